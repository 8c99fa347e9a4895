"""A worker killed while its peer is blocked inside a collective: the controller's call fails at once."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import psutil
import pytest

from conftest import idle_cpus

from pebr.config import load_config
from pebr.trainer.main import build_dataset, load_processor
from pebr.trainer import ray_trainer
from pebr.trainer.ray_trainer import WorkerFailure, WorkerGroup, ray_get
from tests.reliability.procs import trainer_argv, wait_gone

pytestmark = pytest.mark.slow
KILL_AFTER_S = 3.0


def test_dead_worker_fails_the_collective_call_fast(tiny_model_dir, synthetic_data_dir, ray_session, tmp_path):
    cfg = load_config(trainer_argv(tiny_model_dir, synthetic_data_dir, str(tmp_path / "run"), 1)
                      + ["worker.rollout.name=hf"])
    dataset = build_dataset(cfg, cfg.data.train_files, load_processor(cfg))
    free_cpus = idle_cpus(ray_session)
    group = WorkerGroup(cfg, total_steps=1)
    try:
        pids = ray_session.get([w.__ray_call__.remote(lambda self: os.getpid()) for w in group.workers])
        prompts = [dict(dataset[i], uid=f"u{i}") for i in range(2)]
        batch, _ = group.generate(prompts, {"n": 2, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
                                            "max_tokens": 4, "seed": None})
        assert len(batch) == 4
        # Rank 1 is kept busy, so rank 0 enters compute_log_probs alone and blocks in FSDP's all-gather;
        # then rank 1's process is killed, as a segfault or the OOM killer would.
        group.workers[1].__ray_call__.remote(lambda self: time.sleep(120))
        killed_at: list[float] = []

        def kill() -> None:
            killed_at.append(time.time())
            os.kill(pids[1], signal.SIGKILL)

        timer = threading.Timer(KILL_AFTER_S, kill)
        timer.start()
        t0 = time.time()
        with pytest.raises(WorkerFailure) as err:
            group.compute_log_probs(batch)
        raised_at = time.time()
        timer.join()
        assert killed_at, f"compute_log_probs returned before the kill: {err.value}"
        message = str(err.value)
        assert message.startswith("log-prob computation"), message
        assert "worker 1 of 2 died" in message, message  # names the worker and what happened
        detect_s = raised_at - killed_at[0]
        assert detect_s < 10, f"the failure surfaced {detect_s:.1f} s after the kill"
        assert raised_at - t0 >= KILL_AFTER_S - 0.5  # it did wait for the kill: rank 0 was blocked
    finally:
        t_shutdown = time.time()
        group.shutdown()
    gone = wait_gone([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=30, since=t_shutdown)
    assert all(v is not None and v < 10 for v in gone.values()), gone
    deadline = time.time() + 20
    while ray_session.available_resources().get("CPU", 0) < free_cpus and time.time() < deadline:
        time.sleep(0.2)
    assert ray_session.available_resources().get("CPU", 0) == free_cpus
    print(f"\nfault report: worker rank 1 SIGKILLed while rank 0 was in compute_log_probs -> {message!r} after "
          f"{detect_s:.2f} s; after shutdown() worker processes gone: {gone}")


class Rank:
    """A stand-in rank for the error-ordering test: real Ray actors, no model."""

    def fail_after(self, seconds: float) -> None:
        time.sleep(seconds)
        raise RuntimeError("Connection closed by peer")  # what gloo says when the other end is gone

    def die_after(self, seconds: float) -> None:
        time.sleep(seconds)
        os._exit(1)

    def block(self, seconds: float) -> None:
        time.sleep(seconds)


def test_a_collective_broken_by_a_dead_peer_names_the_dead_peer(ray_session, monkeypatch):
    """Rank 0's collective fails because rank 1 died, and rank 0 reports first: the error still names rank 1."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test modules are not importable in workers
    monkeypatch.setattr(ray_trainer, "DEAD_PEER_GRACE_S", 3.0)
    remote = ray_session.remote(num_cpus=0, max_restarts=0)(Rank)
    ranks = [remote.remote() for _ in range(3)]  # the third outlives the test's second call
    try:
        with pytest.raises(WorkerFailure) as err:
            ray_get([ranks[0].fail_after.remote(0.5), ranks[1].die_after.remote(1.5)], "log-prob computation")
        message = str(err.value)
        assert message.startswith("log-prob computation: worker 1 of 2 died"), message
        assert "worker 0 of 2: RuntimeError: Connection closed by peer (after it)" in message, message
        # No peer dies: after the grace period the failed call reports itself.
        t0 = time.time()
        with pytest.raises(WorkerFailure) as err:
            ray_get([ranks[0].fail_after.remote(0.1), ranks[2].block.remote(30)], "update")
        assert str(err.value).startswith("update failed in worker 0 of 2: RuntimeError"), str(err.value)
        assert 2.5 < time.time() - t0 < 10
    finally:
        for actor in ranks:
            ray_session.kill(actor)
