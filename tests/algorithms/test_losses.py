"""Losses, KL penalties and masked reductions against numbers worked out by hand."""

import math

import pytest
import torch

from pebr.algorithms.losses import (
    agg_loss,
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    token_logprobs,
)


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_masked_mean_whole_and_per_row():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(x, mask), 7.0 / 3.0)  # (1 + 2 + 4) / 3
    close(masked_mean(x, mask, dim=-1), [1.5, 4.0])
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)


def test_masked_reductions_ignore_inf_on_padding_and_pass_no_gradient_there():
    x = torch.tensor([[1.0, 2.0, 3.0, float("inf")]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 2; unbiased var (1 + 0 + 1) / 2 = 1; whitened [-1, 0, 1] and 0 on padding
    close(masked_var(x, mask), 1.0)
    close(masked_var(x, mask, unbiased=False), 2.0 / 3.0)  # (1 + 0 + 1) / 3
    white = masked_whiten(x, mask)
    close(white, [[-1.0, 0.0, 1.0, 0.0]])
    (masked_mean(x, mask) + white.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[0, 3].item() == 0.0
    assert (x.grad[0, :3] != 0).any()


def test_agg_loss_modes_differ_on_ragged_masks():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 99.0, 99.0, 99.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    # token-mean: (1 + 2 + 3 + 4 + 10) / 5 valid tokens = 4
    close(agg_loss(loss, mask, "token-mean"), 4.0)
    # seq-mean-token-sum: rows sum to 10 and 10 (the empty third row is left out) -> 10
    close(agg_loss(loss, mask, "seq-mean-token-sum"), 10.0)
    # seq-mean-token-mean: row means 2.5 and 10 -> 6.25
    close(agg_loss(loss, mask, "seq-mean-token-mean"), 6.25)


def test_agg_loss_gradient_only_on_valid_tokens():
    loss = torch.ones(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    agg_loss(loss, mask, "token-mean").backward()
    close(loss.grad, [[1 / 3, 1 / 3, 0.0], [1 / 3, 0.0, 0.0]])


def test_agg_loss_rejects_unknown_mode():
    with pytest.raises(ValueError, match="allowed: token-mean, seq-mean-token-sum, seq-mean-token-mean"):
        agg_loss(torch.zeros(1, 2), torch.ones(1, 2), "sum")


def test_kl_penalty_kinds():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-2.0, -0.5]])
    # k1 = logp - ref = [1, -1.5]
    close(kl_penalty(logp, ref, "kl"), [[1.0, -1.5]])
    close(kl_penalty(logp, ref, "abs"), [[1.0, 1.5]])
    close(kl_penalty(logp, ref, "mse"), [[0.5, 1.125]])  # 0.5 * 1^2, 0.5 * 1.5^2
    # k3 with d = ref - logp = [-1, 1.5]: exp(d) - d - 1
    k3 = [[math.exp(-1.0) - (-1.0) - 1.0, math.exp(1.5) - 1.5 - 1.0]]  # [0.367879, 1.981689]
    close(kl_penalty(logp, ref, "low_var_kl"), k3)
    for alias, name in (("k1", "kl"), ("k2", "mse"), ("k3", "low_var_kl")):
        torch.testing.assert_close(kl_penalty(logp, ref, alias), kl_penalty(logp, ref, name))


def test_low_var_kl_is_clamped():
    # d = 0 - (-30) = 30 -> clamped to 20 -> exp(20) - 21 ~ 4.85e8 -> clamped to 10
    out = kl_penalty(torch.tensor([-30.0]), torch.tensor([0.0]), "low_var_kl")
    close(out, [10.0])


def test_low_var_kl_is_clamped_from_below_too():
    # d = ref - logp = -30 -> clamped to -20: exp(-20) + 20 - 1 = 19 -> capped at 10 (a floor of -5: 4.0067)
    close(kl_penalty(torch.tensor([0.0]), torch.tensor([-30.0]), "low_var_kl"), [10.0])
    # d = -8, inside both clamps: exp(-8) + 8 - 1
    close(kl_penalty(torch.tensor([0.0]), torch.tensor([-8.0]), "low_var_kl"), [math.exp(-8) + 7])


def test_kl_penalty_rejects_unknown_kind():
    with pytest.raises(ValueError, match="low_var_kl"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "full")


def _ppo_case():
    # old logp = 0, so logp = log(ratio). Per token (clip 0.2 / 0.3, dual 3):
    #  a) A=+1, ratio 1.5: max(-1.5, -1.3) = -1.3 (clipped term chosen)
    #  b) A=+1, ratio 0.5: max(-0.5, -0.8) = -0.5 (unclipped)
    #  c) A=-1, ratio 0.5: max(0.5, 0.8) = 0.8 (clipped); dual cap 3 not reached
    #  d) A=-1, ratio 5.0: max(5.0, 1.3) = 5.0 -> dual clip caps at 3 (engaged)
    #  e) A=-2, ratio 2.0: max(4.0, 2.6) = 4.0; cap 6 not reached (not engaged)
    #  f) padding: A=-1, ratio 100 -> ignored
    ratios = torch.tensor([[1.5, 0.5, 0.5, 5.0, 2.0, 100.0]])
    logp = ratios.log().requires_grad_(True)
    old = torch.zeros_like(ratios)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -2.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    return old, logp, adv, mask, ratios


def test_ppo_policy_loss_clip_and_dual_clip():
    old, logp, adv, mask, ratios = _ppo_case()
    loss, metrics = ppo_policy_loss(old, logp, adv, mask)
    # token-mean: (-1.3 - 0.5 + 0.8 + 3 + 4) / 5 = 6.0 / 5 = 1.2
    close(loss, 1.2)
    assert metrics["pg_clipfrac"] == pytest.approx(2 / 5)  # tokens a and c
    assert metrics["pg_clipfrac_lower"] == pytest.approx(1 / 5)  # token d
    # ppo_kl = mean(old - logp) = -ln(1.5 * 0.5 * 0.5 * 5 * 2) / 5 = -ln(3.75) / 5
    assert metrics["ppo_kl"] == pytest.approx(-math.log(3.75) / 5, abs=1e-6)


def test_ppo_policy_loss_gradient():
    old, logp, adv, mask, _ = _ppo_case()
    loss, _ = ppo_policy_loss(old, logp, adv, mask)
    loss.backward()
    # Only unclipped, non-capped valid tokens carry gradient: d(-A * ratio)/d logp = -A * ratio,
    # divided by 5 valid tokens: b) -1 * 0.5 / 5 = -0.1;  e) 2 * 2 / 5 = 0.8.
    # a, c (clipped), d (dual-capped) and f (padding) get 0.
    close(logp.grad, [[0.0, -0.1, 0.0, 0.0, 0.8, 0.0]])


def test_ppo_policy_loss_without_dual_clip_engaged():
    # With dual 6, token d) is no longer capped: (-1.3 - 0.5 + 0.8 + 5 + 4) / 5 = 1.6
    old, logp, adv, mask, _ = _ppo_case()
    loss, metrics = ppo_policy_loss(old, logp, adv, mask, clip_ratio_dual=6.0)
    close(loss, 1.6)
    assert metrics["pg_clipfrac_lower"] == 0.0


def test_ppo_policy_loss_clamps_log_ratio():
    # log-ratio 50 is clamped to 20; A=+1 takes the clipped -1.3, A=-1 the dual cap 3 -> mean 0.85
    old = torch.tensor([[-60.0, -60.0]])
    logp = torch.tensor([[-10.0, -10.0]])
    loss, metrics = ppo_policy_loss(old, logp, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2))
    close(loss, 0.85)
    assert metrics["ppo_kl"] == pytest.approx(-20.0)


def test_ppo_policy_loss_clamps_log_ratio_from_below():
    # log-ratio -30 is clamped to -20 (ratio 2.1e-9): A=+1 takes -2.1e-9, A=-1 the clipped 0.8 -> mean 0.4
    loss, metrics = ppo_policy_loss(torch.zeros(1, 2), torch.full((1, 2), -30.0), torch.tensor([[1.0, -1.0]]),
                                    torch.ones(1, 2))
    close(loss, 0.4)
    assert metrics["ppo_kl"] == pytest.approx(20.0)


def test_pg_clipfrac_counts_only_tokens_the_clip_changed():
    # ratios 1.0 and 1.1 lie inside [0.8, 1.3]; 1.5 with A=+1 is clipped: 1 of 3
    logp = torch.log(torch.tensor([[1.0, 1.1, 1.5]]))
    _, metrics = ppo_policy_loss(torch.zeros(1, 3), logp, torch.ones(1, 3), torch.ones(1, 3))
    assert metrics["pg_clipfrac"] == pytest.approx(1 / 3)


def test_ppo_policy_loss_rejects_bad_input():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="clip_ratio_dual"):
        ppo_policy_loss(x, x, x, torch.ones(1, 2), clip_ratio_dual=1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        ppo_policy_loss(x, torch.zeros(1, 3), x, torch.ones(1, 2))


def test_entropy_uniform_and_two_point():
    # uniform over V=7 -> log 7, also after a large constant shift (stability)
    logits = torch.zeros(2, 3, 7)
    close(entropy_from_logits(logits), torch.full((2, 3), math.log(7)).tolist())
    close(entropy_from_logits(logits + 1000.0), torch.full((2, 3), math.log(7)).tolist())
    # logits [0, ln 3] -> p = [0.25, 0.75]; H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335
    close(entropy_from_logits(torch.tensor([0.0, math.log(3.0)])), 0.562335)
    # the max-shift is detached; the gradient must still be that of -sum p log p
    z = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(entropy_from_logits, (z,))


def test_logprobs_from_logits():
    # logits [0, ln 3] -> p = [0.25, 0.75]: label 1 -> ln 0.75 = -0.287682, label 0 -> ln 0.25
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    close(logprobs_from_logits(logits, torch.tensor([[1, 0]])), [[math.log(0.75), math.log(0.25)]])

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, labels), expected)
    assert torch.autograd.gradcheck(lambda z: logprobs_from_logits(z, labels), (logits,))


def test_logprobs_from_logits_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels shape"):
        logprobs_from_logits(torch.zeros(1, 3, 5), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        logprobs_from_logits(torch.zeros(1, 3, 5), torch.zeros(1, 3))


def test_token_logprobs_by_hand_and_against_the_float32_path():
    # logits [0, ln 3] -> p = [0.25, 0.75]; at temperature 0.5 the logits double: p = [0.1, 0.9].
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    logp, entropy = token_logprobs(logits, torch.tensor([1, 0]), with_entropy=True)
    close(logp, [math.log(0.75), math.log(0.25)])
    close(entropy, [0.562335, 0.562335])
    logp, entropy = token_logprobs(logits, torch.tensor([1, 0]), temperature=0.5, with_entropy=True)
    close(logp, [math.log(0.9), math.log(0.1)])
    close(entropy, [-(0.1 * math.log(0.1) + 0.9 * math.log(0.9))] * 2)

    torch.manual_seed(0)
    z = torch.randn(37, 101) * 3
    labels = torch.randint(0, 101, (37,))
    for chunk_bytes in (4 * 101 * 5, 2 ** 28):  # 5 rows per chunk (8 chunks, the last short), or one chunk
        logp, entropy = token_logprobs(z, labels, 0.7, with_entropy=True, chunk_bytes=chunk_bytes)
        torch.testing.assert_close(logp, logprobs_from_logits(z / 0.7, labels))
        torch.testing.assert_close(entropy, entropy_from_logits(z / 0.7))
    assert token_logprobs(z, labels)[1] is None


def test_token_logprobs_gradient():
    torch.manual_seed(1)
    z = torch.randn(9, 13, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 13, (9,))
    # Chunks of 4 rows; gradcheck compares the hand-written backward with finite differences.
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, labels, 0.6, chunk_bytes=4 * 13 * 4)[0], (z,))
    # bf16 logits (as the model returns them) get a bf16 gradient equal to the float32 path's, rounded.
    w = torch.randn(9)
    zb = z.detach().to(torch.bfloat16).requires_grad_(True)
    (token_logprobs(zb, labels)[0] * w).sum().backward()
    zf = zb.detach().float().requires_grad_(True)
    (logprobs_from_logits(zf, labels) * w).sum().backward()
    assert zb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(zb.grad.float(), zf.grad, atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match=r"logits \[N, V\]"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))
