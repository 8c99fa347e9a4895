"""The RL math: advantage estimators and policy losses as pure torch functions (no Ray, no vLLM)."""

from pebr.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    group_ids_from_uids,
    grpo_advantages,
    reinforce_plus_plus_advantages,
    remax_advantages,
    rloo_advantages,
    token_level_rewards,
    zero_variance_group_fraction,
)
from pebr.algorithms.losses import (
    KL_PENALTY_KINDS,
    LOSS_AGG_MODES,
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

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_PENALTY_KINDS",
    "LOSS_AGG_MODES",
    "agg_loss",
    "compute_advantages",
    "entropy_from_logits",
    "group_ids_from_uids",
    "grpo_advantages",
    "kl_penalty",
    "logprobs_from_logits",
    "token_logprobs",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "reinforce_plus_plus_advantages",
    "remax_advantages",
    "rloo_advantages",
    "token_level_rewards",
    "zero_variance_group_fraction",
]
