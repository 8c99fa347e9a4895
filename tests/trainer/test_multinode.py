"""A run across two Ray nodes: two raylets, each with its own object store and one CPU, on this machine
(`ray.cluster_utils.Cluster`), joined as a multi-node user would (trainer.ray_address, trainer.nnodes=2).

One CPU per node leaves Ray one place for each worker, so rank 1 runs on the other node: its samples, log-probs
and metrics cross between object stores, the process group meets at rank 0's node address, and each rank saves its
own shards into the shared run directory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from pebr import checkpoint
from tests.reliability.procs import CHILD_ENV, ROOT, trainer_argv

pytestmark = pytest.mark.slow


def test_a_run_spans_two_ray_nodes(tiny_model_dir, synthetic_data_dir, tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    # The raylets start the workers with this environment, as `ray start` on each node would.
    for key, value in CHILD_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    # The raylets run in a directory of their own, as `ray start` on another machine would; the driver runs in
    # tmp_path, with a relative run directory, which its workers must not take as relative to theirs.
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    monkeypatch.chdir(nodes)
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        run_dir = str(tmp_path / "run")
        argv = trainer_argv(tiny_model_dir, synthetic_data_dir, "run", steps=1) + [
            f"trainer.ray_address={cluster.address}", "trainer.nnodes=2", "trainer.n_gpus_per_node=1",
            f"data.format_prompt={ROOT}/examples/format_prompt/pebr.jinja"]  # (the recipe's is the repository's)
        res = subprocess.run([sys.executable, "-m", "pebr.trainer.main", *argv], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600)
    finally:
        cluster.shutdown()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not os.listdir(nodes), os.listdir(nodes)  # (the shards went to the raylets' directory)
    assert "2 worker(s) on 2 Ray node(s)" in res.stdout, res.stdout[-3000:]
    checkpoint.check_resumable(checkpoint.step_dir(run_dir, 1), world_size=2)  # both ranks' shards, the index
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        (m,) = [json.loads(line) for line in f]
    assert m["step"] == 1 and math.isfinite(m["actor/grad_norm"]) and m["response/tokens_total"] > 0


PLACEMENT = """
import json, sys, types
import ray
from ray.cluster_utils import Cluster
from pebr.trainer.ray_trainer import node_placement_groups, rank_placement, worker_resources

cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
try:
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()

    @ray.remote
    class Rank:
        def node(self):
            return ray.get_runtime_context().get_node_id()

    cfg = types.SimpleNamespace(trainer=types.SimpleNamespace(nnodes=2, n_gpus_per_node=2))
    groups = node_placement_groups(cfg, worker_resources(False))
    ray.get([group.ready() for group in groups], timeout=60)
    ranks = [Rank.options(num_cpus=1, scheduling_strategy=rank_placement(groups, r)).remote() for r in range(4)]
    print(json.dumps(ray.get([rank.node.remote() for rank in ranks], timeout=60)))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_a_nodes_ranks_are_consecutive(tmp_path):
    """Three 2-CPU nodes, 2 x 2 workers: ranks 0-1 share a node and ranks 2-3 another, as a tensor-parallel engine's
    ranks (consecutive) must. Without a placement group per node Ray put 4 such actors on all three nodes, in
    another order each time."""
    proc = subprocess.run([sys.executable, "-c", PLACEMENT], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "",
                               "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    nodes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2], nodes
