"""Dataset-level sampling: every question of the RL data set answered many times by one model, scored.

    python3 -m pebr.trainer.sample_main config=examples/pebr_sample.yaml key=value ...

Each question of `data.train_files` gets `worker.rollout.n x trainer.total_epochs` responses from
`worker.actor.model.model_path` (no training, no reference model), scored with
`worker.reward.reward_function`, and written to `trainer.sample_output` as JSONL, one record per
response:

    {"qid": ..., "response": "<complete text>", "ground_truth": ..., "score": {"accuracy": ..., ...},
     "sample": <0-based rollout index of this question>,
     "question": <digest of the question, answer and images: pebr.data.records.question_digest>,
     "index": <position among the records loaded, which a skipped bad record shifts>,
     "response_length": <tokens>}

`_rollout_outputs/sample_dataset.py` then splits the data set into easy / medium / hard cases.

The output is a log that can be resumed, never appended to blindly: on start, records of questions
that do not have the full count (a batch cut short by a crash) are removed by rewriting the file
atomically, and only questions without records are sampled. A question whose digest differs from its records'
(the data set edited since) stops the run: its qid now names another question. Each batch is written with a single
append followed by fsync, so a crash loses at most the batch in flight, and a rerun never duplicates. A run holds
`{output}.lock` (flock) while it writes, so a second run on the same output stops at once instead of appending
into it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pebr.cli import UserError, run_cli
from pebr.config import ConfigError, PPOConfig, check_writable_folder, load_config
from pebr.data.records import question_digest
from pebr.trainer.split import SplitError, rollout_fields
from pebr.utils.jsonio import (JSON_PARSE_ERRORS, append_durably, atomic_open, atomic_write_json, exclusive_lock,
                               is_within)

MAX_LISTED = 20


class SampleLogError(UserError, RuntimeError):
    """The existing sample output cannot be resumed; the message names the file and line."""


@dataclass
class SampleSummary:
    """What a sampling run did.

    Attributes:
        output: the JSONL file written.
        per_question: responses per question (rollout n x total_epochs).
        questions: questions in the data set after load-time filtering.
        already_done: questions found complete in the output at start.
        sampled: questions sampled by this run.
        records_written: records appended by this run.
        removed_partial: qids whose incomplete records were removed at start.
        dropped: qids of data-set records that are not sampled (e.g. prompts over max_prompt_length).
        skipped_at_load: where each record the loader skipped was (data.on_bad_record=skip: a bad answer,
            a duplicate qid...), by file and line or index, since such a record may have no qid.
        dropped_reasons: reason -> count, over all records dropped at load time.
        mean_accuracy: mean accuracy of the responses written by this run (nan when none).
    """

    output: str
    per_question: int
    questions: int = 0
    already_done: int = 0
    sampled: int = 0
    records_written: int = 0
    removed_partial: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    skipped_at_load: list[str] = field(default_factory=list)
    dropped_reasons: dict[str, int] = field(default_factory=dict)
    mean_accuracy: float = float("nan")


# -- the output log ----------------------------------------------------------------------------------
def _scan_output(path: str) -> tuple[dict[str, set[int]], str | None, int, dict[str, tuple[str, int]]]:
    """Per-qid sample indices of the complete lines of `path`, the qid of the last of them, how many bytes
    are complete lines, and per qid the question digest of its first line with that line's number (for lines
    that have one).

    A last line without its newline is the trace of a write cut short and is not counted; any other
    unreadable line means the file was not written by this tool (or was edited), and stops the run.
    """
    samples: dict[str, set[int]] = {}
    questions: dict[str, tuple[str, int]] = {}
    last_qid = None
    good_bytes = 0
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                break  # a truncated final line: dropped
            good_bytes += len(line)
            if not line.strip():
                continue
            try:
                # Read as the split reads it: a line it would refuse ("sample": 2.7, "3") must not pass a resume.
                qid, sample, _, question = rollout_fields(json.loads(line.decode("utf-8")), f"{path} line {line_number}")
            except SplitError as err:  # (a ValueError: caught before the parse errors)
                raise SampleLogError(f"{err}; move the file away or set trainer.sample_output to a new file") from None
            except JSON_PARSE_ERRORS as err:
                raise SampleLogError(
                    f"{path} line {line_number}: not a sample record ({type(err).__name__}: {err}); move the file "
                    "away or set trainer.sample_output to a new file") from None
            seen = samples.setdefault(qid, set())
            if sample in seen:
                raise SampleLogError(f"{path} line {line_number}: qid {qid!r} sample {sample} appears twice; the file "
                                     "was appended to by another run: move it away or set trainer.sample_output")
            seen.add(sample)
            if question is not None:
                questions.setdefault(qid, (question, line_number))
            last_qid = qid
    return samples, last_qid, good_bytes, questions


def recover_output(path: str, per_question: int, questions: dict[str, str] | None = None
                   ) -> tuple[set[str], list[str]]:
    """Make `path` hold only questions with all their records; return those and the one removed.

    A batch's records are appended in one write, each question's samples together and in order, so an
    interruption leaves at most one incomplete question: the file's last, with its first samples. Anything
    else is a file written with a smaller n (or edited): removing those questions would throw that run's
    samples away, so it is an error instead.

    Args:
        path: the JSONL sample output (need not exist).
        per_question: the number of records a complete question has (samples 0 .. per_question-1).
        questions: qid -> question digest of the data set now; a complete question of the file whose digest
            differs is an error (records without a digest are not checked).

    Returns:
        (complete qids, qids whose partial records were removed: none or one). The file is rewritten
        atomically (temporary file, fsync, rename) only when something had to be removed.

    Raises:
        SampleLogError: an unreadable line before the last, a duplicate (qid, sample), a qid with
            a sample index outside 0 .. per_question-1 (written with another n or total_epochs), or
            incomplete questions that no interruption leaves (written with a smaller n or total_epochs),
            or a complete question sampled for another question than its qid names now.
    """
    if not os.path.exists(path):
        return set(), []
    samples, last_qid, good_bytes, sampled_as = _scan_output(path)
    full = set(range(per_question))
    for qid, seen in samples.items():
        if not seen <= full:
            raise SampleLogError(
                f"{path}: qid {qid!r} has sample index {max(seen)}, but this run makes {per_question} per question "
                "(worker.rollout.n x trainer.total_epochs); the file was written with other settings: move it "
                "away or set trainer.sample_output")
    complete = {qid for qid, seen in samples.items() if seen == full}
    changed = [f"{qid!r} (line {sampled_as[qid][1]})" for qid in sorted(complete)
               if questions and qid in questions and qid in sampled_as and sampled_as[qid][0] != questions[qid]]
    if changed:
        listed = ", ".join(changed[:MAX_LISTED]) + (f" ... and {len(changed) - MAX_LISTED} more"
                                                     if len(changed) > MAX_LISTED else "")
        raise SampleLogError(
            f"{path}: {len(changed)} questions were sampled for another question than their qid names in the data "
            f"set now: {listed}. The data set was edited since (a question replaced, or records inserted or removed "
            "before others, which moves the default qids '<file stem>-<index>'); resuming would keep rollouts of the "
            "old questions: move the file away or set trainer.sample_output to a new file")
    partial = sorted(qid for qid in samples if qid not in complete)
    interrupted = partial == [last_qid] and samples[last_qid] == set(range(len(samples[last_qid])))
    if partial and not interrupted:
        counts = Counter(len(samples[qid]) for qid in partial)
        raise SampleLogError(
            f"{path}: {len(partial)} questions have fewer than the {per_question} samples this run makes "
            f"(worker.rollout.n x trainer.total_epochs), {dict(sorted(counts.items()))} (samples: questions), "
            f"e.g. {partial[0]!r}; an interrupted run leaves at most one, the file's last question with its first "
            "samples: the file was written with a smaller n or total_epochs (or edited). Resuming would delete "
            "those samples: move the file away or set trainer.sample_output to a new file (or rerun with the "
            "settings that wrote it)")
    truncated = good_bytes != os.path.getsize(path)
    if partial or truncated:
        _rewrite_keeping(path, complete, good_bytes)
    return complete, partial


def _rewrite_keeping(path: str, keep: set[str], good_bytes: int) -> None:
    with open(path, "rb") as src, atomic_open(path, "wb") as dst:
        read = 0
        for line in src:
            read += len(line)
            if read > good_bytes:
                break
            if line.strip() and str(json.loads(line)["qid"]) in keep:
                dst.write(line)


def append_records(path: str, records: list[dict]) -> None:
    """Append whole records in one write, then flush and fsync (a batch is on disk before the next starts)."""
    append_durably(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))


# -- the data set ---------------------------------------------------------------------------------
def load_prompts(cfg: PPOConfig, processor: Any) -> tuple[Any, dict[str, str], list[str], list[str], dict[str, int]]:
    """The prompt data set and its questions, plus what was dropped at load time.

    Returns:
        (dataset, questions, dropped_qids, skipped_at_load, dropped_reasons): `questions` maps each kept record's
        qid to its question digest (`question_digest`), in item order (`list(questions)[i]` is `dataset[i]`'s);
        dropped_qids are records read but not kept (too long, bad images); skipped_at_load where the records
        the loader skipped were (they may have no qid); dropped_reasons counts both by reason.
    """
    from pebr.trainer.main import load_dataset

    dataset, records, load_report = load_dataset(cfg, cfg.data.train_files, processor)
    d = cfg.data
    keys = {"prompt_key": d.prompt_key, "answer_key": d.answer_key, "image_key": d.image_key}
    kept = dataset.record_indices
    questions = {records[index]["qid"]: question_digest(records[index], **keys) for index in kept}
    for index in kept:
        try:
            json.dumps(records[index], ensure_ascii=False)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"{load_report.kept_at[index]}: {err}; the split that follows sampling writes the records to JSON "
                "files, which cannot hold them (images as bytes or decoded images, say): write the data set as JSON "
                "records whose images are file paths (data.image_dir joins relative ones) and sample that") from err
    kept_set = set(kept)
    dropped = [r["qid"] for i, r in enumerate(records) if i not in kept_set]
    reasons = Counter(load_report.skipped) + Counter(dataset.report.skipped)
    return dataset, questions, dropped, load_report.skipped_at, dict(reasons)


def _report_dropped(summary: SampleSummary, source: str) -> None:
    total = sum(summary.dropped_reasons.values())
    path = os.path.splitext(summary.output)[0] + ".dropped.json"
    if not total:
        if os.path.exists(path):
            os.remove(path)  # from an earlier run with other settings: it would mislead
        return
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(summary.dropped_reasons.items()))
    listed = ", ".join(summary.dropped[:MAX_LISTED])
    more = f" ... and {len(summary.dropped) - MAX_LISTED} more" if len(summary.dropped) > MAX_LISTED else ""
    at_load = (f"; {len(summary.skipped_at_load)} skipped by the loader, at "
               f"{', '.join(summary.skipped_at_load[:MAX_LISTED])}" if summary.skipped_at_load else "")
    print(f"warning: {total} records of {source} are not sampled ({reasons}); qids: {listed}{more}{at_load}",
          flush=True)
    atomic_write_json(path, {"source": source, "reasons": summary.dropped_reasons, "qids": summary.dropped,
                             "skipped_at_load": summary.skipped_at_load})
    print(f"the full list of records not sampled is in {path}", flush=True)


# -- sampling -------------------------------------------------------------------------------------
def sampling_params(cfg: PPOConfig) -> dict:
    """All responses of a question in one request: n x total_epochs samples share the prompt's prefill. Each
    question draws from a seed of its own (`worker.rollout.seed` and its qid), so its responses do not depend on
    the batch it came in, the number of workers, or whether the run was resumed."""
    r = cfg.worker.rollout
    return {"n": r.n * cfg.trainer.total_epochs, "temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k,
            "max_tokens": cfg.data.max_response_length, "seed": r.seed}


def to_records(batch: Any, scores: list[dict[str, float]], per_question: int, questions: dict[str, str]) -> list[dict]:
    """One output record per response; `sample` numbers the responses of each qid from 0, `question` is the
    question digest from `questions` (qid -> digest).

    Raises:
        RuntimeError: a question came back with a number of responses other than `per_question`.
    """
    nt = batch.non_tensors
    seen: Counter = Counter()
    records = []
    for i in range(len(batch)):
        qid = nt["qid"][i]
        records.append({"qid": qid, "response": nt["response"][i], "ground_truth": nt["ground_truth"][i],
                        "score": {k: float(v) for k, v in scores[i].items()}, "sample": seen[qid],
                        "question": questions[qid], "index": nt["index"][i],
                        "response_length": len(batch.response_ids[i])})
        seen[qid] += 1
    wrong = {q: c for q, c in seen.items() if c != per_question}
    if wrong:
        raise RuntimeError(f"the rollout returned a number of responses other than {per_question} for {wrong}")
    return records


def run(argv: list[str]) -> SampleSummary:
    """Sample every remaining question; see the module docstring.

    Args:
        argv: `config=FILE` words and dotted overrides, as on the command line.

    Returns:
        The `SampleSummary` (also printed).

    Raises:
        ConfigError: a bad configuration or an empty data set.
        SampleLogError: an existing output that cannot be resumed.
        WorkerFailure: a worker died or raised.
    """
    cfg = load_config(argv, training=False)
    # (after the settings are read: a mistyped key is reported before torch and transformers load)
    from pebr.trainer.main import check_fits_context
    from pebr.utils.versions import warn_untested_versions
    from pebr.workers.actor import load_processor

    warn_untested_versions()
    if not cfg.worker.reward.reward_function:
        raise ConfigError("worker.reward.reward_function is required (path/to/file.py:function)")
    out = cfg.trainer.sample_output
    if not out.strip() or out.endswith(os.sep) or os.path.isdir(out):
        raise ConfigError(f"trainer.sample_output={out!r} names no file (a directory, or nothing); name the JSONL "
                          "file to write")
    source = cfg.data.train_files
    if (os.path.isdir(source) and is_within(out, source)
            or os.path.isfile(source) and os.path.exists(out) and os.path.samefile(out, source)):
        raise ConfigError(f"trainer.sample_output={out!r} is, or lies in, data.train_files={source!r}: the next "
                          "sampling run would read the rollouts as questions; write them elsewhere")
    per_question = cfg.worker.rollout.n * cfg.trainer.total_epochs
    if per_question > 1 and cfg.worker.rollout.temperature <= 0:  # n copies of one greedy answer: no medium case
        raise ConfigError(f"worker.rollout.temperature={cfg.worker.rollout.temperature} is greedy decoding: the "
                          f"{per_question} rollouts of a question would be one answer repeated, and the split could "
                          "find no medium case (1 to n-1 correct); sample at a temperature above 0 (the paper: 1.2)")
    summary = SampleSummary(output=out, per_question=per_question)
    check_writable_folder(os.path.dirname(os.path.abspath(out)), f"trainer.sample_output={out!r}")

    processor = load_processor(cfg.worker.actor.model)
    check_fits_context(cfg)
    dataset, questions, summary.dropped, summary.skipped_at_load, summary.dropped_reasons = load_prompts(cfg, processor)
    summary.questions = len(dataset)
    # A second sampling run on this file would append its records into this run's, and recover_output rewrites it.
    with exclusive_lock(f"{out}.lock", lambda holder: SampleLogError(
            f"{out} is being written by another sampling run ({holder}, holding {out}.lock): wait for it to end, "
            "or stop it, before resuming; or set another trainer.sample_output")):
        return _sample_remaining(cfg, dataset, questions, out, summary)


def _sample_remaining(cfg: Any, dataset: Any, questions: dict[str, str], out: str,
                      summary: SampleSummary) -> SampleSummary:
    """Resume the output log, then sample the questions it lacks (the caller holds the output's lock)."""
    import ray

    from pebr.trainer.ray_trainer import init_ray, sigterm_as_interrupt

    _report_dropped(summary, cfg.data.train_files)
    per_question = summary.per_question
    qids = list(questions)
    complete, summary.removed_partial = recover_output(out, per_question, questions)
    if summary.removed_partial:
        print(f"{out}: removed the records of question {summary.removed_partial[0]!r}, sampled only in part "
              "(an interrupted write); it is sampled again", flush=True)
    todo = [i for i, qid in enumerate(qids) if qid not in complete]
    summary.already_done = len(qids) - len(todo)
    if summary.already_done:
        print(f"{out}: {summary.already_done} of {len(qids)} questions already sampled; {len(todo)} to go", flush=True)
    if not todo:
        print(f"nothing to sample: every question of {cfg.data.train_files} is in {out}", flush=True)
        return summary

    started = init_ray(cfg)
    try:
        with sigterm_as_interrupt():  # (after ray.init, which sets a handler of its own)
            correct, total = _sample(cfg, dataset, questions, qids, todo, per_question, out, summary)
    finally:
        if started:  # only the Ray this run started: a caller's (the tests') stays up
            ray.shutdown()
    summary.mean_accuracy = correct / total if total else float("nan")
    print(f"sampled {summary.sampled} questions x {per_question} = {summary.records_written} records into {out} "
          f"(mean accuracy {summary.mean_accuracy:.3f}); {summary.already_done} were already done", flush=True)
    return summary


def _sample(cfg: Any, dataset: Any, questions: dict, qids: list, todo: list, per_question: int, out: str,
            summary: SampleSummary) -> tuple[float, float]:
    """Sample the questions `todo` into `out`; returns the sum of their accuracies and their number."""
    import ray
    from tqdm import tqdm

    from pebr.trainer.main import probe_reward, start_reward_worker
    from pebr.trainer.ray_trainer import WorkerGroup, ray_get, reward_inputs

    reward = start_reward_worker(cfg, require_overall=False)
    workers = None
    correct = total = 0.0
    try:
        # The difficulty split reads each record's accuracy: a reward without one would waste the whole run.
        probe_reward(reward, dataset[todo[0]], cfg.trainer.worker_timeout_s,
                     {"accuracy": "the difficulty split (pebr.trainer.split)"})
        workers = WorkerGroup(cfg, total_steps=1, need_actor=False)  # kills its actors itself if start-up fails
        sampling = sampling_params(cfg)
        size = cfg.data.rollout_batch_size
        # Closed on a failure too, before the error is printed (its redraw at exit came after the message).
        with tqdm(total=len(qids), initial=summary.already_done, unit="question", desc="sampling",
                  dynamic_ncols=True) as bar:
            for start in range(0, len(todo), size):  # the last, partial batch included
                prompts = []
                for i in todo[start:start + size]:
                    item = dataset[i]
                    item["uid"] = f"sample-{item['index']}"
                    prompts.append(item)
                batch, _ = workers.generate(prompts, sampling)
                scores = ray_get(reward.compute.remote(reward_inputs(batch)), "reward", cfg.trainer.worker_timeout_s)
                records = to_records(batch, scores, per_question, questions)
                append_records(out, records)
                summary.sampled += len(prompts)
                summary.records_written += len(records)
                acc = [float(s.get("accuracy", float("nan"))) for s in scores]
                correct, total = correct + sum(acc), total + len(acc)
                bar.set_postfix(accuracy=f"{correct / total:.3f}")
                bar.update(len(prompts))
    finally:
        # The engines hold memory (and GPUs) until their actors end; do not leave them to the next run.
        if workers is not None:
            workers.shutdown()
        ray.kill(reward)
    return correct, total


def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    code = run_cli(run, argv, __doc__)
    if code == 0:
        print(f"done in {time.time() - t0:.0f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
