"""Reward for dataset-level sampling: accuracy only.

Each question's 8 sampled responses are graded for correctness to split the RL data into easy
(8/8), medium (1-7) and hard (0/8). "overall" repeats accuracy so that the file also works with a
reward manager that requires it.
"""

from __future__ import annotations

import os
from typing import Any

from pebr.rewards.manager import resolve_options
from pebr.rewards.terms import accuracy_reward

REWARD_TYPE = "batch"  # compute_score takes the list of inputs (worker.reward.reward_type=batch)


def setup(**kwargs: Any) -> None:
    """Reject any option at start-up: this reward takes none."""
    resolve_options({}, kwargs, os.path.basename(__file__))


def compute_score(reward_inputs: list[dict], **kwargs: Any) -> list[dict[str, float]]:
    """Accuracy of each response.

    Args:
        reward_inputs: dicts with at least response and ground_truth.
        **kwargs: none are accepted (a stray key is an error, not ignored).

    Returns:
        Per input: accuracy and overall (equal).
    """
    resolve_options({}, kwargs, os.path.basename(__file__))
    scores = []
    for item in reward_inputs:
        accuracy = accuracy_reward(item["response"], item["ground_truth"])
        scores.append({"overall": accuracy, "accuracy": accuracy})
    return scores
