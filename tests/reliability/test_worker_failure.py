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

from pebr.config import ConfigError, load_config
from pebr.trainer.main import build_dataset
from pebr.trainer import ray_trainer
from pebr.cli import WorkerFailure
from pebr.trainer.ray_trainer import WorkerGroup, ray_get
from pebr.workers.actor import load_processor
from tests.reliability.procs import trainer_argv, wait_gone

pytestmark = pytest.mark.slow
KILL_AFTER_S = 3.0


def test_dead_worker_fails_the_collective_call_fast(tiny_model_dir, synthetic_data_dir, ray_session, tmp_path):
    cfg = load_config(trainer_argv(tiny_model_dir, synthetic_data_dir, str(tmp_path / "run"), 1)
                      + ["worker.rollout.name=hf"])
    dataset = build_dataset(cfg, cfg.data.train_files, load_processor(cfg.worker.actor.model))
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
        # A hang guard, not a speed target: without the dead-peer check it waits out rank 0's 120 s sleep.
        assert detect_s < 60, f"the failure surfaced {detect_s:.1f} s after the kill"
        assert raised_at - t0 >= KILL_AFTER_S - 0.5  # it did wait for the kill: rank 0 was blocked
    finally:
        t_shutdown = time.time()
        group.shutdown()
    gone = wait_gone([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=30, since=t_shutdown)
    assert all(v is not None for v in gone.values()), gone  # all gone within wait_gone's 30 s
    deadline = time.time() + 20
    while ray_session.available_resources().get("CPU", 0) < free_cpus and time.time() < deadline:
        time.sleep(0.2)
    assert ray_session.available_resources().get("CPU", 0) == free_cpus
    print(f"\nfault report: worker rank 1 SIGKILLed while rank 0 was in compute_log_probs -> {message!r} after "
          f"{detect_s:.2f} s; after shutdown() worker processes gone: {gone}")


class GlooRank:
    """A bare rank: a Ray actor in a real gloo process group, without the model (the collectives are the point)."""

    store = None

    def open_store(self, world: int) -> int:
        """Rank 0's rendezvous store, on a port the system picks (as the trainer's workers do)."""
        import torch.distributed as dist

        self.store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
        return self.store.port

    def join(self, port: int, rank: int, world: int) -> None:
        import datetime

        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=60)
        if self.store is None:
            self.store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=self.store, rank=rank, world_size=world, timeout=timeout)

    def all_reduce(self) -> None:
        import torch
        import torch.distributed as dist

        dist.all_reduce(torch.ones(4))

    def die_after(self, seconds: float) -> None:
        time.sleep(seconds)
        os._exit(1)

    def leave_then_die(self, seconds: float) -> None:
        """Close this rank's gloo connections now and exit `seconds` later: the peer's collective breaks before
        Ray can know of a death (a killed process's sockets close at once, its death is reported later)."""
        import torch.distributed as dist

        time.sleep(0.5)
        dist.destroy_process_group()
        self.die_after(seconds)

    def raise_value_error(self) -> None:
        raise ValueError("a bug in this rank's own code")


def gloo_ranks(ray_session, world: int) -> list:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test modules are not importable in workers
    remote = ray_session.remote(num_cpus=0, max_restarts=0)(GlooRank)
    ranks = [remote.remote() for _ in range(world)]
    port = ray_session.get(ranks[0].open_store.remote(world))
    ray_session.get([r.join.remote(port, i, world) for i, r in enumerate(ranks)])
    return ranks


def test_a_collective_broken_by_a_dead_peer_names_the_dead_peer(ray_session, monkeypatch):
    """Rank 0 waits in a gloo all-reduce and rank 1 goes away: whichever news reaches the controller first, the
    error names rank 1. Both orders are forced: rank 1's process exits inside the collective (Ray's report
    usually comes first), and rank 1 closes its connections before exiting (rank 0's gloo error comes first)."""
    monkeypatch.setattr(ray_trainer, "DEAD_PEER_GRACE_S", 3.0)
    for leaving, survivor_first in (("die_after", False), ("leave_then_die", True)):
        ranks = gloo_ranks(ray_session, 2)
        try:
            with pytest.raises(WorkerFailure) as err:
                ray_get([ranks[0].all_reduce.remote(), getattr(ranks[1], leaving).remote(1.0)],
                        "log-prob computation")
            message = str(err.value)
            assert message.startswith("log-prob computation: worker 1 of 2 died"), message
            if survivor_first:
                assert "; worker 0 of 2: RuntimeError" in message and message.endswith("(after it)"), message
        finally:
            for actor in ranks:
                ray_session.kill(actor)


def test_a_rank_failing_on_its_own_is_named_after_the_grace_period(ray_session, monkeypatch):
    """No peer dies: rank 0 raises, rank 1 stays blocked in the all-reduce rank 0 never joins."""
    monkeypatch.setattr(ray_trainer, "DEAD_PEER_GRACE_S", 3.0)
    ranks = gloo_ranks(ray_session, 2)
    try:
        t0 = time.time()
        with pytest.raises(WorkerFailure) as err:
            ray_get([ranks[0].raise_value_error.remote(), ranks[1].all_reduce.remote()], "update")
        assert str(err.value).startswith("update failed in worker 0 of 2: ValueError"), str(err.value)
        assert 2.5 < time.time() - t0 < 60  # waited the grace period, then reported instead of hanging
    finally:
        for actor in ranks:
            ray_session.kill(actor)


def test_a_worker_ray_cannot_place_fails_within_the_worker_timeout(tiny_model_dir, synthetic_data_dir, ray_session,
                                                                     tmp_path, monkeypatch):
    """Every CPU of the cluster taken: worker 0 is never placed, and start-up used to wait for it forever. The
    resource check says so before any worker starts; should the CPUs go between that check and the placement, the
    workers' placement group is not placed either, and start-up still ends within trainer.worker_timeout_s, giving
    back what it had reserved."""
    from pebr.trainer import ray_trainer

    cfg = load_config(trainer_argv(tiny_model_dir, synthetic_data_dir, str(tmp_path / "run"), 1)
                      + ["worker.rollout.name=hf", "trainer.worker_timeout_s=3"])
    free_cpus = idle_cpus(ray_session)
    hog = ray_session.remote(num_cpus=free_cpus)(type("Hog", (), {"ready": lambda self: True})).remote()
    monkeypatch.setattr(ray_trainer, "RESOURCES_WAIT_S", 1.0)
    try:
        ray_session.get(hog.ready.remote(), timeout=60)
        with pytest.raises(ConfigError, match=rf"= 2 workers need 2 CPUs \({free_cpus:g} in the cluster, 0 free\): "
                                              r"the cluster cannot place them all"):
            WorkerGroup(cfg, total_steps=1)
        monkeypatch.setattr(ray_trainer, "check_resources_for_workers", lambda *args: None)  # taken after the check
        with pytest.raises(WorkerFailure, match=r"placing the workers of node 1 of 1 \(a placement group of "
                                                r"trainer.n_gpus_per_node=2 x \{'num_cpus': 1, 'num_gpus': 0\}\): "
                                                r"no answer within 3 s \(trainer\.worker_timeout_s\)"):
            WorkerGroup(cfg, total_steps=1)
    finally:
        ray_session.kill(hog)
    assert idle_cpus(ray_session) == free_cpus


def test_a_reward_function_that_stalls_fails_within_the_worker_timeout(ray_session, tmp_path):
    """A reward function waiting on a remote judge that never answers: the trainer waited for it forever while
    the sampling run gave up after trainer.worker_timeout_s."""
    import types

    from pebr.protocol import Batch
    from pebr.workers.reward import RewardWorker

    stalled = tmp_path / "stalled_reward.py"
    stalled.write_text("import time\n\ndef compute_score(reward_inputs):\n    time.sleep(60)\n")
    worker = RewardWorker.options(num_cpus=0).remote(f"{stalled}:compute_score", reward_type="batch",
                                                       reward_function_kwargs={})
    ray_session.get(worker.ready.remote(), timeout=60)
    batch = Batch(prompt_ids=[[1]], response_ids=[[2]], images=[[]],
                  non_tensors={"response": ["x"], "question": ["Q?"], "ground_truth": ["1"], "key_words": [[]],
                               "qid": ["q"]})
    trainer = types.SimpleNamespace(cfg=types.SimpleNamespace(trainer=types.SimpleNamespace(worker_timeout_s=3.0)),
                                    reward_worker=worker)
    try:
        t0 = time.time()
        with pytest.raises(WorkerFailure, match=r"reward: no answer within 3 s \(trainer\.worker_timeout_s\)"):
            future = ray_trainer.RayPPOTrainer._request_scores(trainer, batch)
            ray_trainer.RayPPOTrainer._attach_scores(trainer, batch, future)
        assert time.time() - t0 < 30
    finally:
        ray_session.kill(worker)


def reward_settings(tmp_path, header: str, setup: str, score: str, timeout: float):
    """The settings `start_reward_worker` reads, for a reward file of one `setup` and one `compute_score` line."""
    import types

    reward = tmp_path / "reward_under_test.py"
    reward.write_text(f"{header}\n\ndef setup(**kwargs):\n    {setup}\n\ndef compute_score(reward_inputs):\n    {score}\n")
    return types.SimpleNamespace(
        worker=types.SimpleNamespace(reward=types.SimpleNamespace(
            reward_function=f"{reward}:compute_score", reward_type="batch", reward_function_kwargs={}, num_gpus=0)),
        trainer=types.SimpleNamespace(worker_timeout_s=timeout))


@pytest.mark.parametrize("stalls", ["setup", "compute_score"])
def test_a_reward_stalling_at_start_up_or_in_its_first_check_fails_within_the_worker_timeout(ray_session, tmp_path,
                                                                                            stalls):
    """Both waits before the first rollout had no limit: a setup() that never returned (a judge service that does
    not answer) or a first score that never came hung the trainer and the sampler, saying nothing."""
    from pebr.trainer.main import probe_reward, start_reward_worker

    cfg = reward_settings(tmp_path, "import time", 'time.sleep(600)' if stalls == 'setup' else 'pass',
                          "time.sleep(600)", timeout=3.0)
    t0 = time.time()
    if stalls == "setup":  # no configuration error: the settings may be right, the service is down
        with pytest.raises(ray_trainer.WorkerTimeout, match=r"reward worker start-up: no answer within 3 s"):
            start_reward_worker(cfg)
    else:
        worker = start_reward_worker(cfg)
        try:
            with pytest.raises(ray_trainer.WorkerTimeout, match=r"reward function check on the first training "
                                                                 r"record: no answer within 3 s"):
                probe_reward(worker, {"question": "Q?", "ground_truth": "1", "key_words": [], "qid": "q", "images": []},
                             3.0)
        finally:
            ray_session.kill(worker)
    assert time.time() - t0 < 60


@pytest.mark.parametrize("fate", ["dies", "raises"])
def test_a_reward_worker_that_dies_at_start_up_is_a_worker_failure_not_a_setting(ray_session, tmp_path, fate):
    """Its process gone (a node lost, the OOM killer) was reported as "configuration error:
    worker.reward.reward_function=...", exit 2; a setup that raises is the settings' fault, and stays one."""
    from pebr.config import ConfigError
    from pebr.trainer.main import start_reward_worker

    cfg = reward_settings(tmp_path, "import os", 'os._exit(1)' if fate == 'dies' else 'raise ValueError(1)',
                          "return []", timeout=60.0)
    expected = (WorkerFailure, r"reward worker start-up: a worker died") if fate == "dies" else (
        ConfigError, r"worker\.reward\.reward_function=.*ValueError")
    with pytest.raises(expected[0], match=expected[1]) as caught:
        start_reward_worker(cfg)
    assert fate == "raises" or not isinstance(caught.value, ConfigError)
