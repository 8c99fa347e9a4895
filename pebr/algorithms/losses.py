"""Policy-gradient losses, KL penalties and masked reductions, as pure tensor functions.

Shapes: ``B`` is the number of sequences in a (mini-)batch, ``T`` the number of response positions,
``V`` the vocabulary size. A ``mask`` is 1 (or ``True``) on valid response tokens and 0 on padding.
Everything here imports torch only, so it is tested in milliseconds and reads without the framework.
"""

from __future__ import annotations

import torch

__all__ = [
    "LOSS_AGG_MODES",
    "KL_PENALTY_KINDS",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "agg_loss",
    "kl_penalty",
    "ppo_policy_loss",
    "entropy_from_logits",
    "logprobs_from_logits",
    "token_logprobs",
]

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")

# Aliases map onto the canonical names; "k2" is the squared estimator 0.5 * k1^2 ("mse").
_KL_ALIASES = {"k1": "kl", "k2": "mse", "k3": "low_var_kl"}
KL_PENALTY_KINDS = ("kl", "abs", "mse", "low_var_kl", *_KL_ALIASES)


def _check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise ValueError unless every named tensor has the shape of the first one."""
    names = list(tensors)
    first = tensors[names[0]].shape
    for name in names[1:]:
        if tensors[name].shape != first:
            shapes = ", ".join(f"{n}={tuple(tensors[n].shape)}" for n in names)
            raise ValueError(f"shape mismatch: {shapes}; all must be equal")


def _masked_values(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where (not x * mask) so that inf/NaN at padded positions cannot leak into sums,
    # and so that the gradient at masked positions is exactly zero.
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is set.

    ``masked_mean = sum(x * mask) / max(sum(mask), 1)``, so an all-zero mask gives 0, not NaN.

    Args:
        x: values, any shape.
        mask: same shape as ``x``; 1/True marks positions that count.
        dim: reduce over this dimension only; ``None`` reduces over everything.

    Returns:
        A scalar tensor (``dim=None``) or ``x`` reduced over ``dim``.

    Raises:
        ValueError: if ``x`` and ``mask`` differ in shape.
    """
    _check_same_shape(x=x, mask=mask)
    m = mask.to(x.dtype)
    if dim is None:
        return _masked_values(x, mask).sum() / m.sum().clamp_min(1.0)
    return _masked_values(x, mask).sum(dim) / m.sum(dim).clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all masked-in positions (a scalar).

    ``var = sum(mask * (x - mean)^2) / (n - 1)`` with ``n = sum(mask)`` (Bessel's correction when
    ``unbiased``; ``/ n`` otherwise). Fewer than two valid values give variance 0.

    Args:
        x: values, any shape.
        mask: same shape as ``x``.
        unbiased: divide by ``n - 1`` instead of ``n``.

    Returns:
        Scalar tensor.
    """
    # Zero padded entries first so an inf there cannot turn the backward pass into NaN.
    x = _masked_values(x, mask)
    mean = masked_mean(x, mask)
    sq_dev = _masked_values((x - mean) ** 2, mask).sum()
    n = mask.to(x.dtype).sum()
    denom = (n - 1.0) if unbiased else n
    return sq_dev / denom.clamp_min(1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Whiten ``x`` with the mean and (unbiased) variance of its masked-in values.

    ``out = (x - mean) / sqrt(var + eps)`` on valid positions, 0 elsewhere, where ``mean`` and
    ``var`` come from :func:`masked_mean` and :func:`masked_var` over the whole tensor.

    Args:
        x: values, any shape (e.g. ``[B, T]``).
        mask: same shape as ``x``.
        eps: added to the variance before the square root.

    Returns:
        Tensor shaped like ``x``.
    """
    x = _masked_values(x, mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    return _masked_values((x - mean) * torch.rsqrt(var + eps), mask)


def agg_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar.

    Modes (``n_b`` = valid tokens of row ``b``; rows with ``n_b = 0`` are left out of the row mean):

    - ``"token-mean"``: ``sum_{b,t} mask * loss / sum_{b,t} mask`` (every valid token weighs the same).
    - ``"seq-mean-token-sum"``: mean over rows of ``sum_t mask * loss``.
    - ``"seq-mean-token-mean"``: mean over rows of ``sum_t mask * loss / n_b``.

    Args:
        loss_mat: ``[B, T]`` per-token losses.
        mask: ``[B, T]`` response mask.
        mode: one of :data:`LOSS_AGG_MODES`.

    Returns:
        Scalar tensor (0 when there is no valid token).

    Raises:
        ValueError: unknown ``mode``, or ``loss_mat``/``mask`` shapes differ or are not 2-D.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; allowed: {', '.join(LOSS_AGG_MODES)}")
    _check_same_shape(loss_mat=loss_mat, mask=mask)
    if loss_mat.dim() != 2:
        raise ValueError(f"agg_loss expects [B, T] tensors, got shape {tuple(loss_mat.shape)}")
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    row_sum = _masked_values(loss_mat, mask).sum(-1)
    row_count = mask.to(loss_mat.dtype).sum(-1)
    if mode == "seq-mean-token-mean":
        row_sum = row_sum / row_count.clamp_min(1.0)
    has_tokens = row_count > 0
    return masked_mean(row_sum, has_tokens)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference policy.

    With ``k1 = logp - ref_logp``:

    - ``"kl"`` / ``"k1"``: ``k1``
    - ``"abs"``: ``|k1|``
    - ``"mse"`` / ``"k2"``: ``0.5 * k1^2``
    - ``"low_var_kl"`` / ``"k3"``: ``d = clamp(ref_logp - logp, -20, 20)``;
      ``clamp(exp(d) - d - 1, -10, 10)`` (non-negative, unbiased for KL(pi || ref), low variance).

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the current policy.
        ref_logprobs: ``[B, T]`` log-probs of the same tokens under the reference model.
        kind: one of :data:`KL_PENALTY_KINDS`.

    Returns:
        ``[B, T]`` tensor (not masked; reduce it with :func:`agg_loss`).

    Raises:
        ValueError: unknown ``kind`` or shape mismatch.
    """
    canonical = _KL_ALIASES.get(kind, kind)
    if canonical not in ("kl", "abs", "mse", "low_var_kl"):
        raise ValueError(f"unknown kl_penalty {kind!r}; allowed: {', '.join(KL_PENALTY_KINDS)}")
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    k1 = logprobs - ref_logprobs
    if canonical == "kl":
        return k1
    if canonical == "abs":
        return k1.abs()
    if canonical == "mse":
        return 0.5 * k1.square()
    # Clamps keep exp() finite when the two models disagree wildly on a token (k3 grows
    # exponentially in d), which would otherwise dominate the loss with one outlier.
    d = torch.clamp(ref_logprobs - logprobs, min=-20.0, max=20.0)
    return torch.clamp(torch.exp(d) - d - 1.0, min=-10.0, max=10.0)


def ppo_policy_loss(
    old_logprobs: torch.Tensor,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.3,
    clip_ratio_dual: float = 3.0,
    loss_agg_mode: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped PPO surrogate with dual clipping (the GRPO actor loss).

    Per token, with ``ratio = exp(clamp(logp - old_logp, -20, 20))``:

    ``pg = max(-A * ratio, -A * clip(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high))``, and for
    ``A < 0`` additionally ``pg = min(pg, -A * clip_ratio_dual)`` (the dual clip bounds the loss of a
    negative-advantage token whose ratio has run far above 1). The result is reduced by
    :func:`agg_loss` with ``loss_agg_mode``.

    Args:
        old_logprobs: ``[B, T]`` log-probs under the policy that sampled the rollouts.
        logprobs: ``[B, T]`` log-probs under the policy being optimised (carries the gradient).
        advantages: ``[B, T]`` per-token advantages.
        response_mask: ``[B, T]`` 1 on response tokens.
        clip_ratio_low: lower clip, ratio is clipped at ``1 - clip_ratio_low``.
        clip_ratio_high: upper clip, ratio is clipped at ``1 + clip_ratio_high``.
        clip_ratio_dual: dual-clip constant, must be > 1.
        loss_agg_mode: see :func:`agg_loss`.

    Returns:
        ``(loss, metrics)``: a scalar loss tensor and floats
        ``pg_clipfrac`` (fraction of valid tokens where the clipped term exceeded the unclipped one),
        ``pg_clipfrac_lower`` (fraction of valid tokens where the dual clip capped the loss) and
        ``ppo_kl`` (masked mean of ``old_logp - logp``).

    Raises:
        ValueError: shape mismatch, ``clip_ratio_dual <= 1`` or unknown ``loss_agg_mode``.
    """
    _check_same_shape(
        old_logprobs=old_logprobs, logprobs=logprobs, advantages=advantages, response_mask=response_mask
    )
    if clip_ratio_dual <= 1.0:
        raise ValueError(f"clip_ratio_dual must be > 1.0, got {clip_ratio_dual}")

    log_ratio = torch.clamp(logprobs - old_logprobs, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    pg = torch.maximum(unclipped, clipped)
    dual_cap = -advantages * clip_ratio_dual
    negative = advantages < 0
    dual_active = negative & (pg > dual_cap)
    pg = torch.where(dual_active, dual_cap, pg)

    loss = agg_loss(pg, response_mask, loss_agg_mode)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean((clipped > unclipped).float(), response_mask).item(),
            "pg_clipfrac_lower": masked_mean(dual_active.float(), response_mask).item(),
            "ppo_kl": masked_mean(-log_ratio, response_mask).item(),
        }
    return loss, metrics


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution ``softmax(logits)`` along the last dimension.

    ``H = logsumexp(z) - sum_v softmax(z)_v * z_v`` with ``z = logits - max(logits)``, which equals
    ``-sum p log p`` without ever taking the log of a probability that underflowed to 0. Logits must
    be finite (a ``-inf`` entry gives ``0 * -inf = NaN``).

    Args:
        logits: ``[..., V]``.

    Returns:
        ``[...]`` entropies (in nats), same dtype as ``logits``.
    """
    # Shifting by the max first keeps both terms O(log V): unshifted, logits near 1000 would make
    # them ~1000 each and the float32 difference lose the entropy's last digits.
    shifted = logits - logits.amax(dim=-1, keepdim=True).detach()
    probs = torch.softmax(shifted, dim=-1)
    return torch.logsumexp(shifted, dim=-1) - (probs * shifted).sum(-1)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under ``softmax(logits)``.

    ``logp[b, t] = logits[b, t, labels[b, t]] - logsumexp_v logits[b, t, v]``. Gathering first and
    subtracting a ``[B, T]`` normaliser avoids materialising a full ``log_softmax`` copy of the
    ``[B, T, V]`` logits (the vocabulary of a VLM is ~150k entries).

    Args:
        logits: ``[B, T, V]`` (any leading shape works) float logits.
        labels: ``[B, T]`` token ids, same leading shape as ``logits``.

    Returns:
        ``[B, T]`` log-probs, same dtype as ``logits``.

    Raises:
        ValueError: if ``labels.shape != logits.shape[:-1]`` or ``labels`` is not an integer tensor.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])}"
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    picked = torch.gather(logits, dim=-1, index=labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """``log softmax(logits / temperature)[label]`` row by row, in chunks of rows, keeping only ``logits`` (as
    given, e.g. bf16) and the ``[N]`` normalisers for the backward; the entropy comes out alongside, without
    a graph. The backward rebuilds each chunk's softmax: ``d logp / d z = onehot(label) - softmax(z)``."""

    @staticmethod
    def _scaled(logits, rows, dtype, temperature):
        """Rows `rows` of the logits in the compute dtype, divided by the temperature: z."""
        z = logits[rows].to(dtype)
        return z / temperature if temperature != 1.0 else z

    @staticmethod
    def forward(ctx, logits, labels, temperature, chunk_rows, with_entropy):
        n, dtype = logits.shape[0], torch.promote_types(logits.dtype, torch.float32)
        picked = torch.empty(n, dtype=dtype, device=logits.device)
        lse = torch.empty(n, dtype=dtype, device=logits.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=dtype, device=logits.device)
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            z = _ChunkedTokenLogprobs._scaled(logits, rows, dtype, temperature)
            lse[rows] = torch.logsumexp(z, dim=-1)
            picked[rows] = z.gather(-1, labels[rows, None]).squeeze(-1)
            if with_entropy:
                entropy[rows] = entropy_from_logits(z)
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        ctx.mark_non_differentiable(entropy)
        return picked - lse, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            z = _ChunkedTokenLogprobs._scaled(logits, rows, lse.dtype, ctx.temperature)
            g = grad_logp[rows, None].to(lse.dtype)
            dz = torch.exp(z - lse[rows, None]).mul_(-g)
            dz.scatter_add_(-1, labels[rows, None], g)
            if ctx.temperature != 1.0:
                dz /= ctx.temperature
            grad[rows] = dz.to(grad.dtype)
        return grad, None, None, None, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False,
                   chunk_bytes: int = 2 ** 28) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of ``labels`` under ``softmax(logits / temperature)``, and optionally the entropies, one per row.

    The same numbers as `logprobs_from_logits` / `entropy_from_logits` on ``logits.float() / temperature``,
    but a VLM's ``[N, V]`` logits (V ~ 150k) are never copied to float32 whole: rows are converted a chunk
    at a time (about ``chunk_bytes`` each), and the graph keeps the logits as given plus ``[N]``
    normalisers. At a token budget of 16k that is tens of GiB less than the float32 path holds (an
    H100 ran out of memory there, benchmarks/RESULTS.md).

    Args:
        logits: ``[N, V]``, any float dtype; the gradient comes back in that dtype.
        labels: ``[N]`` token ids.

    Returns:
        ``[N]`` log-probs (differentiable) and ``[N]`` entropies (no graph) or None, in float32 (float64 for
        float64 logits).
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"token_logprobs wants logits [N, V] and labels [N], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    chunk_rows = max(1, chunk_bytes // (4 * logits.shape[1]))
    logp, entropy = _ChunkedTokenLogprobs.apply(logits, labels.long(), float(temperature), chunk_rows, with_entropy)
    return logp, entropy if with_entropy else None
