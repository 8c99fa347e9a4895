"""Does our worker's setting slow the vLLM engine itself? The same engine call, four ways, in isolation.

    python benchmarks/engine_placement.py plain|dist|dist_gc|ray [--work_dir DIR]

plain: a bare `vllm.LLM` in this process. dist: this process first joins a 1-rank gloo group and the engine
uses the external launcher, as in our FSDP worker. dist_gc: the same, then `gc.freeze()` after start-up.
ray: a bare engine inside a Ray task with num_cpus=1. Each prints the sorted seconds of 4 generate calls
(after one warm-up) of the demo's RL workload (8 prompts x 8 responses of up to 256 tokens, bf16, small
model). Run the modes one after another on a quiet machine; see RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, BenchSetup, bare_engine, forget_prompts, prepare, set_threads


def engine_seconds(mode: str, work_dir: str) -> list[float]:
    setup = BenchSetup(size="small", work_dir=work_dir, threads=1, batch=8, n=8, max_tokens=256, global_batch=8,
                       bf16=True)
    set_threads(1)
    prepare(setup)
    kwargs = {}
    if mode in ("dist", "dist_gc"):
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)
        kwargs["distributed_executor_backend"] = "external_launcher"
    llm, params, requests = bare_engine(setup, **kwargs)
    if mode == "dist_gc":
        gc.collect()
        gc.freeze()
    llm.generate(requests, params, use_tqdm=False)
    times = []
    for _ in range(4):
        forget_prompts(llm)
        t0 = time.perf_counter()
        llm.generate(requests, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return sorted(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["plain", "dist", "dist_gc", "ray"])
    parser.add_argument("--work_dir", default="/tmp/pebr_bench")
    args = parser.parse_args()
    if args.mode == "ray":
        import ray

        here = os.path.dirname(os.path.abspath(__file__))
        ray.init(num_cpus=2, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([ROOT, here])}})
        task = ray.remote(num_cpus=1)(engine_seconds)
        print(args.mode, ray.get(task.remote("plain", args.work_dir)))
    else:
        print(args.mode, engine_seconds(args.mode, args.work_dir))


if __name__ == "__main__":
    main()
