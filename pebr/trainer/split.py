"""The easy / medium / hard split of the RL data set by how many sampled rollouts are correct.

PeBR-R1 samples every question n times (n = 8 in the paper) with the warm-up model and splits the
data set by the number of correct responses: easy = all n correct (stage 1, perception), medium =
1 .. n-1 correct (stage 2, reasoning), hard = none correct. Groups whose rewards are all equal
have zero GRPO advantage, which is why stage 2 trains on the medium cases only.

The rollout file is read as a stream, one JSON record per line, keeping per qid two counts and a bit set
of the rollout indices seen, so a file of millions of lines costs memory in proportion to the number of
questions only.
The data set is read from whatever the sampling run read (a .json, .jsonl or .parquet file, a
directory of them, or a hub `name@split`), with the loader's default qids, and its records are
written to the JSON split files exactly as they were read.

The split refuses, before writing anything, what would give silently wrong files: a rollout file
that shares no qid with the data set (sampled from another file), a question sampled other than n
times (the rule is about exactly n rollouts; `allow_count_mismatch` opts out), a rollout index that
appears twice for one question (a file appended to or joined with a copy, whose doubled halves could
add up to n), a qid shared by two data-set records (the rollout file keys rollouts by qid alone), a question
other than the one its qid's rollouts answered (the data set edited after sampling), and
an output directory where a split file would replace the data set itself. The three files are replaced as
a set, so stage 1 and stage 2 never train on the halves of two different splits.

No torch, no Ray: `split_dataset` is called by `_rollout_outputs/sample_dataset.py` and by tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from pebr.cli import UserError
from pebr.data.records import BadRecord, DataError, describe_raw, iter_source, normalize_record, question_digest
from pebr.utils.jsonio import JSON_PARSE_ERRORS, atomic_write_json, is_within

SPLIT_NAMES = ("easy", "medium", "hard")
SPLIT_FILES = {"easy": "easycase.json", "medium": "mediumcase.json", "hard": "hardcase.json"}
MAX_LISTED = 20  # qids named in a warning before "... and K more"
MAX_LISTED_IN_ERROR = 5  # an error names a few, enough to find them in the files
MAX_SAMPLE = 1 << 20  # rollout indices per question beyond any sampling run (bounds the per-qid bit set)


class SplitError(UserError, ValueError):
    """A rollout or data-set file that cannot be split; the message names the file and line or record."""


@dataclass
class QidCount:
    """Rollouts seen for one qid and how many of them were correct."""

    total: int = 0
    correct: int = 0
    seen: int = 0  # bit k set: rollout index ("sample") k was read; a few bytes for n = 8
    question: str | None = None  # the question digest of its first rollout line (None: a file without them)
    first_line: int = 0  # that line's number (an int: a few bytes per question where a file has millions)

    def add(self, sample: int, correct: bool) -> bool:
        """Count rollout `sample`; False (and nothing counted) when it was counted already."""
        bit = 1 << sample
        if self.seen & bit:
            return False
        self.seen |= bit
        self.total += 1
        self.correct += int(correct)
        return True


@dataclass
class SplitReport:
    """What `split_dataset` read and wrote.

    Attributes:
        n: the expected number of rollouts per qid.
        rollout_lines: rollout records read (bad lines not included).
        bad_lines: malformed or repeated rollout lines skipped (only with skip_bad_lines).
        sizes: split name -> number of data-set records written to it.
        correct_histogram: number of correct rollouts -> number of qids (over sampled qids in the data set).
        wrong_count: qid -> rollouts seen, for qids with a count other than n (only filled with
            allow_count_mismatch; otherwise such a qid is an error).
        never_sampled: qids of data-set records that have no rollout (written to no split).
        refused: the loader's message for each record it refuses (skipped: only with skip_bad_lines, as
            sampling with data.on_bad_record=skip skipped them).
        repeated: where each later record with an earlier valid record's qid was (skipped: only with
            skip_bad_lines, as sampling with data.on_bad_record=skip sampled the first valid record of a qid).
        unknown_qids: number of qids in the rollout file that the data set does not have.
        partial_scores: rollouts whose accuracy is neither 0 nor 1 (counted as not correct).
        paths: split name -> file written.
    """

    n: int
    rollout_lines: int = 0
    bad_lines: int = 0
    sizes: dict[str, int] = field(default_factory=lambda: {name: 0 for name in SPLIT_NAMES})
    correct_histogram: dict[int, int] = field(default_factory=dict)
    wrong_count: dict[str, int] = field(default_factory=dict)
    never_sampled: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    repeated: list[str] = field(default_factory=list)
    unknown_qids: int = 0
    partial_scores: int = 0
    paths: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines of statistics for the console."""
        sampled = sum(self.sizes.values())
        skipped = f" (skipped {self.bad_lines} malformed or repeated lines)" if self.bad_lines else ""
        lines = [f"rollout records read: {self.rollout_lines}{skipped}"]
        for name in SPLIT_NAMES:
            share = 100.0 * self.sizes[name] / sampled if sampled else 0.0
            lines.append(f"  {name:<6} {self.sizes[name]:>8}  ({share:5.1f} %)  -> {self.paths.get(name, '-')}")
        histogram = ", ".join(f"{k}: {v}" for k, v in sorted(self.correct_histogram.items()))
        lines.append(f"  questions by number of correct rollouts: {{{histogram}}}")
        if self.wrong_count:
            lines.append(f"  qids with a rollout count other than {self.n}: {len(self.wrong_count)}")
        if self.never_sampled:
            lines.append(f"  data-set records never sampled: {len(self.never_sampled)}")
        if self.unknown_qids:
            lines.append(f"  rollout qids not in the data set (ignored): {self.unknown_qids}")
        return "\n".join(lines)


def classify(correct: int, total: int) -> str:
    """The split of a question with `correct` of `total` rollouts correct.

    Args:
        correct: number of rollouts with accuracy 1.0.
        total: number of rollouts (> 0).

    Returns:
        "easy" when all are correct, "hard" when none is, else "medium". With total == n this is the
        paper's 8/8, 1-7, 0/8 rule; `split_dataset` passes another count only with
        allow_count_mismatch (and warns), and then the same all/some/none reading is used, so
        duplicated rollouts cannot turn an all-correct question into "medium".
    """
    if total <= 0:
        raise ValueError(f"a question needs at least one rollout to be classified, got total={total}")
    if correct == total:
        return "easy"
    if correct == 0:
        return "hard"
    return "medium"


def rollout_fields(value: Any, where: str) -> tuple[str, int, float, str | None]:
    """(qid, sample, accuracy, question digest or None) of one parsed line of a sampling log: the one reading of
    a line, for the split and for sampling's resume.

    Raises:
        SplitError: naming `where` and the key that is missing or of the wrong type.
    """
    if not isinstance(value, dict):
        raise SplitError(f"{where}: a rollout record must be a JSON object, got {type(value).__name__}")
    qid = value.get("qid")
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise SplitError(f"{where}: key 'qid' is missing or not a string/integer")
    score = value.get("score")
    accuracy = score.get("accuracy") if isinstance(score, dict) else None
    if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) or not _finite(accuracy):
        raise SplitError(f"{where}: key 'score.accuracy' is missing or not a finite number")
    sample = value.get("sample")
    if isinstance(sample, bool) or not isinstance(sample, int) or not 0 <= sample < MAX_SAMPLE:
        raise SplitError(f"{where}: key 'sample' (the question's 0-based rollout index, which "
                         f"pebr.trainer.sample_main writes) is missing or not an integer in [0, {MAX_SAMPLE})")
    question = value.get("question")
    return str(qid), sample, float(accuracy), question if isinstance(question, str) else None


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an integer of hundreds of digits
        return False


def iter_rollouts(path: str, skip_bad_lines: bool = False,
                  bad: Counter | None = None) -> Iterator[tuple[str, int, float, str | None, int]]:
    """Stream (qid, sample, accuracy, question digest, line number) from a rollout JSONL file, one line at a time.

    Args:
        path: the rollout file written by `pebr.trainer.sample_main`.
        skip_bad_lines: skip malformed lines (counted in `bad["lines"]`) instead of raising.
        bad: a Counter that receives the number of skipped lines under "lines".

    Raises:
        SplitError: a missing file, or a malformed line (not JSON, no qid, no integer sample, no finite
            score.accuracy) naming the file and line number, unless skip_bad_lines.
    """
    if not os.path.isfile(path):
        raise SplitError(f"rollout file {path!r} does not exist (run pebr.trainer.sample_main first)")
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_number}"
            try:
                try:
                    value = json.loads(line.decode("utf-8"))
                except JSON_PARSE_ERRORS as err:  # (UnicodeDecodeError is a ValueError)
                    cut = ("; it is the file's last line and has no end: a sampling run stopped while writing it, "
                           "and rerunning the sampling removes it" if not line.endswith(b"\n") else "")
                    raise SplitError(f"{where}: malformed JSON: {type(err).__name__}: {err}{cut}") from None
                yield (*rollout_fields(value, where), line_number)
            except SplitError:
                if not skip_bad_lines:
                    raise
                if bad is not None:
                    bad["lines"] += 1


def count_rollouts(path: str, skip_bad_lines: bool = False) -> tuple[dict[str, QidCount], int, int, int]:
    """Per-qid rollout and correct counts of a rollout file. A rollout is correct when its score.accuracy is
    exactly 1 (the split rule counts right answers); partial credit (0.5, 0.999) is not.

    A question's rollout index ("sample") may appear once: a second line with it is a file appended to or
    joined with a copy, and a question sampled 4 times then doubled must not pass for one sampled 8 times.

    Returns:
        (counts, lines, bad_lines, partial): qid -> QidCount, records read, malformed or repeated lines skipped,
        rollouts whose accuracy is neither 0 nor 1.

    Raises:
        SplitError: as `iter_rollouts`, or a repeated (qid, sample) naming the file and line, unless
            skip_bad_lines (which keeps the first and counts the repeat as a bad line).
    """
    counts: dict[str, QidCount] = {}
    bad: Counter = Counter()
    lines = 0
    for qid, sample, accuracy, question, line in iter_rollouts(path, skip_bad_lines, bad):
        entry = counts.get(qid)
        if entry is None:
            entry = counts[qid] = QidCount(question=question, first_line=line)
        if not entry.add(sample, accuracy == 1.0):
            if not skip_bad_lines:
                raise SplitError(
                    f"{path} line {line}: qid {qid!r} sample {sample} appears a second time; "
                    "pebr.trainer.sample_main writes each rollout once, so the file was appended to or joined with a "
                    "copy. Split the rollouts of one sampling run (or --skip_bad_lines to keep the first of each)")
            bad["lines"] += 1
            continue
        lines += 1
        bad["partial"] += accuracy not in (0.0, 1.0)
    return counts, lines, bad["lines"], bad["partial"]


@contextlib.contextmanager
def _not_being_written(rollouts: str) -> Iterator[None]:
    """Hold a shared lock on the sampling run's `ROLLOUTS.lock` while the log is read; refuse one a sampling run
    holds (a log still being written split with exit 0, whatever was there). Read-only: nothing is written to the
    lock, which may belong to another user; without a lock file there is nothing to check."""
    try:
        handle = open(f"{rollouts}.lock")
    except OSError:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or "another process"
            raise SplitError(f"{rollouts} is being written by a sampling run ({holder}): split it once that run has "
                             "ended (nothing was written)") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_qid(record: Any, stem: str, index: int) -> str:
    """The qid the loaders give a data-set record: its own "qid", else "<file stem>-<index>"."""
    qid = record.get("qid") if isinstance(record, dict) else None
    return f"{stem}-{index}" if qid is None else str(qid)


@dataclass
class DatasetRecord:
    """A data-set record as read, its qid and how to name it in messages."""

    value: Any
    qid: str
    where: str


def read_dataset(source: str, malformed: list[str] | None = None) -> list[DatasetRecord]:
    """The data set's records as they are in the source, unchanged, each with its qid.

    `source` is anything the sampling run reads as data.train_files: a .json, .jsonl or .parquet file,
    a directory of them, or a hub `name@split`; qids default as the loader gives them, so they match the
    rollout file's.

    Args:
        malformed: where to list malformed JSONL lines (named by file and line) and skip them, as sampling
            with data.on_bad_record=skip did; without it such a line is an error.

    Raises:
        SplitError: a missing or unreadable source or a malformed JSONL line, naming the file and line.
    """
    records = []
    try:
        for raw in iter_source(source):
            where = describe_raw(raw)
            if raw.parse_error is not None:
                if malformed is None:
                    raise SplitError(f"{where}: malformed JSON: {raw.parse_error}")
                malformed.append(where)
                continue
            qid = record_qid(raw.value, raw.stem, raw.index)
            records.append(DatasetRecord(raw.value, qid, f"{where} qid={qid!r}"))
    except DataError as err:
        raise SplitError(f"data set {source!r}: {err}") from err
    return records


def check_output_dir(output_dir: str, dataset: str) -> None:
    """Refuse an output directory that is a file, that is (or lies in) the directory being split (a later
    sampling run would read the split files there as more questions), or where a split file would replace the
    data set itself (re-splitting dataset/mediumcase.json into dataset/: its records that were not sampled would
    be in no file any more).

    Raises:
        SplitError: naming both.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise SplitError(f"output directory {output_dir} is a file; name a directory for the split files")
    if os.path.isfile(dataset):
        for name in SPLIT_NAMES:
            target = os.path.join(output_dir, SPLIT_FILES[name])
            if os.path.exists(target) and os.path.samefile(target, dataset):
                raise SplitError(
                    f"the data set {dataset} is the {name} split file {target} of --output_dir {output_dir}: the new "
                    "split would replace the records being split; write the split elsewhere (SPLIT_DIR, --output_dir)")
    if os.path.isdir(dataset) and is_within(output_dir, dataset):
        raise SplitError(
            f"the split files would go into {output_dir}, inside the data set directory {dataset}: sampling "
            f"that directory again would take easycase/mediumcase/hardcase.json for more questions; write "
            "them elsewhere (SPLIT_DIR, --output_dir)")


def _listed(qids: list[str], limit: int = MAX_LISTED) -> str:
    shown = ", ".join(qids[:limit])
    return shown + (f" ... and {len(qids) - limit} more" if len(qids) > limit else "")


def check_unique_qids(records: list[DatasetRecord], dataset: str) -> None:
    """Refuse two records with one qid (an explicit one, or one equal to another record's default).

    The rollout file keys rollouts by qid alone, so such records could not be told apart: both would be
    written to one split and counted twice.

    Raises:
        SplitError: naming the data set, the qids and the records.
    """
    places: dict[str, list[str]] = {}
    for record in records:
        places.setdefault(record.qid, []).append(record.where)
    shared = [f"{qid!r} ({'; '.join(where)})" for qid, where in places.items() if len(where) > 1]
    if shared:
        raise SplitError(
            f"{dataset}: {len(shared)} qids are used by more than one record: "
            f"{_listed(shared, MAX_LISTED_IN_ERROR)}; the rollouts of such records cannot be told apart, so they "
            "cannot be split: give every record its own qid (and sample again) or remove the duplicates")


def records_sampled_with_skip(records: list[DatasetRecord], keys: dict[str, str]
                              ) -> tuple[list[DatasetRecord], list[str], list[str]]:
    """The records sampling with data.on_bad_record=skip sampled: the loader (`load_records`) skips a record it
    refuses (`normalize_record`: no answer, a wrong type, placeholders that do not match the images, ...) before
    that record claims its qid, and then every later record of a claimed qid. So of several records with one qid
    the first valid one was sampled, not the first one.

    Args:
        keys: the sampling run's data.prompt_key / answer_key / image_key as prompt_key / answer_key / image_key.

    Returns:
        (kept, refused, repeated): the sampled records, the loader's message for each refused one, and where the
        later valid records of a claimed qid were.
    """
    seen: set[str] = set()
    kept, refused, repeated = [], [], []
    for record in records:
        try:
            normalize_record(record.value, where=record.where, default_qid=record.qid, **keys)
        except BadRecord as err:
            refused.append(str(err))
            continue
        if record.qid in seen:
            repeated.append(record.where)
        else:
            seen.add(record.qid)
            kept.append(record)
    return kept, refused, repeated


def check_same_questions(records: list[DatasetRecord], counts: dict[str, QidCount], keys: dict[str, str],
                         dataset: str, rollouts: str) -> None:
    """Refuse rollouts sampled for another question under the same qid (the data set edited after sampling).

    Rollout lines carry the digest of the question they answer (`question_digest`; files written before it have
    none, and are not checked). A record the loader refuses has no digest, and is not checked either: sampling
    never saw it as a question.

    Raises:
        SplitError: naming the first few qids with the record and the rollout line of each.
    """
    changed = []
    for record in records:
        entry = counts.get(record.qid)
        if entry is None or entry.question is None:
            continue
        try:
            normalized = normalize_record(record.value, where=record.where, default_qid=record.qid, **keys)
        except BadRecord:
            continue
        if question_digest(normalized, **keys) != entry.question:
            changed.append(f"{record.where} (sampled as {rollouts} line {entry.first_line})")
    if changed:
        compared = sum(1 for r in records if r.qid in counts and counts[r.qid].question is not None)
        keys_hint = (f" Every one of the {compared} differs: if the data set is unchanged, the split reads it with "
                     f"other keys than sampling did ({', '.join(f'{k}={v!r}' for k, v in keys.items())} here; pass "
                     "the sampling run's data.prompt_key / answer_key / image_key as --prompt_key / --answer_key / "
                     "--image_key).") if len(changed) == compared else ""
        raise SplitError(
            f"{len(changed)} questions of {dataset} are not the ones {rollouts} sampled under their qids: "
            f"{_listed(changed, MAX_LISTED_IN_ERROR)}. The data set was edited after sampling (a question replaced, "
            "or records inserted or removed before others, which moves the default qids '<file stem>-<index>'): "
            "split the data set as it was sampled, or sample the edited one again into a new rollout file."
            f"{keys_hint} Nothing was written")


def check_json_storable(records: list[DatasetRecord]) -> None:
    """The split files are JSON: refuse, before writing, a record JSON cannot hold (say an image stored as
    bytes in a parquet file or a hub data set), naming it.

    Raises:
        SplitError: naming the record and the type JSON cannot hold.
    """
    for record in records:
        try:
            json.dumps(record.value, ensure_ascii=False).encode("utf-8")  # (a lone surrogate fails only here)
        except (TypeError, ValueError) as err:
            raise SplitError(
                f"{record.where}: {err}; the split files are JSON, so a data set whose records hold such values "
                "(images as bytes or decoded images, say) cannot be split as it is: write it as JSON records "
                "whose images are file paths (data.image_dir joins relative ones), sample that, and split it. "
                "Nothing was written") from err


def _write_splits(output_dir: str, splits: dict[str, list[Any]]) -> dict[str, str]:
    """Replace the three split files as a set; returns split name -> path.

    Each file is first written complete and fsynced beside its target (with the project's atomic
    writer), and only when all three are on disk are they renamed over the previous ones. A failure
    while writing (disk full, a crash, an interrupt) leaves the previous set as it was; only a crash
    between the three renames, a few microseconds, could mix old and new files.
    """
    paths = {name: os.path.join(output_dir, SPLIT_FILES[name]) for name in SPLIT_NAMES}
    staged = {name: os.path.join(output_dir, f".{SPLIT_FILES[name]}.staged") for name in SPLIT_NAMES}
    try:
        for name in SPLIT_NAMES:
            atomic_write_json(staged[name], splits[name])
    except BaseException:
        for path in staged.values():
            if os.path.exists(path):
                os.remove(path)
        raise
    for name in SPLIT_NAMES:
        os.replace(staged[name], paths[name])
    return paths


def split_dataset(rollouts: str, dataset: str, output_dir: str, n: int = 8, *, skip_bad_lines: bool = False,
                  allow_count_mismatch: bool = False, prompt_key: str = "problem", answer_key: str = "answer",
                  image_key: str = "images", log: Any = print) -> SplitReport:
    """Write easycase.json, mediumcase.json and hardcase.json from a rollout file and the data set.

    Args:
        rollouts: JSONL rollout records {qid, score: {accuracy, ...}, ...}.
        dataset: the sampled data set, as the sampling run's data.train_files named it (a .json, .jsonl or
            .parquet file, a directory of them, or a hub `name@split`); its records are copied unchanged
            into the JSON split files.
        output_dir: where the three files go (created if missing). They are replaced as a set, and
            left as they were when the split stops with an error.
        n: rollouts per qid (worker.rollout.n x trainer.total_epochs of the sampling run); a sampled
            qid with another count is an error unless `allow_count_mismatch`.
        skip_bad_lines: count and skip malformed or repeated rollout lines, malformed JSONL lines of the data
            set, records the loader refuses and records whose qid an earlier valid record has (which sampling
            with data.on_bad_record=skip skipped too: `records_sampled_with_skip`), instead of stopping at the
            first.
        allow_count_mismatch: split a qid with a count other than n anyway, by all / some / none
            correct of the rollouts seen, with a warning naming the qids.
        prompt_key / answer_key / image_key: the sampling run's data.prompt_key / answer_key / image_key (to
            compare each question with the one its rollouts answered, and with skip_bad_lines, to tell which
            records its loader refused).
        log: where warnings and statistics go (a print-like function).

    Returns:
        The `SplitReport`.

    Raises:
        SplitError: a missing/malformed file, a malformed rollout line (file and line number), a qid
            shared by two data-set records (unless `skip_bad_lines`), no data-set qid in the rollout file, a question
            other than the one its qid's rollouts were sampled for (`check_same_questions`), a qid with a
            count other than n (unless `allow_count_mismatch`), or a record JSON cannot hold. Nothing
            is written then.
        SplitError: n < 1.
    """
    if n < 1:
        raise SplitError(f"n must be positive, got {n}")
    report = SplitReport(n=n)
    check_output_dir(output_dir, dataset)
    malformed: list[str] = []
    records = read_dataset(dataset, malformed if skip_bad_lines else None)
    keys = {"prompt_key": prompt_key, "answer_key": answer_key, "image_key": image_key}
    if skip_bad_lines:  # the first valid record of a qid is the one sampling kept
        records, report.refused, report.repeated = records_sampled_with_skip(records, keys)
    else:
        check_unique_qids(records, dataset)  # before the rollout file, which may take minutes to read
    qids = [record.qid for record in records]
    with _not_being_written(rollouts):
        counts, report.rollout_lines, report.bad_lines, report.partial_scores = count_rollouts(rollouts,
                                                                                                 skip_bad_lines)
    splits: dict[str, list[DatasetRecord]] = {name: [] for name in SPLIT_NAMES}
    known = set(qids)
    for record in records:
        entry = counts.get(record.qid)
        if entry is None:
            report.never_sampled.append(record.qid)
            continue
        if entry.total != n:
            report.wrong_count[record.qid] = entry.total
        splits[classify(entry.correct, entry.total)].append(record)
        report.correct_histogram[entry.correct] = report.correct_histogram.get(entry.correct, 0) + 1
    report.unknown_qids = sum(1 for qid in counts if qid not in known)
    check_same_questions(records, counts, keys, dataset, rollouts)

    if not records:
        raise SplitError(f"{dataset} holds no records: nothing to split (nothing was written to {output_dir})")
    if not report.correct_histogram:
        # Writing three empty files would replace a good split and look like a successful run.
        found = (f"{len(counts)} qids, e.g. {_listed(list(counts), MAX_LISTED_IN_ERROR)}" if counts
                 else "no rollout records")
        raise SplitError(
            f"none of the {len(records)} qids of {dataset} (e.g. {_listed(qids, MAX_LISTED_IN_ERROR)}) is in the "
            f"rollout file {rollouts} ({found}): it was sampled from another data set, or sampling has not run; "
            f"pass the data set that was sampled (data.train_files of the sampling run). Nothing was written: "
            f"the split files in {output_dir} are left as they were")
    if report.wrong_count:
        listed = _listed([f"{q} ({c})" for q, c in report.wrong_count.items()],
                         MAX_LISTED if allow_count_mismatch else MAX_LISTED_IN_ERROR)
        message = (f"{len(report.wrong_count)} qids of {rollouts} have a rollout count other than n={n}: {listed}")
        if not allow_count_mismatch:
            raise SplitError(
                f"{message}; the split rule (all / 1..n-1 / none correct) is about exactly n rollouts. Rerun the "
                "sampling if it was interrupted (examples/pebr_sample.sh resumes: it removes the incomplete rollouts "
                "an interruption leaves, the file's last question's, and samples what is missing), check that n is "
                "worker.rollout.n x trainer.total_epochs of the sampling run, "
                "or split by all / some / none correct of the rollouts seen anyway with --allow_count_mismatch "
                "(split_dataset(..., allow_count_mismatch=True)). Nothing was written: the split "
                f"files in {output_dir} are left as they were")
        log(f"warning: {message}; they are split by all / some / none correct of the rollouts seen")
    if report.never_sampled:
        log(f"warning: {len(report.never_sampled)} records of {dataset} were never sampled and are in no split: "
            f"{_listed(report.never_sampled)}")
    if report.unknown_qids:
        log(f"warning: {report.unknown_qids} qids of {rollouts} are not in {dataset} (ignored)")
    if report.bad_lines:
        log(f"warning: skipped {report.bad_lines} malformed or repeated lines of {rollouts}")
    if report.partial_scores:  # a soft grader's 0.999 made an all-correct question hard, silently
        log(f"warning: {report.partial_scores} rollouts of {rollouts} scored an accuracy neither 0 nor 1; the split "
            "counts only exactly 1 as correct (a grader giving partial credit or rounding sorts questions wrongly)")
    digests = Counter(counts[r.qid].question for r in records if r.qid in counts and counts[r.qid].question)
    twice = sum(1 for number in digests.values() if number > 1)
    if twice:  # split apart, one copy may train in each stage
        log(f"warning: {twice} questions of {dataset} appear under several qids (the same text, answer and image "
            "file names)")
    if malformed:
        log(f"warning: skipped {len(malformed)} malformed lines of {dataset} (not sampled either): "
            f"{_listed(malformed)}")
    if report.refused:
        log(f"warning: skipped {len(report.refused)} records of {dataset} that the loader refuses (not sampled "
            f"either): {_listed(report.refused, MAX_LISTED_IN_ERROR)}")
    if report.repeated:
        log(f"warning: skipped {len(report.repeated)} records of {dataset} whose qid an earlier valid record has "
            f"(not sampled either): {_listed(report.repeated)}")

    for name in ("easy", "medium") if n > 1 else ("easy",):  # (one rollout a question: no medium case can be)
        if not splits[name]:
            log(f"warning: no {name} case: the stage that trains on {name}case.json would have no data")
    check_json_storable([record for name in SPLIT_NAMES for record in splits[name]])
    report.paths = _write_splits(output_dir, {name: [r.value for r in splits[name]] for name in SPLIT_NAMES})
    report.sizes = {name: len(splits[name]) for name in SPLIT_NAMES}
    log(report.summary())
    return report
