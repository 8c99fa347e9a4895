"""Advantage estimators against numbers worked out by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

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


def close(actual: torch.Tensor, expected: list, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_group_ids_from_uids_in_order_of_first_appearance():
    assert group_ids_from_uids(["b", "a", "b", 3, "a"]).tolist() == [0, 1, 0, 2, 1]
    assert group_ids_from_uids([]).dtype == torch.long


def test_group_ids_from_uids_names_the_unhashable_position():
    with pytest.raises(TypeError, match="position 1"):
        group_ids_from_uids(["a", ["not", "hashable"]])


def test_grpo_one_group_uses_unbiased_std():
    # mean = 0.5; deviations +-0.5; unbiased var = 4 * 0.25 / 3 = 1/3; std = 0.57735
    # A = +-0.5 / 0.57735 = +-0.8660 (the population std would give +-1.0)
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 0, 0]))
    close(adv, [0.8660, -0.8660, -0.8660, 0.8660], atol=1e-4)
    assert adv[0].item() == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1e-6), abs=1e-6)


def test_grpo_mixed_interleaved_groups_with_a_singleton():
    # Group 7: [1, 0, 0, 1] -> +-0.8660 as above.
    # Group 3: [2, 4]: mean 3, unbiased var = (1 + 1) / 1 = 2, std 1.41421 -> -0.70711, +0.70711.
    # Group 42: [5] alone -> 0, not NaN.
    scores = torch.tensor([1.0, 2.0, 0.0, 5.0, 4.0, 0.0, 1.0])
    gids = torch.tensor([7, 3, 7, 42, 3, 7, 7])
    adv = grpo_advantages(scores, gids)
    close(adv, [0.8660, -0.70711, -0.8660, 0.0, 0.70711, -0.8660, 0.8660], atol=1e-4)


def test_grpo_all_equal_group_is_zero_and_integer_scores_are_accepted():
    adv = grpo_advantages(torch.tensor([1, 1, 1]), torch.tensor([0, 0, 0]))
    assert adv.dtype == torch.float32
    close(adv, [0.0, 0.0, 0.0])


@pytest.mark.parametrize("value", [0.9, 0.1, 0.3, 1.0 / 3.0])
def test_grpo_all_equal_float_rewards_are_exactly_zero(value):
    # Eight 0.9s (stage 2: every answer right, no format) have a float32 mean a rounding step below 0.9;
    # divided by a std of the same size that step was an advantage of -0.056.
    scores = torch.tensor([value] * 8 + [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    adv = grpo_advantages(scores, torch.tensor([0] * 8 + [1] * 8))
    assert torch.equal(adv[:8], torch.zeros(8))
    assert adv[8] == pytest.approx(7 / 8 / math.sqrt(1 / 8), rel=1e-5)  # the mixed group is left as it was


def test_grpo_matches_torch_std_per_group():
    torch.manual_seed(0)
    scores = torch.rand(24)
    gids = torch.arange(24) % 3
    adv = grpo_advantages(scores, gids)
    for g in range(3):
        members = scores[gids == g]
        expected = (members - members.mean()) / (members.std() + 1e-6)
        torch.testing.assert_close(adv[gids == g], expected)


def test_grpo_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="group_ids shape"):
        grpo_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        grpo_advantages(torch.zeros(3), torch.zeros(3))


def test_rloo_leave_one_out():
    # Group 0 [1, 0, 0]: 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5 (twice).
    # Group 1 [3, 5]: 3 - 5 = -2; 5 - 3 = 2.  Group 2 [9] alone -> 0.
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0, 5.0, 9.0])
    gids = torch.tensor([0, 1, 0, 0, 1, 2])
    close(rloo_advantages(scores, gids), [1.0, -2.0, -0.5, -0.5, 2.0, 0.0])


def test_bf16_scores_are_grouped_in_float32():
    # One group of 600: 300 right, 300 wrong. Mean 0.5; unbiased std sqrt(150 / 599) = 0.50042, so GRPO gives
    # +-0.5 / 0.50042 = +-0.99917; RLOO gives 1 - 299/599 = 0.50083 and 0 - 300/599 = -0.50083. A bf16 count
    # stops at 256, which made these [0, -1] and [0, -1.008].
    scores = torch.tensor([1.0, 0.0] * 300, dtype=torch.bfloat16)
    gid = torch.zeros(600, dtype=torch.long)
    grpo = grpo_advantages(scores, gid)
    assert grpo.dtype == torch.bfloat16
    close(grpo[:2].float(), [0.99917, -0.99917], atol=4e-3)  # bf16 holds 3 significant digits
    close(rloo_advantages(scores, gid)[:2].float(), [0.50083, -0.50083], atol=2e-3)


def test_remax_subtracts_greedy_reward():
    close(remax_advantages(torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.5])), [0.5, 0.0])
    with pytest.raises(ValueError, match="baseline_scores"):
        remax_advantages(torch.zeros(2), torch.zeros(3))


def test_token_level_rewards_on_last_valid_token():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]])
    close(
        token_level_rewards(scores, mask),
        [[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 3], [0, 0, 4, 0]],
    )


def test_reinforce_plus_plus_gamma_one():
    # Returns-to-go: row 0 [0, 0, 1] -> [1, 1, 1]; row 1 [0, 2, pad] -> [2, 2, pad].
    # The 7.0 on the padded token must be ignored.
    # Valid values 1, 1, 1, 2, 2: mean 1.4; squared deviations 3 * 0.16 + 2 * 0.36 = 1.2;
    # unbiased var 1.2 / 4 = 0.3; std 0.547723 -> -0.4 / std = -0.730297, 0.6 / std = 1.095445.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = reinforce_plus_plus_advantages(rewards, mask, gamma=1.0)
    close(adv, [[-0.730297, -0.730297, -0.730297], [1.095445, 1.095445, 0.0]])


def test_reinforce_plus_plus_discounted():
    # gamma 0.5: row 0 [0, 0, 1] -> [0.25, 0.5, 1]; row 1 [0, 2, pad] -> [1, 2, pad].
    # Valid 0.25, 0.5, 1, 1, 2: mean 0.95; deviations -0.7, -0.45, 0.05, 0.05, 1.05;
    # squares sum 0.49 + 0.2025 + 0.0025 + 0.0025 + 1.1025 = 1.8; var 1.8 / 4 = 0.45; std 0.670820.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = reinforce_plus_plus_advantages(rewards, mask, gamma=0.5)
    close(adv, [[-1.043498, -0.670820, 0.074536], [0.074536, 1.565248, 0.0]])


def test_compute_advantages_broadcasts_outcome_over_valid_tokens():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0])
    gids = torch.tensor([0, 0, 0, 0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    adv = compute_advantages("grpo", scores=scores, group_ids=gids, response_mask=mask)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    close(adv, [[a, a, 0], [-a, 0, 0], [-a, -a, -a], [0, 0, 0]])

    rloo = compute_advantages("rloo", scores=scores, group_ids=gids, response_mask=mask)
    # 1 - mean(0, 0, 1) = 2/3; 0 - mean(1, 0, 1) = -2/3
    close(rloo, [[2 / 3, 2 / 3, 0], [-2 / 3, 0, 0], [-2 / 3, -2 / 3, -2 / 3], [0, 0, 0]])

    remax = compute_advantages(
        "remax", scores=scores, group_ids=None, response_mask=mask, baseline_scores=torch.full((4,), 0.25)
    )
    close(remax, [[0.75, 0.75, 0], [-0.25, 0, 0], [-0.25, -0.25, -0.25], [0, 0, 0]])


def test_compute_advantages_reinforce_pp_defaults_to_outcome_on_last_token():
    scores = torch.tensor([1.0, 2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    implicit = compute_advantages(
        "reinforce_plus_plus", scores=scores, group_ids=None, response_mask=mask, gamma=0.5
    )
    explicit = reinforce_plus_plus_advantages(token_level_rewards(scores, mask), mask, gamma=0.5)
    torch.testing.assert_close(implicit, explicit)
    # Same numbers as test_reinforce_plus_plus_discounted: row 1's 2 sits on its last token, so
    # returns are row 0 [0.25, 0.5, 1], row 1 [1, 2] again.
    close(implicit, [[-1.043498, -0.670820, 0.074536], [0.074536, 1.565248, 0.0]])


def test_compute_advantages_errors_name_what_is_wrong():
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="allowed: grpo, rloo, reinforce_plus_plus, remax"):
        compute_advantages("gae", scores=torch.zeros(2), group_ids=None, response_mask=mask)
    with pytest.raises(ValueError, match="needs baseline_scores"):
        compute_advantages("remax", scores=torch.zeros(2), group_ids=None, response_mask=mask)
    with pytest.raises(ValueError, match="needs group_ids"):
        compute_advantages("grpo", scores=torch.zeros(2), group_ids=None, response_mask=mask)
    with pytest.raises(ValueError, match="same B"):
        compute_advantages("grpo", scores=torch.zeros(3), group_ids=None, response_mask=mask)
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "rloo", "reinforce_plus_plus", "remax"}


def test_zero_variance_group_fraction():
    # Groups: a [1, 1] equal, b [0, 1] not, c [0, 0] equal, d [5] alone (trivially equal) -> 3/4.
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 5.0])
    gids = group_ids_from_uids(["a", "b", "a", "c", "c", "b", "d"])
    assert zero_variance_group_fraction(scores, gids) == pytest.approx(0.75)
    assert zero_variance_group_fraction(torch.zeros(0), torch.zeros(0, dtype=torch.long)) == 0.0
