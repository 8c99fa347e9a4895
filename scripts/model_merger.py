"""Merge a sharded actor checkpoint into a Hugging Face model directory.

    python scripts/model_merger.py --local_dir checkpoints/easy_r1/exp/global_step_10/actor [--target_dir DIR]
    python scripts/model_merger.py --latest_in checkpoints/easy_r1/exp     # the newest complete checkpoint
    python scripts/model_merger.py --latest_in RUN_DIR --final_only        # ... only if it is the run's last step
    python scripts/model_merger.py --latest_in RUN_DIR --adapter_dir DIR   # a LoRA run's adapters for peft

The default target is `<local_dir>/huggingface`, which already holds the config, tokenizer and processor
saved with the checkpoint; the merged weights are written there as safetensors, so transformers and
vLLM load the directory as it is. A checkpoint trained with LoRA is written as a plain model, its adapters
folded into the weights; `--adapter_dir` writes its adapters alone as a peft adapter instead (a few MB, for
`PeftModel.from_pretrained(base_model, DIR)`). An incomplete checkpoint (interrupted save), or one whose
huggingface/ folder lacks the tokenizer, processor or chat template, is refused.

The model is written beside the target and takes its place whole (an existing folder is swapped), so the
target holds the old model or the new one, never a mixture; only a mount point, which cannot be renamed, has
its files replaced one by one. A finished merge leaves `merged_from.json` in the target: the checkpoint's shard
files (size, mtime) and the dtype. A second merge of the same checkpoint into the same target is then skipped
(the stage-2 recipe merges stage 1's newest checkpoint at every start, and rewriting a 7B model takes minutes);
`--force` merges anyway. A target that holds a model without that file (the base model, say), a peft adapter
(adapter_config.json) or other *.safetensors / *.bin files is refused unless `--force`, which removes the
adapter and keeps the other files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pebr.checkpoint import (INDEX_FILE, STATE_FILE, STEP_DIR, CheckpointError, check_complete, read_trainer_state,  # noqa: E402
                             latest_checkpoint, merge_shards, read_index)
from pebr.cli import run_cli  # noqa: E402
from pebr.utils.jsonio import (atomic_write_json, disk_errors_named, exclusive_lock,  # noqa: E402
                               finish_tree, replace_directory)

# Files of a sharded checkpoint (model, optimizer, extra state of each rank).
SHARD_PREFIXES = ("model_world_size_", "optim_world_size_", "extra_state_world_size_")
DTYPES = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


MARKER = "merged_from.json"
STAGING = ".merging"
# What export_adapter writes (and alone may replace).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# A peft adapter's files (older peft saves .bin): transformers applies one it finds beside a model's weights.
PEFT_FILES = (*ADAPTER_FILES, "adapter_model.bin")
# Files that loaders may take for weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def provenance(local_dir: str, dtype: str) -> dict:
    """What a merge was made from: the checkpoint's shard files (size, mtime) and the requested dtype."""
    world = check_complete(local_dir)
    files = [INDEX_FILE] + [f"model_world_size_{world}_rank_{r}.safetensors" for r in range(world)]
    return {"checkpoint": os.path.abspath(local_dir), "dtype": dtype,
            "files": {f: _file_stat(os.path.join(local_dir, f)) for f in files}}


def _file_stat(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def already_merged(target_dir: str, made_from: dict) -> bool:
    """The target holds a finished merge of these shards, its weight files as they were written."""
    try:
        with open(os.path.join(target_dir, MARKER)) as f:
            marker = json.load(f)
        written = marker.pop("weights")
        return marker == made_from and all(_file_stat(os.path.join(target_dir, f)) == stat
                                           for f, stat in written.items())
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return False


def merge(local_dir: str, target_dir: str | None = None, dtype: str = "auto", force: bool = False) -> str:
    """Write the merged model; returns the target directory.

    Args:
        local_dir: the `.../global_step_k/actor` directory.
        target_dir: where to write; default `<local_dir>/huggingface`.
        dtype: weight dtype on disk; "auto" keeps the config's dtype, which the trainer saves as the base
            model's (fp32 when it names none).
        force: merge even when the target holds a finished merge of these very shards, a model this script did
            not merge, or a peft adapter (which is then removed) or other weight files (which are kept).

    The model is written whole in `<target>.merging` beside the target and then takes the target's place: a new
    target is renamed into being, an existing one (the default `<local_dir>/huggingface`, a link's folder) is
    swapped whole (`replace_directory`), its other files (the tokenizer, a user's notes) carried over, so a crash
    leaves the old model or the new one, never a mixture. A link is followed, not replaced. A mount point cannot
    be renamed: its files are replaced one by one, `merged_from.json` saying "unfinished" until the last.

    Raises:
        CheckpointError: the checkpoint is incomplete or damaged, its huggingface/ folder lacks the config or
            the processor, or the target holds what a merge must not replace or leave beside the weights.
    """
    hf_dir = os.path.join(local_dir, "huggingface")
    target_dir = target_dir or hf_dir
    for folder in {os.path.realpath(hf_dir), os.path.realpath(target_dir)}:
        _finish_interrupted_swap(folder)  # the checkpoint's own folder too: it is the default target
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise CheckpointError(f"{hf_dir}/config.json is missing: not an actor checkpoint directory")
    if os.path.exists(target_dir) and not os.path.isdir(target_dir):
        raise CheckpointError(f"--target_dir {target_dir} is a file; name a directory")
    if os.path.isdir(target_dir) and any(f in (INDEX_FILE, STATE_FILE) or f.startswith(SHARD_PREFIXES)
                                         or STEP_DIR.match(f) for f in os.listdir(target_dir)):
        raise CheckpointError(f"--target_dir {target_dir} holds a sharded checkpoint or a training run's "
                              "global_step_* folders, among which a merged model does not belong; name another "
                              "directory (the default is <local_dir>/huggingface)")
    made_from = provenance(local_dir, dtype)
    if not force and os.path.isdir(target_dir):
        foreign = _foreign_files(target_dir)
        if foreign:
            raise CheckpointError(
                f"--target_dir {target_dir} holds {foreign}, which are not this model's weight files: transformers "
                "would apply a peft adapter there on top of the merged weights (LoRA twice) and vLLM would read "
                "other *.safetensors as weights; name another directory, or --force (a peft adapter is then "
                "removed, other files are kept)")
        if (not os.path.samefile(target_dir, hf_dir) and _model_weight_files(target_dir)
                and not os.path.exists(os.path.join(target_dir, MARKER))):
            raise CheckpointError(f"--target_dir {target_dir} holds a model this script did not merge (no "
                                  f"{MARKER}), whose weights a merge would replace; name another directory "
                                  "(or --force)")
    real_target = os.path.realpath(target_dir)  # a link's files go where it points
    in_place = os.path.ismount(real_target)
    # Staged on the target's own file system, so that the last step is a rename: beside the folder (a link's
    # folder on another disk included), inside a mount point.
    staging = os.path.join(real_target, STAGING) if in_place else real_target + STAGING
    # Two merges into one target shared the staging folder: one could publish the other's half-written weights.
    with exclusive_lock(staging + ".lock", lambda holder: CheckpointError(
            f"another merge into {target_dir} is running ({holder}): wait for it to end"), remove=True):
        if not force and already_merged(target_dir, made_from):
            print(f"model_merger: {target_dir} already holds this checkpoint's merge (--force merges again)")
            return target_dir  # before transformers loads: a stage-2 recipe run again merged stage 1 again in 5 s
        _config(hf_dir)  # (the processor's loading reads it too, and would blame the processor)
        check_processor(hf_dir)
        model = load_merged_model(local_dir, dtype)
        return _publish(model, local_dir, hf_dir, target_dir, real_target, staging, in_place, made_from)


def _publish(model: Any, local_dir: str, hf_dir: str, target_dir: str, real_target: str, staging: str,
             in_place: bool, made_from: dict) -> str:
    """Save `model` with the checkpoint's tokenizer and processor into `staging`, then put it at the target."""
    into_checkpoint = os.path.isdir(real_target) and os.path.samefile(real_target, hf_dir)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with disk_errors_named(staging):
            model.save_pretrained(staging, safe_serialization=True)
            del model  # (its memory is not needed for the copies)
            if not into_checkpoint:
                # The tokenizer, processor and chat template; not the config, which save_pretrained wrote with the
                # dtype, nor weights of any kind (an adapter there would be applied on top of the merge).
                skip = _model_weight_files(hf_dir) | {MARKER, *PEFT_FILES} | set(os.listdir(staging))
                for f in sorted(set(os.listdir(hf_dir)) - skip):
                    if os.path.isfile(os.path.join(hf_dir, f)) and not f.endswith(WEIGHT_SUFFIXES):
                        shutil.copy2(os.path.join(hf_dir, f), os.path.join(staging, f))
            weights = {f: _file_stat(os.path.join(staging, f)) for f in sorted(_model_weight_files(staging))}
            if in_place:
                _replace_files(staging, real_target, {**made_from, "weights": weights})
                return target_dir
            if os.path.isdir(real_target):
                _carry_over(real_target, staging)
            atomic_write_json(os.path.join(staging, MARKER), {**made_from, "weights": weights})
            finish_tree(staging)  # before the rename publishes it: a power cut must not leave empty weight files
        if os.path.isdir(real_target) and os.listdir(real_target):
            replace_directory(staging, real_target)  # the old folder until the new one is whole
        else:
            os.replace(staging, real_target)  # a new target, or an empty folder (which a rename replaces)
    except BaseException as err:  # a KeyboardInterrupt too: a hidden staging copy of a model is large
        shutil.rmtree(staging, ignore_errors=True)
        _finish_interrupted_swap(real_target)
        if isinstance(err, FileNotFoundError) and not os.path.isdir(hf_dir):
            for folder in (local_dir, os.path.dirname(os.path.abspath(local_dir))):  # made again by the staging
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # (only if empty)
            raise CheckpointError(f"{local_dir} was deleted while it was merged (its run's trainer.save_limit "
                                  "rotates old checkpoints away); merge a newer one") from None
        raise
    return target_dir


def load_merged_model(local_dir: str, dtype: str = "auto") -> Any:
    """The model of an actor checkpoint (its LoRA adapters folded in), in the dtype to save: "auto" is the base
    model's, as the shard index records it (config.json would carry an earlier merge's --dtype).

    Raises:
        CheckpointError: the shards are damaged or do not fit the config of `<local_dir>/huggingface`.
    """
    import torch
    from transformers import GenerationConfig

    from pebr.utils.dtypes import cast_model

    hf_dir = os.path.join(local_dir, "huggingface")
    index = read_index(local_dir)
    model = _fp32_model(local_dir, index)
    # A null dtype is a base that named none (fp32); only an index of an earlier version, which has no "dtype" key,
    # leaves it to config.json, which an earlier --dtype merge into the checkpoint's folder may have rewritten.
    saved_dtype = index["dtype"] if "dtype" in index else getattr(model.config, "dtype", None)
    name = DTYPES[dtype] or str(saved_dtype or "float32").replace("torch.", "")
    # The model holds the only reference to each merged tensor, so each is freed as soon as it is converted: the
    # fp32 state and the converted model are never in memory together (1.5 times the fp32 model for bf16).
    model = cast_model(model, getattr(torch, name))
    if os.path.isfile(os.path.join(hf_dir, "generation_config.json")):  # the base model's stop tokens, sampling
        model.generation_config = GenerationConfig.from_pretrained(hf_dir)
    return model


def _fp32_model(local_dir: str, index: dict) -> Any:
    """The checkpoint's model with its merged tensors as parameters; the merged state dict ends with this
    function, so that nothing but the model refers to them."""
    import torch
    from transformers import AutoModelForImageTextToText

    from pebr.workers.lora import fold_lora, scaling

    hf_dir = os.path.join(local_dir, "huggingface")
    config = _config(hf_dir)
    state = merge_shards(local_dir)
    adapters = index.get("lora")
    if adapters:  # trained with LoRA: the adapters folded into plain weights, under the base model's names
        state = dict(fold_lora(state.items(), scaling(adapters)))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"the shards in {local_dir} do not fit the model of {hf_dir}/config.json: {err}") from err
    # assign=True sets the input and output embeddings apart: a tied model would be saved with both, and loaders
    # that tie them would find an lm_head.weight they do not expect.
    model.tie_weights()
    return model


def _config(hf_dir: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(hf_dir)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{hf_dir}/config.json cannot be read ({err})") from err


def check_processor(hf_dir: str) -> None:
    """Refuse a checkpoint folder without the tokenizer, processor and chat template that inference and vLLM need
    beside the merged weights (transformers loads a one-token tokenizer when its files are missing).

    Raises:
        CheckpointError: naming the folder and what is missing.
    """
    from transformers import AutoProcessor

    names = set(os.listdir(hf_dir))
    remedy = (f"; copy the base model's tokenizer and processor files into {hf_dir} "
              "(AutoProcessor.from_pretrained(BASE_MODEL).save_pretrained(that folder)) and merge again")
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        raise CheckpointError(f"{hf_dir} has no tokenizer (tokenizer.json, or vocab.json and merges.txt): the merged "
                              f"model could not be prompted{remedy}")
    try:
        processor = AutoProcessor.from_pretrained(hf_dir)
    except Exception as err:  # transformers raises OSError, ValueError or TypeError for missing or damaged files
        raise CheckpointError(f"{hf_dir}: its processor cannot be loaded ({str(err).strip()[:300]}){remedy}") from err
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise CheckpointError(f"{hf_dir}: AutoProcessor loads a {type(processor).__name__} there, not a processor of "
                              f"images and text (no processor_config.json or preprocessor_config.json){remedy}")
    if not (getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)):
        raise CheckpointError(f"{hf_dir} has no chat template (chat_template.jinja), which prompts are built "
                              f"with{remedy}")


def _foreign_files(directory: str) -> list[str]:
    """What a merge must not leave beside its weights unasked: a peft adapter's config, and weight files
    (*.safetensors, *.bin) that are not the model's own."""
    own = _model_weight_files(directory)
    return sorted(f for f in os.listdir(directory)
                  if f == PEFT_FILES[0] or (f.endswith(WEIGHT_SUFFIXES) and f not in own))


def _carry_over(old: str, staging: str) -> None:
    """Put the old folder's other files (the tokenizer when merging into the checkpoint's own folder, a user's
    files) into the staging folder, as links where the file system allows: they outlive the old folder's
    removal. Not the old model's weights and marker, nor a peft adapter."""
    skip = _model_weight_files(old) | {MARKER, STAGING, *PEFT_FILES} | set(os.listdir(staging))

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another file system or one without hard links
            shutil.copy2(src, dst)

    for f in sorted(set(os.listdir(old)) - skip):
        src, dst = os.path.join(old, f), os.path.join(staging, f)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
        elif os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            link_or_copy(src, dst)


def _replace_files(staging: str, target: str, marker: dict) -> None:
    """Move the staged files into `target` one by one (a mount point, which cannot be swapped whole). The marker
    says "unfinished" until the last: a kill midway leaves new files beside old ones, which the next merge
    redoes, as that marker is this script's."""
    path = os.path.join(target, MARKER)
    atomic_write_json(path, {"unfinished": True})
    finish_tree(staging)
    written = sorted(os.listdir(staging))
    stale = (_model_weight_files(target) | {f for f in PEFT_FILES if os.path.isfile(os.path.join(target, f))}) \
        - set(written)
    for f in written:  # each rename replaces its old file whole; the old weights stay until the new are in
        os.replace(os.path.join(staging, f), os.path.join(target, f))
    for f in stale:  # a stale shard index would make loaders look for shards that are gone
        os.remove(os.path.join(target, f))
    shutil.rmtree(staging, ignore_errors=True)
    atomic_write_json(path, marker)  # last: the merge is finished


def _finish_interrupted_swap(folder: str) -> None:
    """Put back a folder that a crash left under `<folder>.replaced` between the two renames of
    `replace_directory` (the checkpoint's own huggingface/ folder among them), or remove that old copy when the
    new folder was in place already."""
    old = folder + ".replaced"
    if not os.path.isdir(old) or os.path.islink(old):
        return
    if os.path.lexists(folder):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, folder)


def export_adapter(local_dir: str, adapter_dir: str) -> str:
    """Write a LoRA checkpoint's adapters as a peft adapter directory (adapter_config.json and
    adapter_model.safetensors), through `<adapter_dir>.writing` and a rename; returns the directory.

    Raises:
        CheckpointError: the checkpoint is incomplete or was not trained with LoRA, or adapter_dir is a file.
    """
    from safetensors.torch import save_file

    from pebr.workers.lora import peft_adapter

    _finish_interrupted_swap(os.path.realpath(adapter_dir))
    others = sorted(set(os.listdir(adapter_dir)) - set(ADAPTER_FILES)) if os.path.isdir(adapter_dir) else []
    if os.path.isfile(adapter_dir) or others:
        what = "is a file" if not others else f"holds {others}, not only an earlier export's adapter files"
        raise CheckpointError(f"--adapter_dir {adapter_dir} {what}; name a new or empty directory (an earlier "
                              "export is replaced)")
    settings = read_index(local_dir).get("lora")
    if not settings:
        raise CheckpointError(f"{local_dir} was trained without LoRA (its {INDEX_FILE} has no 'lora' settings): "
                              "there is no adapter to export; merge it as a whole model instead")
    config, tensors = peft_adapter(merge_shards(local_dir), settings)
    config.base_model_name_or_path = _run_model_path(local_dir)
    staging = os.path.realpath(adapter_dir) + ".writing"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with disk_errors_named(staging):
            config.save_pretrained(staging)
            save_file(tensors, os.path.join(staging, "adapter_model.safetensors"), metadata={"format": "pt"})
            finish_tree(staging)  # before the rename publishes it
        replace_directory(staging, adapter_dir)  # in place of nothing, an empty directory or an earlier export
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _finish_interrupted_swap(os.path.realpath(adapter_dir))
        raise
    return adapter_dir


def _run_model_path(local_dir: str) -> str | None:
    """The model a run trained from, as its config.yaml (beside its global_step_* directories) names it."""
    from omegaconf import OmegaConf

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(local_dir))), "config.yaml")
    try:
        model_path = OmegaConf.select(OmegaConf.load(path), "worker.actor.model.model_path")
    except Exception:  # no or another config.yaml (a checkpoint moved alone): peft does not need the name
        return None
    return None if model_path is None else str(model_path)


# The names transformers gives a model's weights: one file, or shards and their index.
_WEIGHT_NAME = re.compile(r"(?:model|pytorch_model)(?:-\d+-of-\d+)?\.(?:safetensors|bin)"
                          r"|(?:model\.safetensors|pytorch_model\.bin)\.index\.json")


def _model_weight_files(directory: str) -> set[str]:
    """The files of the model saved in `directory`: weights under transformers' names and the shards an index
    names. Nothing else (an adapter, embeddings, a user's files) counts."""
    names = {f for f in os.listdir(directory) if _WEIGHT_NAME.fullmatch(f)}
    for index in [f for f in names if f.endswith(".index.json")]:
        try:
            with open(os.path.join(directory, index)) as fh:
                names |= set(json.load(fh)["weight_map"].values()) & set(os.listdir(directory))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # a damaged index: its own name is enough to replace it
    return names


def unfinished_run(checkpoint: str) -> str | None:
    """Why `checkpoint` is not its run's last step, or None (it is, or its run did not record its length).

    Raises:
        CheckpointError: its trainer_state.json is unreadable, not JSON, or lacks an integer global_step (or has
            a total_steps that is no integer).
    """
    earlier = "merge an earlier global_step_* directory with --local_dir"
    try:
        state = read_trainer_state(checkpoint)
    except CheckpointError as err:
        raise CheckpointError(f"{err}; {earlier}") from err
    step, total = state["global_step"], state.get("total_steps")
    if total is not None and (not isinstance(total, int) or isinstance(total, bool)):
        raise CheckpointError(f"{os.path.join(checkpoint, STATE_FILE)} has no integer 'total_steps' (found "
                              f"{total!r:.60}): the checkpoint is damaged; {earlier}")
    if total is None or step >= total:
        return None
    return (f"{checkpoint} is step {step} of the {total} its run was to train: that run stopped early. Run it again "
            "(it resumes), or name the model to use directly (the stage-2 recipe: MODEL_PATH=...)")


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--local_dir", help="the global_step_k/actor directory")
    where.add_argument("--latest_in", help="a run's checkpoint directory: merge its newest complete checkpoint")
    parser.add_argument("--target_dir", default=None, help="default: <local_dir>/huggingface")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto")
    parser.add_argument("--force", action="store_true", help="merge again even when the target holds this merge, "
                        "or into a target that holds a model this script did not merge, a peft adapter (removed) "
                        "or other weight files (kept)")
    parser.add_argument("--adapter_dir", default=None,
                        help="a LoRA checkpoint: write its adapters here as a peft adapter instead of merging")
    parser.add_argument("--final_only", action="store_true",
                        help="with --latest_in: refuse a newest checkpoint before the run's last step (a run that "
                             "stopped early)")
    args = parser.parse_args(argv)
    if args.final_only and not args.latest_in:  # (it was ignored: a checkpoint named by --local_dir is merged as is)
        parser.error("--final_only acts with --latest_in (the newest checkpoint of a run directory)")
    if args.adapter_dir:  # (they were ignored: the adapters came out in float32, no target folder was made)
        given = [flag for flag, value in (("--target_dir", args.target_dir), ("--dtype", args.dtype != "auto"),
                                          ("--force", args.force)) if value]
        if given:
            parser.error(f"{', '.join(given)} acts on a merged model; --adapter_dir writes the adapters alone, as they "
                         "were trained")
    local_dir = args.local_dir
    if args.latest_in:
        latest = latest_checkpoint(args.latest_in)
        if latest is None:
            raise CheckpointError(f"no complete checkpoint in {args.latest_in}")
        unfinished = args.final_only and unfinished_run(latest)
        if unfinished:
            raise CheckpointError(unfinished)
        local_dir = os.path.join(latest, "actor")
    if args.adapter_dir:
        out = export_adapter(local_dir, args.adapter_dir)
    else:
        out = merge(local_dir, args.target_dir, args.dtype, args.force)
    print(f"{'adapters of' if args.adapter_dir else 'merged'} {local_dir} ->")
    print(out)  # the last line is the merged model's directory, for recipes to pick up


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv, on_interrupt="run it again: the checkpoint is untouched (or choose another "
                                           "--target_dir)")


if __name__ == "__main__":
    sys.exit(main())
