"""Clean a Mulberry-SFT style warm-up set (sharegpt layout) before LLaMA-Factory trains on it.

Usage:
    python dataset/filter.py --input raw.json --output clean.json --image_root IMAGES [--min_size 28]

A sample is dropped, with the reason counted, when
  * reflective: an assistant turn says "let me rethink it" (any case, any spacing); the PeBR warm-up
    teaches describe-then-reason answers, not self-correction loops;
  * small_image: an image is narrower or shorter than ``--min_size`` px (28 is the Qwen2.5-VL
    patch-merge unit; smaller images cannot be tokenised);
  * missing_image / unreadable_image: an image file is absent, or Pillow cannot read its header;
  * malformed: the record is not a dict, ``messages`` is not a list of {role, content} dicts with
    string values, or ``images`` is neither a string nor a list of strings (reported by index).
Text-only samples (no ``images`` or an empty list) are kept. ``images`` given as one string is
written back as a one-element list, the form LLaMA-Factory's sharegpt reader expects.

Input is a ``.json`` list or a ``.jsonl`` file; the output takes the format of its own suffix and is
written atomically. Cost is linear in the number of samples: only image headers are read, once per
distinct path.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pebr.utils.jsonio import atomic_write_json, read_json_records  # noqa: E402

REFLECTIVE_PHRASE = "let me rethink it"
REASONS = ("malformed", "reflective", "missing_image", "unreadable_image", "small_image")
MAX_REPORTED = 20  # malformed records listed one by one before the rest is summarised


class FilterInputError(ValueError):
    """The input file cannot be read as a JSON list or JSON lines."""


@dataclass
class FilterReport:
    """What :func:`filter_records` did: totals, drop counts by reason, and malformed records by index."""

    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    malformed: list[tuple[int, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable summary, one line per fact."""
        out = [f"malformed record {i}: {why}" for i, why in self.malformed[:MAX_REPORTED]]
        if len(self.malformed) > MAX_REPORTED:
            out.append(f"... and {len(self.malformed) - MAX_REPORTED} more malformed records")
        out += [f"dropped {self.dropped[r]} {r}" for r in REASONS]
        out.append(f"before {self.total}, after {self.kept} (dropped {self.total - self.kept})")
        return out


def load_records(path: str | Path) -> list[Any]:
    """Read a ``.jsonl`` file (one JSON value a line) or a JSON file holding a list.

    Raises:
        FilterInputError: naming the file (and line), if it is missing, not JSON, or not a list.
    """
    return read_json_records(str(path), FilterInputError)


def write_records(path: str | Path, records: list[Any]) -> None:
    """Write ``records`` as JSON lines (``.jsonl``) or a JSON list, atomically (temp file + rename)."""
    atomic_write_json(str(path), records)


def _messages_problem(messages: Any) -> str | None:
    """Why ``messages`` is malformed, or None when it is a list of {role: str, content: str} dicts."""
    if not isinstance(messages, list):
        return f"'messages' must be a list, got {type(messages).__name__}"
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {j} needs string 'role' and 'content': {str(m)[:80]}"
    return None


def _image_list(images: Any) -> list[str] | None:
    """``images`` as a list of paths; None when its type is wrong. A missing field means no images."""
    if images is None:
        return []
    if isinstance(images, str):
        return [images]
    if isinstance(images, list) and all(isinstance(p, str) for p in images):
        return images
    return None


def _is_reflective(messages: list[dict[str, str]]) -> bool:
    # Collapse whitespace so that a line break inside the phrase does not hide it.
    return any(
        m["role"] == "assistant" and REFLECTIVE_PHRASE in " ".join(m["content"].split()).lower() for m in messages
    )


def _image_status(path: Path, min_size: int, cache: dict[Path, str | None]) -> str | None:
    """Drop reason for one image (None when usable); reads the header only, memoised per path."""
    if path not in cache:
        if not path.is_file():
            cache[path] = "missing_image"
        else:
            try:
                with Image.open(path) as im:  # lazy: parses the header, not the pixel data
                    width, height = im.size
                cache[path] = "small_image" if min(width, height) < min_size else None
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
                cache[path] = "unreadable_image"
    return cache[path]


def filter_records(
    records: list[Any], image_root: str | Path, min_size: int = 28
) -> tuple[list[dict[str, Any]], FilterReport]:
    """Keep the samples that pass every rule of the module docstring.

    Args:
        records: sharegpt samples, as loaded.
        image_root: directory that relative image paths are resolved against.
        min_size: smallest allowed width and height in pixels.

    Returns:
        ``(kept, report)``: kept samples in their input order (string ``images`` turned into a list)
        and the counts.
    """
    root = Path(image_root)
    cache: dict[Path, str | None] = {}
    report = FilterReport(total=len(records))
    kept = []
    for idx, rec in enumerate(records):
        reason, images = None, None
        if not isinstance(rec, dict):
            problem: str | None = f"record must be a dict, got {type(rec).__name__}"
        else:
            problem = _messages_problem(rec.get("messages"))
            images = _image_list(rec.get("images"))
            if problem is None and images is None:
                problem = f"'images' must be a string or a list of strings, got {str(rec.get('images'))[:80]}"
        if problem is not None:
            report.malformed.append((idx, problem))
            reason = "malformed"
        elif _is_reflective(rec["messages"]):
            reason = "reflective"
        else:
            for p in images:
                reason = _image_status(root / p, min_size, cache)
                if reason is not None:
                    break
        if reason is not None:
            report.dropped[reason] += 1
            continue
        if "images" in rec:
            rec = {**rec, "images": images}
        kept.append(rec)
    report.kept = len(kept)
    return kept, report


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for an unreadable input file)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help=".json list or .jsonl of sharegpt samples")
    parser.add_argument("--output", required=True, help="where to write the kept samples (.json or .jsonl)")
    parser.add_argument("--image_root", default=None, help="base of relative image paths (default: the input's folder)")
    parser.add_argument("--min_size", type=int, default=28, help="smallest allowed image width/height in px")
    args = parser.parse_args(argv)
    try:
        records = load_records(args.input)
    except FilterInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    image_root = args.image_root if args.image_root is not None else str(Path(args.input).parent)
    kept, report = filter_records(records, image_root, args.min_size)
    for line in report.lines():
        print(line)
    write_records(args.output, kept)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
