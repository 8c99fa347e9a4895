"""Forward + backward of the actor with each distinct image encoded once (`images_encoded_once`, the trainer's
way) against encoding every copy of it, as the model would by itself.

    python benchmarks/shared_images.py --size small [--batch 4] [--n 8] [--max_tokens 256] [--micro 8] [--reps 5]

The n responses of a prompt share its image, so a micro-batch of n samples of one prompt holds one distinct
image n times. Both variants run the same micro-batches through `response_logprobs`; their log-probs are
compared before anything is timed. Prints the median seconds of each and their per-pair ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BenchSetup, fmt, load_average, load_prompts, prepare, set_threads, summary
from padding import make_batch

import torch

from pebr.workers import actor as actor_lib

CPU = torch.device("cpu")


def step(model, micro_inputs: list[dict]) -> float:
    t0 = time.perf_counter()
    for inputs in micro_inputs:
        logp, _ = actor_lib.response_logprobs(model, inputs)
        (-(logp.sum()) / logp.shape[0]).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "small"], default="small")
    parser.add_argument("--work_dir", default="/tmp/pebr_bench")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=256)
    parser.add_argument("--micro", type=int, default=8, help="samples per micro-batch")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    setup = BenchSetup(size=args.size, work_dir=args.work_dir, batch=args.batch, n=args.n, max_tokens=args.max_tokens)
    prepare(setup)
    _, prompts, processor = load_prompts(setup)
    model = actor_lib.load_hf_model(setup.model_dir)
    model.config.use_cache = False
    model.train()
    batch = make_batch(prompts, processor, args.n, args.max_tokens // 2, args.max_tokens, seed=0)
    once = [actor_lib.model_inputs(model, mb, processor, CPU, False)
            for mb in actor_lib.micro_batches(batch, args.micro)]
    every = [actor_lib.every_image_copy(inputs) for inputs in once]
    with torch.no_grad():
        gap = max(float((actor_lib.response_logprobs(model, a)[0] - actor_lib.response_logprobs(model, b)[0]).abs().max())
                  for a, b in zip(once, every))
    step(model, once), step(model, every)  # warm-up
    t_once, t_every, loads = [], [], []
    for _ in range(args.reps):
        loads.append(load_average())
        t_once.append(step(model, once))
        t_every.append(step(model, every))
    print(f"{args.size}: {args.batch} prompts x n={args.n}, responses {args.max_tokens // 2}-{args.max_tokens} tokens, "
          f"micro-batches of {args.micro}, fp32, {args.threads} thread(s); max |log-prob gap| {gap:.2e}")
    print(f"every copy encoded s: {fmt(summary(t_every))}")
    print(f"each distinct image once s: {fmt(summary(t_once))}")
    print(f"ratio every / once: {fmt(summary([e / o for e, o in zip(t_every, t_once)]))}; "
          f"load {statistics.median(loads):.2f}")


if __name__ == "__main__":
    main()
