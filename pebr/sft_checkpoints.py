"""Intermediate checkpoints of the warm-up SFT: Trainer's own (weights, optimizer, schedule, RNG, data position),
published whole, rotated, and resumed only by the run that wrote them.

    {output_dir}.checkpoints/
        checkpoint-{N}/     Trainer's files, then pebr_sft.json (the settings and data it belongs to)
        .partial/           where Trainer writes the next one; renamed into place once whole

Trainer writes a checkpoint in place, so a kill during a save would leave the newest `checkpoint-N` half written
and the resume would fail on it (or load it). Here a checkpoint appears under its name only once complete and
flushed to disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from transformers import Trainer, TrainerCallback

from pebr.checkpoint import delete_checkpoint
from pebr.config import ConfigError
from pebr.utils.jsonio import atomic_write_json, finish_tree, fsync_directory

if TYPE_CHECKING:
    from pebr.sft import SFTConfig

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # Trainer's naming
CHECKPOINT_META = "pebr_sft.json"
PARTIAL = ".partial"
# Settings a resumed run may change: nothing a checkpoint holds depends on them (the checkpoints are found through
# output_dir, whichever way it is spelt).
RESUMABLE_CHANGES = ("output_dir", "save_steps", "save_total_limit", "resume", "logging_steps")
# Inputs compared by what they hold, not where they are: a checkpoint copied to another machine, or a run from
# another clone, resumes. The images are taken as the data file names them.
INPUTS = ("model_path", "data", "image_dir", "format_prompt")


# The files a model folder's weights, tokenizer, processor and chat template are made of (not a README or notes).
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".jinja", ".model", ".txt", ".tiktoken", ".py")


def _sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def run_identity(cfg: SFTConfig) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it: every setting that shapes training, and the
    contents of its inputs: the data file (the same path may hold a newly filtered file), the format prompt, and
    the base model, each of its own files (MODEL_FILE_SUFFIXES: weights, configs, tokenizer, chat template; not a
    README). Its config and weight sizes alone took another fine-tune of the same architecture for the same model:
    the resume went on from the checkpoint's weights, never the named base's. Hashing a 7 B model's 15 GB takes seconds to a minute,
    once a run, and only when it keeps checkpoints."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES + INPUTS}
    files = sorted(name for name in os.listdir(cfg.model_path)
                   if name.endswith(MODEL_FILE_SUFFIXES) and os.path.isfile(os.path.join(cfg.model_path, name)))
    settings["the base model (model_path)"] = {name: _sha256(os.path.join(cfg.model_path, name)) for name in files}
    settings["the contents of format_prompt"] = _sha256(cfg.format_prompt) if cfg.format_prompt else None
    settings["the contents of data"] = _sha256(cfg.data)
    return json.loads(json.dumps({"settings": settings}))  # as it reads back from the file


def remove_checkpoints(root: str) -> None:
    """Delete the checkpoints folder; when `root` is a link (to a larger disk, say), the link stays and the folder
    it points to is emptied."""
    if not os.path.islink(root):
        delete_checkpoint(root)
        return
    for name in os.listdir(root):
        delete_checkpoint(os.path.join(root, name))


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of the published checkpoints under `root`, oldest first."""
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        match = CHECKPOINT_NAME.match(name)
        if match and os.path.isfile(os.path.join(root, name, CHECKPOINT_META)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def find_resume_checkpoint(cfg: SFTConfig, identity: dict[str, Any] | None) -> str | None:
    """The newest checkpoint of this run to continue from, or None to start afresh (with `resume` off, after
    deleting the checkpoints). `identity` (`run_identity`) may be None only when `cfg.checkpoint_dir` is absent.

    Raises:
        ConfigError: the newest checkpoint was written with other settings or another data file.
    """
    root = cfg.checkpoint_dir
    # The whole folder, renamed for deletion once the output was complete by a run killed before it was gone.
    shutil.rmtree(root + ".deleting", ignore_errors=True)
    if not cfg.resume:
        if os.path.isdir(root):
            logger.warning("SFT: resume is off, deleting the checkpoints in %s", root)
            remove_checkpoints(root)
        return None
    for name in os.listdir(root) if os.path.isdir(root) else []:  # a save or a rotation that a kill interrupted
        if name == PARTIAL or name.endswith(".deleting"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    found = complete_checkpoints(root)
    if not found:
        return None
    path = found[-1][1]
    with open(os.path.join(path, CHECKPOINT_META), encoding="utf-8") as handle:
        saved = json.load(handle)
    ours, theirs = identity["settings"], saved.get("settings", {})
    base = theirs.get("the base model (model_path)")
    if isinstance(base, dict) and set(base) != {"config", "weights"}:  # (a README hashed by an earlier version)
        theirs["the base model (model_path)"] = {k: v for k, v in base.items() if k.endswith(MODEL_FILE_SUFFIXES)}
    if set(theirs.get("the base model (model_path)", {})) == {"config", "weights"}:
        raise ConfigError(f"sft: the checkpoint {path} was saved by an earlier version of this trainer, which told "
                          "base models apart by their config and weight sizes only; pass --no-resume to delete its "
                          "checkpoints and start again")
    changed = [key if key.startswith("the ") else f"{key}: {theirs.get(key)!r} -> {ours.get(key)!r}"
               for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]
    if changed:
        raise ConfigError(f"sft: the checkpoint {path} belongs to a run with other settings ({'; '.join(changed)}); "
                          "rerun with those to continue it, or pass --no-resume to delete its checkpoints and start "
                          "again")
    return path


class PublishCheckpoints(TrainerCallback):
    """Moves each checkpoint Trainer has written under `root/.partial` into `root` by a rename, then deletes all
    but the `keep` newest. Trainer's `output_dir` must be `partial_dir(root)`."""

    def __init__(self, root: str, identity: dict[str, Any], keep: int) -> None:
        self.root, self.identity, self.keep = root, identity, keep

    @staticmethod
    def partial_dir(root: str) -> str:
        return os.path.join(root, PARTIAL)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
        if state.global_step >= state.max_steps:
            control.should_save = False  # the finished model is written next; this checkpoint would only cost time
        return control

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
        if not state.is_world_process_zero:  # one process publishes what Trainer wrote
            return control
        name = f"checkpoint-{state.global_step}"
        written = os.path.join(args.output_dir, name)
        atomic_write_json(os.path.join(written, CHECKPOINT_META), self.identity)
        finish_tree(written)
        final = os.path.join(self.root, name)
        if os.path.exists(final):
            delete_checkpoint(final)
        os.replace(written, final)
        fsync_directory(self.root)  # the rename on disk before the checkpoints it supersedes are deleted
        for _, old in complete_checkpoints(self.root)[: -self.keep]:
            delete_checkpoint(old)
        return control


class WarmupTrainer(Trainer):
    """Trainer that leaves the model's weights alone on resume: the caller loads them from the checkpoint with
    `from_pretrained`. transformers 5.19's own resume reads the checkpoint's state dict without the key
    conversion `from_pretrained` applies, and Qwen2.5-VL is saved under its original names (`visual.*`,
    `model.layers.*` for `model.visual.*`, `model.language_model.layers.*`): no key matched, a warning was all,
    and the run went on from the base weights with the checkpoint's optimizer state (transformers issue 43701)."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        pass
