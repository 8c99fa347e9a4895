"""Warm-up SFT on sharegpt data: encode chats with assistant-only labels, train with transformers' Trainer.

The paper trains the warm-up with LLaMA-Factory (full fine-tune, vision tower and projector frozen);
that stays the route at real scale (see docs/). This module is the single-machine path used by the demo
and the tests: the same data (the filtered sharegpt json), the same loss (cross-entropy on assistant
tokens only), images through the model's own processor.

A sharegpt record is::

    {"messages": [{"role": "user", "content": "<image>question"},
                  {"role": "assistant", "content": "### Image Description: ..."}],
     "images": ["relative/path.png"]}

The user turn is turned into the prompt the RL stages see: the question rendered through the PeBR
format prompt, each image where its placeholder stands (`pebr.data.prompts.build_messages`), so the
warm-up model learns to answer exactly the prompt it will be sampled and trained on later.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import jinja2
import torch
from torch.utils.data import Dataset

from pebr.config import ConfigError, check_writable_folder
from pebr.data.dataset import PromptLengthCounter
from pebr.data.images import (DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, check_fitted_aspect, fit_size, load_image,
                              probe_image, resolve_path)
from pebr.data.prompts import DEFAULT_FORMAT_PROMPT, build_messages, load_format_prompt
from pebr.data.records import IMAGE_PLACEHOLDER, BadRecord, DataError
from pebr.data.sharegpt import check_sharegpt_record
from pebr.utils.dtypes import cast_model
from pebr.utils.jsonio import (atomic_write_text, disk_errors_named, finish_tree, is_within, read_json_records,
                               replace_directory)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# The Qwen chat layout (ChatML): an assistant turn is "<|im_start|>assistant\n" + content + "<|im_end|>".
ASSISTANT_HEADER = "<|im_start|>assistant\n"
END_OF_TURN = "<|im_end|>"
METRICS_FILE = "sft_metrics.json"  # written last: its presence marks a finished warm-up output


# ----------------------------------------------------------------------------------------------
# Reading and checking the sharegpt file
# ----------------------------------------------------------------------------------------------


def load_sharegpt(path: str, locations: list[str] | None = None) -> list[dict[str, Any]]:
    """Read a sharegpt json list (or jsonl) and check every record's shape.

    Args:
        path: a .json file holding a list of records, or a .jsonl file with one record a line.
        locations: receives where each record is ("FILE line N (record i)"), for `SFTDataset`'s messages.

    Returns:
        Records with `messages` (list of {"role", "content"} with string values, at least one
        assistant turn) and `images` (always a list of strings; a plain string becomes a list of one).

    Raises:
        DataError: the file cannot be read (naming the file, and the line of a .jsonl), or a record is
            malformed (naming file, line or record, key; the rules of `pebr.data.sharegpt.check_sharegpt_record`,
            which dataset/filter.py applies too), or the number of `<image>` placeholders differs from the
            number of images, or the file holds no record.
    """
    lines: list[int] = []
    data = read_json_records(path, DataError, lines)
    if not data:
        raise DataError(f"{path} holds no SFT record")
    where = [f"{path} line {lines[i]} (record {i})" if lines else f"{path} record {i}" for i in range(len(data))]
    if locations is not None:
        locations[:] = where
    return [check_sharegpt_record(value, where[i]) for i, value in enumerate(data)]


def to_chat(
    record: dict[str, Any], template: jinja2.Template | None
) -> list[dict[str, Any]]:
    """Turn a sharegpt record into chat messages for `processor.apply_chat_template`.

    Each user turn becomes its text with its images where its `<image>` placeholders stand (a record whose
    text has no placeholder gets its images at the start of the first user turn). The first user turn's
    text is rendered through `template`, as the RL prompts are; later turns stay as they are.

    Args:
        record: a record as `load_sharegpt` returns it.
        template: the format prompt (None: the question as it is).

    Returns:
        The messages; assistant and system contents stay plain strings.
    """
    images_left = len(record["images"])
    has_placeholders = any(
        IMAGE_PLACEHOLDER in m["content"] for m in record["messages"] if m["role"] == "user"
    )
    chat: list[dict[str, Any]] = []
    first_user = True
    for message in record["messages"]:
        if message["role"] != "user":
            chat.append({"role": message["role"], "content": message["content"]})
            continue
        text = message["content"]
        count = text.count(IMAGE_PLACEHOLDER) if has_placeholders else (images_left if first_user else 0)
        images_left -= count
        (user,) = build_messages(text, count, template if first_user else None)
        chat.append(user)
        first_user = False
    return chat


# ----------------------------------------------------------------------------------------------
# Encoding: token ids, assistant-only labels, image tensors
# ----------------------------------------------------------------------------------------------


def assistant_label_mask(input_ids: list[int], header_ids: list[int], end_id: int) -> list[bool]:
    """Which positions are assistant tokens: everything after each assistant header up to its end token.

    The end-of-turn token itself is a target (the model must learn to stop); the header, the system and
    user turns and the image tokens are not.

    Args:
        input_ids: one tokenised chat, [L].
        header_ids: the ids of "<|im_start|>assistant\\n".
        end_id: the id of "<|im_end|>".

    Returns:
        [L] booleans.
    """
    mask = [False] * len(input_ids)
    width = len(header_ids)
    i = 0
    while i + width <= len(input_ids):
        if input_ids[i : i + width] == header_ids:
            j = i + width
            while j < len(input_ids):
                mask[j] = True
                if input_ids[j] == end_id:
                    break
                j += 1
            i = j + 1
        else:
            i += 1
    return mask


def split_header_newlines(input_ids: list[int], header_ids: list[int], tokenizer: Any) -> list[int]:
    """Give each assistant header its own newline token where the tokenizer merged it into the reply's.

    Qwen2's tokenizer reads a run of newlines as one token, so a reply that starts with "\n" makes the header's
    "\n" and its own one token ("\n\n"): the header is then not found (no labels), and the model would train on a
    sequence it never sees at inference, where the prompt ends with the header's own "\n" token. The merged token is
    replaced by the header's newline and the tokens of the rest, as if header and reply were tokenised apart.

    Args:
        header_ids: the ids of "<|im_start|>assistant\n", whose last is the newline.

    Returns:
        The ids, unchanged where no header newline was merged.
    """
    opener, newline = header_ids[:-1], header_ids[-1]
    if tokenizer.decode([newline]) != "\n":
        return input_ids
    out: list[int] = []
    i, width = 0, len(opener)
    while i < len(input_ids):
        if input_ids[i:i + width] == opener and i + width < len(input_ids) and input_ids[i + width] != newline:
            merged = tokenizer.decode([input_ids[i + width]])
            if merged.startswith("\n"):
                out += [*opener, newline, *tokenizer(merged[1:], add_special_tokens=False)["input_ids"]]
                i += width + 1
                continue
        out.append(input_ids[i])
        i += 1
    return out


def encode_chat(
    processor: Any, chat: list[dict[str, Any]], images: list[Any]
) -> dict[str, torch.Tensor]:
    """Tokenise one chat with its images and set labels on the assistant tokens only.

    Args:
        processor: a Qwen2.5-VL style processor (ChatML chat template).
        chat: messages as `to_chat` returns them.
        images: the decoded PIL images, in the order of the image parts.

    Returns:
        input_ids, labels, attention_mask, mm_token_type_ids: [L] int64 (labels -100 off the assistant
        turns); with images also pixel_values [num_patches, C*T*P*P] and image_grid_thw [num_images, 3].

    Raises:
        DataError: the labelled tokens do not decode to the assistant turns (the tokenizer merged a
            header into the content), so the loss would be on the wrong tokens.
    """
    tokenizer = processor.tokenizer
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    ids = inputs["input_ids"][0]
    header = list(tokenizer(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"])
    split = split_header_newlines(ids.tolist(), header, tokenizer)
    if len(split) != len(ids):  # text tokens only were split: the other per-token tensors follow the new ids
        ids = torch.tensor(split, dtype=ids.dtype)
        inputs["attention_mask"] = torch.ones_like(ids)[None]
        inputs.pop("mm_token_type_ids", None)  # rebuilt from the ids below
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    mask = torch.tensor(assistant_label_mask(ids.tolist(), header, end_id))
    # Each turn as the tokenizer reads it back (its normalizer may change the text: NFC makes an OHM SIGN an Omega).
    expected = "".join(tokenizer.decode(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) + END_OF_TURN
                       for m in chat if m["role"] == "assistant")
    got = tokenizer.decode(ids[mask], skip_special_tokens=False)
    if got != expected:
        raise DataError(
            f"assistant-only labels do not decode to the assistant turns (got {got[:80]!r}..., expected "
            f"{expected[:80]!r}...); the chat template is not the ChatML layout this encoder expects"
        )
    out = {
        "input_ids": ids,
        "labels": torch.where(mask, ids, torch.full_like(ids, IGNORE_INDEX)),
        "attention_mask": inputs["attention_mask"][0],
        # Without it transformers 5.19 gives image tokens 1-D positions (see ENVIRONMENT.md).
        "mm_token_type_ids": inputs.get("mm_token_type_ids", (ids == processor.image_token_id).long()[None])[0],
    }
    if images:
        out["pixel_values"] = inputs["pixel_values"]
        out["image_grid_thw"] = inputs["image_grid_thw"]
    return out


class SFTDataset(Dataset):
    """Sharegpt records as encoded training samples; images are decoded when an item is read.

    Construction checks every image (exists, readable, at least 28 px after resizing) and measures each
    sample's length with its images expanded; samples longer than `max_length` are dropped and counted
    in `num_overlong` rather than truncated, since a cut answer would teach the model not to stop.

    Attributes:
        num_overlong: samples dropped for length.
        lengths: token length of each kept sample.
        record_indices: the index in `records` of each kept sample.
        locations: where each kept sample's record is, for messages (`load_sharegpt`'s `locations`, or
            "sft record i").
    """

    def __init__(
        self,
        records: list[dict[str, Any]],
        processor: Any,
        *,
        image_dir: str | None,
        max_length: int,
        format_prompt: str | None = DEFAULT_FORMAT_PROMPT,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        locations: list[str] | None = None,
    ) -> None:
        """Check and measure the records.

        Args:
            records: as `load_sharegpt` returns them.
            processor: the model's processor.
            image_dir: directory that relative image paths are joined to.
            max_length: most tokens per sample (prompt, image tokens and answer).
            format_prompt: jinja template path for the first user turn; None or "" for none.
            min_pixels, max_pixels: image area bounds for `pebr.data.images.fit_size`.
            locations: where each record is, as `load_sharegpt` gives them; errors name it.

        Raises:
            DataError: an image is missing or unreadable (naming the record and path), or no sample fits.
        """
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.processor = processor
        self.image_dir = image_dir
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        template = load_format_prompt(format_prompt) if format_prompt else None
        count_tokens = PromptLengthCounter(processor)
        tokenizer = processor.tokenizer
        header = list(tokenizer(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"])
        self.samples: list[tuple[list[dict[str, Any]], list[str]]] = []
        self.lengths: list[int] = []
        self.record_indices: list[int] = []  # the record each sample came from
        self.locations: list[str] = []
        self.num_overlong = 0
        for index, record in enumerate(records):
            where = locations[index] if locations else f"sft record {index}"
            sizes = []
            for image in record["images"]:
                try:
                    sizes.append(fit_size(*probe_image(image, image_dir, where), min_pixels, max_pixels))
                    check_fitted_aspect(*sizes[-1], f"{where}: image {image!r}")
                except BadRecord as err:
                    hint = "run dataset/filter.py over the SFT data first"
                    if err.reason == "image_missing":
                        # dataset/filter.py writes the paths as they were: relative to its --image_root.
                        hint = ((f"relative image paths are joined to {image_dir!r} (--image_dir; give it the "
                                 "filter's --image_root if the filtered file was written elsewhere); ") if image_dir
                                else "relative image paths are read from the working directory; ") + hint
                    raise DataError(f"{err} ({hint})") from err
            chat = to_chat(record, template)
            text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
            # Where the tokenizer merges a newline run, a reply starting with "\n" is a token longer once its
            # header's newline is split off (`split_header_newlines`): counted, or a kept sample could run past
            # max_length.
            length = count_tokens(text, sizes)
            if any(m["role"] == "assistant" and m["content"].startswith("\n") for m in chat):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                length += len(split_header_newlines(ids, header, tokenizer)) - len(ids)
            if length > max_length:
                self.num_overlong += 1
                continue
            self.samples.append((chat, record["images"]))
            self.lengths.append(length)
            self.record_indices.append(index)
            self.locations.append(where)
        if self.num_overlong:
            logger.warning("SFT: dropped %d of %d samples longer than %d tokens", self.num_overlong, len(records), max_length)
        if not self.samples:
            raise DataError(f"no SFT sample fits max_length={max_length} (of {len(records)} records)")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Decode the sample's images and encode it.

        Raises:
            DataError: an image cannot be decoded (e.g. a truncated JPEG, whose header passed the probe at
                construction), naming the record and the path; PIL's bare OSError would name neither.
        """
        chat, paths = self.samples[i]
        images = []
        for path in paths:
            try:
                images.append(load_image(path, self.image_dir, min_pixels=self.min_pixels, max_pixels=self.max_pixels))
            except (OSError, SyntaxError, ValueError) as err:  # PIL's ways of saying the file is broken
                raise DataError(
                    f"{self.locations[i]}: image {resolve_path(path, self.image_dir)!r} cannot be "
                    f"decoded: {err} (run dataset/filter.py over the SFT data first)"
                ) from err
        try:
            return encode_chat(self.processor, chat, images)
        except DataError as err:
            raise DataError(f"{self.locations[i]}: {err}") from err
        except (StopIteration, ValueError) as err:
            # A StopIteration leaving __getitem__ would end the DataLoader's epoch early, silently.
            raise DataError(f"{self.locations[i]}: the processor refused it: "
                            f"{type(err).__name__}: {err}") from err


def collate(features: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of `encode_chat` samples into one batch.

    Returns:
        input_ids (pad_token_id), labels (-100), attention_mask (0), mm_token_type_ids (0): [B, L_max];
        pixel_values [sum of patches, D] and image_grid_thw [sum of images, 3] when any sample has images.
    """
    width = max(f["input_ids"].numel() for f in features)
    pads = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0, "mm_token_type_ids": 0}
    batch: dict[str, torch.Tensor] = {}
    for key, value in pads.items():
        rows = [torch.nn.functional.pad(f[key], (0, width - f[key].numel()), value=value) for f in features]
        batch[key] = torch.stack(rows).long()
    with_images = [f for f in features if "pixel_values" in f]
    if with_images:
        batch["pixel_values"] = torch.cat([f["pixel_values"] for f in with_images])
        batch["image_grid_thw"] = torch.cat([f["image_grid_thw"] for f in with_images])
    return batch


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


@dataclass
class SFTConfig:
    """Warm-up SFT settings; defaults are the CPU demo's (see README), the paper's are in docs/.

    Attributes:
        model_path: a Hugging Face Qwen2.5-VL directory (weights, processor, tokenizer).
        data: the filtered sharegpt json (see dataset/filter.py).
        image_dir: directory the records' relative image paths are joined to (None: the data file's directory,
            as dataset/filter.py reads them without --image_root; see `resolved_image_dir`).
        output_dir: where the trained model, processor and `sft_metrics.json` are written.
        epochs, lr, batch_size, grad_accum, warmup_ratio, weight_decay, lr_scheduler: the optimisation
            (AdamW; the paper: 2 epochs, lr 1e-5, batch 16, cosine, warmup 0.1 on a pretrained model).
        max_length: most tokens per sample; longer samples are dropped.
        max_steps: stop after this many optimizer steps (-1: run all epochs).
        freeze_vision_tower: keep the vision encoder and its merger (projector) fixed, as in the paper.
        vision_lr: learning rate of the vision encoder and merger when they train (None: `lr`).
        format_prompt: jinja template for the user turn ("" for none).
        bf16: bf16 autocast (fp32 master weights); on CPUs with AMX it is faster, measure it.
        min_pixels, max_pixels: image area bounds, the RL stages' by default (None: the processor's own).
        logging_steps: log the loss every this many steps.
        seed: seeds the data order.
        save_steps: keep a resumable checkpoint (weights, optimizer, schedule, RNG, data position) every this many
            optimizer steps in `checkpoint_dir` (0: none, an interrupted run starts again).
        save_total_limit: how many of those checkpoints to keep, the newest.
        resume: continue from the newest checkpoint in `checkpoint_dir` when there is one (False: delete them and
            start again). A checkpoint of other settings or another data file is refused, not resumed.
    """

    model_path: str
    data: str
    output_dir: str
    image_dir: str | None = None
    epochs: float = 2.0
    lr: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    max_length: int = 1024
    max_steps: int = -1
    freeze_vision_tower: bool = True
    vision_lr: float | None = None
    format_prompt: str = DEFAULT_FORMAT_PROMPT
    bf16: bool = False
    min_pixels: int | None = DEFAULT_MIN_PIXELS
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    logging_steps: int = 10
    seed: int = 0
    save_steps: int = 0
    save_total_limit: int = 2
    resume: bool = True

    @property
    def resolved_image_dir(self) -> str:
        """`image_dir`, or the data file's directory: the filter checked the images there, so the warm-up reads
        them there too (it read them from the working directory, and the records the filter had kept failed)."""
        return self.image_dir if self.image_dir is not None else os.path.dirname(os.path.abspath(self.data))

    @property
    def checkpoint_dir(self) -> str:
        """Where the intermediate checkpoints live: beside `output_dir`, which the finished model replaces whole."""
        return os.path.realpath(self.output_dir) + ".checkpoints"

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the field for values that cannot work."""
        finite = math.isfinite
        checks = [  # (name, holds, the range said when it does not)
            ("epochs", finite(self.epochs) and self.epochs > 0, "a finite number above 0"),
            ("lr", finite(self.lr) and self.lr > 0, "a finite number above 0"),
            ("weight_decay", finite(self.weight_decay) and self.weight_decay >= 0, "a finite number, at least 0"),
            ("batch_size", self.batch_size >= 1, "at least 1"), ("grad_accum", self.grad_accum >= 1, "at least 1"),
            ("max_length", self.max_length >= 1, "at least 1"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)"),
            ("logging_steps", self.logging_steps >= 1, "at least 1"),
            ("max_steps", self.max_steps == -1 or self.max_steps >= 1, "-1 (all epochs) or at least 1"),
            ("vision_lr", self.vision_lr is None or finite(self.vision_lr) and self.vision_lr > 0,
             "a finite number above 0, or unset"),
            ("min_pixels", self.min_pixels is None or self.min_pixels >= 1, "at least 1"),
            ("max_pixels", self.max_pixels is None or self.max_pixels >= max(1, self.min_pixels or 1),
             "at least 1 and min_pixels"),
            ("save_steps", self.save_steps >= 0, "0 (no checkpoints) or more"),
            ("save_total_limit", self.save_total_limit >= 1, "at least 1"),
        ]
        for name, ok, wanted in checks:
            if not ok:
                raise ConfigError(f"sft config: {name}={getattr(self, name)!r} is out of range: it must be {wanted}")
        if self.vision_lr is not None and self.freeze_vision_tower:  # it would set the lr of no parameter
            raise ConfigError(f"sft config: vision_lr={self.vision_lr} acts only on a vision tower that trains; it is "
                              "frozen (freeze_vision_tower, the default: pass --no-freeze_vision_tower)")
        from transformers import SchedulerType

        schedulers = [kind.value for kind in SchedulerType]
        if self.lr_scheduler not in schedulers:  # transformers says so only after the data scan and model load
            raise ConfigError(f"sft config: lr_scheduler={self.lr_scheduler!r} is not one of {schedulers}")
        if not os.path.isdir(self.model_path):
            raise ConfigError(f"sft config: model_path {self.model_path!r} is not a directory")
        from pebr.evaluation import check_model_path

        check_model_path(self.model_path)  # weights there, not a sharded or unmerged trainer checkpoint
        # The finished output replaces output_dir whole: it must not be, or hold, an input, nor a user's directory.
        for name in ("model_path", "data", "image_dir"):
            path = getattr(self, name)
            if path and is_within(path, self.output_dir):
                raise ConfigError(f"sft config: output_dir {self.output_dir!r} is or holds {name} {path!r}, which the "
                                  "saved model would replace; name another output_dir")
            if path and is_within(path, self.checkpoint_dir):
                raise ConfigError(f"sft config: {name} {path!r} lies in {self.checkpoint_dir}, the checkpoints of this "
                                  "output_dir, which the run rotates and deletes; copy it elsewhere first")
        out = self.output_dir
        if os.path.exists(out) and not os.path.isdir(out):
            raise ConfigError(f"sft config: output_dir {self.output_dir!r} is a file; name a new or empty directory")
        # The model is written beside output_dir, then renamed over it.
        check_writable_folder(os.path.dirname(os.path.realpath(out)), f"sft config: output_dir {self.output_dir!r}")
        if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, METRICS_FILE)):
            raise ConfigError(f"sft config: output_dir {self.output_dir!r} holds files but no {METRICS_FILE}, so it is "
                              "not an earlier warm-up's output, which alone is replaced; name a new or empty directory")


def check_one_process_one_device(cuda_devices: int, environ: Mapping[str, str]) -> None:
    """Refuse what this single-process trainer would run wrongly: several visible GPUs without a launcher make
    transformers' Trainer wrap the model in DataParallel, under which this loss (divided by Trainer's token count)
    comes out multiplied by the number of GPUs (read in transformers 5.19); a launcher (torchrun) starts several
    processes, each of which would write the output directory.

    Raises:
        ConfigError: naming the way to run it on one device.
    """
    if int(environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"sft: started as {environ['WORLD_SIZE']} processes; the built-in warm-up runs as one "
                          "process on one device (at scale use LLaMA-Factory, docs/WARMUP.md)")
    if cuda_devices > 1:
        raise ConfigError(f"sft: {cuda_devices} GPUs are visible; the built-in warm-up trains on one (transformers "
                          "would spread it with DataParallel, which scales this loss by the GPU count): set "
                          "CUDA_VISIBLE_DEVICES=0, or use LLaMA-Factory (docs/WARMUP.md) for several GPUs")


def token_mean_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Next-token cross-entropy summed over a micro-batch's labelled tokens, divided by the labelled tokens of
    the whole accumulated batch (Trainer's `num_items_in_batch`; this micro-batch's own without it).

    So the accumulated gradient is that of the token mean over every sample of the optimizer step, however the
    step is split into micro-batches. Qwen2.5-VL takes no loss arguments, and Trainer then averaged the
    micro-batches' own token means: a short answer in a micro-batch of its own weighed as much as all the tokens
    of another one.
    """
    logits = outputs.logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                              ignore_index=-100, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else targets.ne(-100).sum()
    return total / count


def freeze_vision(model: torch.nn.Module) -> int:
    """Stop gradients into the vision encoder and its merger; returns the number of frozen parameters."""
    frozen = 0
    for param in model.model.visual.parameters():
        param.requires_grad_(False)
        frozen += param.numel()
    return frozen


def lr_warning(lr: float, trainable: int) -> str | None:
    """What to say when the demo's learning rate meets a real model (the defaults are the embedded model's)."""
    if lr > 1e-4 and trainable > 100_000_000:
        return (f"SFT: lr={lr:g} is the embedded demo model's default, for {trainable / 1e9:.1f} B trainable "
                "parameters; the paper's warm-up of Qwen2.5-VL-7B ran at 1e-5 (docs/qwen2_5vl_full_sft.yaml): pass --lr")
    return None


def build_optimizer(model: torch.nn.Module, cfg: SFTConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; the vision encoder and merger may get their own `vision_lr`.

    On the embedded (randomly initialised) demo model, keep the vision tower frozen: trained at the text
    learning rate or above (e.g. 5e-3), it learns within ~100 steps to emit one large constant vector for
    every image (feature RMS 0.1 -> 20, spread across images 60% -> 2% of the RMS), after which the
    model cannot see the image at all; its random features, kept fixed, do carry the scene.
    """
    visual = {id(p) for p in model.model.visual.parameters()}
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            lr = cfg.vision_lr if (id(param) in visual and cfg.vision_lr) else cfg.lr
            # Biases and norm scales (the 1-D parameters) are not decayed, as in transformers' Trainer and
            # LLaMA-Factory; without decay they share their group (the group layout of earlier checkpoints).
            groups.setdefault((lr, cfg.weight_decay > 0 and param.ndim >= 2), []).append(param)
    return torch.optim.AdamW(
        [{"params": params, "lr": lr, "weight_decay": cfg.weight_decay if decayed else 0.0}
         for (lr, decayed), params in groups.items()],
        lr=cfg.lr, fused=True,  # one kernel over all parameters instead of torch's per-parameter loop on CPU
    )


def train_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Run the warm-up SFT and save a model directory that transformers and vLLM load.

    Args:
        cfg: the settings (validated here).

    With `save_steps`, Trainer's checkpoints go to `cfg.checkpoint_dir` (see `pebr.sft_checkpoints`) and a rerun
    continues from the newest; they are deleted once the finished model is in place.

    Returns:
        Metrics: train_loss (Trainer's mean over the steps this process trained: all of them unless resumed),
        first_loss and final_loss (logged losses, the whole run's), steps, samples, dropped_overlong, wall_s
        (this process's training time), trainable_parameters, log_history (Trainer's list of dicts, the whole
        run's), resumed_from (the checkpoint continued, or None); also written to `output_dir/sft_metrics.json`.

    Raises:
        ValueError: a bad setting; DataError: bad data.
    """
    from transformers import AutoConfig, TrainingArguments, set_seed

    from pebr.sft_checkpoints import (PublishCheckpoints, WarmupTrainer, find_resume_checkpoint, remove_checkpoints,
                                      run_identity)
    from pebr.evaluation import load_model_processor
    from pebr.workers.actor import load_hf_model

    cfg.validate()
    check_one_process_one_device(torch.cuda.device_count(), os.environ)
    # Hashing the inputs is wanted only where checkpoints are written or may be there to resume.
    identity = run_identity(cfg) if cfg.save_steps or os.path.isdir(cfg.checkpoint_dir) else None
    resume_from = find_resume_checkpoint(cfg, identity)
    set_seed(cfg.seed)
    processor = load_model_processor(cfg.model_path)
    locations: list[str] = []
    records = load_sharegpt(cfg.data, locations)
    dataset = SFTDataset(
        records, processor, image_dir=cfg.resolved_image_dir, max_length=cfg.max_length,
        format_prompt=cfg.format_prompt or None, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
        locations=locations,
    )
    # Resuming, the weights trained so far, read through from_pretrained (see WarmupTrainer).
    model = load_hf_model(resume_from or cfg.model_path)
    if resume_from:
        logger.info("SFT: continuing from %s", resume_from)
        # The checkpoint holds the fp32 master weights; the finished model is saved in the base model's dtype.
        model.source_dtype = getattr(AutoConfig.from_pretrained(cfg.model_path), "dtype", None)
    if cfg.freeze_vision_tower:
        freeze_vision(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    warning = lr_warning(cfg.lr, trainable)
    if warning:
        logger.warning(warning)
    steps_per_epoch = math.ceil(len(dataset) / (cfg.batch_size * cfg.grad_accum))
    logger.info("SFT: %d samples, %d steps/epoch, %d trainable parameters", len(dataset), steps_per_epoch, trainable)

    # Everything is written to `staging` and renamed into place at the end: output_dir holds the previous complete
    # output (or nothing) until the new one is complete.
    staging = os.path.realpath(cfg.output_dir) + ".saving"
    shutil.rmtree(staging, ignore_errors=True)  # a killed run's
    args = TrainingArguments(
        output_dir=PublishCheckpoints.partial_dir(cfg.checkpoint_dir) if cfg.save_steps else staging,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is read as a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=1.0,
        bf16=cfg.bf16,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 1,  # read only when saving
        save_total_limit=None,  # the publisher rotates; Trainer would rotate its partial folder
        report_to=[],
        remove_unused_columns=False,  # the collator's keys (pixel_values, ...) are all model inputs
        dataloader_num_workers=0,
        seed=cfg.seed,
        disable_tqdm=False,
    )
    pad_id = processor.tokenizer.pad_token_id
    trainer = WarmupTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=lambda feats: collate(feats, pad_id),
        optimizers=(build_optimizer(model, cfg), None),  # Trainer adds the warmup/decay schedule
        compute_loss_func=token_mean_loss,
        callbacks=[PublishCheckpoints(cfg.checkpoint_dir, identity, cfg.save_total_limit)] if cfg.save_steps else [],
    )
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - start

    if model.source_dtype is not None:  # saved in the base model's dtype (trained with fp32 master weights)
        cast_model(model, model.source_dtype)
    with disk_errors_named(staging):
        trainer.save_model(staging)
        processor.save_pretrained(staging)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = {
        "train_loss": result.training_loss,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "steps": trainer.state.global_step,
        "samples": len(dataset),
        "dropped_overlong": dataset.num_overlong,
        "wall_s": wall,
        "trainable_parameters": trainable,
        "config": asdict(cfg),
        "log_history": trainer.state.log_history,
        "resumed_from": resume_from,
    }
    atomic_write_text(os.path.join(staging, METRICS_FILE), json.dumps(metrics, indent=2))
    finish_tree(staging)  # on disk before it is published and the checkpoints it supersedes are deleted
    replace_directory(staging, cfg.output_dir)
    if os.path.isdir(cfg.checkpoint_dir):
        remove_checkpoints(cfg.checkpoint_dir)  # the finished model supersedes them
    return metrics
