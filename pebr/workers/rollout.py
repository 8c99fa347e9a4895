"""Rollout engines: vLLM (default) and transformers `generate` (for machines without vLLM).

This is the only module that touches vLLM: engine creation, weight loading into the engine and
cache resets live here, so a vLLM upgrade changes this file alone.

Both engines take prompts as dicts {"prompt": chat-templated text, "images": [PIL images]} and return,
per prompt, the prompt token ids (image placeholders expanded, exactly as the engine saw them) and
`n` lists of response token ids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch

# Tokens a rollout must never emit: an image placeholder in a response breaks the next forward pass
# ("image features and image tokens do not match").
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


@dataclass
class SamplingConfig:
    n: int
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int | None = None
    logprobs: bool = False  # also return the engine's log-prob of each sampled token


@dataclass
class Generation:
    prompt_ids: list[int]
    responses: list[list[int]]
    logprobs: list[list[float]] | None = None


def banned_token_ids(tokenizer: Any) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


class VLLMRollout:
    """An in-process vLLM engine that shares the worker's process and torch.distributed group."""

    def __init__(self, model_path: str, *, dtype: str, max_model_len: int, tensor_parallel_size: int,
                 gpu_memory_utilization: float, cpu_kv_cache_gb: float, enforce_eager: bool,
                 enable_chunked_prefill: bool, max_num_batched_tokens: int, limit_images: int, seed: int,
                 trust_remote_code: bool, tokenizer: Any, external_launcher: bool, sleep_mode: bool = False):
        # In-process engine: its model object is reachable for weight loading, and it joins the
        # process group that training already created instead of spawning its own.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # nothing leaves the machine unasked
        os.environ.setdefault("DO_NOT_TRACK", "1")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(cpu_kv_cache_gb)))))
        from vllm import LLM

        kwargs: dict[str, Any] = {}
        if external_launcher:
            kwargs["distributed_executor_backend"] = "external_launcher"
        self.llm = LLM(
            model=model_path,
            dtype={"bf16": "bfloat16", "fp32": "float32"}[dtype],
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            enable_chunked_prefill=enable_chunked_prefill,
            max_num_batched_tokens=max(max_num_batched_tokens, max_model_len),
            limit_mm_per_prompt={"image": max(1, limit_images)},
            seed=seed,
            trust_remote_code=trust_remote_code,
            disable_log_stats=True,
            enable_sleep_mode=sleep_mode,
            **kwargs,
        )
        self.banned = banned_token_ids(tokenizer)
        # On GPUs the engine's memory (weights copy, KV cache) is released while the actor trains.
        # vLLM on CPU rejects sleep mode, so there the KV cache stays allocated (sized by cpu_kv_cache_gb).
        self.sleep_mode = sleep_mode
        self.asleep = False

    def release(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def resume(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push trained weights (in-memory transformers names) into the engine, then drop stale caches."""
        self.resume()
        worker = self.llm.llm_engine.model_executor.driver_worker.worker
        worker.reload_weights(weights_iterator=iter(named_tensors), is_checkpoint_format=True)
        # KV blocks and encoder outputs computed with the old weights must not be reused.
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def generate(self, prompts: list[dict], sampling: SamplingConfig) -> list[Generation]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_tokens, seed=sampling.seed, logit_bias={t: -100.0 for t in self.banned},
            logprobs=0 if sampling.logprobs else None,
        )
        requests = []
        for p in prompts:
            req: dict[str, Any] = {"prompt": p["prompt"]}
            if p.get("images"):
                req["multi_modal_data"] = {"image": p["images"] if len(p["images"]) > 1 else p["images"][0]}
            requests.append(req)
        self.resume()
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        gens = []
        for o in outputs:
            logprobs = None
            if sampling.logprobs:
                logprobs = [[step[t].logprob for t, step in zip(c.token_ids, c.logprobs)] for c in o.outputs]
            gens.append(Generation(list(o.prompt_token_ids), [list(c.token_ids) for c in o.outputs], logprobs))
        return gens


class HFRollout:
    """transformers `generate` on a plain (unsharded) copy of the policy, synced like the vLLM engine."""

    def __init__(self, model_path: str, *, processor: Any, device: torch.device, dtype: torch.dtype,
                 trust_remote_code: bool):
        from pebr.workers.actor import load_hf_model

        self.processor = processor
        self.device = device
        self.model = load_hf_model(model_path, trust_remote_code).to(device=device, dtype=dtype).eval()
        self.banned = banned_token_ids(processor.tokenizer)

    def release(self) -> None:
        """Nothing to release: the copy is small next to the sharded actor."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        state = dict(named_tensors)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected:
            raise RuntimeError(f"hf rollout: unexpected weights {unexpected[:5]}")

    @torch.no_grad()
    def generate(self, prompts: list[dict], sampling: SamplingConfig) -> list[Generation]:
        tok = self.processor.tokenizer
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        results = []
        for p in prompts:  # one prompt at a time: no padding side effects on positions
            inputs = self.processor(text=[p["prompt"]], images=p.get("images") or None, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            greedy = sampling.temperature <= 0
            out = self.model.generate(
                **inputs, max_new_tokens=sampling.max_tokens, do_sample=not greedy,
                temperature=None if greedy else sampling.temperature, top_p=None if greedy else sampling.top_p,
                top_k=None if greedy or sampling.top_k <= 0 else sampling.top_k,
                num_return_sequences=sampling.n, suppress_tokens=self.banned,
                eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id],
                pad_token_id=tok.pad_token_id)
            prompt_ids = inputs["input_ids"][0].tolist()
            responses = []
            for row in out[:, len(prompt_ids):].tolist():
                ids = []
                for t in row:
                    if t == tok.pad_token_id:
                        break
                    ids.append(t)
                    if t == tok.convert_tokens_to_ids("<|im_end|>"):
                        break
                responses.append(ids)
            results.append(Generation(prompt_ids, responses))
        return results
