"""Variable-length attention for packed (padding-free) micro-batches.

`collate_packed` lays a micro-batch's sequences end to end in one row and restarts the text positions at
0 for each. Under plain SDPA, transformers turns those positions into a block-diagonal [S, S] mask, so a
row of k sequences costs the attention work (and memory) of one sequence k times as long: packing then
loses to padding (benchmarks/RESULTS.md). The attention registered here computes each sequence's causal
attention on its own, which is what padding-free training needs:

* CUDA, bf16/fp16: one call of PyTorch's flash-attention varlen kernel (`torch.nn.attention.varlen`),
  or flash-attn's `flash_attn_varlen_func` when that package is installed and torch has no varlen kernel;
* otherwise (CPU, fp32): one fused causal SDPA call per sequence, on views of the packed tensors.

A shared prompt (worker.actor.share_prompts) is laid out once: a segment whose text positions start at p > 0
is a response that continues the first p tokens of the last segment starting at 0 (its prompt and first
response), so it attends to those p tokens and causally to itself (`segment_layout`). Such rows take the SDPA
loop on every device (its flash varlen form has not been run on a GPU).

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
import itertools
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


def segment_layout(text_positions: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """The segments of a [1, S] row of text positions (`packed_segments`): their lengths, their first
    positions, and for each the row offset of the segment whose first tokens it continues (its own offset
    when it starts at position 0).

    A segment starting at position p > 0 continues the last segment that starts at 0, which must be at least
    p tokens long (a response whose prompt was laid out once, with the prompt's first response).

    Raises:
        ValueError: a segment starts at p > 0 with no earlier segment of at least p tokens starting at 0.
    """
    lengths = packed_segments(text_positions)
    idx = list(itertools.accumulate([0] + lengths[:-1]))
    firsts = text_positions.reshape(-1)[idx].tolist()
    roots: list[int] = []
    root, root_length = -1, 0
    for offset, length, first in zip(idx, lengths, firsts):
        if first == 0:
            root, root_length = offset, length
        elif first > root_length:
            raise ValueError(f"a packed segment at row offset {offset} starts at position {first}, but no earlier "
                             f"segment starting at position 0 has {first} tokens to continue")
        roots.append(offset if first == 0 else root)
    return lengths, firsts, roots


class _SegmentCache:
    """The segments of the last positions tensor seen (`segment_layout`) and their cumulative offsets
    (`cu_seqlens`, on the positions' device). Every decoder layer of one forward (and its recomputation under
    gradient checkpointing) gets the same tensor object, and finding the boundaries costs a device sync, so it
    is done once per forward, not once per layer. A weak reference, not an id: a new tensor can reuse a dead
    one's id and address."""

    def __init__(self) -> None:
        self.ref: weakref.ref | None = None
        self.version = -1
        self.layout: tuple[list[int], list[int], list[int]] = ([], [], [])
        self.cu_seqlens: torch.Tensor | None = None

    def of(self, positions: torch.Tensor) -> tuple[tuple[list[int], list[int], list[int]], torch.Tensor]:
        """(`segment_layout(positions)`, cu_seqlens)."""
        if self.ref is None or self.ref() is not positions or self.version != positions._version:
            self.layout = segment_layout(positions)
            offsets = [0]
            for n in self.layout[0]:
                offsets.append(offsets[-1] + n)
            self.cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=positions.device)
            self.ref, self.version = weakref.ref(positions), positions._version
        return self.layout, self.cu_seqlens


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


def _sdpa_per_segment(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      layout: tuple[list[int], list[int], list[int]], scale: float) -> torch.Tensor:
    """Causal attention within each segment of `layout` (`segment_layout`), one fused SDPA call per segment, a
    continuing segment also over the first tokens of the segment it continues. query / key / value [1, H, S, D]
    (heads already matched); returns [1, H, S, D].

    The segments are `split` views of the row, whose backward writes each segment's gradient into one
    concatenated buffer; indexing the row once per segment instead made every segment's backward fill a
    row-sized zero tensor: at size small's shapes the attention's forward + backward took 26-32 ms per layer
    instead of 19-23 ms, and a micro-batch's model forward + backward about 3 % longer (benchmarks/RESULTS.md).
    [1, H, L, D] pieces matter too: on CPU only 4-D inputs reach the fused flash kernel; 3-D ones take the
    math path, which builds the whole [L, L] score matrix (a root segment's forward took twice as long).
    """
    lengths, firsts, roots = layout
    index = {offset: i for i, offset in enumerate(itertools.accumulate([0] + lengths[:-1]))}
    qs, ks, vs = (t.split(lengths, dim=2) for t in (query, key, value))
    out = []
    for i, (length, first, root) in enumerate(zip(lengths, firsts, roots)):
        ki, vi, mask = ks[i], vs[i], None
        if first:  # keys: the continued segment's first `first` tokens, then its own; causal from the bottom right
            r = index[root]
            ki, vi = torch.cat([ks[r][:, :, :first], ki], dim=2), torch.cat([vs[r][:, :, :first], vi], dim=2)
            mask = torch.ones(length, first + length, dtype=torch.bool, device=query.device).tril(diagonal=first)
        out.append(F.scaled_dot_product_attention(qs[i], ki, vi, attn_mask=mask, is_causal=mask is None, scale=scale))
    return torch.cat(out, dim=2)


def _varlen_kernel_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                        cu_seqlens: torch.Tensor, scale: float, kernel: str) -> torch.Tensor:
    """Causal attention within each segment through a flash varlen kernel ('torch_varlen' or 'flash_attn').
    q / k / v [S, H, D] (heads already matched); returns [S, H, D]."""
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
              and getattr(module, "is_causal", False) and query.shape[2] == position_ids.shape[-1] == key.shape[2])
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout and module.training:
        raise ValueError("packed (padding-free) attention does not support attention dropout")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layout, cu_seqlens = _segments.of(position_ids)
    lengths, firsts, _ = layout
    kernel = varlen_kernel(query.device, query.dtype)
    if kernel == "sdpa_loop" or any(firsts):
        return _sdpa_per_segment(query, key, value, layout, scale).transpose(1, 2), None
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [S, H, D]
    return _varlen_kernel_call(q, k, v, lengths, cu_seqlens, scale, kernel).unsqueeze(0), None


def register_varlen_attention() -> str:
    """Make `VARLEN_ATTENTION` a valid `attn_implementation` for transformers models; returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    return VARLEN_ATTENTION
