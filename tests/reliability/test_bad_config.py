"""Bad settings and bad data stop `python -m pebr.trainer.main` with exit code 2 naming the key (or the file,
record and key), before Ray starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from tests.reliability.procs import CHILD_ENV, ROOT, trainer_argv


@pytest.fixture(scope="module")
def base_argv(tiny_model_dir, synthetic_data_dir, tmp_path_factory) -> list[str]:
    return trainer_argv(tiny_model_dir, synthetic_data_dir, str(tmp_path_factory.mktemp("run")), 1)


CASES = {
    "unknown key": (["worker.actor.optim.learning_rate=1e-6"], "worker.actor.optim.learning_rate"),
    "wrong type": (["data.rollout_batch_size=many"], "data.rollout_batch_size"),
    "n=1 with GRPO": (["worker.rollout.n=1"], "worker.rollout.n=1"),
    "impossible batch": (["worker.actor.global_batch_size=3"], "worker.actor.global_batch_size=3"),
    "missing model": (["worker.actor.model.model_path=/nonexistent/model"], "worker.actor.model.model_path"),
    "missing reward file": (["worker.reward.reward_function=/nonexistent/reward.py:compute_score"],
                            "worker.reward.reward_function"),
    "missing data file": (["data.train_files=/nonexistent/train.json"],
                          "data.train_files='/nonexistent/train.json': no such file"),
    # Found by the record reader in the driver, still before Ray: names the file, the record and the key.
    # First written at the profiled step, after its rollout and update: the step was lost with a worker error.
    "profile folder under a file": (["trainer.profile_steps=[1]", "trainer.profile_dir={bad_data}/prof"],
                                    "trainer.profile_dir: cannot write into {bad_data}/prof"),
    "bad data record": (["data.train_files={bad_data}"],
                        "{bad_data} record 1 qid='train_00001': key 'answer' is missing"),
    # Found when the data set is built (still before Ray), not when vLLM is given the record mid-run.
    "record with more images than the engine takes": (
        ["data.train_files={two_images}"], "{two_images} record 2 qid='train_00002': 2 images, more than the 1 the "
                                           "rollout engine takes per prompt (worker.rollout.limit_images)"),
}


@pytest.fixture(scope="module")
def bad_data(synthetic_data_dir, tmp_path_factory) -> dict[str, str]:
    """Two broken copies of the first training records: one misses a key, one has a record with two images."""
    with open(os.path.join(synthetic_data_dir, "train.json")) as f:
        records = json.load(f)[:8]
    missing = [dict(r) for r in records]
    del missing[1]["answer"]
    two_images = [dict(r) for r in records]
    two_images[2]["images"] = two_images[2]["images"] * 2
    two_images[2]["problem"] = "<image>" + two_images[2]["problem"]
    paths = {}
    for name, broken in (("bad_data", missing), ("two_images", two_images)):
        paths[name] = str(tmp_path_factory.mktemp(name) / "train.json")
        with open(paths[name], "w") as f:
            json.dump(broken, f)
    return paths


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_setting_exits_2_naming_the_key_without_ray(case, base_argv, bad_data, tmp_path):
    extra, named = [word.format(**bad_data) for word in CASES[case][0]], CASES[case][1].format(**bad_data)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pebr.trainer.main", *base_argv, *extra], cwd=ROOT,
                          env={**os.environ, **CHILD_ENV, "RAY_TMPDIR": str(tmp_path)}, capture_output=True,
                          text=True, timeout=120)
    elapsed = time.time() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert named in proc.stderr, proc.stderr[-2000:]
    assert ("data error" if "record" in case else "configuration error") in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not os.listdir(tmp_path), "a Ray session was started"  # Ray writes its session under RAY_TMPDIR
    # Failing early is shown by what did not happen (no Ray session). The time is reported, not asserted:
    # a 10 s bound failed once on a busy 2-core CI machine (10.4 s), and timings belong in benchmarks/.
    print(f"\nfault report: {case} -> rc 2 in {elapsed:.1f} s: {proc.stderr.strip().splitlines()[-1]}")


@pytest.mark.parametrize("module, recipe", [("pebr.trainer.main", "pebr_stage2.yaml"),
                                            ("pebr.trainer.sample_main", "pebr_sample.yaml")])
def test_a_mistyped_key_is_reported_before_torch_loads(module, recipe, base_argv):
    """The settings are read first: a typo costs a third of a second, not the seconds torch, transformers and the
    data set take (4.6 s before on this machine)."""
    code = (f"import sys; from {module} import main\n"
            f"rc = main(sys.argv[1:])\n"
            "print('loaded:', sorted(m for m in ('torch', 'transformers', 'ray', 'vllm') if m in sys.modules))\n"
            "sys.exit(rc)")
    argv = [f"config={ROOT}/examples/{recipe}", *base_argv[2:], "worker.actor.optim.learning_rate=1e-6"]
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env={**os.environ, **CHILD_ENV},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "configuration error" in proc.stderr and "worker.actor.optim.learning_rate" in proc.stderr
    assert "loaded: []" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_a_run_below_another_runs_checkpoints_is_refused(base_argv, tmp_path):
    """A fresh run (or one resumed from elsewhere) in a folder holding later steps would have its saves
    rotated away by save_limit, and a later auto-resume would pick the other run's step."""
    run_dir = tmp_path / "run"
    (run_dir / "global_step_7").mkdir(parents=True)
    (run_dir / "global_step_7" / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    proc = subprocess.run([sys.executable, "-m", "pebr.trainer.main", *base_argv,
                           f"trainer.save_checkpoint_path={run_dir}", "trainer.find_last_checkpoint=false"],
                          cwd=ROOT, env={**os.environ, **CHILD_ENV, "RAY_TMPDIR": ray_tmp},
                          capture_output=True, text=True, timeout=300)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "checkpoint error:" in proc.stderr and "steps [7] after the step this run starts at (0)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(run_dir)) == [".lock", "global_step_7"]  # nothing written beside it but the run's lock


def test_top_k_sampling_is_warned_about_before_the_run_starts(base_argv, tmp_path):
    """The loss scores top-k samples under the whole distribution: a large, silent mismatch (3.4 nats a token on
    the tiny model at top_k=20). Stopped right after (its run directory is a file), as no run needs to start."""
    taken = tmp_path / "taken"
    taken.write_text("a file where the run directory would go")
    proc = subprocess.run([sys.executable, "-m", "pebr.trainer.main", *base_argv, "worker.rollout.top_k=20",
                           f"trainer.save_checkpoint_path={taken}"], cwd=ROOT,
                          env={**os.environ, **CHILD_ENV, "RAY_TMPDIR": str(tmp_path)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "warning: worker.rollout.top_k=20: the rollout samples from the top 20 tokens" in proc.stderr
