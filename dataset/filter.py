"""Clean a Mulberry-SFT style warm-up set (sharegpt layout) before LLaMA-Factory trains on it.

Usage:
    python dataset/filter.py --input raw.json --output clean.json --image_root IMAGES [--min_size 28]

A sample is dropped, with the reason counted, when
  * reflective: an assistant turn says "let me rethink it" (any case, any spacing, invisible characters
    such as a zero-width space or a soft hyphen read past); the PeBR warm-up
    teaches describe-then-reason answers, not self-correction loops;
  * small_image: an image is narrower or shorter than ``--min_size`` px (28 is the Qwen2.5-VL
    patch-merge unit; smaller images cannot be tokenised);
  * missing_image / unreadable_image / large_image: an image file is absent; or Pillow cannot decode
    it in full (a file cut short keeps a good header, so the pixels are decoded, not just the header);
    or it has more pixels than ``pebr.data.images.MAX_SOURCE_PIXELS``;
  * thin_image: an image's long side, once resized into SFT's default pixel bounds (sides multiples of
    28 px), is more than ``pebr.data.images.MAX_ASPECT_RATIO`` (200) times its short side, which the
    Qwen2.5-VL processor refuses;
  * turn_order: after an optional system turn, the turns are not user, assistant, user, ... ending with
    an assistant turn; LLaMA-Factory's sharegpt reader skips such samples;
  * media_placeholder: a turn holds ``<video>`` or ``<audio>``, which LLaMA-Factory reads as a video or audio
    slot and refuses, the sample having none;
  * malformed / unknown_role / no_assistant_turn / empty_turn / vision_token_in_text / chat_token_in_text /
    placeholder_mismatch: the record breaks a rule of ``pebr.data.sharegpt.check_sharegpt_record``, the check
    that pebr/sft.py's loader applies too (not a dict, ``messages`` empty or not {role, content} strings, a role
    other than system/user/assistant, no assistant turn, an assistant turn with no text (an empty answer teaches
    the model to stop at once) or a user turn with neither text nor image, a turn holding one of the model's vision
    tokens such
    as ``<|image_pad|>`` or the chat template's ``<|im_start|>`` / ``<|im_end|>`` / ``<|endoftext|>``,
    ``<image>`` placeholders in the user turns not matching ``images`` or one in another turn, text that is not
    valid Unicode such as half a surrogate pair); these are also listed one by one, by index.
Text-only samples (no ``images`` or an empty list) are kept. ``images`` given as one string is
written back as a one-element list, the form LLaMA-Factory's sharegpt reader expects, and one image without
an ``<image>`` placeholder gets one at the start of the first user turn (where pebr/sft.py puts it), since
LLaMA-Factory refuses a sample whose images and placeholders differ in number.

Nothing is written (exit status 2) when the input holds no sample, when every sample is dropped, or when images
were asked for and not one was found: an empty or image-less output would replace a good one, and the usual cause
is a wrong ``--image_root``, which the ``missing_image`` count shows. Nor is an output that is the input file.

Input is a ``.json`` list or a ``.jsonl`` file; the output takes the format of its own suffix and is
written atomically. Cost is linear in the number of samples: each distinct image path is decoded once.
"""

from __future__ import annotations

import argparse
import os
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pebr.cli import UserError, run_cli  # noqa: E402
from pebr.data.images import (  # noqa: E402
    DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, MAX_ASPECT_RATIO, fit_size, probe_image)
from pebr.data.prompts import load_format_prompt, render_question  # noqa: E402
from pebr.data.records import IMAGE_PLACEHOLDER, BadRecord  # noqa: E402
from pebr.data.sharegpt import SHAREGPT_REASONS, check_sharegpt_record  # noqa: E402
from pebr.utils.jsonio import DISK_ERRNOS, atomic_write_json, read_json_records  # noqa: E402

REFLECTIVE_PHRASE = "let me rethink it"
IMAGE_REASONS = ("missing_image", "unreadable_image", "large_image", "small_image", "thin_image")
REASONS = (*SHAREGPT_REASONS, "turn_order", "reflective", "media_placeholder", *IMAGE_REASONS)
MAX_REPORTED = 20  # invalid records (and records dropped for an image) listed one by one, the rest summarised
# probe_image's reason tags -> this script's
_PROBE_REASONS = {"image_missing": "missing_image", "image_unreadable": "unreadable_image",
                  "image_too_large": "large_image"}


class FilterInputError(UserError, ValueError):
    """The input cannot be read as a JSON list or JSON lines, or the output cannot be written; the message names
    the file."""


@dataclass
class FilterReport:
    """What :func:`filter_records` did: totals, drop counts by reason, and invalid records by index.

    ``invalid`` holds ``(index, reason, message)`` for each record that failed the sharegpt check, the
    message naming the record (``"record 12: key 'messages' ..."``); ``image_drops`` the same for the first
    ``MAX_REPORTED`` records dropped for an image, the message naming the image and where it was looked for.
    """

    total: int = 0
    kept: int = 0
    images_found: int = 0  # distinct image files that passed every image rule
    dropped: Counter = field(default_factory=Counter)
    invalid: list[tuple[int, str, str]] = field(default_factory=list)
    image_drops: list[tuple[int, str, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable summary, one line per fact."""
        out = [f"{reason} {message}" for _, reason, message in self.invalid[:MAX_REPORTED]]
        if len(self.invalid) > MAX_REPORTED:
            out.append(f"... and {len(self.invalid) - MAX_REPORTED} more invalid records")
        out += [f"{reason} {message}" for _, reason, message in self.image_drops]
        image_dropped = sum(self.dropped[r] for r in IMAGE_REASONS)
        if image_dropped > len(self.image_drops):
            out.append(f"... and {image_dropped - len(self.image_drops)} more records dropped for an image")
        out += [f"dropped {self.dropped[r]} {r}" for r in REASONS]
        out.append(f"before {self.total}, after {self.kept} (dropped {self.total - self.kept})")
        return out


def load_records(path: str | Path, lines: list[int] | None = None) -> list[Any]:
    """Read a ``.jsonl`` file (one JSON value a line) or a JSON file holding a list.

    Args:
        lines: for a ``.jsonl`` file, receives each record's line number.

    Raises:
        FilterInputError: naming the file (and line), if it is missing, not UTF-8, not JSON, or not a list.
    """
    return read_json_records(str(path), FilterInputError, lines)


def write_records(path: str | Path, records: list[Any]) -> None:
    """Write ``records`` as JSON lines (``.jsonl``) or a JSON list, atomically (temp file + rename)."""
    atomic_write_json(str(path), records)


def _turns_alternate(messages: list[dict[str, str]]) -> bool:
    roles = [m["role"] for m in messages]
    if roles and roles[0] == "system":
        roles = roles[1:]
    return len(roles) % 2 == 0 and all(role == ("user", "assistant")[i % 2] for i, role in enumerate(roles))


def _with_placeholder(messages: list[dict[str, str]], images: list[str]) -> list[dict[str, str]]:
    """The messages, with an ``<image>`` before the first user turn's text when one image has none."""
    if len(images) != 1 or any(IMAGE_PLACEHOLDER in m["content"] for m in messages if m["role"] == "user"):
        return messages
    first = next(i for i, m in enumerate(messages) if m["role"] == "user")
    return [{**m, "content": IMAGE_PLACEHOLDER + m["content"]} if i == first else m for i, m in enumerate(messages)]


def _plain(text: str) -> str:
    """`text` lower-cased with its whitespace collapsed, a zero-width space read as a space and other format
    characters (soft hyphens, joiners: Unicode category Cf) removed, so that none of them hides the phrase."""
    text = unicodedata.normalize("NFKC", text).replace("\u200b", " ")
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    return " ".join(text.split()).lower()


def _is_reflective(messages: list[dict[str, str]]) -> bool:
    return any(m["role"] == "assistant" and REFLECTIVE_PHRASE in _plain(m["content"]) for m in messages)


# Placeholders of media this data never has, which LLaMA-Factory counts against empty video / audio lists.
_OTHER_MEDIA = ("<video>", "<audio>")


def _image_status(path: Path, min_size: int, cache: dict[Path, str | None]) -> str | None:
    """Drop reason for one image (None when usable), memoised per path.

    The header check is the one pebr/sft.py runs at load (`probe_image`); the full decode after it
    finds files cut short, whose header still parses (a truncated JPEG passes even the probe) and
    which would otherwise fail only inside a training step.
    """
    if path not in cache:
        try:
            width, height = probe_image(str(path), None, str(path))
        except BadRecord as err:
            cache[path] = _PROBE_REASONS.get(err.reason, "unreadable_image")
            return cache[path]
        if min(width, height) < min_size:
            cache[path] = "small_image"  # too small to train on whatever its pixels; no need to decode
            return cache[path]
        fitted = fit_size(width, height, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)  # what SFT trains on
        if max(fitted) > MAX_ASPECT_RATIO * min(fitted):
            cache[path] = "thin_image"
            return cache[path]
        try:
            with Image.open(path) as im:
                im.load()
            cache[path] = None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            # PIL signals broken pixel data with all of these ("image file is truncated" is an OSError).
            cache[path] = "unreadable_image"
    return cache[path]


def filter_records(
    records: list[Any], image_root: str | Path, min_size: int = 28, names: list[str] | None = None
) -> tuple[list[dict[str, Any]], FilterReport]:
    """Keep the samples that pass every rule of the module docstring.

    Args:
        records: sharegpt samples, as loaded.
        image_root: directory that relative image paths are resolved against.
        min_size: smallest allowed width and height in pixels.
        names: how to name each record in messages (its file and line, say); "record i" by default.

    Returns:
        ``(kept, report)``: kept samples in their input order (string ``images`` turned into a list)
        and the counts.
    """
    root = Path(image_root)
    cache: dict[Path, str | None] = {}
    report = FilterReport(total=len(records))
    kept = []
    for idx, rec in enumerate(records):
        try:
            images = check_sharegpt_record(rec, names[idx] if names else f"record {idx}")["images"]
        except BadRecord as err:
            report.invalid.append((idx, err.reason, str(err)))
            report.dropped[err.reason] += 1
            continue
        reason = None
        if not _turns_alternate(rec["messages"]):
            reason = "turn_order"
        elif _is_reflective(rec["messages"]):
            reason = "reflective"
        elif any(tag in m["content"] for m in rec["messages"] for tag in _OTHER_MEDIA):
            reason = "media_placeholder"
        else:
            for p in images:
                reason = _image_status(root / p, min_size, cache)
                if reason is not None:
                    if len(report.image_drops) < MAX_REPORTED:
                        report.image_drops.append(
                            (idx, reason, f"{names[idx] if names else f'record {idx}'}: image {p!r} ({root / p})"))
                    break
        if reason is not None:
            report.dropped[reason] += 1
            continue
        if "images" in rec:
            rec = {**rec, "images": images, "messages": _with_placeholder(rec["messages"], images)}
        kept.append(rec)
    report.kept = len(kept)
    report.images_found = sum(status is None for status in cache.values())
    return kept, report


def with_format_prompt(record: dict, template: Any) -> dict:
    """`record` with its first user turn written through the format prompt (its `<image>` placeholders kept
    where the question puts them), as the RL stages and scripts/sft_warmup.py present a question."""
    messages, done = [], False
    for message in record["messages"]:
        if message["role"] == "user" and not done:
            message, done = {**message, "content": render_question(template, message["content"].strip())}, True
        messages.append(message)
    return {**record, "messages": messages}


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, type=os.path.expanduser, help=".json list or .jsonl of sharegpt samples")
    parser.add_argument("--output", required=True, type=os.path.expanduser,
                        help="where to write the kept samples (.json or .jsonl)")
    parser.add_argument("--image_root", default=None, type=os.path.expanduser,
                        help="base of relative image paths (default: the input's folder)")
    parser.add_argument("--min_size", type=int, default=28, help="smallest allowed image width/height in px")
    parser.add_argument("--format_prompt", default=None,
                        help="jinja template to write each sample's first question through, as the RL stages prompt "
                             "(examples/format_prompt/pebr.jinja), for trainers that take the text as it is "
                             "(LLaMA-Factory); scripts/sft_warmup.py applies it itself, and does not apply it twice")
    args = parser.parse_args(argv)
    if args.min_size < 1:
        parser.error(f"--min_size {args.min_size} must be at least 1 (px)")
    lines: list[int] = []
    records = load_records(args.input, lines)
    if os.path.isdir(args.output):
        raise FilterInputError(f"--output {args.output} is a directory; name the file to write")
    if os.path.exists(args.output) and os.path.samefile(args.output, args.input):
        raise FilterInputError(f"--output {args.output} is the input file: the dropped samples would be lost; write "
                               "the kept ones to another file")
    if not records:
        raise FilterInputError(f"{args.input} holds no sample; {args.output} was not written")
    names = [f"{args.input} line {line} (record {i})" for i, line in enumerate(lines)] if lines else \
        [f"{args.input} record {i}" for i in range(len(records))]
    image_root = args.image_root if args.image_root is not None else str(Path(args.input).parent)
    template = load_format_prompt(args.format_prompt) if args.format_prompt else None
    kept, report = filter_records(records, image_root, args.min_size, names)
    if template is not None:
        kept = [with_format_prompt(rec, template) for rec in kept]
    for line in report.lines():
        print(line)
    problem = ("every sample was dropped (reasons above" if not report.kept else
               f"not one image was found ({report.dropped['missing_image']} samples dropped as missing_image"
               if report.dropped["missing_image"] and not report.images_found else None)
    if problem:
        raise FilterInputError(f"{problem}; images are looked for under {image_root}, set by --image_root); "
                               f"{args.output} was not written")
    try:
        write_records(args.output, kept)
    except OSError as err:
        if err.errno in DISK_ERRNOS:  # exit 1, as for every entry point: the same command once there is room
            raise
        raise FilterInputError(f"cannot write {args.output}: {err}") from err
    print(f"wrote {args.output}")
    relative = any(not os.path.isabs(p) for rec in kept for p in rec.get("images") or [])
    if relative and Path(image_root).resolve() != Path(args.output).parent.resolve():
        # Paths stay as they were (LLaMA-Factory's media_dir names their root), so a trainer that reads them
        # beside the data file would find none.
        print(f"note: the relative image paths in {args.output} are relative to {image_root}, not to its own "
              f"folder: pass --image_dir {image_root} to scripts/sft_warmup.py (LLaMA-Factory: media_dir)")


def main(argv: list[str] | None = None) -> int:
    """The command line: exit 2, with one message, for input it cannot filter (pebr/cli.py)."""
    return run_cli(run, argv, on_interrupt="run it again (the output is written whole or not at all)")


if __name__ == "__main__":
    sys.exit(main())
