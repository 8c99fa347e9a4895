"""The single controller: owns Ray, the data, the reward worker and the FSDP/vLLM workers, and runs GRPO.

Read `fit` top to bottom: each phase of a step is one named call, timed.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import socket
import threading
import time
import uuid
from typing import Any, Iterator

import numpy as np
import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm

from pebr import checkpoint
from pebr.algorithms.advantages import (compute_advantages, group_ids_from_uids, token_level_rewards,
                                       zero_variance_group_fraction)
from pebr.algorithms.filtering import groups_within
from pebr.algorithms.losses import kl_penalty, masked_mean
from pebr.cli import Terminated, WorkerFailure, WorkerTimeout
from pebr.config import ConfigError, PPOConfig, changed_settings, config_to_yaml
from pebr.protocol import Batch
from pebr.rewards.manager import reward_input
from pebr.trainer.logger import Tracker
from pebr.utils.jsonio import atomic_write_json, atomic_write_text
from pebr.workers.lora import requested_settings


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the driver runs, SIGTERM unwinds it as Ctrl-C does (workers shut down, one message, exit 143). Ray's
    own handler, installed by ray.init, made it abort with a C++ stack dump and no message."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# Actor calls the GCS of a local cluster keeps a record of (see init_ray); Ray's default is 100 000.
GCS_TASK_EVENTS = 10_000


def init_ray(cfg: PPOConfig) -> bool:
    """Connect to trainer.ray_address's cluster, or start a local one sized for the run; returns whether this call
    did (False: Ray was up already, as in the tests), so that the caller shuts down only what it started.

    Raises:
        ConfigError: trainer.ray_address names no reachable cluster (a malformed address, nothing listening, a
            cluster that refuses the connection), said at once instead of after Ray's minutes of retries.
    """
    if ray.is_initialized():
        return False
    # No usage reports leave the machine unless the user asks for them.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        # (Under `ray job submit` the job's runtime_env reaches every worker already, and Ray refuses a second one
        # that names any of its variables again.)
        kwargs["runtime_env"] = {"env_vars": forwarded_environment()}
    # RAY_ADDRESS as ray.init reads it (`ray job submit` sets it); trainer.ray_address wins over it.
    key = "trainer.ray_address" if cfg.trainer.ray_address else "RAY_ADDRESS"
    address = cfg.trainer.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        kwargs["address"] = address
        _check_reachable(address, key)
        print(f"joining the Ray cluster at {address} ({key})", flush=True)
    else:
        # A fresh local cluster (never one found through `ray start` by accident), with one CPU per worker plus
        # the reward worker.
        kwargs["address"] = "local"
        kwargs["num_cpus"] = max(os.cpu_count() or 1, cfg.world_size + math.ceil(cfg.worker.reward.num_cpus) + 1)
        # The GCS keeps a record of each actor call for the dashboard (off here), 3-4 KB each, up to 100 000 by
        # default: its memory grew 1.35 MB per 100 tiny steps, towards about 340 MB. (A cluster of `ray start`
        # takes this from its own start, RAY_task_events_max_num_task_in_gcs.)
        kwargs["_system_config"] = {"task_events_max_num_task_in_gcs": GCS_TASK_EVENTS}
    try:
        ray.init(**kwargs)
    except (ConnectionError, ValueError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        hint = (" (a cluster with token authentication: set RAY_AUTH_MODE=token, as `ray start` said)"
                if "auth" in str(err).lower() else "")
        raise ConfigError(f"{key}={address!r}: no Ray cluster to join: "
                          f"{lines[-1] if lines else type(err).__name__}{hint}") from None
    return True


# Prefixes of the driver's environment variables that the workers need as the driver has them: on a cluster
# started with `ray start` they run in the raylet's environment, without the driver shell's HF_HUB_OFFLINE=1, say.
FORWARDED_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "VLLM_", "WANDB_", "PEBR_", "NCCL_",
                      "GLOO_", "CUDA_LAUNCH_BLOCKING", "TORCH_", "PYTORCH_")
# Each node's own (its address, its network interfaces): the driver's value would be wrong on the others.
PER_NODE_VARIABLES = frozenset({"VLLM_HOST_IP", "VLLM_PORT", "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA",
                                "GLOO_SOCKET_IFNAME"})


def forwarded_environment() -> dict[str, str]:
    """The driver's variables under `FORWARDED_PREFIXES` (not `PER_NODE_VARIABLES`), for the workers on every
    node."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES) and k not in PER_NODE_VARIABLES}


def _check_reachable(address: str, key: str = "trainer.ray_address") -> None:
    """A "host:port" address (or "auto", as Ray resolves it: RAY_ADDRESS, else the last cluster `ray start` made on
    this machine) must answer a TCP connection within a few seconds: Ray's own client retries a dead one for about
    14 minutes. Other forms ("ray://...", "local") are left to Ray."""
    given = address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address  # (how ray.init reads "auto")

        try:
            address = canonicalize_bootstrap_address("auto") or ""
        except (ValueError, ConnectionError) as err:
            raise ConfigError(f"{key}='auto': no Ray cluster found to join ({err})") from None
        if not address:
            raise ConfigError(f"{key}='auto': no Ray cluster runs on this machine (`ray start --head` starts one; "
                              "or give the head's host:port)")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in address or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()  # "[::1]:6379" too
    except OSError as err:
        shown = f"{given!r} ({address})" if given != address else repr(address)
        raise ConfigError(f"{key}={shown}: nothing answers there ({err}); start the cluster's head with "
                          "`ray start --head`, or correct the address") from None


def _died_why(error: Exception) -> str:
    """The reason an actor died: for one whose start-up raised, the exception's own line (Ray puts it at the end
    of a traceback of some 50 lines, after its own first line), else Ray's first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if getattr(error, "_actor_init_failed", False):
        raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Failure): ", line)]
        if raised:
            return f"its start-up raised {raised[-1]}"
    return lines[0] if lines else type(error).__name__


def ray_get(refs: Any, what: str, timeout: float | None = None) -> Any:
    """`ray.get` that turns a dead or failed worker into one clear error naming the call.

    For a list, results are awaited as they come, so a failure surfaces at once even while the other
    workers are still blocked in a collective waiting for the one that died. A worker whose collective
    broke because a peer died (gloo: "connection closed by peer") can report before Ray notices the death;
    the error then names the dead peer first.
    """
    single = not isinstance(refs, list)
    pending = [refs] if single else list(refs)
    # For a list of per-rank calls, the position of the failed call names the worker.
    position = {ref: i for i, ref in enumerate(pending)}
    who = "a worker"
    deadline = None if timeout is None else time.time() + timeout
    try:
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.time())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                silent = "" if single else (f" from worker(s) {sorted(position[ref] for ref in pending)} of "
                                            f"{len(position)}")
                raise WorkerTimeout(f"{what}: no answer within {timeout:.0f} s{silent} (trainer.worker_timeout_s)")
            if not single:
                who = f"worker {position[ready[0]]} of {len(position)}"
            ray.get(ready)  # raises here if that worker failed
        return ray.get(refs)
    except ray.exceptions.RayActorError as e:
        raise WorkerFailure(f"{what}: {who} died: {_died_why(e)}") from e
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if getattr(e, "cause", None) is not None else e
        failed = f"{who}: {type(cause).__name__}: {cause}"
        dead = _dead_peer(pending, position, DEAD_PEER_GRACE_S)
        if dead is not None:
            raise WorkerFailure(f"{what}: {dead}; {failed} (after it)") from e
        raise WorkerFailure(f"{what} failed in {failed}") from e


DEAD_PEER_GRACE_S = 5.0  # how long a failed call waits for news of a dead peer before reporting itself


def _dead_peer(pending: list, position: dict, grace: float) -> str | None:
    """'worker k of n died: ...' if one of the `pending` per-rank calls turns out, within `grace` seconds, to
    belong to a worker that died; None otherwise (a worker still blocked in a collective answers nothing)."""
    deadline = time.time() + grace
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.time()))
        if not ready:
            return None
        try:
            ray.get(ready)
        except ray.exceptions.RayActorError as e:
            return f"worker {position[ready[0]]} of {len(position)} died: {str(e).splitlines()[0]}"
        except ray.exceptions.RayTaskError:
            continue
    return None


@contextlib.contextmanager
def timed(metrics: dict, name: str) -> Iterator[None]:
    t0 = time.time()
    yield
    metrics[f"timing/{name}_s"] = time.time() - t0


def reward_inputs(batch: Batch) -> list[dict]:
    """What the reward function gets per sample (the keys are listed in `pebr.rewards.manager`)."""
    nt = batch.non_tensors
    return [reward_input(nt["response"][i], len(batch.response_ids[i]), nt["question"][i], nt["ground_truth"][i],
                         nt["key_words"][i], nt["qid"][i], batch.images[i]) for i in range(len(batch))]


def batch_advantages(batch: Batch, a: Any) -> None:
    """Fill batch.tensors response_mask and advantages [N, T] from scores [N] (and the KL penalty in the
    reward when algorithm.use_kl_loss is off and KL is not disabled)."""
    mask = batch.response_mask()
    batch.tensors["response_mask"] = mask
    scores = batch.tensors["scores"]
    token_rewards = None
    if a.kl_in_reward:
        kl = kl_penalty(batch.tensors["old_logprobs"], batch.tensors["ref_logprobs"], a.kl_penalty) * mask
        token_rewards = token_level_rewards(scores, mask) - a.kl_coef * kl
        scores = (token_rewards * mask).sum(-1)
    batch.tensors["advantages"] = compute_advantages(
        a.adv_estimator, scores=scores, group_ids=group_ids_from_uids(batch.non_tensors["uid"]),
        response_mask=mask, token_rewards=token_rewards, gamma=a.gamma)


def worker_resources(on_gpu: bool) -> dict[str, float]:
    """What Ray reserves for one FSDP/vLLM worker.

    A worker has its GPU to itself, but asks Ray for 0.9 of it: stage 1's CLIP scorer takes 0.1 of a GPU
    (`pebr.workers.reward.DEFAULT_CLIP_GPU_FRACTION`) and must fit beside a worker, or on a node with one
    GPU per worker the last worker could never be placed and the others would wait for it in the rendezvous.
    Two workers never share a GPU: 0.9 + 0.9 > 1.
    """
    from pebr.workers.reward import DEFAULT_CLIP_GPU_FRACTION

    return {"num_cpus": 1, "num_gpus": 1.0 - DEFAULT_CLIP_GPU_FRACTION if on_gpu else 0}


def workers_on_gpu(cfg: PPOConfig) -> bool:
    """Whether the FSDP/vLLM workers take GPUs: trainer.device, where "auto" asks the cluster, not this process (a
    driver on a head node without GPUs made the workers ask Ray for none, and Ray then hid the GPU nodes' cards
    from them: a 7 B model trained in fp32 on gloo)."""
    return cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)


def node_placement_groups(cfg: PPOConfig, resources: dict[str, float]) -> list[PlacementGroup]:
    """A placement group per node's share of the workers, trainer.n_gpus_per_node bundles of `resources` each, packed:
    rank r runs in group r // n_gpus_per_node, so consecutive ranks (those of one tensor-parallel engine, and a node's
    FSDP neighbours) share a node when one has room. Ray alone scattered them: 4 workers on three 2-CPU nodes went to
    all three, in another order each time. PACK rather than STRICT_PACK: a group no one node can hold is spread, not
    refused."""
    bundle = {"CPU": resources["num_cpus"], **({"GPU": resources["num_gpus"]} if resources["num_gpus"] else {})}
    return [placement_group([bundle] * cfg.trainer.n_gpus_per_node, strategy="PACK")
            for _ in range(cfg.trainer.nnodes)]


def rank_placement(groups: list[PlacementGroup], rank: int) -> PlacementGroupSchedulingStrategy:
    """Where rank `rank` runs: bundle rank mod n of group rank div n, for groups of n bundles."""
    per_node = groups[0].bundle_count
    return PlacementGroupSchedulingStrategy(groups[rank // per_node], placement_group_bundle_index=rank % per_node)


def check_reward_gpus(cfg: PPOConfig) -> None:
    """worker.reward.num_gpus are whole cards of the reward actor's own, beside one per GPU worker: on a cluster
    without them Ray would leave the reward actor, or the last worker once the reward actor holds its card, waiting
    until trainer.worker_timeout_s. (A fraction is not offered: beside a worker's 0.9 and the CLIP scorer's 0.1
    there is none left on any card.)

    Raises:
        ConfigError: naming the setting, the GPUs the run needs and those the cluster has.
    """
    want = cfg.worker.reward.num_gpus
    if not want:
        return
    workers = cfg.world_size if workers_on_gpu(cfg) else 0
    total = ray.cluster_resources().get("GPU", 0)
    if total < workers + want:
        beside = (f" beside the {workers} of the training workers (trainer.nnodes x trainer.n_gpus_per_node), "
                  f"{workers + want} in all" if workers else "")
        remedy = "lower trainer.n_gpus_per_node to leave cards free, or " if workers else ""
        raise ConfigError(f"worker.reward.num_gpus={want}: the reward actor needs {want} GPU(s) of its own{beside}, "
                          f"and the Ray cluster has {total:g}; {remedy}set worker.reward.num_gpus=0 (the reward actor "
                          "on a CPU)")


# Seconds to wait for the cluster to free what the workers need (a killed actor's CPUs come back a moment later).
RESOURCES_WAIT_S = 30.0


def check_resources_for_workers(world_size: int, on_gpu: bool) -> None:
    """Refuse to start workers the Ray cluster cannot place all at once: those placed would wait for the others in
    the process group's rendezvous until trainer.worker_timeout_s (an hour by default), and then blame slowness.

    Raises:
        ConfigError: naming what the workers need, what the cluster has and has free, and the settings.
    """
    need = {key: world_size * value for key, value in
            (("CPU", worker_resources(on_gpu)["num_cpus"]), ("GPU", worker_resources(on_gpu)["num_gpus"])) if value}
    deadline = time.monotonic() + RESOURCES_WAIT_S
    while True:
        total, free = ray.cluster_resources(), ray.available_resources()
        short = {key: amount for key, amount in need.items() if free.get(key, 0) < amount - 1e-9}
        if not short:
            return
        if any(total.get(key, 0) < need[key] - 1e-9 for key in short) or time.monotonic() > deadline:
            kinds = ", ".join(f"{need[key]:g} {key}s ({total.get(key, 0):g} in the cluster, {free.get(key, 0):g} "
                              f"free)" for key in short)
            raise ConfigError(f"trainer.nnodes x trainer.n_gpus_per_node = {world_size} "
                              f"{'GPU ' if on_gpu else ''}workers need {kinds}: the cluster cannot place them all. "
                              "Lower trainer.n_gpus_per_node (or trainer.nnodes), or free or add resources")
        time.sleep(0.5)


class WorkerGroup:
    """The FSDP/vLLM workers, one per rank, and the calls that go to all of them."""

    def __init__(self, cfg: PPOConfig, total_steps: int, need_actor: bool = True):
        from pebr.workers.fsdp_worker import FSDPWorker

        self.cfg = cfg
        self.size = cfg.world_size
        self.tp = cfg.worker.rollout.tensor_parallel_size
        on_gpu = workers_on_gpu(cfg)
        check_resources_for_workers(self.size, on_gpu)
        resources = worker_resources(on_gpu)
        remote = ray.remote(FSDPWorker)
        self.timeout = cfg.trainer.worker_timeout_s
        self._last_rollout: str | None = None  # the id of the rollout the workers hold
        # (batch, shares, samples of the first mini-batch to skip in each share, tensors the workers hold)
        self._experience: tuple[Batch, list[list[int]], int, set[str]] | None = None
        self.workers: list[Any] = []
        self.groups = node_placement_groups(cfg, resources)
        try:
            per_node = cfg.trainer.n_gpus_per_node
            for k, group in enumerate(self.groups):  # (placed together: the later waits are short)
                # Bounded: a group Ray cannot place (its CPUs or GPUs taken since the check) is never ready.
                ray_get(group.ready(), f"placing the workers of node {k + 1} of {len(self.groups)} (a placement "
                        f"group of trainer.n_gpus_per_node={per_node} x {resources})", self.timeout)
            self.workers = [remote.options(**resources, max_restarts=0, scheduling_strategy=rank_placement(
                self.groups, rank)).remote(cfg, rank, self.size, total_steps, need_actor) for rank in range(self.size)]
            addr, port = ray_get(self.workers[0].address.remote(), "worker 0 start", self.timeout)
            # Each worker's rank, device, start-up time and how weights reach its engine.
            self.started = ray_get([w.init.remote(addr, port) for w in self.workers], "worker start-up", self.timeout)
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self) -> None:
        """Kill the workers (their engines and process group go with them) and give back their placement groups'
        resources (held by the cluster until then, or until the driver's job ends)."""
        for w in self.workers:
            ray.kill(w)
        for group in self.groups:
            remove_placement_group(group)
        self.workers, self.groups = [], []

    def generate(self, prompts: list[dict], sampling: dict) -> tuple[Batch, dict]:
        """Spread prompts over the rollout groups (ranks sharing a tensor-parallel engine get the same ones).

        The workers keep what they generated and send back no images: the batch carries the prompts' own
        image objects, and per sample where it was generated (non_tensors["origin"]: rollout id, rollout
        group, position), so that `compute_log_probs` can leave samples where they already are.
        """
        groups = self.size // self.tp
        shards = [prompts[g::groups] for g in range(groups)]
        rollout_id = self._last_rollout = uuid.uuid4().hex
        futures = [w.generate.remote(shards[rank // self.tp], sampling, rollout_id) for rank, w in enumerate(self.workers)]
        results = ray_get(futures, "rollout", self.timeout)
        batches = []
        for g in range(groups):
            batch, shard = results[g * self.tp][0], shards[g]
            if len(batch) != len(shard) * sampling["n"]:
                raise WorkerFailure(f"rollout group {g} returned {len(batch)} samples for {len(shard)} prompts x "
                                    f"n={sampling['n']}")
            batch.images = [shard[j // sampling["n"]].get("images") or [] for j in range(len(batch))]
            batch.non_tensors["origin"] = [(rollout_id, g, j) for j in range(len(batch))]
            batches.append(batch)
        timing = {k: max(r[1][k] for r in results) for k in results[0][1]}
        return Batch.concat(batches), timing

    def compute_log_probs(self, batch: Batch, on_policy: int = 0, old: bool = True) -> dict[str, torch.Tensor]:
        """Reference log-probs [N, T], and old log-probs with their entropies for all but the first
        `on_policy` samples (the first global mini-batch, whose update supplies them: `on_policy_samples`);
        none with `old=False` (`batch` carries the rollout's own as "old_logprobs").

        Each rank gets its share of the step (`rank_shares`) and keeps it for `update_actor`, so the samples
        are sent once per step (and not at all when they are still where they were generated).
        """
        mini = min(self.cfg.worker.actor.global_batch_size * self.cfg.worker.rollout.n, len(batch))
        if on_policy not in (0, mini):
            raise ValueError(f"on_policy must be 0 or the first mini-batch's {mini} samples, got {on_policy}")
        shares = rank_shares(batch, self.size, mini)
        skip = on_policy // self.size  # a rank's share starts with its part of the first mini-batch
        payloads = [share_payload(batch, share, rank // self.tp, self._last_rollout) for rank, share in enumerate(shares)]
        parts = ray_get([w.compute_log_probs.remote(p, skip, old) for w, p in zip(self.workers, payloads)],
                        "log-prob computation", self.timeout)
        self._experience = (batch, shares, skip, set(parts[0]))
        out = {}
        for name in parts[0]:
            out[name] = torch.zeros(len(batch), max(p[name].shape[1] for p in parts))
            for share, part in zip(shares, parts):
                rows = share if name == "ref_logprobs" else share[skip:]
                out[name][rows, :part[name].shape[1]] = part[name]
        return out

    def update_actor(self, batch: Batch) -> dict[str, float]:
        """One PPO update per rank on the share `compute_log_probs` left there, with only the tensors the
        workers do not hold yet (advantages, response_mask, ...). The old log-probs and entropies that the
        update supplied for the first mini-batch are written into `batch`, so its metrics cover every sample.

        Each global mini-batch (a contiguous block of global_batch_size x n samples) is split evenly over
        the ranks, so an optimizer step sees the same samples whatever the number of workers."""
        if self._experience is None or self._experience[0] is not batch:
            raise RuntimeError("update_actor(batch) needs compute_log_probs(batch) first: the workers hold the "
                               "step's samples from that call")
        _, shares, skip, held = self._experience
        self._experience = None
        index = [torch.tensor(share, dtype=torch.long) for share in shares]
        sends = [{k: v.index_select(0, i) for k, v in batch.tensors.items() if k not in held} for i in index]
        results = ray_get([w.update_actor.remote(t) for w, t in zip(self.workers, sends)],
                          "actor update", self.timeout)
        for name in results[0][1]:
            full = batch.response_tensor(name)
            for share, (_, filled) in zip(shares, results):
                full[share[:skip], :filled[name].shape[1]] = filled[name]
        # perf/* are per-process resource figures: the largest rank's is the one that runs out first.
        return {k: float((np.max if k.startswith("perf/") else np.mean)([r[0][k] for r in results]))
                for k in results[0][0]}

    def call_all(self, method: str, *args: Any) -> list:
        return ray_get([getattr(w, method).remote(*args) for w in self.workers], method, self.timeout)


def on_policy_samples(cfg: PPOConfig, num_samples: int) -> int:
    """How many leading samples of a step (its first global mini-batch) can skip the old log-prob pass.

    Nothing updates the policy between sampling a batch and its first optimizer step, so the first
    mini-batch's old log-probs are its current ones: the update takes them, detached, from its own forward
    (ratio 1) and hands them back. With one mini-batch per rollout that skips the whole pass. A KL penalty
    in the reward needs every old log-prob before the update, so it keeps the pass. With the rollout's
    log-probs as the old ones (algorithm.old_logprobs=rollout) no sample needs the pass.
    """
    if cfg.algorithm.kl_in_reward or cfg.algorithm.old_from_rollout:
        return 0
    return min(cfg.worker.actor.global_batch_size * cfg.worker.rollout.n, num_samples)


def balanced_order(batch: Batch, parts: int) -> list[int]:
    """An order of samples that gives each of `parts` equal chunks a similar number of tokens.

    The samples that share an image (a prompt's n responses, `Batch.image_groups`) are dealt together,
    largest group first, to the chunk with the fewest tokens so far that has room for the whole group
    (greedy partitioning): ranks then finish their passes at about the same time, and each image is
    encoded on one rank instead of on every rank that got one of its responses. A group that fits in no
    chunk is cut, longest samples first. Within a chunk the batch order is kept.
    """
    size = len(batch) // parts
    lengths = [len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids)]
    loads, chunks = [0] * parts, [[] for _ in range(parts)]
    for group in sorted(batch.image_groups(), key=lambda g: -sum(lengths[i] for i in g)):
        rest = sorted(group, key=lambda i: -lengths[i])
        while rest:
            open_chunks = [c for c in range(parts) if len(chunks[c]) < size]
            whole = [c for c in open_chunks if size - len(chunks[c]) >= len(rest)]
            c = min(whole or open_chunks, key=lambda c: loads[c])
            take, rest = rest[:size - len(chunks[c])], rest[size - len(chunks[c]):]
            chunks[c] += take
            loads[c] += sum(lengths[i] for i in take)
    return [i for c in chunks for i in sorted(c)]


def share_payload(batch: Batch, share: list[int], group: int, last_rollout: str | None) -> Batch | tuple[str, list[int]]:
    """What a rank of rollout group `group` is sent for `share`: (rollout id, positions) when every sample
    of it came from that group's engine in the workers' last rollout, which the rank still holds, else
    the samples themselves."""
    origins = [batch.non_tensors["origin"][i] for i in share] if "origin" in batch.non_tensors else []
    if origins and all(o[0] == last_rollout and o[1] == group for o in origins):
        return last_rollout, [o[2] for o in origins]
    return batch.select(share)


def rank_shares(batch: Batch, ranks: int, mini_batch: int) -> list[list[int]]:
    """The samples each rank computes log-probs for and trains on this step.

    From every global mini-batch (a contiguous block of `mini_batch` samples: one optimizer step) each rank
    gets an equal part, chosen by `balanced_order` (similar token counts, a prompt's responses on one rank);
    a rank's share is its parts block after block, which `update_policy` cuts into mini-batches again.
    One assignment serves both passes, so each rank receives its samples once per step.
    """
    if mini_batch % ranks or len(batch) % mini_batch:
        raise ValueError(f"a batch of {len(batch)} samples in mini-batches of {mini_batch} cannot be split evenly "
                         f"over {ranks} ranks")
    per_rank = mini_batch // ranks
    shares: list[list[int]] = [[] for _ in range(ranks)]
    for start in range(0, len(batch), mini_batch):
        order = balanced_order(batch.select(range(start, start + mini_batch)), ranks)
        for rank in range(ranks):
            shares[rank] += [start + i for i in order[rank * per_rank:(rank + 1) * per_rank]]
    return shares


def model_identity(model_path: str) -> str:
    """A model directory resolved (links, relative paths), or a hub id as it is: what a checkpoint records to
    refuse a resume that names another starting model."""
    local = os.path.expanduser(model_path)
    return os.path.realpath(local) if os.path.exists(local) else model_path


class RayPPOTrainer:
    def __init__(self, cfg: PPOConfig, train_dataset: Any, val_dataset: Any, sampler: Any, reward_worker: Any):
        """`reward_worker`: the RewardWorker actor that scores training and validation responses."""
        self.cfg = cfg
        self.train_dataset, self.val_dataset, self.sampler = train_dataset, val_dataset, sampler
        self.reward_worker = reward_worker
        steps_per_epoch = len(sampler)
        t = cfg.trainer
        epochs_steps = steps_per_epoch * t.total_epochs
        self.total_steps = t.max_steps or epochs_steps
        if t.max_steps and t.max_steps != epochs_steps and not t.val_only:
            print(f"trainer.max_steps={t.max_steps} sets the run's length: {t.max_steps / steps_per_epoch:.3g} epochs "
                  f"of {steps_per_epoch} steps (trainer.total_epochs={t.total_epochs} would be {epochs_steps} steps)",
                  flush=True)
        self.ckpt_dir = cfg.checkpoint_dir
        self.global_step = 0
        self._batches = iter(self.sampler)
        self._resume_path = self._find_resume_checkpoint()
        # Which records the data order indexes (the tests build a trainer without a data set), and which model the
        # run starts from: both go into every checkpoint.
        self._data_fingerprint = getattr(train_dataset, "fingerprint", None)
        self._model_identity = model_identity(cfg.worker.actor.model.model_path)
        state = self._resume_state() if self._resume_path else {}
        self._refuse_later_checkpoints()
        os.makedirs(self.ckpt_dir, exist_ok=True)
        if self._resume_path and not t.val_only:  # a run stopped between publishing its last save and rotating
            checkpoint.rotate(self.ckpt_dir, self.global_step, t.save_limit)
        self._drop_rollouts_after(self.global_step)
        self._write_config(config_to_yaml(cfg))
        self.tracker = Tracker(cfg.trainer.logger, self.ckpt_dir, cfg.trainer.project_name,
                               cfg.trainer.experiment_name, cfg.to_dict(), self.global_step)
        # The resumed step's training metrics, when the run that saved it ended before logging them (fit logs
        # them, with the step's validation if one was due: it comes after the save).
        self._unlogged_metrics = (state["metrics"] if state.get("metrics") and self.tracker.missing(self.global_step)
                                  else None)
        self.workers = WorkerGroup(cfg, self.total_steps)
        nodes = len({w["node"] for w in self.workers.started})
        print(f"{self.workers.size} worker(s) on {nodes} Ray node(s); rollout weight sync: "
              f"{self.workers.started[0]['weight_sync']}", flush=True)
        if self._resume_path:
            try:
                self.workers.call_all("load_checkpoint", os.path.join(self._resume_path, "actor"), cfg.trainer.val_only)
            except BaseException:
                self.workers.shutdown()
                raise
            print(f"resumed from {self._resume_path} at step {self.global_step}", flush=True)

    def _resume_state(self) -> dict:
        """Check the checkpoint to resume against this run (before any worker starts), restore the data order,
        and return its trainer state; raises CheckpointError naming what differs and the way out."""
        cfg = self.cfg
        # Validation alone (trainer.val_only) needs the weights only: a save_model_only checkpoint will do, and
        # one past this run's steps too.
        try:
            checkpoint.check_resumable(self._resume_path, cfg.world_size,
                                       requested_settings(cfg.worker.actor.model),
                                       cfg.worker.actor.model.freeze_vision_tower,
                                       weights_only=cfg.trainer.val_only)
            state = checkpoint.read_trainer_state(self._resume_path)
        except checkpoint.DamagedCheckpoint as err:
            if cfg.trainer.load_checkpoint_path:
                raise
            # An earlier step named by load_checkpoint_path is refused below (later steps are there): the way
            # back to the one before is to take the damaged one out of the run's listing.
            raise checkpoint.DamagedCheckpoint(
                f"{err}. It is this run's newest checkpoint, which auto-resume takes; to go on from the one "
                f"before it, move it aside (mv {self._resume_path} {self._resume_path}.damaged) and run again"
            ) from None
        self.global_step = state["global_step"]
        if self.global_step > self.total_steps and not cfg.trainer.val_only:
            raise checkpoint.CheckpointError(
                f"{self._resume_path} is at step {self.global_step}, past the {self.total_steps} steps of this "
                "run (trainer.max_steps, or total_epochs x steps per epoch): nothing would be trained. Raise "
                "them to continue it, or start a new run in another trainer.save_checkpoint_path")
        saved_model = state.get("model_path")  # absent from checkpoints of earlier versions
        if saved_model and saved_model != self._model_identity:
            message = (f"{self._resume_path} continues a run from the model {saved_model}, and this run names "
                       f"{cfg.worker.actor.model.model_path}: its actor would keep the old run's weights while the "
                       "reference model loads the new ones")
            if not cfg.trainer.load_checkpoint_path:
                raise checkpoint.CheckpointError(
                    f"{message}. Start a new run in another trainer.save_checkpoint_path (or experiment_name); "
                    "if the model only moved, name the checkpoint with trainer.load_checkpoint_path")
            print(f"warning: {message}; resuming it as trainer.load_checkpoint_path asks", flush=True)
        if state.get("data") and self._data_fingerprint and state["data"] != self._data_fingerprint:
            raise checkpoint.CheckpointError(
                f"{self._resume_path} was saved with another training set: data.train_files, or which of its "
                "records were kept (data.max_prompt_length, the image bounds), holds other questions or "
                "another order, and the saved data order would repeat some prompts and skip others. Resume "
                "with the data it was saved with, or start a new run in another trainer.save_checkpoint_path")
        try:
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as err:
            raise checkpoint.CheckpointError(
                f"{self._resume_path} cannot continue its data order: {err}. Resume with the data.train_files "
                "and data.rollout_batch_size it was saved with, or start a new run in another "
                "trainer.save_checkpoint_path") from None
        if self.sampler.seed != cfg.data.seed:  # the saved order goes on, and config.yaml must say whose it is
            print(f"warning: data.seed={cfg.data.seed} is ignored: {self._resume_path} continues the data order "
                  f"of data.seed={self.sampler.seed}, which config.yaml records", flush=True)
            cfg.data.seed = self.sampler.seed
        self._batches = iter(self.sampler)
        return state

    def _refuse_later_checkpoints(self) -> None:
        """Checkpoints after the step this run starts at are another run's: auto-resume would take them later,
        and rotation would delete this run's saves first."""
        cfg = self.cfg
        later = checkpoint.later_steps(self.ckpt_dir, self.global_step)
        if later and cfg.trainer.val_only:  # its step's metrics would go where the later steps' were logged
            raise checkpoint.CheckpointError(
                f"trainer.val_only of step {self.global_step} in {self.ckpt_dir}, which holds later steps "
                f"{later[:5]}: their logs would be cut back to step {self.global_step}. To validate an earlier "
                "checkpoint, keep trainer.load_checkpoint_path and set trainer.save_checkpoint_path to a new "
                "directory (the validation's logs go there)")
        if later:
            raise checkpoint.CheckpointError(
                f"{self.ckpt_dir} holds checkpoints of steps {later[:5]} after the step this run starts at "
                f"({self.global_step}), from another run: a later auto-resume would take them for this run's, and "
                "save_limit would delete this run's saves before them. Resume from the latest "
                "(trainer.find_last_checkpoint=true, no trainer.load_checkpoint_path), or set another "
                "trainer.save_checkpoint_path")

    def _find_resume_checkpoint(self) -> str | None:
        t = self.cfg.trainer
        removed = checkpoint.remove_partial(self.ckpt_dir)
        if removed:
            print(f"removed incomplete checkpoints: {removed}", flush=True)
        if t.load_checkpoint_path:  # (checked and made the global_step_* folder by load_config)
            return t.load_checkpoint_path
        return checkpoint.latest_checkpoint(self.ckpt_dir) if t.find_last_checkpoint else None

    # -- the phases of a step -------------------------------------------------------------------
    def _next_prompts(self, attempt: int) -> list[dict]:
        """The sampler's next batch of prompts, each with a uid naming its group of responses. The attempt (a try
        of online filtering) is part of it: tries past an epoch's end draw from a new shuffle, where a prompt
        may come again, and its two groups must stay two."""
        try:
            indices = next(self._batches)
        except StopIteration:
            self._batches = iter(self.sampler)
            indices = next(self._batches)
        prompts = [self.train_dataset[i] for i in indices]
        for p in prompts:
            p["uid"] = f"{self.global_step}-{attempt}-{p['index']}"
        return prompts

    def _sampling(self, overrides: dict | None = None) -> dict:
        r = self.cfg.worker.rollout
        s = {"n": r.n, "temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k,
             "max_tokens": self.cfg.data.max_response_length, "seed": None,
             "logprobs": self.cfg.algorithm.old_from_rollout}
        s.update(overrides or {})
        return s

    def _request_scores(self, batch: Batch) -> Any:
        """Start scoring `batch` in the reward actor; `_attach_scores` takes the result."""
        return self.reward_worker.compute.remote(reward_inputs(batch))

    def _attach_scores(self, batch: Batch, future: Any) -> dict[str, list[float]]:
        """Wait for the scores of `batch`; its "scores" tensor is the overall reward, each term a reward/<term>
        column (saved with the rollouts). Returns the terms' lists."""
        scores = ray_get(future, "reward", self.cfg.trainer.worker_timeout_s)
        per_key = {k: [s[k] for s in scores] for k in scores[0]}
        batch.tensors["scores"] = torch.tensor(per_key["overall"], dtype=torch.float32)
        for k, v in per_key.items():
            batch.non_tensors[f"reward/{k}"] = v
        return per_key

    def make_batch(self, metrics: dict) -> Batch:
        """Roll out, score and (optionally) filter groups until a full batch of prompts is ready."""
        a, need = self.cfg.algorithm, self.cfg.data.rollout_batch_size
        kept: list[Batch] = []
        num_groups, tries = 0, 0
        generated: dict[str, list[float]] = {}  # every try's scores: the policy's reward, not the filter window's
        groups, flat_groups = 0, 0.0  # every try's groups, and those whose scores are all equal
        while True:
            tries += 1
            # Each step's tries draw from streams of their own: a resumed run samples what an uninterrupted one did.
            batch, timing = self.workers.generate(self._next_prompts(tries),
                                                  self._sampling({"stream": (self.global_step, tries)}))
            for k, v in timing.items():
                metrics[k] = metrics.get(k, 0.0) + v
            if not a.online_filtering:
                return batch  # scored later, overlapping the log-prob pass
            t0 = time.time()
            per_key = self._attach_scores(batch, self._request_scores(batch))
            metrics["timing/reward_s"] = metrics.get("timing/reward_s", 0.0) + time.time() - t0
            scores = batch.tensors["scores"]
            for k, v in per_key.items():
                generated.setdefault(k, []).extend(v)
                metrics[f"reward/{k}"] = float(np.mean(generated[k]))
            if a.filter_key not in per_key:
                raise KeyError(f"algorithm.filter_key={a.filter_key!r} is not a reward key; the reward function "
                               f"returns {sorted(per_key)}")
            gid = group_ids_from_uids(batch.non_tensors["uid"])
            # The kept groups' fraction (batch_metrics) says little: a filter on a 0/1 term drops them all.
            count = len(set(gid.tolist()))
            groups, flat_groups = groups + count, flat_groups + zero_variance_group_fraction(scores, gid) * count
            metrics["batch/zero_variance_group_fraction_generated"] = flat_groups / groups
            ok = groups_within(torch.tensor(per_key[a.filter_key]), gid, a.filter_low, a.filter_high)
            kept.append(batch.select(torch.nonzero(ok).flatten().tolist()))
            num_groups += len(set(gid[ok].tolist()))
            metrics["batch/filter_kept_groups"] = num_groups
            if num_groups >= need:
                full = Batch.concat(kept)
                metrics["batch/filter_tries"] = tries
                return full.select(range(need * self.cfg.worker.rollout.n))
            if 0 < self.cfg.trainer.max_try_make_batch <= tries:  # (<= 0: no limit, as in EasyR1)
                raise ConfigError(
                    f"online filtering kept {num_groups} of the {need} prompt groups needed after {tries} tries "
                    f"(trainer.max_try_make_batch); widen algorithm.filter_low/filter_high "
                    f"({a.filter_low}, {a.filter_high}) or filter the data offline")

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> None:
        t = self.cfg.trainer
        if self._unlogged_metrics is not None:
            metrics, self._unlogged_metrics = dict(self._unlogged_metrics), None
            if not t.val_only and self._validation_due(self.global_step):  # a rerun ended at the last step too
                self._validate_into(metrics)
            self.tracker.log(self.global_step, metrics)
        elif (not t.val_only and self._failed_validation() == self.global_step
              and self._validation_due(self.global_step)):
            # Its training metrics were logged when it failed; without this a run that failed validating its last
            # step resumed, did nothing, and ended without that validation.
            self.tracker.log(self.global_step, self.validate(), replace_validation=True)
        if t.val_only:  # validation alone, whatever val_before_train says and wherever the run resumed
            self.tracker.log(self.global_step, self.validate(), replace_validation=True)
            self._forget_failed_validation()
            self.tracker.close()
            return
        self._forget_failed_validation()
        if t.val_before_train and self.val_dataset is not None and self.global_step == 0 and t.val_freq != 0:
            self.tracker.log(0, self.validate())
        unreached = [k for k in t.profile_steps if not self.global_step < k <= self.total_steps]
        if unreached:
            print(f"trainer.profile_steps {unreached}: outside the steps this run trains "
                  f"({self.global_step + 1}-{self.total_steps}), not profiled", flush=True)
        # Closed on a failure too, before the error is printed (its redraw at exit came after the message).
        with tqdm(total=self.total_steps, initial=self.global_step, desc="GRPO steps", dynamic_ncols=True) as bar:
            while self.global_step < self.total_steps:
                self.global_step += 1
                metrics: dict[str, float] = {}
                step_start = time.time()
                profile_dir = self.profile_dir(self.global_step)
                if profile_dir:
                    self.workers.call_all("start_profile")

                with timed(metrics, "make_batch"):
                    batch = self.make_batch(metrics)
                # Reward scoring runs in its own actor while the workers compute log-probs.
                reward_future = None if "scores" in batch.tensors else self._request_scores(batch)
                with timed(metrics, "log_probs"):
                    self.compute_log_probs(batch, metrics)
                if reward_future is not None:
                    with timed(metrics, "reward_wait"):
                        self._attach_scores(batch, reward_future)
                with timed(metrics, "advantages"):
                    batch_advantages(batch, self.cfg.algorithm)
                with timed(metrics, "update_actor"):
                    metrics.update(self.workers.update_actor(batch))
                if profile_dir:
                    with timed(metrics, "profile_write"):
                        written = self.workers.call_all("stop_profile", profile_dir)
                    print(f"step {self.global_step} profiled: {len(written)} worker(s) wrote rank*.trace.json.gz (for "
                          f"ui.perfetto.dev or chrome://tracing) and rank*.ops.txt in {profile_dir}", flush=True)

                metrics.update(self.batch_metrics(batch))
                if t.save_rollouts:
                    self.save_rollouts(batch)
                metrics["timing/step_s"] = time.time() - step_start
                metrics["perf/tokens_per_s"] = (metrics["prompt/tokens_total"] + metrics["response/tokens_total"]) / \
                    metrics["timing/step_s"]
                # Saved before validating: a validation that fails must not take the step's training with it.
                if (t.save_freq > 0 and self.global_step % t.save_freq == 0) or self.global_step == self.total_steps:
                    with timed(metrics, "save_checkpoint"):
                        self.save_checkpoint(metrics)
                if self._validation_due(self.global_step):  # (it syncs the new weights: the next step's sync is ~0)
                    self._validate_into(metrics)
                self.tracker.log(self.global_step, metrics)
                bar.update(1)
        self.tracker.close()

    def compute_log_probs(self, batch: Batch, metrics: dict[str, float]) -> None:
        """The old and reference log-probs of `batch`, into its tensors (the old ones are the engine's own when
        algorithm.old_logprobs=rollout)."""
        old_from_rollout = self.cfg.algorithm.old_from_rollout
        if old_from_rollout:  # the engine sampled with the actor's weights: its log-probs are the old ones
            batch.tensors["old_logprobs"] = batch.tensors.pop("rollout_logprobs")
        on_policy = on_policy_samples(self.cfg, len(batch))
        metrics["batch/old_logprobs_from_update"] = on_policy / len(batch)
        batch.tensors.update(self.workers.compute_log_probs(batch, on_policy, old=not old_from_rollout))

    def _validation_due(self, step: int) -> bool:
        """Every val_freq steps, and at the end whenever there is validation data (val_freq=0: never)."""
        t = self.cfg.trainer
        return self.val_dataset is not None and t.val_freq != 0 and (
            (t.val_freq > 0 and step % t.val_freq == 0) or step == self.total_steps)

    def _validate_into(self, metrics: dict[str, float]) -> None:
        """Add the validation metrics to the step's `metrics`. Should validation fail, the step's training metrics
        are logged first: the step is saved, and they must not be lost with it."""
        try:
            metrics.update(self.validate())
        except BaseException:
            self.tracker.log(self.global_step, metrics)
            # A resume at this step validates it then (one from an earlier step trains it again anyway).
            atomic_write_text(self._failed_validation_path, f"{self.global_step}\n")
            raise

    @property
    def _failed_validation_path(self) -> str:
        return os.path.join(self.ckpt_dir, "validation_failed_at")

    def _failed_validation(self) -> int | None:
        """The step whose validation failed in an earlier run of this directory (None: none did)."""
        try:
            with open(self._failed_validation_path) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def _forget_failed_validation(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._failed_validation_path)

    def profile_dir(self, step: int) -> str | None:
        """Where step `step`'s profiles go, or None when trainer.profile_steps does not name it."""
        t = self.cfg.trainer
        if step not in t.profile_steps:
            return None
        return os.path.abspath(os.path.join(t.profile_dir or os.path.join(self.ckpt_dir, "profile"), f"step_{step}"))

    def batch_metrics(self, batch: Batch) -> dict[str, float]:
        mask = batch.tensors["response_mask"]
        lengths = batch.response_lengths.float()
        # With online filtering, reward/* are the means over every generated response (make_batch logs them) and
        # the kept groups' means go under reward_kept/*.
        prefix = "reward_kept/" if self.cfg.algorithm.online_filtering else "reward/"
        m = {f"{prefix}{k[len('reward/'):]}": float(np.mean(v)) for k, v in batch.non_tensors.items()
             if k.startswith("reward/")}
        gid = group_ids_from_uids(batch.non_tensors["uid"])
        m["batch/zero_variance_group_fraction"] = zero_variance_group_fraction(batch.tensors["scores"], gid)
        m["response/length_mean"] = float(lengths.mean())
        m["response/length_max"] = float(lengths.max())
        m["response/clip_ratio"] = float(np.mean(batch.non_tensors["truncated"]))  # cut at the length limit
        m["response/tokens_total"] = float(lengths.sum())
        # Each sample's prompt, image tokens included (a prompt counts once per response, as verl counts it).
        m["prompt/tokens_total"] = float(sum(len(p) for p in batch.prompt_ids))
        if "entropy" in batch.tensors:
            m["actor/entropy_rollout"] = float(masked_mean(batch.tensors["entropy"], mask))
        if "ref_logprobs" in batch.tensors and "old_logprobs" in batch.tensors:
            m["actor/kl_ref"] = float(masked_mean(
                kl_penalty(batch.tensors["old_logprobs"], batch.tensors["ref_logprobs"], "kl"), mask))
            a = self.cfg.algorithm
            if a.kl_in_reward:  # the penalty the advantages took (per token, before kl_coef), not the plain log-ratio
                m["actor/reward_kl_penalty"] = float(masked_mean(
                    kl_penalty(batch.tensors["old_logprobs"], batch.tensors["ref_logprobs"], a.kl_penalty), mask))
        return m

    def _write_config(self, text: str) -> None:
        """The run directory's config.yaml. A resume with other settings keeps the earlier ones as
        config.until_step_{k}.yaml: config.yaml alone would say every step ran with the new ones."""
        path = os.path.join(self.ckpt_dir, "config.yaml")
        earlier = os.path.join(self.ckpt_dir, f"config.until_step_{self.global_step}.yaml")
        if self.global_step and os.path.isfile(path):
            with open(path) as f:
                old = f.read()
            if old != text:
                # Most settings apply from here on whatever the checkpoint holds (the lr schedule is rebuilt from
                # them, say): a resume that changes them is said, not only recorded.
                changed = changed_settings(old, text)
                print(f"warning: resuming at step {self.global_step} with {len(changed)} setting(s) other than the "
                      f"run's config.yaml, applied from here on: " + "; ".join(changed[:12])
                      + ("; ..." if len(changed) > 12 else "") + f" (the earlier ones are kept in "
                      f"{os.path.basename(earlier)})", flush=True)
                # (A second resume from the same step keeps the first one's record: its run trained those steps.)
                if not os.path.exists(earlier):
                    os.replace(path, earlier)
        atomic_write_text(path, text)

    def _drop_rollouts_after(self, step: int) -> None:
        """Remove rollouts/step_k.jsonl of steps after `step`, which this run trains again (metrics.jsonl is trimmed
        alike): left there, a run that stops earlier kept files of responses no checkpoint was trained on."""
        folder = os.path.join(self.ckpt_dir, "rollouts")
        if not os.path.isdir(folder):
            return
        for name in os.listdir(folder):
            match = re.fullmatch(r"step_(\d+)\.jsonl", name)
            if match and int(match[1]) > step:
                os.remove(os.path.join(folder, name))

    def save_rollouts(self, batch: Batch) -> None:
        path = os.path.join(self.ckpt_dir, "rollouts", f"step_{self.global_step}.jsonl")
        nt = batch.non_tensors
        rewards = {k: v for k, v in nt.items() if k.startswith("reward/")}
        atomic_write_json(path, [{"qid": nt["qid"][i], "index": nt["index"][i], "uid": nt["uid"][i],
                                  "response": nt["response"][i], "ground_truth": nt["ground_truth"][i],
                                  **{k: v[i] for k, v in rewards.items()}} for i in range(len(batch))])

    def validate(self) -> dict[str, float]:
        """The validation metrics, with `timing/validate_s` (also when a resume or `val_only` validates)."""
        if self.val_dataset is None:
            return {}
        t0 = time.time()
        r = self.cfg.worker.rollout
        overrides = {"n": 1, "temperature": 0.5, "seed": r.seed, "logprobs": False, **dict(r.val_override_config)}
        total = len(self.val_dataset)
        chunk = self.cfg.data.val_batch_size if self.cfg.data.val_batch_size > 0 else total
        per_key: dict[str, list[float]] = {}
        lengths: list[int] = []
        for start in range(0, total, chunk):  # a chunk's images are loaded only when it is generated
            prompts = [self.val_dataset[i] for i in range(start, min(start + chunk, total))]
            for p in prompts:
                p["uid"] = f"val-{p['index']}"
            batch, _ = self.workers.generate(prompts, self._sampling(overrides))
            for k, v in self._attach_scores(batch, self._request_scores(batch)).items():
                per_key.setdefault(k, []).extend(v)
            lengths.extend(batch.response_lengths.tolist())
        out = {f"val/{k}": float(np.mean(v)) for k, v in per_key.items()}
        out["val/response_length"] = float(np.mean(lengths))
        out["val/samples"] = float(len(lengths))
        out["timing/validate_s"] = time.time() - t0
        return out

    def save_checkpoint(self, metrics: dict[str, float]) -> str:
        """Save the step; its training metrics go with it, so that a resume logs them when the run ended before
        it did (killed during the validation that follows a save, say)."""
        t = self.cfg.trainer
        tmp = checkpoint.partial_dir(self.ckpt_dir, self.global_step)
        t0 = time.time()
        self.workers.call_all("save_checkpoint", os.path.join(tmp, "actor"), t.save_model_only)
        saved = {k: float(v) for k, v in metrics.items()}
        # The shards' writes, nearly all of a save: a resume that logs these metrics has no other figure for it.
        saved["timing/save_checkpoint_s"] = time.time() - t0
        # total_steps: whether this is the run's last step (the stage-2 recipe refuses a stage 1 that stopped early)
        state = {"global_step": self.global_step, "total_steps": self.total_steps, "sampler": self.sampler.state_dict(),
                 "data": self._data_fingerprint, "model_path": self._model_identity, "metrics": saved}
        return checkpoint.finalize(self.ckpt_dir, self.global_step, state, t.save_limit)
