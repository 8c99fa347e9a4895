"""Ray places every GPU worker beside stage 1's CLIP scorer, on a cluster with one GPU per worker.

Ray schedules GPUs as numbers, so a cluster that declares GPUs it does not have shows the placement on a CPU
machine: a fresh Ray in a subprocess declares 2 GPUs, takes the CLIP scorer's share first (as `probe_reward`
does before the workers start), then places the workers as the trainer does: its resource request, in a placement
group per node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import json, os
    import ray
    from pebr.config import ConfigError
    from pebr.trainer import ray_trainer
    import types
    from pebr.trainer.ray_trainer import (check_resources_for_workers, node_placement_groups, rank_placement,
                                          worker_resources)
    from pebr.workers.reward import DEFAULT_CLIP_GPU_FRACTION

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class Placed:
        def gpus(self):
            return ray.get_gpu_ids()

    clip = Placed.options(num_gpus=DEFAULT_CLIP_GPU_FRACTION, num_cpus=0).remote()
    ray.get(clip.gpus.remote(), timeout=60)
    out = {}
    # The trainer's way: a placement group of the node's 2 workers, each in its bundle.
    groups = node_placement_groups(types.SimpleNamespace(trainer=types.SimpleNamespace(nnodes=1, n_gpus_per_node=2)),
                                   worker_resources(True))
    ray.get(groups[0].ready(), timeout=60)
    placed = [Placed.options(**worker_resources(True), scheduling_strategy=rank_placement(groups, rank)).remote()
              for rank in range(2)]
    out["trainer"] = sorted(str(g) for ids in ray.get([w.gpus.remote() for w in placed], timeout=60) for g in ids)
    for w in placed:
        ray.kill(w)
    ray.util.remove_placement_group(groups[0])
    for name, options, wait_s in (("whole GPUs", {"num_cpus": 1, "num_gpus": 1}, 5),):
        workers = [Placed.options(**options).remote() for _ in range(2)]
        ready, _ = ray.wait([w.gpus.remote() for w in workers], num_returns=2, timeout=wait_s)
        out[name] = sorted(str(g) for ref in ready for g in ray.get(ref))
        for w in workers:
            ray.kill(w)
    ray_trainer.RESOURCES_WAIT_S = 2.0
    busy = Placed.options(num_cpus=3).remote()  # another job's actor, holding 3 of the 4 CPUs
    ray.get(busy.gpus.remote(), timeout=60)
    errors = []
    for size, on_gpu in ((2, True), (3, True), (1, False), (2, False), (5, False)):
        try:
            check_resources_for_workers(size, on_gpu)
            errors.append(None)
        except ConfigError as e:
            errors.append(str(e))
    out["checks"] = errors
    print("RESULT " + json.dumps(out))
""")


def test_workers_fit_beside_the_clip_scorer_and_too_few_resources_are_refused():
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as ray_tmp:  # Ray's socket paths must stay short
        proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": "", "PYTHONPATH": ROOT})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT "):])
    assert out["trainer"] == ["0", "1"]  # both workers placed, one on each GPU
    assert len(out["whole GPUs"]) == 1  # asking for whole GPUs, the second worker never gets one
    # Workers the cluster cannot place all at once waited for each other until trainer.worker_timeout_s (an hour),
    # and were then reported slow; only too few GPUs in all was said.
    tail = ": the cluster cannot place them all. Lower trainer.n_gpus_per_node (or trainer.nnodes), or free or add "
    assert out["checks"] == [
        "trainer.nnodes x trainer.n_gpus_per_node = 2 GPU workers need 2 CPUs (4 in the cluster, 1 free)" + tail
        + "resources",  # the busy actor holds 3 CPUs
        "trainer.nnodes x trainer.n_gpus_per_node = 3 GPU workers need 3 CPUs (4 in the cluster, 1 free), 2.7 GPUs "
        "(2 in the cluster, 1.9 free)" + tail + "resources",
        None,
        "trainer.nnodes x trainer.n_gpus_per_node = 2 workers need 2 CPUs (4 in the cluster, 1 free)" + tail
        + "resources",
        "trainer.nnodes x trainer.n_gpus_per_node = 5 workers need 5 CPUs (4 in the cluster, 1 free)" + tail
        + "resources"]
