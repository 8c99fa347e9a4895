"""Padded vs padding-free (packed) actor updates at several response-length spreads.

All paths are the actor's own (pebr.workers.actor): `model_inputs(..., padding_free=False)` right-pads
every micro-batch to its longest sequence (`collate`); `padding_free=True` lays its sequences end to end
in one row (`collate_packed`: per-sequence multimodal RoPE positions and a leading row of text positions
restarting at 0 per sequence). The packed row is timed twice: with the variable-length attention that
`worker.actor.padding_free` loads (`pebr.workers.attention`: each sequence attends on its own), and with
plain SDPA, where transformers builds a block-diagonal [S, S] mask from the positions (what packing cost
before the varlen attention), and a third time with each prompt laid out once for its n responses
(`worker.actor.share_prompts`). All feed `response_logprobs`; the packed log-probs are checked against the
padded ones before anything is timed.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from pebr.protocol import Batch
from pebr.workers import actor as actor_lib

CPU = torch.device("cpu")

# name -> (low, high) response lengths, drawn uniformly per sequence.
SPREADS = {"all 64": (64, 64), "uniform 32..96": (32, 96), "uniform 8..128": (8, 128)}


def make_batch(prompts: list[dict], processor: Any, n: int, low: int, high: int, seed: int) -> Batch:
    """A rollout-shaped batch: each prompt n times with random responses of length U[low, high]."""
    rng = random.Random(seed)
    tok = processor.tokenizer
    special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    vocab = [i for i in range(len(tok)) if i not in special]
    prompt_ids, response_ids, images = [], [], []
    for p in prompts:
        ids = processor(text=[p["prompt"]], images=p["images"] or None, return_tensors="pt")["input_ids"][0].tolist()
        for _ in range(n):
            prompt_ids.append(ids)
            response_ids.append([rng.choice(vocab) for _ in range(rng.randint(low, high))])
            images.append(p["images"])
    return Batch(prompt_ids=prompt_ids, response_ids=response_ids, images=images, non_tensors={})


def micro(batch: Batch, size: int) -> list[Batch]:
    """The fixed-size micro-batches update_policy makes (dynamic_batching off), same for both layouts."""
    return list(actor_lib.micro_batches(batch, size))


def step(model, batch: Batch, processor: Any, size: int, layout: dict) -> tuple[float, int]:
    """Forward + backward over all micro-batches in one layout (`model_inputs`' keywords); returns (seconds,
    tokens computed)."""
    t0, computed = time.perf_counter(), 0
    for mb in micro(batch, size):
        inputs = actor_lib.model_inputs(model, mb, processor, CPU, **layout)
        computed += inputs["input_ids"].numel()
        logp, _ = actor_lib.response_logprobs(model, inputs)
        (-(logp.sum()) / logp.shape[0]).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, computed


def max_logprob_gap(padded_model, packed_model, batch: Batch, processor: Any, size: int, layout: dict) -> float:
    """Largest |padded - packed| log-prob over all response tokens (must be ~0 for packing to be correct)."""
    gap = 0.0
    with torch.no_grad():
        for mb in micro(batch, size):
            padded, _ = actor_lib.response_logprobs(
                padded_model, actor_lib.model_inputs(padded_model, mb, processor, CPU, padding_free=False))
            packed, _ = actor_lib.response_logprobs(
                packed_model, actor_lib.model_inputs(packed_model, mb, processor, CPU, **layout))
            gap = max(gap, float((padded - packed).abs().max()))
    return gap


def measure(model_path: str, prompts: list[dict], processor: Any, n: int, micro_size: int, reps: int,
            load_fn) -> list[dict]:
    """Interleaved padded / packed (varlen) / packed (SDPA mask) / packed with shared prompts repetitions per
    spread; one row per spread with raw timings. The models are the same weights loaded with SDPA and with the
    varlen attention."""
    models = {}
    for name, padding_free in (("sdpa", False), ("varlen", True)):
        models[name] = actor_lib.load_hf_model(model_path, padding_free=padding_free)
        models[name].config.use_cache = False
        models[name].train()
    packed, shared = {"padding_free": True}, {"padding_free": True, "share_prompts": True}
    variants = {"padded": (models["sdpa"], {"padding_free": False}), "packed": (models["varlen"], packed),
                "packed_sdpa_mask": (models["sdpa"], packed), "packed_shared": (models["varlen"], shared)}
    rows = []
    for name, (low, high) in SPREADS.items():
        batch = make_batch(prompts, processor, n, low, high, seed=0)
        useful = sum(len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids))
        row = {"spread": name, "useful_tokens": useful, "load": [],
               "logprob_gap": max(max_logprob_gap(models["sdpa"], models["varlen"], batch, processor, micro_size, lay)
                                  for lay in (packed, shared))}
        for model, layout in variants.values():  # warm-up
            step(model, batch, processor, micro_size, layout)
        for _ in range(reps):
            row["load"].append(load_fn())
            for variant, (model, layout) in variants.items():
                s, row[f"{variant}_computed"] = step(model, batch, processor, micro_size, layout)
                row.setdefault(f"{variant}_s", []).append(s)
        rows.append(row)
    return rows
