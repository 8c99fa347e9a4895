"""The shortened demo (tiny model, a step per RL stage) runs every stage end to end and writes its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_demo_end_to_end(tmp_path):
    out = str(tmp_path / "demo")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--profile", "quick", "--out", out]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(os.path.join(out, "results.md")) as f:
        table = f.read()
    for label in ("warm-up SFT", "stage 1", "stage 2"):
        assert f"| {label} |" in table
    assert os.path.getsize(os.path.join(out, "training_curves.png")) > 1000
    for stage in ("stage1", "stage2"):
        merged = [d for d in os.listdir(os.path.join(out, stage)) if d.startswith("global_step_")]
        assert merged and os.path.isfile(os.path.join(out, stage, merged[0], "actor", "huggingface", "model.safetensors"))
    # Rerunning skips every finished stage.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("skipped") >= 8, again.stdout[-2000:]
    assert os.path.exists(os.path.join(out, ".pebr_demo_output"))  # so that --force may delete it


def test_seed_summary_by_hand(tmp_path):
    """OUT/seeds.md from three seeds' evaluation files: means, ranges and per-seed changes worked by hand."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import json

    from demo import seed_summary

    accuracy = {0: (0.50, 0.48, 0.56), 1: (0.60, 0.61, 0.62), 2: (0.55, 0.50, 0.57)}  # warm-up, stage 1, stage 2
    recall = {0: (0.60, 0.70, 0.65), 1: (0.62, 0.61, 0.60), 2: (0.64, 0.66, 0.64)}
    for seed in accuracy:
        os.makedirs(tmp_path / f"seed_{seed}" / "eval")
        for k, name in enumerate(("warmup", "stage1", "stage2")):
            overall = {"accuracy": accuracy[seed][k], "keyword_recall": recall[seed][k], "format_rate": 1.0,
                       "count": 300}
            (tmp_path / f"seed_{seed}" / "eval" / f"{name}.json").write_text(json.dumps({"overall": overall}))
    table = seed_summary(str(tmp_path), [0, 1, 2], {0: 600.0, 1: 660.0, 2: 720.0})
    assert table == (tmp_path / "seeds.md").read_text()
    assert "| warm-up SFT | 55.0 (50.0-60.0) | 62.0 (60.0-64.0) | 100.0 (100.0-100.0) |" in table
    assert "| stage 2 | 58.3 (56.0-62.0) |" in table  # (56 + 62 + 57) / 3
    assert "| 0 | 10.0 min | +6.0 | +10.0 |" in table and "| 1 | 11.0 min | +2.0 | -1.0 |" in table
    assert "| 2 | 12.0 min | +2.0 | +2.0 |" in table
    # Mean change (6 + 2 + 2) / 3; warm-up spread 60 - 50; spread of the changes 6 - 2.
    assert "+3.3 points" in table and "(max-min): 10.0 points" in table and "per-seed change: 4.0 points" in table


def test_seed_summary_without_key_words(tmp_path):
    """Held-out questions without key words give keyword recall None: n/a in the table, not a TypeError."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import json

    from demo import seed_summary

    os.makedirs(tmp_path / "seed_0" / "eval")
    for name in ("warmup", "stage1", "stage2"):
        overall = {"accuracy": 0.5, "keyword_recall": None, "format_rate": 1.0, "count": 4}
        (tmp_path / "seed_0" / "eval" / f"{name}.json").write_text(json.dumps({"overall": overall}))
    table = seed_summary(str(tmp_path), [0], {0: 60.0})
    assert "| warm-up SFT | 50.0 (50.0-50.0) | n/a | 100.0 (100.0-100.0) |" in table
    assert "| 0 | 1.0 min | +0.0 | n/a |" in table


def test_stage1_data_is_easy_or_easy_plus_medium(tmp_path, capsys):
    """Stage 1 gets the easy cases when they fill a rollout batch, else easy + medium (never hard), said loudly;
    with no such cases at all, every RL question."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import json

    from demo import PROFILES, Pipeline

    pipe = Pipeline(str(tmp_path), PROFILES["full"], seed=0)  # rollout batch 16
    os.makedirs(tmp_path / "split")

    def write(easy: int, medium: int) -> None:
        for kind, count in (("easy", easy), ("medium", medium), ("hard", 5)):
            records = [{"qid": f"{kind}_{i}"} for i in range(count)]
            (tmp_path / "split" / f"{kind}case.json").write_text(json.dumps(records))

    write(easy=16, medium=3)
    assert pipe.split_file(*pipe.stage1_kinds()) == str(tmp_path / "split" / "easycase.json")
    write(easy=2, medium=3)
    path = pipe.split_file(*pipe.stage1_kinds())
    assert [r["qid"] for r in json.loads(open(path).read())] == ["easy_0", "easy_1", "medium_0", "medium_1", "medium_2"]
    assert "2 easy cases fill less than one batch of 16" in capsys.readouterr().out
    write(easy=0, medium=0)
    assert pipe.split_file(*pipe.stage1_kinds()) == str(tmp_path / "data" / "train.json")
    assert "no easy or medium cases" in capsys.readouterr().out


def test_the_demo_deletes_or_replaces_nothing_in_a_directory_it_did_not_create(tmp_path, capsys):
    """With or without --force: without it, its stages replaced a `model` or `data` folder made from other
    inputs, which in someone else's directory were that person's files."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import demo

    mine = tmp_path / "notes"
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "model.safetensors").write_text("keep me")
    for force in ([], ["--force"]):
        assert demo.main(["--out", str(mine), "--profile", "quick", *force]) == 2
        assert (mine / "model" / "model.safetensors").read_text() == "keep me"
        assert "holds files scripts/demo.py did not write" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert demo.main(["--out", str(tmp_path / "a_file"), "--profile", "quick"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_failed_stage_says_which_and_passes_its_exit_status_on(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import demo

    pipeline = demo.Pipeline(str(tmp_path / "out"), demo.PROFILES["quick"], seed=0)
    with pytest.raises(demo.StageFailed, match=r"\[demo\] sampling failed \(exit status 2;") as failed:
        pipeline.stage("sampling", pipeline.path("rollouts.jsonl"), ["bash", "-c", "exit 2"])
    assert failed.value.code == 2 and not os.path.exists(pipeline.path("rollouts.jsonl.done"))


def test_bf16_is_kept_only_where_the_cpu_runs_it_natively_unless_asked():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import demo

    full = demo.PROFILES["full"]
    assert full.bf16 and full.sft_bf16
    flags = {(choice, native): (p.bf16, p.sft_bf16) for choice in ("auto", "yes", "no") for native in (True, False)
             for p in [demo.resolve_bf16(full, choice, native)]}
    assert flags == {("auto", True): (True, True), ("auto", False): (False, False), ("yes", True): (True, True),
                     ("yes", False): (True, True), ("no", True): (False, False), ("no", False): (False, False)}
    # The CPU's own flags say the same (Linux): this machine's Intel ones have AMX, an AVX2-only AMD has neither.
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
    assert demo.cpu_has_native_bf16() is bool(flags & {"amx_tile", "avx512_bf16"})


def test_a_stage_runs_again_when_its_command_or_an_earlier_stage_changed(tmp_path, capsys):
    """A finished stage is skipped only for the same command after no earlier stage ran again: a --seed or
    --profile changed in the same --out reused every old output before."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import demo

    def write(path: str, text: str) -> list[str]:
        return [sys.executable, "-c", f"open({path!r}, 'w').write({text!r})"]

    first, second = str(tmp_path / "first.txt"), str(tmp_path / "second.txt")

    # The second stage's command is the same whatever the first wrote: only the chain of markers tells.
    copy = [sys.executable, "-c", f"open({second!r}, 'w').write('from ' + open({first!r}).read())"]

    def run(first_text: str, stages: int = 2) -> str:
        pipeline = demo.Pipeline(str(tmp_path), demo.PROFILES["quick"], 0)
        pipeline.stage("first", first, write(first, first_text))
        if stages == 2:
            pipeline.stage("second", second, copy)
        return capsys.readouterr().out

    run("a")
    assert run("a").count("done before, skipped") == 2
    out = run("b")  # the first stage's command changed: it runs, and so does the one after it
    assert "first: " + first + " was made from other inputs" in out and "done before" not in out
    assert open(second).read() == "from b"
    assert run("b").count("done before, skipped") == 2
    # A call stopped after the first stage ran again: the next one must not skip the second (it kept "from b").
    run("c", stages=1)
    out = run("c")
    assert out.count("done before, skipped") == 1 and open(second).read() == "from c"
    # An output whose marker outlived it is made again, not skipped.
    os.remove(second)
    assert "done before" not in run("c").split("second")[1] and open(second).read() == "from c"


def test_an_interrupted_stage_resumes_only_with_the_same_recipe(tmp_path, capsys):
    """A stage stopped half-way left its output to be resumed by the next call, whatever settings that call had."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import demo

    out, stop = str(tmp_path / "run"), tmp_path / "stop"

    def partial(setting: str) -> list[str]:  # appends a line, as a resumed run adds steps; fails while `stop` exists
        code = (f"import os; open({out!r}, 'a').write({setting!r} + chr(10)); "
                f"raise SystemExit(os.path.exists({str(stop)!r}))")
        return [sys.executable, "-c", code]

    def interrupted(setting: str) -> None:
        stop.touch()
        with pytest.raises(demo.StageFailed):
            pipeline.stage("rl", out, partial(setting))
        stop.unlink()

    pipeline = demo.Pipeline(str(tmp_path), demo.PROFILES["quick"], 0)
    interrupted("lr=1e-5")
    pipeline.stage("rl", out, partial("lr=1e-5"))  # the same recipe: resumed
    assert open(out).read() == "lr=1e-5\nlr=1e-5\n"
    interrupted("lr=3e-5")
    pipeline.stage("rl", out, partial("lr=1e-5"))  # another recipe started it: made again
    assert open(out).read() == "lr=1e-5\n"
    assert "was made from other inputs" in capsys.readouterr().out
    # The warm-up writes its output only when complete: an interrupted one leaves only OUTPUT.checkpoints, which
    # the next recipe's warm-up refused as another run's (the demo failed there).
    warmup, checkpoints = str(tmp_path / "warmup"), tmp_path / "warmup.checkpoints"
    checkpoints.mkdir()
    (tmp_path / "warmup.started").write_text(json.dumps({"recipe": {"command": ["other"]}}))
    pipeline.stage("warm-up", warmup, [sys.executable, "-c", f"open({warmup!r}, 'w').write('ok')"])
    assert open(warmup).read() == "ok" and not checkpoints.exists()


def test_the_full_profiles_training_stages_save_before_they_end(tmp_path):
    """The CPU recipes save an RL run at its last step only, and the warm-up saved nothing: an interrupted stage
    of the full demo started again, though the demo says it resumes."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import demo

    p = demo.PROFILES["full"]
    overrides = demo.Pipeline(str(tmp_path), p, 0).rl_overrides(p.stage1_steps)
    (save_freq,) = [int(o.split("=")[1]) for o in overrides if o.startswith("trainer.save_freq=")]
    assert 0 < save_freq < min(p.stage1_steps, p.stage2_steps)
    warmup_steps = p.sft_num * 0.8 * p.sft_epochs / p.sft_batch_size  # at least 80 % of the records are kept
    assert 0 < demo.SFT_SAVE_EVERY < warmup_steps / 2


def test_the_results_table_carries_each_models_own_evaluation(tmp_path):
    """results.md by hand: each row from its model's eval file, in the columns the header names (the end-to-end
    demo test checks only that the rows are there)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import demo

    pipeline = demo.Pipeline(str(tmp_path), demo.PROFILES["quick"], seed=0)
    os.makedirs(pipeline.path("eval"))
    os.makedirs(pipeline.path("split"))
    scores = {"warmup": (0.25, 0.5, 0.125, 100.4), "stage1": (0.375, 0.75, None, 80.0),
              "stage2": (0.5, 1.0, 0.625, 60.6)}
    for name, (accuracy, format_rate, recall, length) in scores.items():
        with open(pipeline.path("eval", name + ".json"), "w") as f:
            json.dump({"overall": {"count": 16, "accuracy": accuracy, "format_rate": format_rate,
                                   "keyword_recall": recall, "mean_response_length": length}}, f)
    for kind, size in (("easy", 3), ("medium", 2), ("hard", 1)):
        with open(pipeline.path("split", f"{kind}case.json"), "w") as f:
            json.dump([{"qid": str(i)} for i in range(size)], f)
    pipeline.report({"warm-up SFT": "w", "stage 1": "s1", "stage 2": "s2"})
    table = open(pipeline.path("results.md")).read().splitlines()
    assert table[0] == "| model | accuracy | format rate | keyword recall | mean response length |"
    assert table[2:5] == ["| warm-up SFT | 25.0 % | 50.0 % | 12.5 % | 100 |",
                          "| stage 1 | 37.5 % | 75.0 % | n/a | 80 |",
                          "| stage 2 | 50.0 % | 100.0 % | 62.5 % | 61 |"]
    assert table[-1] == "held-out questions: 16; split of the RL questions: easy 3, medium 2, hard 1"
