"""Padded vs padding-free (packed) actor updates at several response-length spreads.

The padded path is ours as it is (pebr.workers.actor.collate + response_logprobs: every micro-batch is
right-padded to its longest sequence). The packed path is a PROTOTYPE that lives only here: the
sequences of a micro-batch are laid end to end in one row, with per-sequence multimodal RoPE positions
and a leading row of text positions that restart at 0 for each sequence; from those transformers builds
a block-diagonal causal mask, so no token attends across a sequence boundary and no pad is computed.
`packed_logprobs` is checked against the padded log-probs before anything is timed.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from pebr.protocol import Batch
from pebr.workers import actor as actor_lib

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


def packed_inputs(model: torch.nn.Module, batch: Batch, processor: Any) -> dict[str, torch.Tensor]:
    """One packed row for a micro-batch.

    Returns input_ids / mm_token_type_ids [1, S], position_ids [4, 1, S] (text row, then t/h/w),
    pixel_values / image_grid_thw as the padded collate makes them, and `response_index` [R] (positions
    of all response tokens in the row, sequence after sequence).
    """
    padded = actor_lib.collate(batch, processor, torch.device("cpu"))
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = processor.image_processor.merge_size ** 2
    grids = padded.get("image_grid_thw")
    ids, types, positions, index = [], [], [], []
    offset, image_at = 0, 0
    for prompt, response, ims in zip(batch.prompt_ids, batch.response_ids, batch.images):
        seq = torch.tensor(prompt + response, dtype=torch.long)[None]
        mm = (seq == image_token).to(torch.int32)
        grid = grids[image_at:image_at + len(ims)] if ims else None
        image_at += len(ims)
        rope, _ = model.model.get_rope_index(seq, mm, image_grid_thw=grid)  # [3, 1, L]
        if grid is not None and int(mm.sum()) != int(grid.prod(-1).sum()) // merge:
            raise ValueError("image tokens and image grid disagree")
        text = torch.arange(seq.shape[1])[None, None]
        positions.append(torch.cat([text, rope.to(torch.long)], 0))
        ids.append(seq)
        types.append(mm)
        index.append(offset + len(prompt) + torch.arange(len(response)))
        offset += seq.shape[1]
    out = {"input_ids": torch.cat(ids, 1), "mm_token_type_ids": torch.cat(types, 1),
           "position_ids": torch.cat(positions, 2), "response_index": torch.cat(index)}
    if grids is not None:
        out["pixel_values"], out["image_grid_thw"] = padded["pixel_values"], grids
    return out


def packed_logprobs(model: torch.nn.Module, inputs: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Log-probs [R] of all response tokens of a packed row (no attention mask: boundaries come from positions)."""
    model_inputs = {k: v for k, v in inputs.items() if k != "response_index"}
    logits = model(**model_inputs, use_cache=False).logits[0]  # [S, V]
    index = inputs["response_index"]
    pred = logits[index - 1].float() / temperature
    return torch.log_softmax(pred, -1).gather(-1, inputs["input_ids"][0, index][:, None])[:, 0]


def micro(batch: Batch, size: int) -> list[Batch]:
    return list(actor_lib.micro_batches(batch, size))


def padded_step(model, batch: Batch, processor: Any, size: int) -> tuple[float, int]:
    """Forward + backward over all micro-batches, padded; returns (seconds, tokens computed)."""
    t0, computed = time.perf_counter(), 0
    for mb in micro(batch, size):
        inputs = actor_lib.collate(mb, processor, torch.device("cpu"))
        computed += inputs["input_ids"].numel()
        logp, _ = actor_lib.response_logprobs(model, inputs)
        (-(logp.sum()) / logp.shape[0]).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, computed


def packed_step(model, batch: Batch, processor: Any, size: int) -> tuple[float, int]:
    """The same work with each micro-batch packed into one row."""
    t0, computed = time.perf_counter(), 0
    for mb in micro(batch, size):
        inputs = packed_inputs(model, mb, processor)
        computed += inputs["input_ids"].numel()
        (-(packed_logprobs(model, inputs).sum()) / len(mb)).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, computed


def max_logprob_gap(model, batch: Batch, processor: Any, size: int) -> float:
    """Largest |padded - packed| log-prob over all response tokens (must be ~0 for packing to be correct)."""
    gap = 0.0
    with torch.no_grad():
        for mb in micro(batch, size):
            inputs = actor_lib.collate(mb, processor, torch.device("cpu"))
            logp, _ = actor_lib.response_logprobs(model, inputs)
            padded = logp[inputs["response_mask"].bool()]
            packed = packed_logprobs(model, packed_inputs(model, mb, processor))
            gap = max(gap, float((padded - packed).abs().max()))
    return gap


def measure(model_path: str, prompts: list[dict], processor: Any, n: int, micro_size: int, reps: int,
            load_fn) -> list[dict]:
    """Interleaved padded / packed repetitions per spread; one row per spread with raw timings."""
    model = actor_lib.load_hf_model(model_path)
    model.config.use_cache = False
    model.train()
    rows = []
    for name, (low, high) in SPREADS.items():
        batch = make_batch(prompts, processor, n, low, high, seed=0)
        useful = sum(len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids))
        gap = max_logprob_gap(model, batch, processor, micro_size)
        padded_step(model, batch, processor, micro_size)  # warm-up
        packed_step(model, batch, processor, micro_size)
        row = {"spread": name, "useful_tokens": useful, "logprob_gap": gap, "padded_s": [], "packed_s": [],
               "load": []}
        for _ in range(reps):
            row["load"].append(load_fn())
            s, row["padded_computed"] = padded_step(model, batch, processor, micro_size)
            row["padded_s"].append(s)
            s, row["packed_computed"] = packed_step(model, batch, processor, micro_size)
            row["packed_s"].append(s)
        rows.append(row)
    return rows
