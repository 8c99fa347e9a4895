"""The baseline of the rollout comparison: a bare `vllm.LLM.generate`, in its own process.

Same model, prompts (with images), dtype, enforce_eager, max_model_len, batched-token budget, KV cache
size (VLLM_CPU_KVCACHE_SPACE) and SamplingParams as the rollout engine of our worker, but none of our
code around it: no weight sync, no Batch building, no Ray. Its prefix and encoder caches are emptied before
each timed call (outside the timer), as a weight load empties ours (`common.forget_prompts`).

    python benchmarks/bare_vllm.py SETUP_JSON      (driven by benchmarks/run.py over stdin/stdout)
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BenchSetup, bare_engine, forget_prompts, serve, set_threads


def main() -> None:
    setup = BenchSetup.from_json(sys.argv[1])
    set_threads(setup.threads)
    llm, params, requests = bare_engine(setup)
    import torch

    def once() -> dict:
        forget_prompts(llm)
        t0 = time.perf_counter()
        outs = llm.generate(requests, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        lengths = [len(c.token_ids) for o in outs for c in o.outputs]
        return {"generate_s": elapsed, "response_tokens": sum(lengths), "responses": len(lengths),
                "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs), "threads": torch.get_num_threads()}

    serve(once)


if __name__ == "__main__":
    main()
