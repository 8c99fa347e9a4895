import torch

from pebr.algorithms.filtering import groups_within


def test_groups_within_keeps_groups_whose_mean_is_in_range():
    # group 0: [1, 1] mean 1.0 (all right) -> dropped; group 1: [1, 0] mean 0.5 -> kept;
    # group 2: [0, 0] mean 0.0 (all wrong) -> dropped; group 3: [0.99, 0.99] mean 0.99 -> kept (inclusive).
    values = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.99, 0.99])
    gid = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    keep = groups_within(values, gid, 0.01, 0.99)
    assert keep.tolist() == [False, False, True, True, False, False, True, True]


def test_both_bounds_are_inclusive():
    values = torch.tensor([0.25, 0.25, 0.75, 0.75, 0.2, 0.2])
    gid = torch.tensor([0, 0, 1, 1, 2, 2])  # means 0.25 (= low), 0.75 (= high), 0.2 (below)
    assert groups_within(values, gid, 0.25, 0.75).tolist() == [True, True, True, True, False, False]


def test_groups_within_interleaved_groups():
    values = torch.tensor([0.0, 1.0, 1.0, 1.0])
    gid = torch.tensor([0, 1, 0, 1])  # group 0 mean 0.5, group 1 mean 1.0
    assert groups_within(values, gid, 0.0, 0.9).tolist() == [True, False, True, False]
