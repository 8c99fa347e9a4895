import torch

from pebr.algorithms.filtering import groups_within


def test_groups_within_keeps_groups_whose_mean_is_in_range():
    # group 0: [1, 1] mean 1.0 (all right) -> dropped; group 1: [1, 0] mean 0.5 -> kept;
    # group 2: [0, 0] mean 0.0 (all wrong) -> dropped; group 3: [0.5, 0.25] mean 0.375 -> kept.
    values = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.5, 0.25])
    gid = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    keep = groups_within(values, gid, 0.01, 0.99)
    assert keep.tolist() == [False, False, True, True, False, False, True, True]


def test_both_bounds_are_exclusive_as_in_easyr1():
    values = torch.tensor([0.25, 0.25, 0.75, 0.75, 0.5, 0.5])
    gid = torch.tensor([0, 0, 1, 1, 2, 2])  # means 0.25 (= low), 0.75 (= high), 0.5 (between)
    assert groups_within(values, gid, 0.25, 0.75).tolist() == [False, False, False, False, True, True]
    # 0 and 1 on accuracy drop exactly the all-wrong and all-right groups.
    acc = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    assert groups_within(acc, gid, 0.0, 1.0).tolist() == [False, False, False, False, True, True]


def test_a_weighted_reward_keeps_a_group_whose_scores_are_all_equal():
    # Stage 2: 0.9 accuracy + 0.1 format. All wrong but well formatted is 0.1 for each response: the mean is
    # inside (0.01, 0.99) though the group has no spread, which filtering on accuracy would drop.
    overall, accuracy = torch.tensor([0.1, 0.1, 0.1]), torch.tensor([0.0, 0.0, 0.0])
    gid = torch.tensor([0, 0, 0])
    assert groups_within(overall, gid, 0.01, 0.99).tolist() == [True, True, True]
    assert groups_within(accuracy, gid, 0.01, 0.99).tolist() == [False, False, False]


def test_groups_within_interleaved_groups():
    values = torch.tensor([0.0, 1.0, 1.0, 1.0])
    gid = torch.tensor([0, 1, 0, 1])  # group 0 mean 0.5, group 1 mean 1.0
    assert groups_within(values, gid, 0.0, 0.9).tolist() == [True, False, True, False]
