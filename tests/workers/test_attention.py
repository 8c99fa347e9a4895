"""The variable-length attention of packed rows (pebr.workers.attention), against attention written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pebr.workers import attention as att


class Layer(torch.nn.Module):
    """What transformers' attention functions read off a decoder layer's attention module."""

    def __init__(self, heads: int, kv_heads: int, causal: bool = True):
        super().__init__()
        self.is_causal = causal
        self.num_key_value_groups = heads // kv_heads
        self.training = False


def by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Causal softmax attention inside each segment, in float64, one query at a time. q [H, S, D], k / v [H_kv, S, D]."""
    heads, kv_heads = q.shape[0], k.shape[0]
    out = torch.zeros(q.shape[1], heads, q.shape[2], dtype=torch.float64)
    start = 0
    for length in lengths:
        for i in range(start, start + length):
            for h in range(heads):
                g = h // (heads // kv_heads)
                keys = k[g, start:i + 1].double()
                scores = keys @ q[h, i].double() / math.sqrt(q.shape[2])
                out[i, h] = torch.softmax(scores, 0) @ v[g, start:i + 1].double()
        start += length
    return out


def test_segments_start_wherever_the_position_does_not_follow_on():
    assert att.packed_segments(torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])) == [3, 2, 1, 4]
    assert att.packed_segments(torch.tensor([[0, 1, 2]])) == [3]
    # A row that starts mid-sequence or jumps (not produced by collate_packed) still splits where positions break.
    assert att.packed_segments(torch.tensor([[5, 6, 9, 10]])) == [2, 2]


def test_a_segment_starting_past_zero_continues_the_last_one_that_starts_at_zero():
    # prompt of 2 + response of 2, two more responses of that prompt, then a prompt of 1 + response, one more response
    lengths, firsts, roots = att.segment_layout(torch.tensor([[0, 1, 2, 3, 2, 3, 2, 0, 1, 1, 2]]))
    assert (lengths, firsts, roots) == ([4, 2, 1, 2, 2], [0, 2, 2, 0, 1], [0, 0, 0, 7, 7])
    with pytest.raises(ValueError, match="row offset 2 starts at position 3, but no earlier segment"):
        att.segment_layout(torch.tensor([[0, 1, 3, 4]]))
    with pytest.raises(ValueError, match="row offset 0 starts at position 5"):
        att.segment_layout(torch.tensor([[5, 6]]))


def test_responses_sharing_a_prompt_laid_out_once_attend_as_if_each_followed_it():
    """Prompt P (3 tokens) with responses of 2, 1 and 3 tokens, then a lone sequence of 4; the row holds P once.
    Each response token's output must equal its output in the full sequence P + response, computed by hand."""
    gen = torch.Generator().manual_seed(2)
    heads, kv_heads, dim, prompt, responses = 4, 2, 8, 3, [2, 1, 3]
    full = [prompt + r for r in responses] + [4]
    qs = [torch.randn(heads, n, dim, generator=gen) for n in full]
    ks = [torch.randn(kv_heads, n, dim, generator=gen) for n in full]
    vs = [torch.randn(kv_heads, n, dim, generator=gen) for n in full]
    for t in (qs, ks, vs):  # the prompt's tokens are the same in every sequence that shares it
        for i in (1, 2):
            t[i][:, :prompt] = t[0][:, :prompt]
    want = [by_hand(q, k, v, [q.shape[1]]) for q, k, v in zip(qs, ks, vs)]
    # The row: P + response 0, response 1, response 2 (positions continuing P), the lone sequence.
    parts = [slice(0, None), slice(prompt, None), slice(prompt, None), slice(0, None)]
    row = [torch.cat([t[:, part] for t, part in zip(ts, parts)], 1)[None] for ts in (qs, ks, vs)]
    positions = torch.cat([torch.arange(n)[part] for n, part in zip(full, parts)])[None]
    out, _ = att.varlen_attention_forward(Layer(heads, kv_heads), *row, None, position_ids=positions)
    expected = torch.cat([w[part] for w, part in zip(want, parts)])
    torch.testing.assert_close(out[0].double(), expected, atol=1e-5, rtol=1e-5)

    # The second response sees the prompt, not the first response: changing the first response's keys
    # changes the first response's outputs only.
    k2 = row[1].clone()
    k2[:, :, prompt:prompt + responses[0]] += 3.0
    again, _ = att.varlen_attention_forward(Layer(heads, kv_heads), row[0], k2, row[2], None, position_ids=positions)
    first_response = slice(prompt, prompt + responses[0])
    assert torch.equal(again[0, :prompt], out[0, :prompt])
    assert torch.equal(again[0, first_response.stop:], out[0, first_response.stop:])
    assert not torch.allclose(again[0, first_response], out[0, first_response])


def test_gradients_of_a_row_with_shared_prompts_equal_those_of_every_sequence_written_out():
    """Backward through the packed row (a prompt laid out once for three responses, then a lone sequence) gives
    each token of the row the gradient it gets when every sequence is written out whole and attended on its own:
    the prompt's tokens summing what each of its sequences sends them."""
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, dim, prompt, responses, lone = 4, 2, 8, 5, [3, 1, 4], 6
    row_len = prompt + sum(responses) + lone
    q = torch.randn(1, heads, row_len, dim, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(1, kv_heads, row_len, dim, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(1, kv_heads, row_len, dim, dtype=torch.float64, generator=gen, requires_grad=True)
    upstream = torch.randn(1, row_len, heads, dim, dtype=torch.float64, generator=gen)
    starts = [prompt + sum(responses[:i]) for i in range(len(responses))]
    positions = torch.cat([torch.arange(prompt + responses[0])]
                          + [torch.arange(prompt, prompt + r) for r in responses[1:]]
                          + [torch.arange(lone)])[None]
    out, _ = att.varlen_attention_forward(Layer(heads, kv_heads), q, k, v, None, position_ids=positions)
    got = torch.autograd.grad((out * upstream).sum(), (q, k, v))

    # Written out: sequence i = the prompt's row entries + response i's, attended causally on its own; the loss
    # takes each row token's output once (the prompt's from the first sequence, where the row computes it).
    loss = 0.0
    sequences = [list(range(prompt)) + list(range(s, s + r)) for s, r in zip(starts, responses)]
    sequences.append(list(range(row_len - lone, row_len)))
    groups = heads // kv_heads
    for number, rows in enumerate(sequences):
        idx = torch.tensor(rows)
        qi, ki, vi = q[:, :, idx], k[:, :, idx].repeat_interleave(groups, 1), v[:, :, idx].repeat_interleave(groups, 1)
        oi = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=True).transpose(1, 2)
        kept = slice(0, None) if number in (0, len(sequences) - 1) else slice(prompt, None)
        loss = loss + (oi[:, kept] * upstream[:, idx[kept]]).sum()
    want = torch.autograd.grad(loss, (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_packed_rows_attend_within_each_sequence_with_gqa():
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 1, 7, 3]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    q = torch.randn(1, 4, sum(lengths), 8, generator=gen)
    k = torch.randn(1, 2, sum(lengths), 8, generator=gen)  # 2 query heads per key/value head
    v = torch.randn(1, 2, sum(lengths), 8, generator=gen)
    out, weights = att.varlen_attention_forward(Layer(4, 2), q, k, v, None, position_ids=positions)
    assert weights is None and out.shape == (1, sum(lengths), 4, 8)
    torch.testing.assert_close(out[0].double(), by_hand(q[0], k[0], v[0], lengths), atol=1e-5, rtol=1e-5)

    # Nothing leaks across a boundary: changing sequence 0's keys and values leaves the others unchanged.
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :5] += 3.0
    v2[:, :, :5] -= 2.0
    again, _ = att.varlen_attention_forward(Layer(4, 2), q, k2, v2, None, position_ids=positions)
    assert torch.equal(again[0, 5:], out[0, 5:])
    assert not torch.allclose(again[0, :5], out[0, :5])


def test_calls_that_are_not_packed_are_plain_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=gen) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    mask[1, :, :, 4:] = False
    for layer, kwargs in ((Layer(2, 2), {"attention_mask": mask}),  # a padded batch with its mask
                          (Layer(2, 2, causal=False), {"attention_mask": None}),  # a vision block
                          (Layer(2, 2), {"attention_mask": None})):  # no positions: causal over the row
        got, _ = att.varlen_attention_forward(layer, q, k, v, **kwargs)
        want, _ = sdpa_attention_forward(layer, q, k, v, **kwargs)
        assert torch.equal(got, want)


def test_segments_are_found_again_for_a_new_positions_tensor():
    """Every layer of a forward shares one positions tensor, so the boundaries are cached per tensor object;
    a new tensor (even at a freed one's address, with the same shape) gets its own."""
    first = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert att._segments.of(first)[0][0] == [3, 3]
    assert att._segments.of(first)[0][0] == [3, 3]
    del first
    second = torch.tensor([[0, 1, 0, 1, 2, 3]])
    assert att._segments.of(second)[0][0] == [2, 4]
    second[0, 4:] = torch.tensor([0, 1])  # changed in place: found again
    assert att._segments.of(second)[0][0] == [2, 2, 2]


def test_kernel_choice():
    assert att.varlen_kernel(torch.device("cpu"), torch.bfloat16) == "sdpa_loop"
    assert att.varlen_kernel(torch.device("cpu"), torch.float32) == "sdpa_loop"
    # fp32 on a GPU has no flash kernel: the loop there too.
    assert att.varlen_kernel(torch.device("cuda"), torch.float32) == "sdpa_loop"
    # bf16 / fp16 on a GPU: torch's own varlen kernel, which this torch has (the choice is made without a GPU).
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401

    assert att.varlen_kernel(torch.device("cuda"), torch.bfloat16) == "torch_varlen"
    assert att.varlen_kernel(torch.device("cuda"), torch.float16) == "torch_varlen"


def test_padding_free_models_load_with_the_varlen_attention(tiny_model_dir, tmp_path):
    from pebr.workers.actor import load_hf_model

    model = load_hf_model(tiny_model_dir, padding_free=True)
    assert model.config.text_config._attn_implementation == att.VARLEN_ATTENTION
    assert load_hf_model(tiny_model_dir).config.text_config._attn_implementation == "sdpa"
    # A checkpoint's config stays loadable anywhere: the name of this process's registration is not saved.
    model.config.save_pretrained(tmp_path)
    assert att.VARLEN_ATTENTION not in (tmp_path / "config.json").read_text()


def test_cumulative_offsets_of_the_segments_for_the_varlen_kernel():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert att._segments.of(positions)[1].tolist() == [0, 3, 5, 6]
    assert att._segments.of(positions)[1].dtype == torch.int32
