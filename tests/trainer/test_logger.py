"""Metric back-ends: the JSONL file survives a resume without duplicate steps; tensorboard and wandb (offline) write."""

from __future__ import annotations

import json
import os

import pytest

from pebr.trainer.logger import Tracker


def test_metrics_file_drops_steps_after_the_resumed_one(tmp_path):
    run_dir = str(tmp_path)
    t = Tracker(["file"], run_dir, "p", "e", {}, resume_step=0)
    for step in (1, 2, 3):
        t.log(step, {"reward/overall": step / 10})
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "reward/ov')  # a line cut short by a crash
    Tracker(["file"], run_dir, "p", "e", {}, resume_step=2).log(3, {"reward/overall": 0.9})
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [(r["step"], r["reward/overall"]) for r in rows] == [(1, 0.1), (2, 0.2), (3, 0.9)]


def test_validation_alone_at_one_step_replaces_its_earlier_line(tmp_path):
    """trainer.val_only run twice at one checkpoint: one validation line for the step, beside its training line."""
    run_dir = str(tmp_path)
    Tracker(["file"], run_dir, "p", "e", {}, resume_step=0).log(1, {"reward/overall": 0.1, "val/overall": 0.2})
    for score in (0.3, 0.4):  # as the trainer's validate() returns them: with their timing
        Tracker(["file"], run_dir, "p", "e", {}, resume_step=1).log(1, {"val/overall": score, "timing/validate_s": 2.0},
                                                                    replace_validation=True)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert rows == [{"step": 1, "reward/overall": 0.1, "val/overall": 0.2},
                    {"step": 1, "val/overall": 0.4, "timing/validate_s": 2.0}]


def test_validation_alone_in_a_new_run_directory_is_logged(tmp_path):
    """trainer.val_only of a base model (or of another run's checkpoint) into a new directory: there was no
    metrics.jsonl to drop an earlier validation from, and the run died on it after validating."""
    Tracker(["file"], str(tmp_path), "p", "e", {}, resume_step=0).log(0, {"val/overall": 0.2},
                                                                     replace_validation=True)
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line) for line in f] == [{"step": 0, "val/overall": 0.2}]


def test_a_run_restarted_before_its_first_checkpoint_logs_step_0_once(tmp_path):
    run_dir = str(tmp_path)
    t = Tracker(["file"], run_dir, "p", "e", {}, resume_step=0)
    t.log(0, {"val/overall": 0.3})
    t.log(1, {"reward/overall": 0.1})
    again = Tracker(["file"], run_dir, "p", "e", {}, resume_step=0)  # the rerun validates before step 1 again
    again.log(0, {"val/overall": 0.3})
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [0]


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []
    for resume_step in (0, 2, 0):  # start, resume at step 2, start over
        t = Tracker(["wandb"], str(tmp_path), "pebr-test", "resume", {}, resume_step=resume_step)
        ids.append(t.wandb.id)
        t.close()
    assert ids[0] == ids[1] != ids[2]


@pytest.mark.parametrize("backends", [["file", "wandb"], ["wandb"]])
def test_a_resume_says_which_steps_wandb_keeps_from_the_run_before(tmp_path, monkeypatch, capsys, backends):
    """wandb drops a step lower than its last one: the steps an earlier run logged past the checkpoint keep that
    run's values there, while metrics.jsonl and TensorBoard are rewound. README promised the same run; now the run
    says what wandb will show."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = Tracker(backends, str(tmp_path), "pebr-test", "resume", {}, resume_step=0)
    for step in (1, 2, 3, 4):
        t.log(step, {"reward/overall": 0.1 * step})
    t.close()
    capsys.readouterr()
    Tracker(backends, str(tmp_path), "pebr-test", "resume", {}, resume_step=2).close()
    assert ("warning: the wandb run already holds steps 3..4, logged by the run before this resume from step 2"
            in capsys.readouterr().out)
    Tracker(backends, str(tmp_path), "pebr-test", "resume", {}, resume_step=4).close()  # nothing logged past 4
    assert "warning" not in capsys.readouterr().out


def test_tensorboard_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = Tracker(["console", "tensorboard", "wandb"], str(tmp_path), "pebr-test", "logger", {"a": 1}, resume_step=0)
    t.log(1, {"reward/overall": 0.5})
    t.log(2, {"reward/overall": 0.75})
    # wandb commits a step's row when the next step starts: step 1's value, at its step (not just a run folder)
    assert t.wandb.summary["reward/overall"] == 0.5 and t.wandb.summary["_step"] == 1
    t.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward/overall")] == [(1, 0.5), (2, 0.75)]
    assert any("offline-run" in d for d in os.listdir(tmp_path / "wandb"))


def test_unknown_logger_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown back-ends"):
        Tracker(["console", "mlflow"], str(tmp_path), "p", "e", {}, resume_step=0)


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = Tracker(["tensorboard"], str(tmp_path), "p", "e", {}, resume_step=0)
    for step in (1, 2, 3):
        first.log(step, {"reward/overall": step / 10})
    first.close()
    resumed = Tracker(["tensorboard"], str(tmp_path), "p", "e", {}, resume_step=2)  # the checkpoint of step 2
    resumed.log(3, {"reward/overall": 0.9})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("reward/overall")] == [(1, 0.1), (2, 0.2), (3, 0.9)]


def test_tensorboard_shows_step_0_once_after_a_restart_before_any_checkpoint(tmp_path):
    """A rerun before the first checkpoint validates step 0 again: metrics.jsonl kept one line, TensorBoard two."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for score in (0.3, 0.5):
        run = Tracker(["tensorboard"], str(tmp_path), "p", "e", {}, resume_step=0)
        run.log(0, {"val/overall": score})
        run.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("val/overall")] == [(0, 0.5)]


def test_without_the_file_back_end_a_step_saved_but_never_logged_is_known(tmp_path):
    """missing() was always False without metrics.jsonl: a step saved by a run that died before logging it never
    reached TensorBoard or wandb, nor was its due validation run on resume."""
    first = Tracker(["tensorboard"], str(tmp_path), "p", "e", {}, resume_step=0)
    assert first.missing(1)
    for step in (1, 2):
        first.log(step, {"reward/overall": step / 10})
    first.close()
    resumed = Tracker(["tensorboard"], str(tmp_path), "p", "e", {}, resume_step=3)  # step 3 saved, then a crash
    assert not resumed.missing(2) and resumed.missing(3)
    resumed.log(3, {"reward/overall": 0.3})
    assert not resumed.missing(3)
    resumed.close()


def test_non_finite_metrics_are_null_in_the_file_and_validation_keys_are_whole_on_the_console(tmp_path, capsys):
    """NaN / Infinity made metrics.jsonl invalid JSON for strict readers; the console printed "overall=" twice."""
    t = Tracker(["file", "console"], str(tmp_path), "p", "e", {}, resume_step=0)
    t.log(5, {"reward/overall": 0.2, "val/overall": 0.9, "actor/grad_norm": float("nan"), "x": float("inf")})
    line = open(os.path.join(tmp_path, "metrics.jsonl")).read()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == {
        "step": 5, "reward/overall": 0.2, "val/overall": 0.9, "actor/grad_norm": None, "x": None}
    assert "step 5: overall=0.2  grad_norm=nan  val/overall=0.9" in capsys.readouterr().out
