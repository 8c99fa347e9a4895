"""Load and validate RL prompt records (no torch, no transformers).

A record is one question of the RL data set (the paper's RL data format; README, "Running the trainer")::

    {"qid": "q-17", "problem": "<image>How many cubes?", "answer": "3",
     "images": ["scenes/17.png"], "key_words": ["cube", "red"]}

`load_records` reads records from a local file or directory, or from the hub when a `name@split` is
given, and returns them normalised: the prompt is a non-empty string whose `<image>` placeholders match
the images one to one, the answer is a string, images are a list, `key_words` a list of strings and
`qid` a unique string. A record that breaks a rule either stops the load with a `DataError` naming the
file, the record and the key, or is skipped and counted in the returned `LoadReport`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pebr.cli import UserError
from pebr.utils.jsonio import JSON_PARSE_ERRORS, json_parse_failure

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
_PLACEHOLDER_LOOKALIKE = re.compile(r"<\s*image\s*>", re.IGNORECASE)  # "<Image>", "< image >"
# The model's own vision tokens. In a record's text they are taken for image slots ("image features and image
# tokens do not match", or the processor running out of images); a rollout must never emit them either.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# The chat template's control tokens: in a turn's text they end the turn early or open another one.
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
IMAGE_KEYS = ("images", "image")  # the names image columns usually have
JSON_SUFFIXES = (".json", ".jsonl", ".parquet")
ON_BAD_RECORD_CHOICES = ("raise", "skip")
MAX_REPORT_MESSAGES = 10


class DataError(UserError, ValueError):
    """A data source or record is unusable; the message names the file, the record and the key."""

    label = "data error"


class BadRecord(DataError):
    """One record broke a rule; `reason` is a short stable tag used to count skips."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class LoadReport:
    """What a load kept and what it skipped.

    Attributes:
        total: records seen (kept + skipped).
        kept: records returned.
        skipped: reason tag -> number of records skipped for it.
        messages: the first `MAX_REPORT_MESSAGES` skip messages, verbatim.
        skipped_at: where every skipped record was (file and line or index), when the caller said.
        kept_at: where each returned record was, in order (`load_records` fills it).
    """

    total: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    skipped_at: list[str] = field(default_factory=list)
    kept_at: list[str] = field(default_factory=list)

    def add_skip(self, error: BadRecord, where: str | None = None) -> None:
        """Count one skipped record under `error.reason` and keep its message if there is room."""
        self.skipped[error.reason] = self.skipped.get(error.reason, 0) + 1
        if where is not None:
            self.skipped_at.append(where)
        if len(self.messages) < MAX_REPORT_MESSAGES:
            self.messages.append(str(error))

    @property
    def num_skipped(self) -> int:
        """Total number of skipped records, over all reasons."""
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line for the log: counts, the reasons, and the first skipped record's message (which names it)."""
        reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(self.skipped.items()))
        return f"kept {self.kept} of {self.total} records; skipped {self.num_skipped}" + (
            f" ({reasons})" if reasons else "") + (f"; first: {self.messages[0]}" if self.messages else "")


def check_on_bad_record(on_bad_record: str) -> None:
    """Raise `ValueError` unless `on_bad_record` is one of `ON_BAD_RECORD_CHOICES`."""
    if on_bad_record not in ON_BAD_RECORD_CHOICES:
        raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD_CHOICES}, got {on_bad_record!r}")


# ----------------------------------------------------------------------------------------------
# Reading sources
# ----------------------------------------------------------------------------------------------


@dataclass
class RawRecord:
    """A record as read, with where it came from (for messages and default qids)."""

    value: Any
    origin: str  # file path or hub id
    stem: str  # default qid prefix
    index: int  # position in its file
    line: int | None = None  # JSONL line number, for messages
    parse_error: str | None = None  # set when the JSONL line itself is malformed


def _read_json(path: str) -> Iterator[RawRecord]:
    stem = os.path.splitext(os.path.basename(path))[0]
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        data = json.loads(raw.decode("utf-8-sig"))  # -sig: a byte-order mark (Windows editors) is skipped
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from err
    except json.JSONDecodeError as err:
        # One broken document cannot be partly skipped: always stop here.
        hint = ("; it looks like JSON Lines (one record a line): name it .jsonl"
                if err.msg == "Extra data" and err.colno == 1 else "")
        raise DataError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}{hint}") from err
    except JSON_PARSE_ERRORS as err:
        raise DataError(f"{path}: cannot be read as JSON: {json_parse_failure(err)}") from err
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json source must hold a list of records, found {type(data).__name__}")
    for index, value in enumerate(data):
        yield RawRecord(value, path, stem, index)


def _read_jsonl(path: str) -> Iterator[RawRecord]:
    stem = os.path.splitext(os.path.basename(path))[0]
    index = 0
    # Binary lines, decoded one by one, so that a bad byte spoils one record and not the whole file.
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value, parse_error = json.loads(line.decode("utf-8-sig")), None
            except UnicodeDecodeError as err:
                value, parse_error = None, f"not UTF-8 text (byte {err.start})"
            except JSON_PARSE_ERRORS as err:
                value, parse_error = None, json_parse_failure(err)
            yield RawRecord(value, path, stem, index, line=line_number, parse_error=parse_error)
            index += 1


def _read_parquet(path: str) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq  # imported here: only parquet sources need it

    stem = os.path.splitext(os.path.basename(path))[0]
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: cannot read parquet file: {err}") from err
    for index, value in enumerate(rows):
        yield RawRecord(value, path, stem, index)


_READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def _read_file(path: str) -> Iterator[RawRecord]:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _READERS:
        raise DataError(f"{path}: unsupported file type {suffix!r}; expected one of {JSON_SUFFIXES}")
    yield from _READERS[suffix](path)


def _read_hub(source: str) -> Iterator[RawRecord]:
    name, split = source.rsplit("@", 1)
    if not name or not split:
        raise DataError(f"{source!r}: a hub source is written 'name@split'")
    import datasets  # imported here: only hub sources need it (and only they touch the network)

    try:
        table = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types (network, missing split, ...)
        raise DataError(f"{source!r}: datasets.load_dataset({name!r}, split={split!r}) failed: {err}") from err
    yield from _table_rows(table, source, f"{name.rstrip('/').split('/')[-1]}-{split}")


def _read_saved(folder: str) -> Iterator[RawRecord]:
    """A folder written by `datasets.Dataset.save_to_disk`."""
    import datasets

    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        splits = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)))
        raise DataError(f"{folder}: a saved DatasetDict with splits {splits}; name the folder of one, e.g. "
                        f"{os.path.join(folder, splits[0]) if splits else folder + '/train'}")
    try:
        table = datasets.load_from_disk(folder)
    except Exception as err:  # datasets raises many types for a damaged folder
        raise DataError(f"{folder}: datasets.load_from_disk failed: {err}") from err
    yield from _table_rows(table, folder, os.path.basename(os.path.normpath(folder)))


def _table_rows(table: Any, origin: str, stem: str) -> Iterator[RawRecord]:
    """The rows as Arrow stores them: image columns stay {"bytes", "path"}, undecoded (`datasets` decodes images
    as rows are read: one corrupt image stopped the whole load with a bare PIL error, and every image sat decoded
    in memory), and nothing is written (`Dataset.cast` wrote a copy of the whole table beside its files)."""
    if getattr(table, "_indices", None) is not None:  # a selection: its rows, in its order
        table = table.flatten_indices()
    index = 0
    for batch in table.data.to_batches():
        for value in batch.to_pylist():
            yield RawRecord(value, origin, stem, index)
            index += 1


def iter_source(source: str) -> Iterator[RawRecord]:
    """Yield raw records from a file, a directory of files (sorted by name), a folder written by `datasets`'
    `save_to_disk`, or a `name@split`."""
    source = os.path.expanduser(source)
    if os.path.isdir(source) and (os.path.isfile(os.path.join(source, "dataset_dict.json")) or all(
            os.path.isfile(os.path.join(source, name)) for name in ("state.json", "dataset_info.json"))):
        yield from _read_saved(source)
    elif os.path.isdir(source):
        files = sorted(
            os.path.join(source, name)
            for name in os.listdir(source)
            if name.lower().endswith(JSON_SUFFIXES) and os.path.isfile(os.path.join(source, name))
        )
        if not files:
            raise DataError(f"{source}: directory holds no {'/'.join(JSON_SUFFIXES)} files")
        for path in files:
            yield from _read_file(path)
    elif os.path.isfile(source):
        yield from _read_file(source)
    elif "@" in source:
        yield from _read_hub(source)
    else:
        raise DataError(f"{source}: no such file or directory (and not a 'name@split' hub id)")


# ----------------------------------------------------------------------------------------------
# Validating one record
# ----------------------------------------------------------------------------------------------


def _is_image_like(value: Any) -> bool:
    if isinstance(value, (str, bytes, bytearray)):
        return True
    if isinstance(value, dict):
        return True  # checked in detail by _normalize_image
    return type(value).__module__.startswith("PIL.")  # any PIL image class, without importing PIL


def _normalize_image(value: Any, where: str, key: str, position: int) -> Any:
    """Return a path (str), raw bytes, or a PIL image; a {"bytes", "path"} dict becomes one of those."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, (bytes, bytearray)) and len(data) > 0:
            return bytes(data)
        if isinstance(path, str) and path:
            return path
        raise BadRecord("bad_image", f"{where}: key {key!r}[{position}] is a dict without non-empty 'bytes' or 'path'")
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord("bad_image", f"{where}: key {key!r}[{position}] is an empty path")
        return value
    if isinstance(value, (bytes, bytearray)):
        if len(value) == 0:
            raise BadRecord("bad_image", f"{where}: key {key!r}[{position}] is empty bytes")
        return bytes(value)
    if _is_image_like(value):
        return value
    raise BadRecord(
        "bad_image",
        f"{where}: key {key!r}[{position}] must be a path, bytes, a PIL image or a dict with 'bytes'/'path', "
        f"got {type(value).__name__}",
    )


def _normalize_images(value: Any, where: str, key: str) -> list[Any]:
    if value is None or (isinstance(value, str) and not value.strip()):  # a text-only row's empty cell (CSV)
        return []
    if _is_image_like(value):
        value = [value]  # a single image is accepted as a list of one
    if not isinstance(value, (list, tuple)):
        raise BadRecord("bad_image", f"{where}: key {key!r} must be a list of images, got {type(value).__name__}")
    return [_normalize_image(item, where, key, position) for position, item in enumerate(value)]


def _normalize_answer(value: Any, where: str, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRecord("bad_answer", f"{where}: key {key!r} must be a string or a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRecord("bad_answer", f"{where}: key {key!r} is {value!r}, not a usable answer")
    answer = value if isinstance(value, str) else str(value)
    if not answer.strip():
        raise BadRecord("bad_answer", f"{where}: key {key!r} is an empty string")
    return answer


def check_no_model_tokens(text: str, where: str, key: str) -> None:
    """Refuse text holding one of the model's vision tokens (reason "vision_token_in_text") or the chat template's
    control tokens (reason "chat_token_in_text").

    Raises:
        BadRecord: naming `where`, the key and the token.
    """
    for token in VISION_TOKENS:
        if token in text:
            raise BadRecord("vision_token_in_text", f"{where}: key {key!r} holds the model's vision token {token!r}, "
                                                    f"which the processor would take for an image slot; mark images "
                                                    f"with {IMAGE_PLACEHOLDER} only")
    for token in CHAT_TOKENS:
        if token in text:
            raise BadRecord("chat_token_in_text", f"{where}: key {key!r} holds the chat template's control token "
                                                  f"{token!r}, which would end the turn there or start another")


def check_unicode(text: str, where: str, key: str, reason: str = "bad_text") -> None:
    """JSON can carry half of a surrogate pair (an emoji cut in two, "\\ud83c"), which Python reads but no UTF-8
    file, file system or tokenizer takes: the tokenizer failed with a bare TypeError, the question digest and the
    SFT filter's output with a UnicodeEncodeError, none naming the record."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadRecord(reason, f"{where}: key {key!r} is not valid Unicode (a lone surrogate "
                                f"{text[err.start]!r} at character {err.start})") from None


def _normalize_key_words(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(word, str) for word in value):
        raise BadRecord("bad_key_words", f"{where}: key 'key_words' must be a list of strings, got {value!r:.80}")
    for position, word in enumerate(value):
        check_unicode(word, where, f"key_words[{position}]", "bad_key_words")
    # A blank key word is found in no response: it scored every response of its record 0 on recall, and the
    # record still counted as one with key words.
    return [word for word in value if word.strip()]


def normalize_record(
    value: Any,
    *,
    where: str,
    default_qid: str,
    prompt_key: str = "problem",
    answer_key: str = "answer",
    image_key: str = "images",
) -> dict[str, Any]:
    """Validate one record and return a normalised copy (other keys are kept as they are).

    A prompt that has images but no `<image>` placeholder gets one placeholder per image prepended,
    so that the placeholders always match the images one to one.

    Args:
        value: the record as read.
        where: how to name the record in messages, e.g. "data/rl.jsonl line 4 (record 3)".
        default_qid: the qid to use when the record has none.
        prompt_key / answer_key / image_key: the record's keys for the question, answer and images.

    Returns:
        A new dict with `prompt_key` (str), `answer_key` (str), `image_key` (list of path/bytes/PIL
        image), `key_words` (list[str]) and `qid` (str).

    Raises:
        BadRecord: the record breaks a rule; `reason` tags which one.
    """
    if not isinstance(value, dict):
        raise BadRecord("not_a_dict", f"{where}: a record must be a JSON object, got {type(value).__name__}")
    qid = value.get("qid")
    if qid is None:
        qid = default_qid
    elif isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise BadRecord("bad_qid", f"{where}: key 'qid' must be a string or an integer, got {type(qid).__name__}")
    elif isinstance(qid, str) and not qid.strip():
        raise BadRecord("bad_qid", f"{where}: key 'qid' is blank ({qid!r}); give it a name or leave the key out")
    else:
        if isinstance(qid, str):
            check_unicode(qid, where, "qid", "bad_qid")
        qid = str(qid)
        where = f"{where} qid={qid!r}"  # only a qid from the data helps find the record

    prompt = value.get(prompt_key)
    if not isinstance(prompt, str) or not prompt.strip():
        problem = "missing" if prompt_key not in value else f"not a non-empty string ({type(prompt).__name__})"
        raise BadRecord("bad_prompt", f"{where}: key {prompt_key!r} is {problem}")
    if answer_key not in value or value[answer_key] is None:
        raise BadRecord("bad_answer", f"{where}: key {answer_key!r} is {'missing' if answer_key not in value else 'null'}")
    check_unicode(prompt, where, prompt_key, "bad_prompt")
    check_no_model_tokens(prompt, where, prompt_key)
    answer = _normalize_answer(value[answer_key], where, answer_key)
    check_unicode(answer, where, answer_key, "bad_answer")
    images = _normalize_images(value.get(image_key), where, image_key)
    for position, image in enumerate(images):
        if isinstance(image, str):
            check_unicode(image, where, f"{image_key}[{position}]", "bad_image")
    if image_key not in value:
        # Without this a data set whose images are under another usual name would load as text-only questions.
        stray = [k for k in IMAGE_KEYS if k != image_key and value.get(k) not in (None, "", [])]
        if stray:
            raise BadRecord("bad_image", f"{where}: key {image_key!r} is missing but key {stray[0]!r} is set: if it "
                                         f"holds the images, rename it to {image_key!r} (or set the trainer's "
                                         f"data.image_key={stray[0]})")
    key_words = _normalize_key_words(value.get("key_words"), where)

    placeholders = prompt.count(IMAGE_PLACEHOLDER)
    lookalike = next((m.group() for m in _PLACEHOLDER_LOOKALIKE.finditer(prompt) if m.group() != IMAGE_PLACEHOLDER),
                     None)
    if lookalike is not None and images:  # it stayed text, and the image went in front of the question instead
        raise BadRecord("image_count_mismatch", f"{where}: key {prompt_key!r} holds {lookalike!r}, which is not the "
                                                f"image placeholder {IMAGE_PLACEHOLDER} (it is matched exactly)")
    if images and placeholders == 0:
        prompt = IMAGE_PLACEHOLDER * len(images) + prompt
    elif placeholders != len(images):
        raise BadRecord(
            "image_count_mismatch",
            f"{where}: key {prompt_key!r} has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
            f"but key {image_key!r} has {len(images)} image(s)",
        )

    record = dict(value)
    record.update({prompt_key: prompt, answer_key: answer, image_key: images, "key_words": key_words, "qid": qid})
    return record


def _image_reference(image: Any) -> str:
    if isinstance(image, str):
        return os.path.basename(image)  # data moved to another disk is still the same question
    if isinstance(image, bytes):
        return "sha256:" + hashlib.sha256(image).hexdigest()
    return "pixels:" + hashlib.sha256(image.tobytes()).hexdigest()  # a PIL image


def question_digest(record: dict[str, Any], *, prompt_key: str = "problem", answer_key: str = "answer",
                    image_key: str = "images") -> str:
    """A short hash of a normalised record's question, answer and images (their file names, or their bytes).

    The rollout file and the split know a question by its qid, which defaults to its position in its file: a
    data set edited after sampling (a question replaced, or one inserted before others) would pair rollouts with
    questions they were not sampled for. Sampling writes this digest with every rollout, and resuming and the
    split compare it with the data set's.
    """
    parts = [record[prompt_key], record[answer_key], [_image_reference(i) for i in record[image_key]]]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def describe_raw(raw: RawRecord) -> str:
    if raw.line is not None:
        return f"{raw.origin} line {raw.line} (record {raw.index})"
    return f"{raw.origin} record {raw.index}"


def load_records(
    source: str,
    *,
    prompt_key: str = "problem",
    answer_key: str = "answer",
    image_key: str = "images",
    on_bad_record: str = "raise",
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Read and validate RL prompt records.

    A local path always wins over a hub name; the network is touched only when `source` names no
    local path and has the form `name@split`.

    Args:
        source: a .json file (a list of records), a .jsonl file, a .parquet file, a directory (all such
            files in it, in sorted order), or `name@split` for `datasets.load_dataset(name, split=split)`.
        prompt_key / answer_key / image_key: the record keys of the question, answer and images.
        on_bad_record: "raise" stops at the first bad record; "skip" drops it, counts it in the report
            and logs one summary line at the end.

    Returns:
        (records, report): the normalised records (see `normalize_record`; qids default to
        "<file stem>-<index in file>" and must be unique) and the `LoadReport`.

    Raises:
        DataError: an unreadable source (missing path, malformed .json document, non-list .json), or
            with on_bad_record="raise" the first bad record (malformed JSONL line, missing or wrongly
            typed key, placeholder/image mismatch, duplicate qid), naming file, line/index and key.
        ValueError: `on_bad_record` is not "raise" or "skip".
    """
    check_on_bad_record(on_bad_record)
    report = LoadReport()
    records: list[dict[str, Any]] = []
    first_at: dict[str, str] = {}  # qid -> where it was first used
    for raw in iter_source(source):
        report.total += 1
        where = describe_raw(raw)
        try:
            if raw.parse_error is not None:
                raise BadRecord("malformed_json", f"{where}: malformed JSON: {raw.parse_error}")
            record = normalize_record(
                raw.value,
                where=where,
                default_qid=f"{raw.stem}-{raw.index}",
                prompt_key=prompt_key,
                answer_key=answer_key,
                image_key=image_key,
            )
            if record["qid"] in first_at:
                # Duplicate qids would merge two questions in qid-keyed sampling logs and splits.
                given = raw.value.get("qid") if isinstance(raw.value, dict) else None
                how = ("its default qid" if given is None
                       else f"its qid {given!r}, read as the string" if not isinstance(given, str) else "its qid")
                raise BadRecord("duplicate_qid", f"{where}: {how} {record['qid']!r} was already used by "
                                                 f"{first_at[record['qid']]}")
        except BadRecord as err:
            if on_bad_record == "raise":
                raise
            report.add_skip(err, where)
            continue
        first_at[record["qid"]] = where
        records.append(record)
        report.kept_at.append(where)
    report.kept = len(records)
    if report.num_skipped:
        logger.warning("load_records(%s): %s", source, report.summary())
    return records, report
