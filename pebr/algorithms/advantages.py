"""Advantage estimators (GRPO, RLOO, REINFORCE++, ReMax) as vectorised tensor functions.

Shapes: ``B`` sequences in the batch, ``T`` response positions. ``scores`` are the scalar outcome
rewards of the ``B`` responses; ``group_ids`` say which prompt each response answers (the ``n``
rollouts of one prompt share an id). Group statistics are computed with ``index_add_`` over compacted
group ids, never with a Python loop over samples.
"""

from __future__ import annotations

import math

from collections.abc import Callable, Hashable, Sequence

import torch

from pebr.algorithms.losses import masked_whiten

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "group_ids_from_uids",
    "grpo_advantages",
    "rloo_advantages",
    "reinforce_plus_plus_advantages",
    "remax_advantages",
    "compute_advantages",
    "zero_variance_group_fraction",
    "token_level_rewards",
]


def group_ids_from_uids(uids: Sequence[Hashable]) -> torch.LongTensor:
    """Map arbitrary hashable prompt ids to dense group ids ``0..G-1`` in order of first appearance.

    Example: ``["b", "a", "b"] -> tensor([0, 1, 0])``.

    Args:
        uids: one hashable id per response (e.g. the prompt's uid string), length ``B``.

    Returns:
        ``[B]`` int64 tensor.

    Raises:
        TypeError: if an id is not hashable (names its position).
    """
    index: dict[Hashable, int] = {}
    ids = []
    for position, uid in enumerate(uids):
        try:
            ids.append(index.setdefault(uid, len(index)))
        except TypeError as err:
            raise TypeError(f"uid at position {position} ({uid!r}) is not hashable") from err
    return torch.tensor(ids, dtype=torch.long)


def _check_outcome_inputs(scores: torch.Tensor, group_ids: torch.Tensor) -> None:
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [B], got shape {tuple(scores.shape)}")
    if group_ids.shape != scores.shape:
        raise ValueError(
            f"group_ids shape {tuple(group_ids.shape)} must equal scores shape {tuple(scores.shape)}"
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")


def _group_sums(
    values: torch.Tensor, group_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group count and sum of ``values``, with ids compacted by ``torch.unique``.

    Returns:
        ``(inverse [B], counts [G], sums [G])`` where ``inverse`` maps each sample to its group row.
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    # At least float32: a bf16 count stops at 256, and a bf16 sum of 8 scores is already off in its third digit.
    dtype = torch.promote_types(values.dtype, torch.float32)
    counts = torch.zeros(num_groups, dtype=dtype, device=values.device)
    counts.index_add_(0, inverse, torch.ones_like(values, dtype=dtype))
    sums = torch.zeros(num_groups, dtype=dtype, device=values.device)
    sums.index_add_(0, inverse, values.to(dtype))
    return inverse, counts, sums


def _all_equal(values: torch.Tensor, inverse: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[G]`` whether each group's values are all equal (its max is its min); ``inverse`` maps samples to groups."""
    highest = torch.full((num_groups,), -math.inf, dtype=values.dtype, device=values.device)
    lowest = torch.full((num_groups,), math.inf, dtype=values.dtype, device=values.device)
    highest = highest.scatter_reduce(0, inverse, values, reduce="amax")
    return highest == lowest.scatter_reduce(0, inverse, values, reduce="amin")


def _as_float(scores: torch.Tensor) -> torch.Tensor:
    return scores if scores.dtype.is_floating_point else scores.float()


def grpo_advantages(scores: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantage, normalised within each prompt group.

    ``A_i = (r_i - mean_g) / (std_g + eps)`` where ``mean_g`` and ``std_g`` are taken over the group
    of ``i``; ``std_g`` uses Bessel's correction (``/ (n_g - 1)``, as ``torch.std``). A group of one
    response has no spread to compare against and gets ``A_i = 0`` (not NaN). With rewards
    ``[1, 0, 0, 1]`` in one group: mean 0.5, std sqrt(1/3) = 0.57735, so ``A = +-0.8660``.

    Args:
        scores: ``[B]`` scalar rewards.
        group_ids: ``[B]`` integer group id per response (any integers; need not be contiguous).
        eps: added to the std. A group whose rewards are all equal gets 0 exactly: its float mean may sit a
            rounding step off the rewards (eight 0.9s), and that step over a std of the same size is not 0.

    Returns:
        ``[B]`` advantages, float dtype of ``scores``.

    Raises:
        ValueError: on shape or dtype mismatch.
    """
    _check_outcome_inputs(scores, group_ids)
    r = _as_float(scores)
    inverse, counts, sums = _group_sums(r, group_ids)
    mean = sums / counts
    deviation = r - mean[inverse]
    sq_sums = torch.zeros_like(sums).index_add_(0, inverse, deviation.square())
    std = torch.sqrt(sq_sums / (counts - 1.0).clamp_min(1.0))
    adv = deviation / (std[inverse] + eps)
    no_spread = (counts < 2) | _all_equal(r, inverse, len(sums))
    return torch.where(no_spread[inverse], torch.zeros_like(adv), adv).to(r.dtype)


def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """RLOO (leave-one-out) advantage.

    ``A_i = r_i - (sum_g - r_i) / (n_g - 1)``: the reward minus the mean of the *other* members of
    its group. A group of one has no other member and gets 0. Rewards ``[1, 0, 0]`` give
    ``[1 - 0, 0 - 0.5, 0 - 0.5] = [1, -0.5, -0.5]``.

    Args:
        scores: ``[B]`` scalar rewards.
        group_ids: ``[B]`` integer group ids.

    Returns:
        ``[B]`` advantages.

    Raises:
        ValueError: on shape or dtype mismatch.
    """
    _check_outcome_inputs(scores, group_ids)
    r = _as_float(scores)
    inverse, counts, sums = _group_sums(r, group_ids)
    n = counts[inverse]
    others_mean = (sums[inverse] - r) / (n - 1.0).clamp_min(1.0)
    adv = r - others_mean
    return torch.where(n < 2, torch.zeros_like(adv), adv).to(r.dtype)


def remax_advantages(scores: torch.Tensor, baseline_scores: torch.Tensor) -> torch.Tensor:
    """ReMax advantage: ``A_i = r_i - r_greedy_i``, the reward minus that of the greedy response.

    Args:
        scores: ``[B]`` rewards of the sampled responses.
        baseline_scores: ``[B]`` rewards of the greedy response to the same prompt.

    Returns:
        ``[B]`` advantages.

    Raises:
        ValueError: if the shapes differ or are not 1-D.
    """
    if scores.dim() != 1 or baseline_scores.shape != scores.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} and baseline_scores {tuple(baseline_scores.shape)} "
            "must both be 1-D [B]"
        )
    return _as_float(scores) - _as_float(baseline_scores)


def _check_token_inputs(token_rewards: torch.Tensor, response_mask: torch.Tensor) -> None:
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [B, T], got shape {tuple(response_mask.shape)}")
    if token_rewards.shape != response_mask.shape:
        raise ValueError(
            f"token_rewards shape {tuple(token_rewards.shape)} must equal response_mask shape "
            f"{tuple(response_mask.shape)}"
        )


def reinforce_plus_plus_advantages(
    token_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """REINFORCE++ advantage: discounted return-to-go, whitened over the batch.

    ``G_t = sum_{s >= t} gamma^(s - t) * mask_s * r_s`` per row, then
    ``A = (G - mean) / sqrt(var + 1e-8)`` with the mean and unbiased variance over all valid tokens
    of the batch (:func:`pebr.algorithms.losses.masked_whiten`); 0 on padding.

    The scan runs over the ``T`` positions, each step vectorised over the ``B`` rows (a closed form
    with ``gamma^-t`` overflows for long responses).

    Args:
        token_rewards: ``[B, T]`` per-token rewards (often the outcome on the last token only).
        response_mask: ``[B, T]`` 1 on response tokens.
        gamma: discount factor.

    Returns:
        ``[B, T]`` advantages.

    Raises:
        ValueError: on shape mismatch.
    """
    _check_token_inputs(token_rewards, response_mask)
    rewards = torch.where(response_mask.bool(), _as_float(token_rewards), 0.0)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return masked_whiten(returns, response_mask)


def token_level_rewards(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Place each row's scalar reward on its last valid response token.

    ``out[b, t] = scores[b]`` if ``t`` is the last position with ``response_mask[b, t] = 1``,
    else 0; rows without a valid token are all zeros.

    Args:
        scores: ``[B]`` scalar rewards.
        response_mask: ``[B, T]``.

    Returns:
        ``[B, T]`` tensor of the float dtype of ``scores``.

    Raises:
        ValueError: on shape mismatch.
    """
    if response_mask.dim() != 2 or scores.shape != response_mask.shape[:1]:
        raise ValueError(
            f"scores {tuple(scores.shape)} must be [B] and response_mask "
            f"{tuple(response_mask.shape)} [B, T]"
        )
    r = _as_float(scores)
    out = torch.zeros(response_mask.shape, dtype=r.dtype, device=r.device)
    if response_mask.shape[1] == 0:
        return out
    positions = torch.arange(1, response_mask.shape[1] + 1, device=response_mask.device)
    # 1-based position of the last valid token, 0 when the row has none.
    last = (response_mask.bool().long() * positions).amax(dim=-1)
    has_token = last > 0
    rows = torch.arange(response_mask.shape[0], device=r.device)[has_token]
    out[rows, last[has_token] - 1] = r[has_token]
    return out


def _broadcast_outcome(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    return advantages.unsqueeze(-1) * response_mask.to(advantages.dtype)


def _require(name: str, value: torch.Tensor | None, estimator: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"advantage estimator {estimator!r} needs {name}, got None")
    return value


def _grpo_tokens(scores, group_ids, response_mask, token_rewards, baseline_scores, gamma):
    group_ids = _require("group_ids", group_ids, "grpo")
    return _broadcast_outcome(grpo_advantages(scores, group_ids), response_mask)


def _rloo_tokens(scores, group_ids, response_mask, token_rewards, baseline_scores, gamma):
    group_ids = _require("group_ids", group_ids, "rloo")
    return _broadcast_outcome(rloo_advantages(scores, group_ids), response_mask)


def _remax_tokens(scores, group_ids, response_mask, token_rewards, baseline_scores, gamma):
    baseline_scores = _require("baseline_scores", baseline_scores, "remax")
    return _broadcast_outcome(remax_advantages(scores, baseline_scores), response_mask)


def _reinforce_pp_tokens(scores, group_ids, response_mask, token_rewards, baseline_scores, gamma):
    if token_rewards is None:
        token_rewards = token_level_rewards(scores, response_mask)
    return reinforce_plus_plus_advantages(token_rewards, response_mask, gamma=gamma)


# Every entry maps the same keyword arguments to [B, T] advantages (0 on padding).
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": _grpo_tokens,
    "rloo": _rloo_tokens,
    "reinforce_plus_plus": _reinforce_pp_tokens,
    "remax": _remax_tokens,
}


def compute_advantages(
    estimator: str,
    *,
    scores: torch.Tensor,
    group_ids: torch.Tensor | None,
    response_mask: torch.Tensor,
    token_rewards: torch.Tensor | None = None,
    baseline_scores: torch.Tensor | None = None,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Per-token advantages ``[B, T]`` from the named estimator.

    Outcome estimators (``grpo``, ``rloo``, ``remax``) compute one scalar per response and place it
    on every valid response token: ``A[b, t] = a[b] * response_mask[b, t]``. ``reinforce_plus_plus``
    uses ``token_rewards`` (or, when ``None``, ``scores`` placed on the last valid token) and
    ``gamma``.

    Args:
        estimator: one of ``ADVANTAGE_ESTIMATORS``.
        scores: ``[B]`` scalar rewards.
        group_ids: ``[B]`` integer group ids (needed by ``grpo`` and ``rloo``).
        response_mask: ``[B, T]`` 1 on response tokens.
        token_rewards: ``[B, T]`` per-token rewards for ``reinforce_plus_plus``.
        baseline_scores: ``[B]`` greedy-response rewards for ``remax``.
        gamma: discount for ``reinforce_plus_plus``.

    Returns:
        ``[B, T]`` float advantages, 0 where ``response_mask`` is 0.

    Raises:
        ValueError: unknown estimator (lists the allowed names), a missing input the estimator
            needs, or mismatched shapes.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {estimator!r}; allowed: {', '.join(ADVANTAGE_ESTIMATORS)}"
        )
    if response_mask.dim() != 2 or scores.shape != response_mask.shape[:1]:
        raise ValueError(
            f"scores {tuple(scores.shape)} must be [B] and response_mask "
            f"{tuple(response_mask.shape)} [B, T] with the same B"
        )
    return ADVANTAGE_ESTIMATORS[estimator](
        scores, group_ids, response_mask, token_rewards, baseline_scores, gamma
    )


def zero_variance_group_fraction(scores: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Fraction of prompt groups whose scores are all equal (their GRPO advantage is 0, unless the KL penalty is
    in the reward, algorithm.use_kl_loss=false, where each response's KL still sets the group apart).

    Args:
        scores: ``[B]`` scalar rewards.
        group_ids: ``[B]`` integer group ids.

    Returns:
        ``#{g : max_g = min_g} / G`` as a float; 0.0 for an empty batch.

    Raises:
        ValueError: on shape or dtype mismatch.
    """
    _check_outcome_inputs(scores, group_ids)
    if scores.numel() == 0:
        return 0.0
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return _all_equal(_as_float(scores), inverse, int(inverse.max().item()) + 1).float().mean().item()
