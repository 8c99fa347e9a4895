"""Variable-length attention for packed (padding-free) micro-batches.

`collate_packed` lays a micro-batch's sequences end to end in one row and restarts the text positions at
0 for each. Under plain SDPA, transformers turns those positions into a block-diagonal [S, S] mask, so a
row of k sequences costs the attention work (and memory) of one sequence k times as long: packing then
loses to padding (benchmarks/RESULTS.md). The attention registered here computes each sequence's causal
attention on its own, which is what padding-free training needs:

* CUDA, bf16/fp16: one call of PyTorch's flash-attention varlen kernel (`torch.nn.attention.varlen`),
  or flash-attn's `flash_attn_varlen_func` when that package is installed and torch has no varlen kernel;
* otherwise (CPU, fp32): one fused causal SDPA call per sequence, on views of the packed tensors.

Every other call (the vision tower's blocks, a row without packed positions) goes to transformers' SDPA
unchanged. No mask is built for this implementation: transformers skips mask creation for attention
functions it has no mask function for, which is the point (no [S, S] tensor). A right-padded batch through
such a model is therefore causal over each row, which leaves its real tokens exact (tested); the trainer
still loads plain SDPA when it pads.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "pebr_varlen"


def packed_segments(text_positions: torch.Tensor) -> list[int]:
    """Lengths of the sequences packed in a [1, S] row of text positions: a new one starts wherever the
    position does not follow its predecessor (transformers detects packing the same way)."""
    pos = text_positions.reshape(-1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    idx = torch.nonzero(starts).flatten().tolist() + [pos.numel()]
    return [b - a for a, b in zip(idx[:-1], idx[1:])]


class _SegmentCache:
    """The segments of the last positions tensor seen: their lengths and cumulative offsets (`cu_seqlens`, on
    the positions' device). Every decoder layer of one forward (and its recomputation under gradient
    checkpointing) gets the same tensor object, and finding the boundaries costs a device sync, so it is
    done once per forward, not once per layer. A weak reference, not an id: a new tensor can reuse a dead
    one's id and address."""

    def __init__(self) -> None:
        self.ref: weakref.ref | None = None
        self.version = -1
        self.lengths: list[int] = []
        self.cu_seqlens: torch.Tensor | None = None

    def _refresh(self, positions: torch.Tensor) -> None:
        if self.ref is None or self.ref() is not positions or self.version != positions._version:
            self.lengths = packed_segments(positions)
            offsets = [0]
            for n in self.lengths:
                offsets.append(offsets[-1] + n)
            self.cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=positions.device)
            self.ref, self.version = weakref.ref(positions), positions._version

    def lengths_of(self, positions: torch.Tensor) -> list[int]:
        self._refresh(positions)
        return self.lengths

    def cu_seqlens_of(self, positions: torch.Tensor) -> torch.Tensor:
        self._refresh(positions)
        return self.cu_seqlens


_segments = _SegmentCache()


@functools.lru_cache(maxsize=None)
def _optional(module: str, name: str) -> Callable | None:
    """`module.name`, or None where this installation lacks it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _torch_varlen() -> Callable | None:
    return _optional("torch.nn.attention.varlen", "varlen_attn")


def _flash_attn_varlen() -> Callable | None:
    return _optional("flash_attn", "flash_attn_varlen_func")


def varlen_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """Which kernel packed attention uses on this device and dtype: 'torch_varlen', 'flash_attn' or 'sdpa_loop'."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        if _torch_varlen() is not None:
            return "torch_varlen"
        if _flash_attn_varlen() is not None:
            return "flash_attn"
    return "sdpa_loop"


@functools.lru_cache(maxsize=None)
def _torch_varlen_params() -> frozenset[str]:
    """The keyword names this torch's `varlen_attn` takes (torch 2.10-2.12 spell causality is_causal, later
    window_size); read once, not in every layer's call."""
    return frozenset(inspect.signature(_torch_varlen()).parameters)


def _causal_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], cu_seqlens: torch.Tensor,
                   scale: float, kernel: str) -> torch.Tensor:
    """Causal attention within each segment. q [S, H, D], k / v [S, H, D] (heads already matched); returns [S, H, D]."""
    if kernel == "sdpa_loop":
        out = [F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1),
                                              is_causal=True, scale=scale).transpose(0, 1)
               for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
        return torch.cat(out)
    cu, longest = cu_seqlens.to(q.device), max(lengths)
    if kernel == "flash_attn":
        return _flash_attn_varlen()(q, k, v, cu, cu, longest, longest, softmax_scale=scale, causal=True)
    params = _torch_varlen_params()
    kwargs: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        kwargs["scale"] = scale
    elif not math.isclose(scale, q.shape[-1] ** -0.5):
        raise ValueError(f"this torch's varlen_attn has no scale argument; the model needs scale {scale}")
    return _torch_varlen()(q, k, v, cu, cu, longest, longest, **kwargs)


@torch.compiler.disable  # a Python loop over sequences on CPU and a cached host-side boundary list: kept eager
def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             position_ids: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A transformers attention function: query [1, H, S, D], key / value [1, H_kv, S, D] -> ([1, S, H, D], None).

    Packed only when a decoder layer passes a single row of text positions and no mask; everything else
    is SDPA's. Dropout is not supported in the packed branch (Qwen2.5-VL's is 0).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = (attention_mask is None and position_ids is not None and query.shape[0] == 1
              and getattr(module, "is_causal", False) and query.shape[2] == position_ids.shape[-1])
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout and module.training:
        raise ValueError("packed (padding-free) attention does not support attention dropout")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    lengths, cu_seqlens = _segments.lengths_of(position_ids), _segments.cu_seqlens_of(position_ids)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [S, H, D]
    out = _causal_varlen(q, k, v, lengths, cu_seqlens, scale, varlen_kernel(query.device, query.dtype))
    return out.unsqueeze(0), None


def register_varlen_attention() -> str:
    """Make `VARLEN_ATTENTION` a valid `attn_implementation` for transformers models; returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    return VARLEN_ATTENTION
