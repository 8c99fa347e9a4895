"""The RL prompt data set: chat-templated prompts, resized images, ground truths.

Everything that can be wrong with a record (types, missing or broken image files, prompts that are too
long once the processor expands the image placeholders) is found when the data set is built, so that a
bad file fails at load time with its record named, not deep inside a rollout worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Sequence

from PIL import Image
from torch.utils.data import Dataset

from pebr.data.images import check_fitted_aspect, fit_size, load_image, probe_image
from pebr.data.prompts import build_messages, load_format_prompt
from pebr.data.records import (
    BadRecord,
    DataError,
    LoadReport,
    check_on_bad_record,
    normalize_record,
)

logger = logging.getLogger(__name__)

OVERLONG_REASON = "prompt_too_long"
TOO_MANY_IMAGES_REASON = "too_many_images"


def note_processor_bounds(processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """Log where the data's pixel bounds reach past the model's image processor, whose bounds then apply.

    Both the actor and vLLM expand images with the model's processor as shipped, so that an image becomes
    the same tokens on both sides; a data bound past the processor's is therefore not reached.
    """
    size = getattr(getattr(processor, "image_processor", None), "size", None)
    low, high = (size.get("shortest_edge"), size.get("longest_edge")) if hasattr(size, "get") else (None, None)
    if min_pixels is not None and low is not None and min_pixels < low:
        logger.info("data min_pixels=%d is below the model's image processor minimum of %d px: smaller images "
                    "are enlarged to it, in training and in the rollout alike", min_pixels, low)
    if max_pixels is not None and high is not None and max_pixels > high:
        logger.info("data max_pixels=%d is above the model's image processor maximum of %d px: larger images "
                    "are shrunk to it, in training and in the rollout alike", max_pixels, high)


class PromptLengthCounter:
    """Counts prompt tokens after the processor expands each image into its patch tokens.

    The expansion of one image depends only on its size, so it is measured once per size, by running
    the processor on a blank image of that size, and added to the token count of the unexpanded text.
    This gives exactly the length of `processor(text=[prompt], images=images)` without decoding images.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token: str = processor.image_token
        self._base = len(self._text_ids(self.image_token))
        self._per_size: dict[tuple[int, int], int] = {}

    def _text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def image_tokens(self, size: tuple[int, int]) -> int:
        """Number of tokens one placeholder becomes for an image of `size` = (width, height)."""
        if size not in self._per_size:
            blank = Image.new("RGB", size)
            expanded = self.processor(text=[self.image_token], images=[blank])["input_ids"][0]
            self._per_size[size] = len(expanded) - self._base + 1
        return self._per_size[size]

    def __call__(self, prompt: str, sizes: list[tuple[int, int]]) -> int:
        """Tokens of `prompt` (already chat-templated) with one image of each size in `sizes`."""
        return len(self._text_ids(prompt)) + sum(self.image_tokens(size) - 1 for size in sizes)


class RLDataset(Dataset):
    """Prompts for RL rollouts, checked up front, images decoded only when an item is read.

    Item `i` is a dict:
        "prompt": str, the chat-templated user turn with the generation prompt; each image appears as
            the template's <|vision_start|><|image_pad|><|vision_end|> (not yet expanded).
        "images": list[PIL.Image.Image], RGB, resized with `fit_size(min_pixels, max_pixels)`.
        "question": str, the record's question, normalised (an `<image>` placeholder in front per image when it
            wrote none), without the chat template or the format prompt;
        "ground_truth": str; "qid": str; "key_words": list[str];
        "index": int, the record's position in the `records` list given to the constructor.

    Attributes:
        report: a `LoadReport` of this construction (total = len(records)); prompts dropped for length
            are counted under the reason "prompt_too_long" (see `num_overlong`).
    """

    def __init__(
        self,
        records: list[dict[str, Any]],
        processor: Any,
        *,
        image_dir: str | None,
        max_prompt_length: int,
        format_prompt: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        filter_overlong_prompts: bool = True,
        on_bad_record: str = "raise",
        prompt_key: str = "problem",
        answer_key: str = "answer",
        image_key: str = "images",
        max_images: int | None = None,
        source: str | None = None,
        origins: Sequence[str] | None = None,
    ) -> None:
        """Validate every record, probe its images and measure its prompt.

        Args:
            records: raw or `load_records`-normalised records.
            processor: a Qwen2.5-VL style processor (tokenizer, image processor, chat template).
            image_dir: directory that relative image paths are joined to.
            max_prompt_length: the most prompt tokens allowed, counted after image expansion.
            format_prompt: path to a jinja2 template rendered with `content` = the question text.
            min_pixels, max_pixels: area bounds for resizing images (see `fit_size`); the model's image
                processor then applies its own (`note_processor_bounds`).
            max_images: the most images one prompt may have: the rollout engine's limit
                (worker.rollout.limit_images), which it would otherwise enforce only when the record is drawn.
            source: the file the records came from, named in errors before the record.
            origins: where each record was read (`LoadReport.kept_at`: file, line or position in the file),
                named in errors instead of `source` and the record's position in `records`, which skipped
                records and the files of a directory shift.
            filter_overlong_prompts: drop prompts over `max_prompt_length` (counted in the report)
                instead of raising.
            on_bad_record: "raise" or "skip" for records with bad fields or bad images.
            prompt_key / answer_key / image_key: the record keys of question, answer and images.

        Raises:
            DataError: a bad record with on_bad_record="raise", an overlong prompt with
                filter_overlong_prompts=False, or an unreadable template.
            ValueError: a bad on_bad_record or max_prompt_length.
        """
        check_on_bad_record(on_bad_record)
        if max_prompt_length <= 0:
            raise ValueError(f"max_prompt_length must be positive, got {max_prompt_length}")
        if origins is not None and len(origins) != len(records):
            raise ValueError(f"{len(origins)} origins for {len(records)} records")
        self.processor = processor
        self.source = source
        self.origins = origins
        self.image_dir = image_dir
        self.max_prompt_length = max_prompt_length
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.prompt_key, self.answer_key, self.image_key = prompt_key, answer_key, image_key
        self._template = load_format_prompt(format_prompt) if format_prompt else None
        from pebr.rewards.terms import clean_answer  # the graders' view of an answer (imports sympy: here only)

        note_processor_bounds(processor, min_pixels, max_pixels)
        count_tokens = PromptLengthCounter(processor)

        self.report = LoadReport(total=len(records))
        self._items: list[tuple[int, dict[str, Any], str]] = []  # (index, record, prompt)
        for index, raw in enumerate(records):
            where = self._record_name(index)
            try:
                record = normalize_record(
                    raw,
                    where=where,
                    default_qid=f"record-{index}",
                    prompt_key=prompt_key,
                    answer_key=answer_key,
                    image_key=image_key,
                )
                where = f"{where} qid={record['qid']!r}"
                if not clean_answer(record[answer_key]):
                    raise BadRecord("bad_answer", f"{where}: key {answer_key!r} is {record[answer_key]!r}, which "
                                    "leaves nothing to grade once spacing, markdown and math delimiters are removed")
                images = record[image_key]
                if max_images is not None and len(images) > max_images:
                    raise BadRecord(TOO_MANY_IMAGES_REASON, f"{where}: {len(images)} images, more than the "
                                    f"{max_images} the rollout engine takes per prompt (worker.rollout.limit_images)")
                sizes = [
                    fit_size(*probe_image(image, image_dir, where), min_pixels, max_pixels) for image in images
                ]
                for position, (width, height) in enumerate(sizes):
                    check_fitted_aspect(width, height, f"{where}: image {position}")
            except BadRecord as err:
                if on_bad_record == "raise":
                    raise
                self.report.add_skip(err)
                continue
            prompt = processor.apply_chat_template(
                build_messages(record[prompt_key], len(images), self._template),
                add_generation_prompt=True,
                tokenize=False,
            )
            length = count_tokens(prompt, sizes)
            if length > max_prompt_length:
                message = f"{where}: prompt has {length} tokens, more than max_prompt_length={max_prompt_length}"
                if not filter_overlong_prompts:
                    raise DataError(message + " (set filter_overlong_prompts to drop such prompts)")
                self.report.add_skip(BadRecord(OVERLONG_REASON, message))
                continue
            self._items.append((index, record, prompt))
        self.report.kept = len(self._items)
        # Stage 1's keyword term is 0 for every response to a record without key words (the trainer warns).
        self.num_without_key_words = sum(1 for _, record, _ in self._items if not record["key_words"])
        # Its CLIP term is 0 for every response to a record without an image (the trainer warns too).
        self.num_without_images = sum(1 for _, record, _ in self._items if not record[image_key])
        # ...and it scores the description against the first image alone.
        self.num_with_several_images = sum(1 for _, record, _ in self._items if len(record[image_key]) > 1)
        if self.num_overlong:
            logger.warning(
                "RLDataset: dropped %d of %d prompts longer than %d tokens",
                self.num_overlong,
                len(records),
                max_prompt_length,
            )
        if self.report.num_skipped:
            logger.warning("RLDataset: %s", self.report.summary())

    def _record_name(self, index: int) -> str:
        if self.origins is not None:
            return self.origins[index]
        return f"{self.source} record {index}" if self.source else f"record {index}"

    @property
    def num_overlong(self) -> int:
        """How many records were dropped because their prompt was over `max_prompt_length`."""
        return self.report.skipped.get(OVERLONG_REASON, 0)

    @property
    def record_indices(self) -> list[int]:
        """Positions (in the records given to the constructor) of the kept records, in item order."""
        return [index for index, _, _ in self._items]

    @property
    def fingerprint(self) -> str:
        """A hash of the kept records' qids and questions, in item order: a checkpoint's data order fits only
        the data set it was saved with, and two data sets of one size are told apart by this."""
        digest = hashlib.sha256()
        for _, record, _ in self._items:
            digest.update(json.dumps([record["qid"], record[self.prompt_key]], ensure_ascii=False).encode() + b"\n")
        return digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self._items)

    def record(self, i: int) -> dict[str, Any]:
        """The normalised record of item `i` (qid, question, answer, image references), without loading images."""
        return self._items[i][1]

    def __getitem__(self, i: int) -> dict[str, Any]:
        index, record, prompt = self._items[i]
        images = []
        for image in record[self.image_key]:
            try:
                images.append(load_image(image, self.image_dir, min_pixels=self.min_pixels, max_pixels=self.max_pixels))
            except (OSError, SyntaxError, ValueError) as err:
                # The file passed the probe at construction, so it changed or is broken past the header.
                where = f"{self._record_name(index)} qid={record['qid']!r}"
                raise DataError(f"{where}: image cannot be decoded: {err}") from err
        return {
            "prompt": prompt,
            "images": images,
            "question": record[self.prompt_key],
            "ground_truth": record[self.answer_key],
            "qid": record["qid"],
            "key_words": list(record["key_words"]),
            "index": index,
        }
