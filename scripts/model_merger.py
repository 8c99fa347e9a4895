"""Merge a sharded actor checkpoint into a Hugging Face model directory.

    python scripts/model_merger.py --local_dir checkpoints/easy_r1/exp/global_step_10/actor [--target_dir DIR]
    python scripts/model_merger.py --latest_in checkpoints/easy_r1/exp     # the newest complete checkpoint
    python scripts/model_merger.py --latest_in RUN_DIR --adapter_dir DIR   # a LoRA run's adapters for peft

The default target is `<local_dir>/huggingface`, which already holds the config, tokenizer and processor
saved with the checkpoint; the merged weights are written there as safetensors, so transformers and
vLLM load the directory as it is. A checkpoint trained with LoRA is written as a plain model, its adapters
folded into the weights; `--adapter_dir` writes its adapters alone as a peft adapter instead (a few MB, for
`PeftModel.from_pretrained(base_model, DIR)`). An incomplete checkpoint (interrupted save) is refused.

A finished merge leaves `merged_from.json` in the target: the checkpoint's shard files (size, mtime) and the
dtype. A second merge of the same checkpoint into the same target is then skipped (the stage-2 recipe merges
stage 1's newest checkpoint at every start, and rewriting a 7B model takes minutes); `--force` merges anyway.
A target that holds a model without that file (the base model, say) is refused unless `--force`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pebr.checkpoint import (INDEX_FILE, STATE_FILE, STEP_DIR, CheckpointError, check_complete,  # noqa: E402
                             latest_checkpoint, merge_shards, read_index)
from pebr.utils.jsonio import DISK_ERRNOS, atomic_write_json, disk_errors_named, replace_directory  # noqa: E402
from pebr.workers.lora import fold_lora, peft_adapter, scaling  # noqa: E402

# Files of a sharded checkpoint (model, optimizer, extra state of each rank).
SHARD_PREFIXES = ("model_world_size_", "optim_world_size_", "extra_state_world_size_")
DTYPES = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


MARKER = "merged_from.json"
STAGING = ".merging"
# What export_adapter writes (and alone may replace).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


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
        force: merge even when the target holds a finished merge of these very shards.

    A new target is written as `<target_dir>.merging` and renamed, so it is complete or absent. An existing
    one (the default `<local_dir>/huggingface`, a link, a mount point) is written where it is: the files are
    staged in its `.merging/` and renamed over the old ones, the previous model's other weight files are
    removed after that (a stale shard index would make loaders look for shards that are gone), and
    `merged_from.json` comes last; other files in it are left alone. A link is followed, not replaced.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    hf_dir = os.path.join(local_dir, "huggingface")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise CheckpointError(f"{hf_dir}/config.json is missing: not an actor checkpoint directory")
    target_dir = target_dir or hf_dir
    if os.path.exists(target_dir) and not os.path.isdir(target_dir):
        raise CheckpointError(f"--target_dir {target_dir} is a file; name a directory")
    if os.path.isdir(target_dir) and any(f in (INDEX_FILE, STATE_FILE) or f.startswith(SHARD_PREFIXES)
                                         or STEP_DIR.match(f) for f in os.listdir(target_dir)):
        raise CheckpointError(f"--target_dir {target_dir} holds a sharded checkpoint or a training run's "
                              "global_step_* folders, among which a merged model does not belong; name another "
                              "directory (the default is <local_dir>/huggingface)")
    made_from = provenance(local_dir, dtype)
    if (not force and os.path.isdir(target_dir) and not os.path.samefile(target_dir, hf_dir)
            and _model_weight_files(target_dir) and not os.path.exists(os.path.join(target_dir, MARKER))):
        raise CheckpointError(f"--target_dir {target_dir} holds a model this script did not merge (no {MARKER}), "
                              "whose weights a merge would replace; name another directory (or --force)")
    if not force and already_merged(target_dir, made_from):
        print(f"model_merger: {target_dir} already holds this checkpoint's merge (--force merges again)")
        return target_dir
    state = merge_shards(local_dir)
    index = read_index(local_dir)
    adapters = index.get("lora")
    if adapters:  # trained with LoRA: the adapters folded into plain weights, under the base model's names
        state = dict(fold_lora(state.items(), scaling(adapters)))
    try:
        config = AutoConfig.from_pretrained(hf_dir)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{hf_dir}/config.json cannot be read ({err})") from err
    # "auto": the base model's dtype as the trainer recorded it; config.json would carry an earlier merge's --dtype.
    saved_dtype = index.get("dtype") or getattr(config, "dtype", None)
    name = DTYPES[dtype] or str(saved_dtype or "float32").replace("torch.", "")
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"the shards in {local_dir} do not fit the model of {hf_dir}/config.json: {err}") from err
    model = model.to(getattr(torch, name))
    if os.path.isfile(os.path.join(hf_dir, "generation_config.json")):  # the base model's stop tokens, sampling
        model.generation_config = GenerationConfig.from_pretrained(hf_dir)
    real_target = os.path.realpath(target_dir)  # a link's files go where it points
    exists = os.path.isdir(real_target)
    # Staged on the target's own file system: inside an existing target (a mount point, a link to another disk),
    # beside a new one.
    staging = os.path.join(real_target, STAGING) if exists else real_target + STAGING
    shutil.rmtree(staging, ignore_errors=True)
    with disk_errors_named(staging):
        model.save_pretrained(staging, safe_serialization=True)
    into_checkpoint = os.path.isdir(target_dir) and os.path.samefile(target_dir, hf_dir)
    if not into_checkpoint:
        # The tokenizer, processor and chat template; not the config, which save_pretrained wrote with the dtype.
        skip = _model_weight_files(hf_dir) | {MARKER} | set(os.listdir(staging))
        for f in sorted(set(os.listdir(hf_dir)) - skip):
            if os.path.isfile(os.path.join(hf_dir, f)):
                shutil.copy2(os.path.join(hf_dir, f), os.path.join(staging, f))
    written = sorted(os.listdir(staging))
    weights = {f: _file_stat(os.path.join(staging, f)) for f in sorted(_model_weight_files(staging))}
    if not exists:
        atomic_write_json(os.path.join(staging, MARKER), {**made_from, "weights": weights})
        os.replace(staging, real_target)  # complete or absent
        return target_dir
    marker = os.path.join(real_target, MARKER)
    # First: an interrupted replacement must not pass for a finished merge, yet stays known as this script's.
    atomic_write_json(marker, {"unfinished": True})
    stale = _model_weight_files(real_target) - set(written)  # a sharded model's index and shards, say
    for f in written:  # each rename replaces its old file whole; the old weights stay until the new are in
        os.replace(os.path.join(staging, f), os.path.join(real_target, f))
    for f in stale:  # a stale shard index would make loaders look for shards that are gone
        os.remove(os.path.join(real_target, f))
    shutil.rmtree(staging, ignore_errors=True)
    atomic_write_json(marker, {**made_from, "weights": weights})  # last: the merge is finished
    return target_dir


def export_adapter(local_dir: str, adapter_dir: str) -> str:
    """Write a LoRA checkpoint's adapters as a peft adapter directory (adapter_config.json and
    adapter_model.safetensors), through `<adapter_dir>.writing` and a rename; returns the directory.

    Raises:
        CheckpointError: the checkpoint is incomplete or was not trained with LoRA, or adapter_dir is a file.
    """
    from safetensors.torch import save_file

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
    config.save_pretrained(staging)
    save_file(tensors, os.path.join(staging, "adapter_model.safetensors"), metadata={"format": "pt"})
    replace_directory(staging, adapter_dir)  # in place of nothing, an empty directory or an earlier export
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
    """Why `checkpoint` is not its run's last step, or None (it is, or its run did not record its length)."""
    with open(os.path.join(checkpoint, STATE_FILE)) as f:
        state = json.load(f)
    step, total = state.get("global_step"), state.get("total_steps")
    if total is None or step >= total:
        return None
    return (f"{checkpoint} is step {step} of the {total} its run was to train: that run stopped early. Run it again "
            "(it resumes), or name the model to use directly (the stage-2 recipe: MODEL_PATH=...)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--local_dir", help="the global_step_k/actor directory")
    where.add_argument("--latest_in", help="a run's checkpoint directory: merge its newest complete checkpoint")
    parser.add_argument("--target_dir", default=None, help="default: <local_dir>/huggingface")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto")
    parser.add_argument("--force", action="store_true", help="merge again even when the target holds this merge, "
                        "or into a target that holds a model this script did not merge")
    parser.add_argument("--adapter_dir", default=None,
                        help="a LoRA checkpoint: write its adapters here as a peft adapter instead of merging")
    parser.add_argument("--final_only", action="store_true",
                        help="with --latest_in: refuse a newest checkpoint before the run's last step (a run that "
                             "stopped early)")
    args = parser.parse_args(argv)
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
            print(f"model_merger: no complete checkpoint in {args.latest_in}", file=sys.stderr)
            return 2
        unfinished = args.final_only and unfinished_run(latest)
        if unfinished:
            print(f"model_merger: {unfinished}", file=sys.stderr)
            return 2
        local_dir = os.path.join(latest, "actor")
    try:
        if args.adapter_dir:
            out = export_adapter(local_dir, args.adapter_dir)
        else:
            out = merge(local_dir, args.target_dir, args.dtype, args.force)
    except CheckpointError as e:
        print(f"model_merger: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        print(f"model_merger: {e}; the checkpoint is untouched: free space (or choose another --target_dir) and "
              "run it again", file=sys.stderr)
        return 1
    print(f"{'adapters of' if args.adapter_dir else 'merged'} {local_dir} ->")
    print(out)  # the last line is the merged model's directory, for recipes to pick up
    return 0


if __name__ == "__main__":
    sys.exit(main())
