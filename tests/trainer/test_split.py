"""The easy / medium / hard split (pebr.trainer.split and _rollout_outputs/sample_dataset.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tracemalloc

import pytest
from omegaconf import OmegaConf

import pebr.trainer.split as split_module
from pebr.trainer.split import SplitError, classify, split_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 8


def _cli():
    spec = importlib.util.spec_from_file_location("sample_dataset", os.path.join(ROOT, "_rollout_outputs",
                                                                                 "sample_dataset.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rollout(qid, accuracy, sample=0):
    return {"qid": qid, "response": "### The final answer is: 3", "ground_truth": "3",
            "score": {"accuracy": accuracy, "overall": accuracy}, "sample": sample, "index": 0}


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


# The data set: (qid, accuracies of its rollouts or None when never sampled)
CASES = {
    "q-easy": [1.0] * 8,
    "q-medium": [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
    "q-one": [0.0] * 7 + [1.0],
    "q-seven": [1.0] * 7 + [0.0],
    "q-hard": [0.0] * 8,
    "q-half": [0.5] * 8,  # partial credit is not correct: accuracy must be 1.0
    "q-never": None,
    "q-short": [1.0] * 5,  # a count other than n: an error, or with the opt-in warned, all correct -> easy
    "q-double": [1.0] * 16,  # duplicated rollouts, all correct: still easy (the authors' release got this wrong)
}
WRONG_COUNT = ("q-short", "q-double")
EXPECTED = {"easy": ["q-easy", "q-short", "q-double"],
            "medium": ["q-medium", "q-one", "q-seven", "train-9"],
            "hard": ["q-hard", "q-half"]}


@pytest.fixture
def files(tmp_path):
    records = []
    for i, qid in enumerate(CASES):
        records.append({"qid": qid, "problem": f"<image>question {i}?", "answer": str(i),
                        "images": [f"train/{i:05d}.png"], "key_words": ["cube", "red"],
                        "category": {"nested": [i, "ü"]}})
    records.append({"problem": "<image>no qid", "answer": "x", "images": ["train/x.png"]})  # qid train-9
    dataset = tmp_path / "train.json"
    dataset.write_text(json.dumps(records, ensure_ascii=False))
    rows = []
    for qid, accs in CASES.items():
        rows += [_rollout(qid, a, s) for s, a in enumerate(accs or [])]
    rows += [_rollout("train-9", a, s) for s, a in enumerate([0.0, 1.0] + [0.0] * 6)]
    rows += [_rollout("not-in-dataset", 1.0, s) for s in range(8)]
    rows.insert(5, "")  # blank lines are ignored
    rollouts = tmp_path / "rollouts.jsonl"
    _write_jsonl(rollouts, rows)
    return str(dataset), str(rollouts), records


def _drop_qids(rollouts, qids):
    """Remove the rollouts of `qids` from the file: what is left has exactly N per sampled qid."""
    lines = [line for line in open(rollouts).read().splitlines()
             if not line.strip() or json.loads(line)["qid"] not in qids]
    _write_jsonl(rollouts, lines)


def _previous_split(out):
    """Split files of an earlier run, to check that a refused split leaves them as they were."""
    out.mkdir(exist_ok=True)
    before = {}
    for filename in ("easycase.json", "mediumcase.json", "hardcase.json"):
        (out / filename).write_text(json.dumps([{"qid": f"old-{filename}"}]))
        before[filename] = (out / filename).read_text()
    return before


def _files_in(out):
    return {filename: (out / filename).read_text() for filename in os.listdir(out)}


def test_classify_rule():
    assert classify(8, 8) == "easy"
    assert [classify(k, 8) for k in range(1, 8)] == ["medium"] * 7
    assert classify(0, 8) == "hard"
    with pytest.raises(ValueError, match="needs at least one rollout to be classified, got total=0"):
        classify(0, 0)


def test_split_puts_each_qid_where_it_belongs(files, tmp_path):
    dataset, rollouts, records = files
    out = tmp_path / "split"
    messages = []
    report = split_dataset(rollouts, dataset, str(out), N, allow_count_mismatch=True, log=messages.append)
    by_qid = {r.get("qid", "train-9"): r for r in records}
    for name, filename in (("easy", "easycase.json"), ("medium", "mediumcase.json"), ("hard", "hardcase.json")):
        written = json.loads((out / filename).read_text(encoding="utf-8"))
        # the data set's records, unchanged and in data-set order
        assert written == [by_qid[q] for q in by_qid if q in EXPECTED[name]]
        assert sorted(r.get("qid", "train-9") for r in written) == sorted(EXPECTED[name])
        assert report.sizes[name] == len(EXPECTED[name])
    assert report.rollout_lines == sum(len(a or []) for a in CASES.values()) + 8 + 8
    assert report.wrong_count == {"q-short": 5, "q-double": 16}
    assert report.never_sampled == ["q-never"]
    assert report.unknown_qids == 1
    # correct counts: easy 8, medium 3, one 1, seven 7, hard 0, half 0, short 5, double 16, train-9 1
    assert report.correct_histogram == {8: 1, 3: 1, 1: 2, 7: 1, 0: 2, 5: 1, 16: 1}
    text = "\n".join(messages)
    assert "2 qids" in text and "q-short (5)" in text and "q-double (16)" in text
    assert "1 records" in text and "q-never" in text and "never sampled" in text
    assert "easy" in text and "medium" in text and "hard" in text
    assert "they are split by all / some / none" in text
    # q-half's 0.5s: counted as not correct, as before, but said (a soft grader's 0.999 made an easy question hard)
    assert report.partial_scores == 8 and "8 rollouts of" in text and "neither 0 nor 1" in text
    # atomic writes leave no temporary or staged files
    assert sorted(os.listdir(out)) == ["easycase.json", "hardcase.json", "mediumcase.json"]


def test_exact_counts_split_without_opt_in(files, tmp_path):
    dataset, rollouts, _ = files
    _drop_qids(rollouts, WRONG_COUNT)
    report = split_dataset(rollouts, dataset, str(tmp_path / "s"), N, log=lambda m: None)
    assert not report.wrong_count
    assert report.sizes == {name: len([q for q in qids if q not in WRONG_COUNT]) for name, qids in EXPECTED.items()}


def test_count_other_than_n_is_an_error_by_default(files, tmp_path):
    dataset, rollouts, _ = files
    out = tmp_path / "s"
    before = _previous_split(out)
    with pytest.raises(SplitError) as err:
        split_dataset(rollouts, dataset, str(out), N, log=lambda m: None)
    message = str(err.value)
    assert rollouts in message and "n=8" in message and "q-short (5)" in message and "q-double (16)" in message
    assert "Rerun the sampling" in message and "allow_count_mismatch" in message
    assert _files_in(out) == before  # refused: the previous split is kept


def test_count_mismatch_error_names_only_a_few(tmp_path):
    dataset = tmp_path / "train.json"
    dataset.write_text(json.dumps([{"qid": f"q{i}"} for i in range(30)]))
    rollouts = tmp_path / "rollouts.jsonl"
    _write_jsonl(rollouts, [_rollout(f"q{i}", 1.0, s) for i in range(30) for s in range(3)])
    listed = r"30 qids .*q0 \(3\), q1 \(3\), q2 \(3\), q3 \(3\), q4 \(3\) \.\.\. and 25 more"
    with pytest.raises(SplitError, match=listed):
        split_dataset(str(rollouts), str(dataset), str(tmp_path / "s"), N, log=lambda m: None)


def test_rollouts_of_another_data_set_are_refused(files, tmp_path):
    dataset, _, _ = files
    other = tmp_path / "other.jsonl"
    _write_jsonl(other, [_rollout(f"other-{i}", 1.0, s) for i in range(3) for s in range(N)])
    out = tmp_path / "s"
    before = _previous_split(out)
    with pytest.raises(SplitError) as err:
        split_dataset(str(other), dataset, str(out), N, log=lambda m: None)
    message = str(err.value)
    assert dataset in message and str(other) in message and "another data set" in message
    assert "q-easy" in message and "other-0" in message  # a few qids of each side, to see the mismatch
    assert _files_in(out) == before

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SplitError, match="no rollout records"):
        split_dataset(str(empty), dataset, str(out), N, log=lambda m: None)
    assert _files_in(out) == before


def test_empty_data_set_is_refused(files, tmp_path):
    _, rollouts, _ = files
    dataset = tmp_path / "empty.json"
    dataset.write_text("[]")
    with pytest.raises(SplitError, match="empty.json holds no records"):
        split_dataset(rollouts, str(dataset), str(tmp_path / "s"), N, log=lambda m: None)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("duplicate, qid, positions", [
    ({"qid": "q-easy", "problem": "again"}, "'q-easy'", ("record 0 qid", "record 10 qid")),
    ({"qid": "train-9", "problem": "like the default qid of record 9"}, "'train-9'", ("record 9 qid", "record 10 qid")),
])
def test_duplicate_qids_in_the_data_set_are_refused(files, tmp_path, duplicate, qid, positions):
    dataset, rollouts, records = files
    with open(dataset, "w") as f:
        json.dump(records + [duplicate], f)
    out = tmp_path / "s"
    before = _previous_split(out)
    with pytest.raises(SplitError) as err:
        split_dataset(rollouts, dataset, str(out), N, allow_count_mismatch=True, log=lambda m: None)
    message = str(err.value)
    assert dataset in message and qid in message and "own qid" in message
    assert all(position in message for position in positions)
    assert _files_in(out) == before


def test_with_skip_bad_lines_a_repeated_qid_keeps_its_first_record(files, tmp_path):
    """Sampling with data.on_bad_record=skip sampled the first record of a qid and skipped the later ones; the
    split with --skip_bad_lines does the same, named in a warning, instead of refusing after the sampling ran."""
    dataset, rollouts, records = files
    with open(dataset, "w") as f:
        json.dump(records + [{"qid": "q-easy", "problem": "again", "answer": "x"}], f)
    said = []
    report = split_dataset(rollouts, dataset, str(tmp_path / "s"), N, skip_bad_lines=True,
                           allow_count_mismatch=True, log=said.append)
    easy = json.loads((tmp_path / "s" / "easycase.json").read_text())
    assert [r for r in easy if r.get("qid") == "q-easy"] == [records[0]]
    assert len(report.repeated) == 1 and "record 10" in report.repeated[0]
    assert any("skipped 1 records" in line and "record 10" in line for line in said)


def test_with_skip_bad_lines_a_record_the_loader_refused_does_not_take_its_qid(files, tmp_path):
    """The loader skips a refused record before it claims its qid, so sampling sampled the later valid record of
    that qid: the split writes that one (it wrote the refused one, which stage training then refused, and dropped
    the one sampled), and counts the refused one."""
    dataset, rollouts, records = files
    refused = {"qid": "q-easy", "problem": "no answer here"}  # before q-easy's valid record
    with open(dataset, "w") as f:
        json.dump([refused] + records, f)
    said = []
    report = split_dataset(rollouts, dataset, str(tmp_path / "s"), N, skip_bad_lines=True,
                           allow_count_mismatch=True, log=said.append)
    easy = json.loads((tmp_path / "s" / "easycase.json").read_text())
    assert [r for r in easy if r.get("qid") == "q-easy"] == [records[0]]
    assert report.repeated == [] and len(report.refused) == 1 and "key 'answer' is missing" in report.refused[0]
    assert any("skipped 1 records" in line and "loader refuses" in line and "record 0" in line for line in said)
    # Custom keys, as the sampling run's data.answer_key names them: the record is valid then.
    renamed = [{("solution" if k == "answer" else k): v for k, v in r.items()} for r in records]
    with open(dataset, "w") as f:
        json.dump(renamed, f)
    report = split_dataset(rollouts, dataset, str(tmp_path / "t"), N, skip_bad_lines=True, allow_count_mismatch=True,
                           answer_key="solution", log=lambda m: None)
    assert report.refused == [] and report.sizes == {k: len(v) for k, v in EXPECTED.items()}


def test_a_rollout_repeated_is_refused_even_when_the_copies_add_up_to_n(tmp_path):
    """Four rollouts of a question, written twice (a file appended to or joined with a copy), counted 8 and split
    as if sampled 8 times: now an error naming the line; --skip_bad_lines keeps the first copies and counts the
    others, and the question's 4 rollouts are then a count other than n."""
    dataset = tmp_path / "train.json"
    dataset.write_text(json.dumps([{"qid": "q", "problem": "p", "answer": "1"}]))
    rollouts = tmp_path / "rollouts.jsonl"
    _write_jsonl(rollouts, [_rollout("q", 1.0, s) for s in range(4)] * 2)
    with pytest.raises(SplitError, match=re.escape(f"{rollouts} line 5: qid 'q' sample 0 appears a second time")):
        split_dataset(str(rollouts), str(dataset), str(tmp_path / "s"), N, log=lambda m: None)
    assert not (tmp_path / "s").exists()
    with pytest.raises(SplitError, match=r"have a rollout count other than n=8: q \(4\)"):
        split_dataset(str(rollouts), str(dataset), str(tmp_path / "s"), N, skip_bad_lines=True, log=lambda m: None)
    report = split_dataset(str(rollouts), str(dataset), str(tmp_path / "s"), N, skip_bad_lines=True,
                           allow_count_mismatch=True, log=lambda m: None)
    assert report.bad_lines == 4 and report.rollout_lines == 4 and report.wrong_count == {"q": 4}


def test_a_data_set_that_is_one_of_the_split_files_is_not_replaced(files, tmp_path):
    """Re-splitting dataset/mediumcase.json into dataset/ would replace it, and its records that were never
    sampled would be in no file any more."""
    dataset, rollouts, records = files
    out = tmp_path / "dataset"
    out.mkdir()
    medium = out / "mediumcase.json"
    medium.write_text(open(dataset).read())
    before = medium.read_bytes()
    with pytest.raises(SplitError, match="is the medium split file"):
        split_dataset(rollouts, str(medium), str(out), N, allow_count_mismatch=True, log=lambda m: None)
    assert medium.read_bytes() == before and sorted(os.listdir(out)) == ["mediumcase.json"]


def test_a_failed_write_keeps_the_previous_split(files, tmp_path, monkeypatch):
    """The three files are replaced together: a failure on the last one leaves all three as they were."""
    dataset, rollouts, _ = files
    out = tmp_path / "s"
    before = _previous_split(out)
    real_write = split_module.atomic_write_json

    def disk_full_on_hardcase(path, value):
        if "hardcase" in os.path.basename(path):
            raise OSError(28, "No space left on device")
        real_write(path, value)

    monkeypatch.setattr(split_module, "atomic_write_json", disk_full_on_hardcase)
    with pytest.raises(OSError, match="No space left"):
        split_dataset(rollouts, dataset, str(out), N, allow_count_mismatch=True, log=lambda m: None)
    assert _files_in(out) == before  # no new easy / medium file beside an old hard one, no staged leftovers

    monkeypatch.setattr(split_module, "atomic_write_json", real_write)
    report = split_dataset(rollouts, dataset, str(out), N, allow_count_mismatch=True, log=lambda m: None)
    assert sorted(os.listdir(out)) == ["easycase.json", "hardcase.json", "mediumcase.json"]
    assert len(json.loads((out / "hardcase.json").read_text())) == report.sizes["hard"]


@pytest.mark.parametrize("bad, what", [("{not json", "malformed JSON"),
                                       ('{"qid": "q-easy", "score": {"accuracy": NaN}, "sample": 9}', "finite"),
                                       (json.dumps({"qid": "q-easy", "score": {}}), "score.accuracy"),
                                       (json.dumps({"score": {"accuracy": 1.0}}), "'qid'"),
                                       (json.dumps([1, 2]), "JSON object")])
def test_malformed_line_names_file_and_line(files, tmp_path, bad, what):
    dataset, rollouts, _ = files
    lines = open(rollouts).read().splitlines()
    lines.insert(10, bad)  # becomes line 11
    _write_jsonl(rollouts, lines)
    with pytest.raises(SplitError) as err:
        split_dataset(rollouts, dataset, str(tmp_path / "s"), N, log=lambda m: None)
    assert f"{rollouts} line 11" in str(err.value) and what in str(err.value)

    report = split_dataset(rollouts, dataset, str(tmp_path / "s"), N, skip_bad_lines=True, allow_count_mismatch=True,
                           log=lambda m: None)
    assert report.bad_lines == 1
    assert report.sizes == {name: len(q) for name, q in EXPECTED.items()}


def test_a_last_line_cut_by_a_crash_says_that_rerunning_the_sampling_mends_it(files, tmp_path):
    dataset, rollouts, _ = files
    with open(rollouts, "a") as f:
        f.write('{"qid": "q-easy", "respo')  # a sampling run stopped while appending
    with pytest.raises(SplitError, match=r"malformed JSON.*the file's last line and has no end: a sampling run "
                                         r"stopped while writing it, and rerunning the sampling removes it"):
        split_dataset(rollouts, dataset, str(tmp_path / "s"), N, log=lambda m: None)


def test_missing_files_are_named(files, tmp_path):
    dataset, rollouts, _ = files
    with pytest.raises(SplitError, match="nope.jsonl"):
        split_dataset(str(tmp_path / "nope.jsonl"), dataset, str(tmp_path), N)
    with pytest.raises(SplitError, match="nope.json"):
        split_dataset(rollouts, str(tmp_path / "nope.json"), str(tmp_path), N)


def test_cli_flags_and_exit_code(files, tmp_path, capsys):
    dataset, rollouts, _ = files
    cli = _cli()
    out = tmp_path / "cli"
    argv = ["--rollouts", rollouts, "--dataset", dataset, "--output_dir", str(out), "--n", "8"]
    assert cli.main(argv) == 2  # q-short and q-double were not sampled 8 times
    assert "q-short (5)" in capsys.readouterr().err and not out.exists()
    assert cli.main(argv + ["--allow_count_mismatch"]) == 0  # the opt-in splits them by all / some / none
    assert "they are split by all / some / none" in capsys.readouterr().out
    _drop_qids(rollouts, WRONG_COUNT)
    assert cli.main(argv) == 0
    assert len(json.loads((out / "mediumcase.json").read_text())) == len(EXPECTED["medium"])
    assert "never sampled" in capsys.readouterr().out
    with open(rollouts, "a") as f:
        f.write("garbage\n")
    assert cli.main(["--rollouts", rollouts, "--dataset", dataset, "--output_dir", str(out)]) == 2
    assert "line" in capsys.readouterr().err


def test_cli_defaults_chain_with_the_recipes():
    """sample yaml -> rollouts -> split -> the stage recipes' train_files, without editing any file."""
    args = _cli().parse_args([])
    sample = OmegaConf.load(os.path.join(ROOT, "examples", "pebr_sample.yaml"))
    assert args.rollouts == sample.trainer.sample_output
    assert args.dataset == sample.data.train_files
    assert args.n == sample.worker.rollout.n * sample.trainer.total_epochs
    stage1 = OmegaConf.load(os.path.join(ROOT, "examples", "pebr_stage1.yaml"))
    stage2 = OmegaConf.load(os.path.join(ROOT, "examples", "pebr_stage2.yaml"))
    assert stage1.data.train_files == os.path.join(args.output_dir, "easycase.json")
    assert stage2.data.train_files == os.path.join(args.output_dir, "mediumcase.json")
    # sampling at the training resolution of the stage recipes
    assert (sample.data.min_pixels, sample.data.max_pixels) == (stage1.data.min_pixels, stage1.data.max_pixels)


def test_memory_is_bounded_by_questions_not_lines(tmp_path):
    """50 000 rollout lines over 10 questions: the split keeps counters, not lines."""
    dataset = tmp_path / "train.json"
    dataset.write_text(json.dumps([{"qid": f"q{i}", "problem": "p", "answer": "1"} for i in range(10)]))
    rollouts = tmp_path / "rollouts.jsonl"
    with open(rollouts, "w") as f:
        for k in range(50_000):
            f.write(json.dumps(_rollout(f"q{k % 10}", 1.0, sample=k // 10)) + "\n")
    size = os.path.getsize(rollouts)
    tracemalloc.start()
    report = split_dataset(str(rollouts), str(dataset), str(tmp_path / "s"), 5_000, log=lambda m: None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert report.sizes["easy"] == 10 and not report.wrong_count
    assert peak < size / 20, (peak, size)


def test_a_directory_of_jsonl_and_parquet_splits_with_the_loaders_qids(tmp_path):
    """Sampling reads a directory, parquet or JSONL; the split reads the same source, with the same qids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pebr.data.records import load_records

    data = tmp_path / "rl"
    data.mkdir()
    part_a = [{"problem": f"<image>a{i}?", "answer": str(i), "images": [f"a/{i}.png"]} for i in range(2)]
    part_b = [{"qid": "b-own", "problem": "<image>b?", "answer": "7", "images": ["b/0.png"]},
              {"problem": "<image>b1?", "answer": "8", "images": ["b/1.png"]}]
    _write_jsonl(data / "a.jsonl", [json.dumps(r) for r in part_a])
    pq.write_table(pa.Table.from_pylist(part_b), data / "b.parquet")
    loaded, _ = load_records(str(data))
    assert [r["qid"] for r in loaded] == ["a-0", "a-1", "b-own", "b-1"]  # defaults by each file's stem
    rows = ([_rollout("a-0", 1.0, s) for s in range(N)] + [_rollout("a-1", float(s % 2), s) for s in range(N)]
            + [_rollout("b-own", 0.0, s) for s in range(N)] + [_rollout("b-1", 1.0, s) for s in range(N)])
    _write_jsonl(tmp_path / "rollouts.jsonl", rows)
    out = tmp_path / "split"
    report = split_dataset(str(tmp_path / "rollouts.jsonl"), str(data), str(out), N, log=lambda m: None)
    assert report.sizes == {"easy": 2, "medium": 1, "hard": 1}
    # As read, no qid added (parquet gives the record without one a null qid column).
    assert json.loads((out / "easycase.json").read_text()) == [part_a[0], {**part_b[1], "qid": None}]
    assert json.loads((out / "hardcase.json").read_text()) == [part_b[0]]


def test_a_record_json_cannot_hold_is_refused_by_name(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"qid": "text", "problem": "<image>q?", "answer": "1", "images": ["x.png"], "blob": None},
               {"qid": "bytes", "problem": "<image>q?", "answer": "1", "images": ["y.png"], "blob": b"\x89PNG"}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "rl.parquet")
    rows = [_rollout(qid, 1.0, s) for qid in ("text", "bytes") for s in range(N)]
    _write_jsonl(tmp_path / "rollouts.jsonl", rows)
    out = tmp_path / "split"
    before = _previous_split(out)
    with pytest.raises(SplitError) as err:
        split_dataset(str(tmp_path / "rollouts.jsonl"), str(tmp_path / "rl.parquet"), str(out), N, log=lambda m: None)
    message = str(err.value)
    assert "rl.parquet record 1" in message and "'bytes'" in message and "bytes" in message
    assert "file paths" in message and "Nothing was written" in message
    assert _files_in(out) == before


def test_a_record_utf8_cannot_hold_is_refused_by_name_not_raised(tmp_path):
    """A lone surrogate (json.loads of "\\ud800" makes one) passed json.dumps and raised UnicodeEncodeError from the
    writer: a traceback and exit 1 once the split script went through run_cli, which says only UserErrors."""
    data = tmp_path / "rl.json"
    data.write_text('[{"qid": "a", "problem": "<image>q?", "answer": "1", "images": ["x.png"], "note": "\\ud800"}]')
    _write_jsonl(tmp_path / "rollouts.jsonl", [_rollout("a", 1.0, s) for s in range(N)])
    out = tmp_path / "split"
    before = _previous_split(out)
    with pytest.raises(SplitError, match=r"rl\.json record 0.*surrogates not allowed.*Nothing was written"):
        split_dataset(str(tmp_path / "rollouts.jsonl"), str(data), str(out), N, log=lambda m: None)
    assert _files_in(out) == before


def test_a_malformed_line_sampling_skipped_is_skipped_with_skip_bad_lines(tmp_path):
    """Sampling with data.on_bad_record=skip leaves a malformed JSONL line out; the split with --skip_bad_lines
    does too, keeping the other records' default qids (their line numbers)."""
    data = tmp_path / "train.jsonl"
    good = [{"problem": f"<image>q{i}?", "answer": str(i), "images": [f"{i}.png"]} for i in range(3)]
    data.write_text(json.dumps(good[0]) + "\n{not json\n" + json.dumps(good[1]) + "\n" + json.dumps(good[2]) + "\n")
    rows = [_rollout(q, 1.0, s) for q in ("train-0", "train-2", "train-3") for s in range(N)]
    _write_jsonl(tmp_path / "rollouts.jsonl", rows)
    with pytest.raises(SplitError, match=r"train\.jsonl line 2.*malformed JSON"):
        split_dataset(str(tmp_path / "rollouts.jsonl"), str(data), str(tmp_path / "out"), N, log=lambda m: None)
    said = []
    report = split_dataset(str(tmp_path / "rollouts.jsonl"), str(data), str(tmp_path / "out"), N,
                           skip_bad_lines=True, log=said.append)
    assert report.sizes == {"easy": 3, "medium": 0, "hard": 0}
    assert any("skipped 1 malformed lines of" in line and "line 2" in line for line in said)


def test_split_files_may_not_go_into_the_directory_being_split(tmp_path):
    data = tmp_path / "dataset"
    data.mkdir()
    (data / "train.json").write_text(json.dumps([{"qid": "q0", "problem": "<image>?", "answer": "1",
                                                  "images": ["0.png"]}]))
    _write_jsonl(tmp_path / "rollouts.jsonl", [_rollout("q0", 1.0, s) for s in range(N)])
    for output in (data, data / "split"):
        with pytest.raises(SplitError, match="inside the data set directory"):
            split_dataset(str(tmp_path / "rollouts.jsonl"), str(data), str(output), N, log=lambda m: None)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SplitError, match="is a file"):
        split_dataset(str(tmp_path / "rollouts.jsonl"), str(data), str(tmp_path / "a_file"), N, log=lambda m: None)
    assert split_dataset(str(tmp_path / "rollouts.jsonl"), str(data), str(tmp_path / "split"), N,
                         log=lambda m: None).sizes["easy"] == 1


def _sampled_rollouts(records, accuracies):
    """Rollout lines as sampling writes them: each with the digest of the question it answered."""
    from pebr.data.records import normalize_record, question_digest

    rows = []
    for index, (record, accuracy) in enumerate(zip(records, accuracies)):
        normalized = normalize_record(record, where="test", default_qid=f"train-{index}")
        rows += [dict(_rollout(normalized["qid"], accuracy, s), question=question_digest(normalized))
                 for s in range(N)]
    return rows


@pytest.mark.parametrize("edit", ["replace", "insert"])
def test_a_data_set_edited_after_sampling_is_refused(tmp_path, edit):
    """Rollouts know their question by qid, and the default qid is the record's position: a question replaced, or
    one inserted before others, used to be split with rollouts sampled for another question, silently."""
    records = [{"problem": f"<image>question {i}?", "answer": str(i), "images": [f"{i}.png"]} for i in range(3)]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    _write_jsonl(tmp_path / "rollouts.jsonl", _sampled_rollouts(records, [1.0, 0.0, 1.0]))
    rollouts, out = str(tmp_path / "rollouts.jsonl"), tmp_path / "split"
    assert split_dataset(rollouts, str(data), str(out), N, log=lambda m: None).sizes == {
        "easy": 2, "medium": 0, "hard": 1}
    before = _files_in(out)

    new = {"problem": "<image>a new question?", "answer": "99", "images": ["new.png"]}
    edited = [new] + records[1:] if edit == "replace" else [new] + records
    data.write_text(json.dumps(edited))
    with pytest.raises(SplitError) as err:
        split_dataset(rollouts, str(data), str(out), N, log=lambda m: None)
    message = str(err.value)
    assert "not the ones" in message and f"{data} record 0 qid='train-0' (sampled as {rollouts} line 1)" in message
    assert ("1 questions" if edit == "replace" else "3 questions") in message and "Nothing was written" in message
    assert _files_in(out) == before
    # Rollout files written before the digest existed are split as before (nothing to compare).
    _write_jsonl(tmp_path / "old.jsonl", [_rollout(f"train-{i}", 1.0, s) for i in range(3) for s in range(N)])
    assert split_dataset(str(tmp_path / "old.jsonl"), str(data), str(tmp_path / "old"), N,
                         allow_count_mismatch=True, log=lambda m: None).sizes["easy"] == 3


def test_other_keys_than_samplings_are_named_and_moved_images_are_the_same_question(tmp_path):
    """Sampled with data.prompt_key=question from records that also hold 'problem': split with the default keys,
    every question differs, and the message says which keys to pass. Image paths moved to another folder keep
    the questions the same (the digest takes the image file names)."""
    from pebr.data.records import normalize_record, question_digest

    records = [{"question": f"<image>q{i}?", "problem": "other text", "answer": str(i), "images": [f"/old/{i}.png"]}
               for i in range(3)]
    rows = []
    for i, record in enumerate(records):
        normalized = normalize_record(record, where="t", default_qid=f"train-{i}", prompt_key="question")
        rows += [dict(_rollout(f"train-{i}", 1.0, s), question=question_digest(normalized, prompt_key="question"))
                 for s in range(N)]
    _write_jsonl(tmp_path / "rollouts.jsonl", rows)
    data = tmp_path / "train.json"
    data.write_text(json.dumps([dict(r, images=[r["images"][0].replace("/old/", "/new/")]) for r in records]))
    with pytest.raises(SplitError, match=r"Every one of the 3 differs.*prompt_key='problem', .* here.*--prompt_key"):
        split_dataset(str(tmp_path / "rollouts.jsonl"), str(data), str(tmp_path / "out"), N, log=lambda m: None)
    report = split_dataset(str(tmp_path / "rollouts.jsonl"), str(data), str(tmp_path / "out"), N,
                           prompt_key="question", log=lambda m: None)
    assert report.sizes == {"easy": 3, "medium": 0, "hard": 0}


def test_the_split_refuses_a_log_being_written_and_says_what_would_mislead_it(files, tmp_path):
    """A log still being written split with exit 0 and whatever was there; the same question under two qids went
    to two stages; a huge number or a deeply nested line stopped --skip_bad_lines with a traceback; an empty
    stage file was written without a word."""
    import fcntl

    from pebr.data.records import question_digest

    dataset, rollouts, records = files
    _drop_qids(rollouts, WRONG_COUNT)
    with open(rollouts + ".lock", "a+") as lock:
        lock.write("pid 1 on sampler\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.chmod(rollouts + ".lock", 0o444)  # another user's run: the check needs no write access (nor writes)
        with pytest.raises(SplitError, match=r"is being written by a sampling run \(pid 1 on sampler\)"):
            split_dataset(rollouts, dataset, str(tmp_path / "s"), N, log=lambda m: None)
    assert not os.path.exists(tmp_path / "s" / "easycase.json")
    assert open(rollouts + ".lock").read() == "pid 1 on sampler\n"  # a finished run's log splits, as below

    # q-easy and q-hard asked twice: the same text, answer and image under two qids (rollouts carry the digest).
    twin = dict(records[0], qid="q-hard")
    same = [dict(r, problem=twin["problem"], answer=twin["answer"], images=twin["images"]) if r.get("qid") ==
            "q-hard" else r for r in records]
    (tmp_path / "twins.json").write_text(json.dumps(same))
    digest = question_digest(twin)
    rows = [dict(json.loads(line), question=digest if json.loads(line)["qid"] in ("q-easy", "q-hard") else None)
            for line in open(rollouts).read().splitlines() if line.strip()]
    rows = [{k: v for k, v in row.items() if v is not None} for row in rows]
    rows += ["1" * 400, '{"qid": "x", "sample": 0, "score": {"accuracy": ' + "9" * 401 + "}}", "[" * 100_000,
             "9" * 5000]  # (over 4300 digits: Python's int refuses it with a plain ValueError)
    _write_jsonl(rollouts, rows)
    said = []
    report = split_dataset(rollouts, str(tmp_path / "twins.json"), str(tmp_path / "t"), N, skip_bad_lines=True,
                           log=said.append)
    text = "\n".join(said)
    assert report.bad_lines == 4 and "1 questions of" in text and "appear under several qids" in text

    easy_only = tmp_path / "easy_only.json"
    easy_only.write_text(json.dumps([r for r in records if r.get("qid") == "q-easy"]))
    said.clear()
    split_dataset(rollouts, str(easy_only), str(tmp_path / "e"), N, skip_bad_lines=True, log=said.append)
    assert "no medium case: the stage that trains on mediumcase.json would have no data" in "\n".join(said)
