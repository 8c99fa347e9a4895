"""The baseline of the rollout comparison: a bare `vllm.LLM.generate`, in its own process.

Same model, prompts (with images), dtype, enforce_eager, max_model_len, batched-token budget, KV cache
size (VLLM_CPU_KVCACHE_SPACE) and SamplingParams as the rollout engine of our worker, but none of our
code around it: no weight sync, no Batch building, no Ray.

    python benchmarks/bare_vllm.py SETUP_JSON      (driven by benchmarks/run.py over stdin/stdout)
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BenchSetup, load_prompts, serve, set_threads


def main() -> None:
    setup = BenchSetup.from_json(sys.argv[1])
    set_threads(setup.threads)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    cfg, prompts, processor = load_prompts(setup)
    r = cfg.worker.rollout
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(r.cpu_kv_cache_gb))))
    from vllm import LLM, SamplingParams

    from pebr.workers.rollout import banned_token_ids

    max_model_len = cfg.data.max_prompt_length + cfg.data.max_response_length
    llm = LLM(model=cfg.worker.actor.model.model_path, dtype={"bf16": "bfloat16", "fp32": "float32"}[setup.dtype], max_model_len=max_model_len,
              enforce_eager=True, enable_chunked_prefill=r.enable_chunked_prefill,
              max_num_batched_tokens=max(r.max_num_batched_tokens, max_model_len),
              limit_mm_per_prompt={"image": max(1, r.limit_images)}, seed=r.seed, disable_log_stats=True)
    s = setup.sampling()
    # The same logit bias as our engine (it bans image placeholders), so both sample from one distribution.
    params = SamplingParams(n=s["n"], temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
                            max_tokens=s["max_tokens"], seed=s["seed"],
                            logit_bias={t: -100.0 for t in banned_token_ids(processor.tokenizer)})
    requests = [{"prompt": p["prompt"], "multi_modal_data": {"image": p["images"][0]}} if p.get("images")
                else {"prompt": p["prompt"]} for p in prompts]
    import torch

    def once() -> dict:
        t0 = time.perf_counter()
        outs = llm.generate(requests, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        lengths = [len(c.token_ids) for o in outs for c in o.outputs]
        return {"generate_s": elapsed, "response_tokens": sum(lengths), "responses": len(lengths),
                "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs), "threads": torch.get_num_threads()}

    serve(once)


if __name__ == "__main__":
    main()
