"""Checkpoints: sharded safetensors per rank, atomic step directories, rotation, merging.

Layout of one checkpoint (the directory appears only once it is complete):

    {checkpoint_dir}/global_step_{k}/
        trainer_state.json                   step, data-loader state, metrics bookkeeping
        actor/
            model_world_size_{W}_rank_{r}.safetensors    this rank's shards of every parameter
            optim_world_size_{W}_rank_{r}.safetensors    this rank's AdamW moments and steps
            extra_state_world_size_{W}_rank_{r}.json     lr schedule and optimizer param groups
            shard_index.json                             global shape and sharding of each tensor
            huggingface/                                 config, tokenizer, processor (weights after merging)

A save goes to `global_step_{k}.partial/` and is renamed when every rank has written its files, so a
crash during a save leaves a `.partial` directory that is ignored and cleaned up, never a half
checkpoint that a restart would load. Deleting works the other way round: a checkpoint is first renamed to
`global_step_{k}.deleting/`, then removed, so a crash while deleting never leaves a half checkpoint under
its step's name either. Weights are never pickled: tensors are safetensors, the rest JSON. A training run
holds `{checkpoint_dir}/.lock` while it runs (`run_dir_lock`), so a second run started on the same folder stops
instead of deleting the first one's saves and logs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pebr.cli import UserError
from pebr.utils.jsonio import atomic_write_json, disk_errors_named, exclusive_lock, finish_tree, fsync_directory

if TYPE_CHECKING:  # torch is imported where tensors are handled: the merger's checks and errors come first
    import torch

logger = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^global_step_(0|[1-9]\d*)$")  # as step_dir writes it: "global_step_05" is not step 5
STATE_FILE = "trainer_state.json"
INDEX_FILE = "shard_index.json"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete or inconsistent."""

    label = "checkpoint error"


class DamagedCheckpoint(CheckpointError):
    """A published checkpoint whose files are missing or unreadable (a disk fault, or a hand edit)."""


def step_dir(checkpoint_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir, f"global_step_{step}")


def partial_dir(checkpoint_dir: str, step: int) -> str:
    return step_dir(checkpoint_dir, step) + ".partial"


def complete_steps(checkpoint_dir: str) -> list[int]:
    """Steps with a complete checkpoint, ascending."""
    if not os.path.isdir(checkpoint_dir):
        return []
    steps = []
    for name in os.listdir(checkpoint_dir):
        m = STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(checkpoint_dir, name, STATE_FILE)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    steps = complete_steps(checkpoint_dir)
    return step_dir(checkpoint_dir, steps[-1]) if steps else None


def remove_partial(checkpoint_dir: str) -> list[str]:
    """Delete leftovers of interrupted saves and deletions; returns what was removed."""
    removed = []
    if os.path.isdir(checkpoint_dir):
        for name in os.listdir(checkpoint_dir):
            if name.endswith((".partial", ".deleting")):
                shutil.rmtree(os.path.join(checkpoint_dir, name), ignore_errors=True)
                if os.path.exists(os.path.join(checkpoint_dir, name)):  # (its name says it is no checkpoint)
                    logger.warning("could not remove all of %s (an interrupted save or deletion)",
                                   os.path.join(checkpoint_dir, name))
                else:
                    removed.append(name)
    return removed


def delete_checkpoint(path: str) -> None:
    """Remove a checkpoint directory so that no crash leaves part of it under its own name."""
    doomed = path + ".deleting"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def finalize(checkpoint_dir: str, step: int, trainer_state: dict, save_limit: int) -> str:
    """Write the trainer state into the partial directory, publish it by renaming, then rotate.

    Rotation keeps the `save_limit` highest steps up to this one and never touches a later step (the
    trainer refuses to start a run below another run's checkpoints, see `later_steps`).
    """
    tmp = partial_dir(checkpoint_dir, step)
    try:
        check_shards(os.path.join(tmp, "actor"), optimizer=True)
    except CheckpointError as err:
        # Published, it would become `latest` and rotation would delete the complete checkpoints before it.
        raise CheckpointError(f"the checkpoint of step {step} is incomplete, so it is not published and no earlier "
                              f"one is deleted: {err}. With several nodes, trainer.save_checkpoint_path must be on "
                              "storage that every node writes to (a shared file system)") from err
    atomic_write_json(os.path.join(tmp, STATE_FILE), trainer_state)
    # The shards are flushed as they are written; the Hugging Face files and the directories are not. After a power
    # cut a published checkpoint must hold every file whole, and the rename must be on disk before rotation
    # deletes the checkpoints it supersedes.
    finish_tree(tmp)
    final = step_dir(checkpoint_dir, step)
    if os.path.exists(final):  # a re-save of the same step (e.g. after resume) replaces it whole
        delete_checkpoint(final)
    os.replace(tmp, final)
    fsync_directory(checkpoint_dir)
    rotate(checkpoint_dir, step, save_limit)
    return final


def rotate(checkpoint_dir: str, step: int, save_limit: int) -> None:
    """Delete the complete checkpoints before `step` beyond the `save_limit` highest up to it (none when
    save_limit <= 0). Also run at a resume, where a run stopped between publishing a save and rotating."""
    if save_limit > 0:
        earlier = [s for s in complete_steps(checkpoint_dir) if s < step]
        for old in earlier[: max(0, len(earlier) - (save_limit - 1))]:
            delete_checkpoint(step_dir(checkpoint_dir, old))


def read_trainer_state(step_path: str) -> dict[str, Any]:
    """The trainer state a checkpoint was published with (its step, data order, metrics).

    Raises:
        CheckpointError: naming the file, when it is unreadable, not JSON, or holds no integer global_step.
    """
    path = os.path.join(step_path, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as err:  # (a truncated file: a JSONDecodeError, which is a ValueError)
        raise DamagedCheckpoint(f"{path} cannot be read ({err}): the checkpoint is damaged") from err
    step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        raise DamagedCheckpoint(f"{path} has no integer 'global_step' (found {step!r:.60}): the checkpoint is damaged")
    return state


def later_steps(checkpoint_dir: str, step: int) -> list[int]:
    """Complete checkpoints in `checkpoint_dir` of a step after `step`: another run's, when a run starts at
    `step` (auto-resume would take them for this run's, and rotation would keep them over this run's)."""
    return [s for s in complete_steps(checkpoint_dir) if s > step]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _placement(t: torch.Tensor) -> dict:
    if hasattr(t, "placements"):
        p = t.placements[0]
        dim = getattr(p, "dim", None)
        return {"shape": list(t.shape), "shard_dim": dim}
    return {"shape": list(t.shape), "shard_dim": None}


def _save_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors to a safetensors file atomically and durably (fsynced before the rename).

    Tensors that share memory (tied embeddings, whose local shards already sit in CPU memory on CPU runs
    and with CPU offload) are copied apart, since safetensors refuses shared storage.
    """
    from safetensors.torch import save_file

    seen: set[int] = set()
    host = {}
    for name, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        pointer = value.untyped_storage().data_ptr()
        host[name] = value.clone() if pointer in seen and value.numel() else value
        seen.add(pointer)
    tmp = path + ".tmp"
    try:
        with disk_errors_named(path):  # (safetensors' own error says "No space left on device", naming no file)
            save_file(host, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)  # (on the disk it filled: the next save, or the merge, needs the room)
        raise
    os.replace(tmp, path)


def save_sharded(actor_dir: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 scheduler: Any, rank: int, world_size: int, lora: dict | None = None,
                 freeze_vision_tower: bool = False) -> None:
    """Write this rank's shards of the model (and optimizer) into `actor_dir`.

    `lora` ({"rank", "alpha", "target_modules"} of a model with LoRA adapters) goes into the shard index, which
    the merger reads to fold the adapters into the weights and a resume checks against its settings;
    `freeze_vision_tower` too (which parameters the optimizer state covers).
    """
    import torch
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    os.makedirs(actor_dir, exist_ok=True)
    tag = f"world_size_{world_size}_rank_{rank}"
    model_sd = get_model_state_dict(model)
    _save_tensors(os.path.join(actor_dir, f"model_{tag}.safetensors"), {k: _local(v) for k, v in model_sd.items()})
    if rank == 0:
        source_dtype = getattr(model, "source_dtype", None)  # the base model's (load_hf_model), for the merger
        index = {"world_size": world_size, "tensors": {k: _placement(v) for k, v in model_sd.items()},
                 "freeze_vision_tower": bool(freeze_vision_tower),
                 "dtype": str(source_dtype).replace("torch.", "") if source_dtype is not None else None}
        if lora:
            index["lora"] = lora
        atomic_write_json(os.path.join(actor_dir, INDEX_FILE), index)
    if optimizer is None:
        return
    optim_sd = get_optimizer_state_dict(model, optimizer)
    flat = {}
    for fqn, state in optim_sd["state"].items():
        for name, value in state.items():
            flat[f"{fqn}::{name}"] = _local(value) if torch.is_tensor(value) else torch.tensor(value)
    _save_tensors(os.path.join(actor_dir, f"optim_{tag}.safetensors"), flat)
    extra = {"param_groups": optim_sd["param_groups"], "scheduler": scheduler.state_dict() if scheduler else None}
    atomic_write_json(os.path.join(actor_dir, f"extra_state_{tag}.json"), extra)


def _with_local(template: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    if hasattr(template, "placements"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local.to(template.device, template.dtype), template.device_mesh,
                                  template.placements, shape=template.shape, stride=template.stride())
    return local.to(template.device, template.dtype)


def check_resumable(checkpoint_dir: str, world_size: int, lora: dict | None = None,
                    freeze_vision_tower: bool = False, weights_only: bool = False) -> None:
    """Refuse, before any worker starts, a checkpoint the workers could not resume from.

    Args:
        lora: the run's LoRA settings ({"rank", "alpha", "target_modules"}), None without LoRA.
        freeze_vision_tower: the run's worker.actor.model.freeze_vision_tower.
        weights_only: the run loads the weights alone (trainer.val_only): no optimizer state is needed.

    Raises:
        CheckpointError: it was saved by another number of workers, with other LoRA settings or another
            vision-tower freezing, or without optimizer state (trainer.save_model_only), or a file of it is missing.
    """
    actor_dir = os.path.join(checkpoint_dir, "actor")
    index = read_index(actor_dir)
    saved = index["world_size"]
    if index.get("lora") != lora:
        raise CheckpointError(f"{checkpoint_dir} was saved with LoRA settings {index.get('lora')} and this run has "
                              f"{lora} (worker.actor.model.lora_rank, lora_alpha, lora_target_modules); resume with "
                              "the saved ones, or start a new run in another trainer.save_checkpoint_path")
    if saved != world_size:
        raise CheckpointError(f"{checkpoint_dir} was saved by {saved} workers and resumes only with as many "
                              f"(trainer.nnodes x trainer.n_gpus_per_node = {world_size} now)")
    if weights_only:
        check_shards(actor_dir, optimizer=False)
        return
    frozen = index.get("freeze_vision_tower")  # absent from checkpoints of earlier versions
    if not lora and frozen is not None and frozen != freeze_vision_tower:
        raise CheckpointError(f"{checkpoint_dir} was saved with worker.actor.model.freeze_vision_tower={frozen} and "
                              f"this run has {freeze_vision_tower}: its optimizer state covers other parameters. "
                              "Resume with the saved setting, or start a new run in another "
                              "trainer.save_checkpoint_path")
    if not os.path.isfile(os.path.join(actor_dir, f"optim_world_size_{world_size}_rank_0.safetensors")):
        raise CheckpointError(f"{checkpoint_dir} holds the weights only (saved with trainer.save_model_only=true), "
                              "so training cannot resume from it; to start a new run from these weights, merge "
                              "them (scripts/model_merger.py), set worker.actor.model.model_path to the merged "
                              "model and trainer.save_checkpoint_path to a new directory")
    check_shards(actor_dir, optimizer=True)  # every rank's files: a lost one would fail only in the workers


LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_dir_lock(checkpoint_dir: str) -> Iterator[None]:
    """Hold `checkpoint_dir`'s lock file for the block: one training run per folder.

    A second run on a live run's folder removed its in-flight save, trimmed its metrics file and purged its
    TensorBoard steps before failing; now it stops first. The lock is the kernel's (flock), so a run that dies
    leaves nothing to clean up.

    Raises:
        CheckpointError: another process holds the lock, naming the folder and the holder.
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    path = os.path.join(checkpoint_dir, LOCK_FILE)
    with exclusive_lock(path, lambda holder: CheckpointError(
            f"{checkpoint_dir} is in use by another training run ({holder}, holding {path}): wait for it to end, or "
            "stop it, before resuming; or set another trainer.save_checkpoint_path")):
        yield


def load_sharded(actor_dir: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 scheduler: Any, rank: int, world_size: int) -> None:
    """Restore this rank's shards written by `save_sharded` with the same world size."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

    tag = f"world_size_{world_size}_rank_{rank}"
    model_file = os.path.join(actor_dir, f"model_{tag}.safetensors")
    if not os.path.isfile(model_file):
        found = sorted(f for f in os.listdir(actor_dir) if f.startswith("model_world_size_")) if os.path.isdir(actor_dir) else []
        if not found:  # not another world size: the folder went away, or was emptied, after the run picked it
            raise CheckpointError(f"{model_file} is missing, and {actor_dir} holds no model shards at all: was the "
                                  "checkpoint deleted while this run started?")
        if any(f.startswith(f"model_world_size_{world_size}_") for f in found):
            raise CheckpointError(f"{model_file} is missing (found {found[:4]}): the checkpoint is incomplete")
        raise CheckpointError(f"{model_file} is missing (found {found[:4]}); a checkpoint resumes with the "
                              f"world size it was saved with ({world_size} now)")
    loaded = load_file(model_file)
    current = get_model_state_dict(model)
    missing = set(current) - set(loaded)
    if missing:
        raise CheckpointError(f"{model_file} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    saved = read_index(actor_dir)["tensors"]
    other = [(k, saved[k]["shape"], list(v.shape)) for k, v in current.items()
             if k in saved and saved[k].get("shape") != list(v.shape)]
    if other:  # torch would say so per shard, printing the model's shard shape on both sides
        name, was, now = other[0]
        raise CheckpointError(f"{actor_dir} holds another model: {len(other)} tensors differ in shape, e.g. {name} "
                              f"{was} in the checkpoint, {now} in worker.actor.model.model_path's model")
    set_model_state_dict(model, {k: _with_local(v, loaded[k]) for k, v in current.items()})
    if optimizer is None:
        return
    flat = load_file(os.path.join(actor_dir, f"optim_{tag}.safetensors"))
    with open(os.path.join(actor_dir, f"extra_state_{tag}.json")) as f:
        extra = json.load(f)
    configured = [{k: g[k] for k in _CONFIGURED if k in g} for g in optimizer.param_groups]
    template = get_optimizer_state_dict(model, optimizer)
    state: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        fqn, name = key.split("::", 1)
        ref = template["state"].get(fqn, {}).get(name)
        state.setdefault(fqn, {})[name] = _with_local(ref, value) if ref is not None and torch.is_tensor(ref) else value
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": extra["param_groups"]})
    if scheduler is not None and extra.get("scheduler"):
        scheduler.load_state_dict(extra["scheduler"])
    _apply_configured(optimizer, scheduler, configured, actor_dir, rank)


# Optimizer settings the run's config gives (initial_lr: the schedule's base lr, worker.actor.optim.lr). Loading
# a checkpoint's param_groups overwrote them: a resume with another lr ran on the old one, while config.yaml
# recorded the new one.
_CONFIGURED = ("initial_lr", "weight_decay", "betas", "eps")


def _apply_configured(optimizer: torch.optim.Optimizer, scheduler: Any, configured: list[dict[str, Any]],
                      actor_dir: str, rank: int) -> None:
    """Put the configured settings back after a load (the moments and the schedule's position stay the
    checkpoint's) and set the current lr from them; say which ones differ from the checkpoint's."""
    import torch

    changed = []
    for i, (group, conf) in enumerate(zip(optimizer.param_groups, configured)):
        for key, value in conf.items():
            saved = tuple(group[key]) if isinstance(group[key], list) else group[key]
            if saved != value:
                changed.append(f"group {i} {key} {saved} -> {value}")
            group[key] = value
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() returns; no setter
    if changed and rank == 0:
        logger.warning("%s: the configured optimizer settings replace the checkpoint's: %s", actor_dir,
                       "; ".join(changed))


def read_index(actor_dir: str) -> dict[str, Any]:
    """The shard index of an actor checkpoint: {"world_size": W, "tensors": {name: {shape, shard_dim}}}.

    Raises:
        CheckpointError: naming the file when it is missing, not JSON or lacks a key.
    """
    import torch

    path = os.path.join(actor_dir, INDEX_FILE)
    try:
        with open(path) as f:
            index = json.load(f)
        if not isinstance(index.get("world_size"), int) or not isinstance(index.get("tensors"), dict):
            raise ValueError("no integer 'world_size' and 'tensors' mapping")
        for name, info in index["tensors"].items():  # the merger and the resume checks index into each entry
            shape, dim = (info.get("shape"), info.get("shard_dim", "?")) if isinstance(info, dict) else (None, "?")
            if not (isinstance(shape, list) and all(isinstance(n, int) for n in shape)
                    and (dim is None or isinstance(dim, int) and 0 <= dim < max(len(shape), 1))):
                raise ValueError(f"tensor {name!r} has no integer 'shape' list and 'shard_dim' (an axis or null): "
                                 f"{info!r:.120}")
        dtype = index.get("dtype")
        if dtype is not None and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"'dtype' {dtype!r} is not a torch dtype")
    except (OSError, ValueError, AttributeError) as err:
        raise DamagedCheckpoint(f"{path} cannot be read ({err}): the checkpoint is damaged; use another "
                                "global_step_* directory") from err
    return index


def check_complete(actor_dir: str) -> int:
    """Return the world size of a complete sharded actor checkpoint, or raise CheckpointError."""
    actor_dir = os.path.abspath(actor_dir)
    step = os.path.dirname(actor_dir)
    # A save is published by renaming global_step_k.partial when complete, and a rotation renames a checkpoint
    # to .deleting first; any other name holds a whole checkpoint (or an actor directory copied out of one,
    # without its trainer_state.json: still whole, which the index and shards below confirm).
    if step.endswith((".partial", ".deleting")):
        raise CheckpointError(f"{actor_dir} belongs to an incomplete checkpoint ({os.path.basename(step)}): it "
                              "was interrupted while saving or deleting; use an earlier global_step_* directory")
    return check_shards(actor_dir)


def check_shards(actor_dir: str, optimizer: bool = False) -> int:
    """Return the world size when the shard index and every rank's model shard are in `actor_dir`, and with
    `optimizer` every rank's optimizer state as well if rank 0 saved one; else raise CheckpointError."""
    index_path = os.path.join(actor_dir, INDEX_FILE)
    if not os.path.isfile(index_path):
        raise CheckpointError(f"{index_path} is missing: not a sharded actor checkpoint")
    world = read_index(actor_dir)["world_size"]
    names = [f"model_world_size_{world}_rank_{r}.safetensors" for r in range(world)]
    if optimizer and os.path.isfile(os.path.join(actor_dir, f"optim_world_size_{world}_rank_0.safetensors")):
        names += [f"{kind}_world_size_{world}_rank_{r}.{ext}" for r in range(world)
                  for kind, ext in (("optim", "safetensors"), ("extra_state", "json"))]
    for name in names:
        path = os.path.join(actor_dir, name)
        if not os.path.isfile(path):
            raise DamagedCheckpoint(f"{path} is missing: the checkpoint is incomplete")
    return world


def merge_shards(actor_dir: str) -> dict[str, torch.Tensor]:
    """Reassemble full tensors from the per-rank shards (FSDP2 shards dim 0 into equal chunks)."""
    import torch
    from safetensors import safe_open

    world = check_complete(actor_dir)
    index = read_index(actor_dir)["tensors"]
    handles = []
    for r in range(world):
        path = os.path.join(actor_dir, f"model_world_size_{world}_rank_{r}.safetensors")
        try:
            handles.append(safe_open(path, "pt"))
        except Exception as err:  # safetensors raises its own error type for a damaged header
            raise DamagedCheckpoint(f"{path} cannot be read ({err}): the checkpoint is damaged; use another "
                                    "global_step_* directory") from err

    def read(rank: int, name: str) -> torch.Tensor:
        try:
            return handles[rank].get_tensor(name)
        except Exception as err:  # safetensors' own error type: a tensor the index names is not in the shard
            raise DamagedCheckpoint(f"{actor_dir}/model_world_size_{world}_rank_{rank}.safetensors has no readable "
                                    f"tensor {name!r} ({err}), which {INDEX_FILE} names: the checkpoint is damaged; "
                                    "use another global_step_* directory") from err

    full = {}
    for name, info in index.items():
        dim = info["shard_dim"]
        if dim is None:
            tensor = read(0, name)
        else:
            parts = [read(r, name) for r in range(world)]
            for rank, part in enumerate(parts):
                _check_part(part, info["shape"], dim, name,
                            f"{actor_dir}/model_world_size_{world}_rank_{rank}.safetensors")
            tensor = torch.cat([p for p in parts if p.numel() or p.dim() > 0], dim=dim)
        if list(tensor.shape) != info["shape"]:
            raise CheckpointError(f"{actor_dir}: merged {name} has shape {list(tensor.shape)}, expected {info['shape']}")
        full[name] = tensor
    return full


def _check_part(part: torch.Tensor, shape: list[int], dim: int, name: str, path: str) -> None:
    """A rank's part of `name` must match the index's shape on every axis but the sharded one, which no part may
    exceed: torch.cat said only "Sizes of tensors must match", naming neither the file nor the tensor."""
    if part.numel() == 0 and part.dim() == 1:
        return  # an empty rank's share as a 1-D tensor, which torch.cat skips whatever the other axes
    expected = [n if axis != dim else "*" for axis, n in enumerate(shape)]
    found = list(part.shape)
    if (len(found) != len(shape) or found[dim] > shape[dim]
            or any(a != b for axis, (a, b) in enumerate(zip(found, shape)) if axis != dim)):
        raise DamagedCheckpoint(f"{path}: its part of {name!r} has shape {found}, which does not fit the shape "
                                f"{shape} that {INDEX_FILE} records (expected {expected}, axis {dim} split among "
                                "the ranks): the checkpoint is damaged; use another global_step_* directory")
