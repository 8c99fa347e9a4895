"""SIGKILL the real trainer (`python -m pebr.trainer.main`) at two moments and restart it to completion.

Kill 1 lands after step 1's checkpoint (only the driver process, as an OOM killer would); kill 2 lands
while step 2's checkpoint is being written (`global_step_2.partial` exists; the whole process group,
as a scheduler would). The third start must finish the run as if nothing had happened.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from pebr import checkpoint
from pebr.config import load_config
from pebr.data import StatefulBatchSampler
from pebr.trainer.main import build_dataset
from pebr.workers.actor import load_processor
from tests.reliability.procs import (ROOT, descendants, pickle_like_files, sigkill, start, trainer_argv, wait_gone,
                                     wait_until)

pytestmark = pytest.mark.slow
STEPS = 3
LR, WARMUP = 1.0e-5, 4  # a warm-up schedule makes the lr differ at every step, so a lost schedule shows
# Ray's own processes that outlive a killed driver by up to a minute (they poll the dead raylet).
RAY_AGENTS = ("DashboardAgent", "RuntimeEnvAgent")


def _read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_sigkill_after_checkpoint_and_during_save_then_resume(tiny_model_dir, synthetic_data_dir, tmp_path):
    run_dir = str(tmp_path / "run")
    argv = trainer_argv(tiny_model_dir, synthetic_data_dir, run_dir, STEPS) + [
        f"worker.actor.optim.lr={LR}", f"worker.actor.optim.lr_warmup_steps={WARMUP}"]
    log = str(tmp_path / "train.log")
    report: dict[str, object] = {}

    # -- kill 1: the driver alone, right after step 1's checkpoint is published ------------------------
    proc = start("pebr.trainer.main", argv, log)
    report["first_ckpt_s"] = wait_until("global_step_1 complete",
                                        lambda: os.path.isfile(os.path.join(run_dir, "global_step_1",
                                                                            checkpoint.STATE_FILE)), proc, 240)
    family = descendants(proc.pid)
    t_kill1 = sigkill(proc, group=False)
    gone = wait_gone(family, timeout=20, since=t_kill1)
    core = {k: v for k, v in gone.items() if not any(a in k for a in RAY_AGENTS)}
    report["kill1_exit_s"] = core
    # raylet, GCS, FSDP and reward workers follow their driver within wait_gone's 20 s, not minutes
    assert all(v is not None for v in core.values()), core
    assert any("FSDPWorker" in k for k in core), core  # the workers were there to be killed
    agents = [p for p in family if any(a in name and name.endswith(f"[{p.pid}]") for name in gone for a in RAY_AGENTS)]

    # -- kill 2: the process group, while step 2's checkpoint is being written -------------------------
    partial = checkpoint.partial_dir(run_dir, 2)
    proc = start("pebr.trainer.main", argv, log)
    wait_until("global_step_2.partial appears", lambda: os.path.isdir(partial), proc, 240, poll=0.001)
    family = descendants(proc.pid)
    t_kill2 = sigkill(proc, group=True)
    assert os.path.isdir(partial), "the kill did not land inside the save"
    assert checkpoint.complete_steps(run_dir) == [1]
    report["kill2_exit_s"] = wait_gone(family, timeout=20, since=t_kill2)
    assert all(v is not None for v in report["kill2_exit_s"].values()), report["kill2_exit_s"]
    # The interrupted save is refused by the merger with a clear message.
    kept_partial = str(tmp_path / "kept" / "global_step_2.partial")
    shutil.copytree(partial, kept_partial)
    merger = subprocess.run([sys.executable, f"{ROOT}/scripts/model_merger.py", "--local_dir",
                             os.path.join(kept_partial, "actor")], capture_output=True, text=True, timeout=120)
    assert merger.returncode == 2, merger.stderr
    assert "incomplete checkpoint" in merger.stderr and "global_step_2.partial" in merger.stderr

    # -- the same command again, to the end ------------------------------------------------------------
    t0 = time.time()
    proc = start("pebr.trainer.main", argv, log)
    assert proc.wait(timeout=300) == 0, open(log).read()[-3000:]
    report["restart_to_end_s"] = round(time.time() - t0, 1)
    text = open(log).read()
    assert "removed incomplete checkpoints: ['global_step_2.partial']" in text
    assert text.count(f"resumed from {run_dir}/global_step_1 at step 1") == 2  # both restarts

    assert checkpoint.complete_steps(run_dir) == [2, 3]  # save_limit=2
    assert not [n for n in os.listdir(run_dir) if n.endswith((".partial", ".tmp"))]
    with open(os.path.join(run_dir, "global_step_3", checkpoint.STATE_FILE)) as f:
        assert json.load(f)["global_step"] == 3
    metrics = _read(os.path.join(run_dir, "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # lr is logged before the scheduler steps: base x step / warm-up, restored across both kills
    assert [m["actor/lr"] for m in metrics] == pytest.approx([LR * k / WARMUP for k in (1, 2, 3)], rel=1e-6)

    # Each step trained on the batch an uninterrupted run serves: the sampler's order, no batch skipped.
    cfg = load_config(argv)
    dataset = build_dataset(cfg, cfg.data.train_files, load_processor(cfg.worker.actor.model))
    b = cfg.data.rollout_batch_size
    order = StatefulBatchSampler(len(dataset), b, shuffle=True, seed=cfg.data.seed, drop_last=True).epoch_order(0)
    for step in range(1, STEPS + 1):
        rows = _read(os.path.join(run_dir, "rollouts", f"step_{step}.jsonl"))
        assert len(rows) == b * cfg.worker.rollout.n
        assert {r["index"] for r in rows} == {dataset.record_indices[i] for i in order[(step - 1) * b:step * b]}

    # Checkpoints hold safetensors and JSON only.
    assert pickle_like_files(run_dir) == []

    # No orphans: everything the killed runs started is gone, Ray's agents within about a minute.
    late = wait_gone(agents, timeout=90, since=t_kill1)
    report["kill1_ray_agents_exit_s"] = late
    assert all(v is not None for v in late.values()), late
    print("\nfault report:", json.dumps(report, indent=1))


def test_sigterm_to_the_driver_mid_run_ends_it_with_one_message(tiny_model_dir, synthetic_data_dir, tmp_path):
    """A scheduler's stop (SIGTERM to the driver) aborted it through Ray's handler: a C++ stack dump, no message,
    exit -6. Now the run unwinds as on Ctrl-C: workers shut down, one line saying what a rerun does, exit 143,
    the progress bar closed before that line."""
    run_dir = str(tmp_path / "run")
    log = str(tmp_path / "train.log")
    proc = start("pebr.trainer.main", trainer_argv(tiny_model_dir, synthetic_data_dir, run_dir, STEPS), log)
    wait_until("global_step_1 complete", lambda: os.path.isfile(os.path.join(run_dir, "global_step_1",
                                                                             checkpoint.STATE_FILE)), proc, 240)
    family = descendants(proc.pid)
    t_term = time.time()
    proc.send_signal(15)
    assert proc.wait(timeout=60) == 143
    gone = wait_gone(family, timeout=30, since=t_term)
    core = {k: v for k, v in gone.items() if not any(a in k for a in RAY_AGENTS)}
    assert any("FSDPWorker" in k for k in core) and all(v is not None for v in core.values()), core
    with open(log) as f:
        text = f.read()
    assert "SIGTERM received" not in text, text[-3000:]
    last = text.rstrip().splitlines()[-1]
    assert last == "terminated (SIGTERM); the same command continues from the last complete checkpoint or output"
    assert 1 in checkpoint.complete_steps(run_dir)
