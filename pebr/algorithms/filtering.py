"""Online filtering of prompt groups (algorithm.online_filtering)."""

from __future__ import annotations

import torch


def groups_within(values: torch.Tensor, group_ids: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Which samples belong to a group whose mean value lies strictly between low and high (as in EasyR1).

    With accuracy as the value, low=0.01 and high=0.99 keep only groups that are neither all wrong nor
    all right: the groups whose GRPO advantages are not all zero. With a weighted reward ("overall") a group's
    mean can sit inside the bounds while its scores are all equal (stage 2: all wrong but well formatted is 0.1),
    so such groups are kept, with zero advantages; filter on a 0/1 term to drop them.

    Args:
        values: [B] a reward term per sample.
        group_ids: [B] prompt group of each sample (0..G-1).
        low, high: exclusive bounds on the group mean: 0 and 1 drop the all-wrong and all-right groups.

    Returns:
        [B] bool mask.
    """
    values = values.float()
    counts = torch.bincount(group_ids).float()
    means = torch.zeros_like(counts).index_add_(0, group_ids, values) / counts.clamp_min(1)
    ok = (means > low) & (means < high)
    return ok[group_ids]
