"""The easy / medium / hard split of the RL data set by how many sampled rollouts are correct.

PeBR-R1 samples every question n times (n = 8 in the paper) with the warm-up model and splits the
data set by the number of correct responses: easy = all n correct (stage 1, perception), medium =
1 .. n-1 correct (stage 2, reasoning), hard = none correct. Groups whose rewards are all equal
have zero GRPO advantage, which is why stage 2 trains on the medium cases only.

The rollout file is read as a stream, one JSON record per line, keeping two integers per qid,
so a file of millions of lines costs memory in proportion to the number of questions only.
The data set's records are written to the split files exactly as they were read.

No torch, no Ray: `split_dataset` is called by `_rollout_outputs/sample_dataset.py` and by tests.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from pebr.utils.jsonio import atomic_write_json, read_json_records

SPLIT_NAMES = ("easy", "medium", "hard")
SPLIT_FILES = {"easy": "easycase.json", "medium": "mediumcase.json", "hard": "hardcase.json"}
MAX_LISTED = 20  # qids named in a warning before "... and K more"


class SplitError(ValueError):
    """A rollout or data-set file that cannot be split; the message names the file and line or record."""


@dataclass
class QidCount:
    """Rollouts seen for one qid and how many of them were correct."""

    total: int = 0
    correct: int = 0


@dataclass
class SplitReport:
    """What `split_dataset` read and wrote.

    Attributes:
        n: the expected number of rollouts per qid.
        rollout_lines: rollout records read (bad lines not included).
        bad_lines: malformed rollout lines skipped (only with skip_bad_lines).
        sizes: split name -> number of data-set records written to it.
        correct_histogram: number of correct rollouts -> number of qids (over sampled qids in the data set).
        wrong_count: qid -> rollouts seen, for qids with a count other than n.
        never_sampled: qids of data-set records that have no rollout (written to no split).
        unknown_qids: number of qids in the rollout file that the data set does not have.
        paths: split name -> file written.
    """

    n: int
    rollout_lines: int = 0
    bad_lines: int = 0
    sizes: dict[str, int] = field(default_factory=lambda: {name: 0 for name in SPLIT_NAMES})
    correct_histogram: dict[int, int] = field(default_factory=dict)
    wrong_count: dict[str, int] = field(default_factory=dict)
    never_sampled: list[str] = field(default_factory=list)
    unknown_qids: int = 0
    paths: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines of statistics for the console."""
        sampled = sum(self.sizes.values())
        lines = [f"rollout records read: {self.rollout_lines}" + (f" (skipped {self.bad_lines} malformed lines)"
                                                                   if self.bad_lines else "")]
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
        paper's 8/8, 1-7, 0/8 rule; with another count (reported as a warning) the same all/some/none
        reading is used, so duplicated rollouts cannot turn an all-correct question into "medium".
    """
    if total <= 0:
        raise ValueError(f"a question needs at least one rollout to be classified, got total={total}")
    if correct == total:
        return "easy"
    if correct == 0:
        return "hard"
    return "medium"


def _rollout_fields(value: Any, where: str) -> tuple[str, bool]:
    if not isinstance(value, dict):
        raise SplitError(f"{where}: a rollout record must be a JSON object, got {type(value).__name__}")
    qid = value.get("qid")
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise SplitError(f"{where}: key 'qid' is missing or not a string/integer")
    score = value.get("score")
    accuracy = score.get("accuracy") if isinstance(score, dict) else None
    if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)):
        raise SplitError(f"{where}: key 'score.accuracy' is missing or not a number")
    return str(qid), float(accuracy) == 1.0


def iter_rollouts(path: str, skip_bad_lines: bool = False, bad: Counter | None = None) -> Iterator[tuple[str, bool]]:
    """Stream (qid, correct) from a rollout JSONL file, one line at a time.

    Args:
        path: the rollout file written by `pebr.trainer.sample_main`.
        skip_bad_lines: skip malformed lines (counted in `bad["lines"]`) instead of raising.
        bad: a Counter that receives the number of skipped lines under "lines".

    Raises:
        SplitError: a missing file, or a malformed line (not JSON, no qid, no numeric score.accuracy)
            naming the file and line number, unless skip_bad_lines.
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
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise SplitError(f"{where}: malformed JSON: {err}") from None
                yield _rollout_fields(value, where)
            except SplitError:
                if not skip_bad_lines:
                    raise
                if bad is not None:
                    bad["lines"] += 1


def count_rollouts(path: str, skip_bad_lines: bool = False) -> tuple[dict[str, QidCount], int, int]:
    """Per-qid rollout and correct counts of a rollout file.

    Returns:
        (counts, lines, bad_lines): qid -> QidCount, records read, malformed lines skipped.
    """
    counts: dict[str, QidCount] = {}
    bad: Counter = Counter()
    lines = 0
    for qid, correct in iter_rollouts(path, skip_bad_lines, bad):
        entry = counts.get(qid)
        if entry is None:
            entry = counts[qid] = QidCount()
        entry.total += 1
        entry.correct += int(correct)
        lines += 1
    return counts, lines, bad["lines"]


def record_qid(record: Any, stem: str, index: int) -> str:
    """The qid the loaders give a data-set record: its own "qid", else "<file stem>-<index>"."""
    qid = record.get("qid") if isinstance(record, dict) else None
    return f"{stem}-{index}" if qid is None else str(qid)


def read_dataset(path: str) -> list[Any]:
    """The data set's records as they are in the file (.json list or .jsonl), unchanged.

    Raises:
        SplitError: a missing or malformed file, naming it (and the line for .jsonl).
    """
    if not os.path.isfile(path):
        raise SplitError(f"data-set file {path!r} does not exist")
    return read_json_records(path, SplitError)


def _listed(qids: list[str]) -> str:
    shown = ", ".join(qids[:MAX_LISTED])
    return shown + (f" ... and {len(qids) - MAX_LISTED} more" if len(qids) > MAX_LISTED else "")


def split_dataset(rollouts: str, dataset: str, output_dir: str, n: int = 8, *, skip_bad_lines: bool = False,
                  strict: bool = False, log: Any = print) -> SplitReport:
    """Write easycase.json, mediumcase.json and hardcase.json from a rollout file and the data set.

    Args:
        rollouts: JSONL rollout records {qid, score: {accuracy, ...}, ...}.
        dataset: the sampled data set (.json list or .jsonl); its records are copied unchanged.
        output_dir: where the three files go (created if missing).
        n: expected rollouts per qid; other counts are warned about (or an error with `strict`).
        skip_bad_lines: count and skip malformed rollout lines instead of stopping at the first.
        strict: raise on any qid with a rollout count other than n.
        log: where warnings and statistics go (a print-like function).

    Returns:
        The `SplitReport`.

    Raises:
        SplitError: a missing/malformed file, a malformed rollout line (file and line number), or with
            `strict` a qid with a count other than n.
        ValueError: n < 1.
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    report = SplitReport(n=n)
    records = read_dataset(dataset)
    counts, report.rollout_lines, report.bad_lines = count_rollouts(rollouts, skip_bad_lines)
    stem = os.path.splitext(os.path.basename(dataset))[0]
    splits: dict[str, list[Any]] = {name: [] for name in SPLIT_NAMES}
    known: set[str] = set()
    for index, record in enumerate(records):
        qid = record_qid(record, stem, index)
        known.add(qid)
        entry = counts.get(qid)
        if entry is None:
            report.never_sampled.append(qid)
            continue
        if entry.total != n:
            report.wrong_count[qid] = entry.total
        splits[classify(entry.correct, entry.total)].append(record)
        report.correct_histogram[entry.correct] = report.correct_histogram.get(entry.correct, 0) + 1
    report.unknown_qids = sum(1 for qid in counts if qid not in known)

    if report.wrong_count:
        listed = _listed([f"{q} ({c})" for q, c in report.wrong_count.items()])
        message = (f"{len(report.wrong_count)} qids of {rollouts} have a rollout count other than n={n}: {listed}; "
                   "they are split by all / some / none correct of the rollouts seen")
        if strict:
            raise SplitError(message)
        log(f"warning: {message}")
    if report.never_sampled:
        log(f"warning: {len(report.never_sampled)} records of {dataset} were never sampled and are in no split: "
            f"{_listed(report.never_sampled)}")
    if report.unknown_qids:
        log(f"warning: {report.unknown_qids} qids of {rollouts} are not in {dataset} (ignored)")
    if report.bad_lines:
        log(f"warning: skipped {report.bad_lines} malformed lines of {rollouts}")

    for name in SPLIT_NAMES:
        path = os.path.join(output_dir, SPLIT_FILES[name])
        atomic_write_json(path, splits[name])
        report.sizes[name] = len(splits[name])
        report.paths[name] = path
    log(report.summary())
    return report
