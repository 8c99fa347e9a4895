"""Stage-2 (reasoning) reward of PeBR-R1.

    overall = 0.9 * accuracy + 0.1 * format

The weights can be overridden through worker.reward.reward_function_kwargs (keys in DEFAULTS).
"""

from __future__ import annotations

import os
from typing import Any

from pebr.rewards.manager import resolve_options
from pebr.rewards.terms import accuracy_reward, format_reward

REWARD_TYPE = "batch"  # compute_score takes the list of inputs (worker.reward.reward_type=batch)
DEFAULTS: dict[str, Any] = {"accuracy_weight": 0.9, "format_weight": 0.1}


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    return resolve_options(DEFAULTS, kwargs, os.path.basename(__file__))


def setup(**kwargs: Any) -> None:
    """Check the options once at start-up (a misspelt key fails here, not at the first step)."""
    _options(kwargs)


def compute_score(reward_inputs: list[dict], **kwargs: Any) -> list[dict[str, float]]:
    """Stage-2 scores of a batch.

    Args:
        reward_inputs: dicts with at least response and ground_truth.
        **kwargs: overrides of DEFAULTS.

    Returns:
        Per input: overall, accuracy, format.
    """
    options = _options(kwargs)
    scores = []
    for item in reward_inputs:
        accuracy = accuracy_reward(item["response"], item["ground_truth"])
        fmt = format_reward(item["response"])
        overall = options["accuracy_weight"] * accuracy + options["format_weight"] * fmt
        scores.append({"overall": overall, "accuracy": accuracy, "format": fmt})
    return scores
