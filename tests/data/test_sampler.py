"""StatefulBatchSampler: order, partial batches, resume mid-epoch and across epochs."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from pebr.data.sampler import StatefulBatchSampler, collate_fn


def take(sampler: StatefulBatchSampler, count: int) -> list[list[int]]:
    """Serve `count` batches, moving across epochs like a trainer loop does."""
    served: list[list[int]] = []
    while len(served) < count:
        for batch in sampler:
            served.append(batch)
            if len(served) == count:
                break
    return served


def test_last_partial_batch_is_served_and_len():
    sampler = StatefulBatchSampler(10, 4, shuffle=False)
    assert len(sampler) == 3
    assert list(sampler) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["position"] == 0

    dropping = StatefulBatchSampler(10, 4, shuffle=False, drop_last=True)
    assert len(dropping) == 2 and list(dropping) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_shuffled_epoch_is_the_seeded_permutation():
    sampler = StatefulBatchSampler(7, 3, seed=5)
    epoch0 = list(sampler)
    epoch1 = list(sampler)
    generator = torch.Generator().manual_seed(5)
    assert sum(epoch0, []) == torch.randperm(7, generator=generator).tolist()
    assert sum(epoch1, []) == torch.randperm(7, generator=torch.Generator().manual_seed(6)).tolist()
    assert [len(b) for b in epoch0] == [3, 3, 1]
    assert sorted(sum(epoch0, [])) == list(range(7)) and sorted(sum(epoch1, [])) == list(range(7))
    assert epoch0 != epoch1


@pytest.mark.parametrize("consumed", [3, 4, 5, 9])
def test_resume_continues_with_the_next_unseen_batch(consumed):
    # 10 items, batch 3 -> 4 batches per epoch; `consumed` crosses the epoch boundary for 4, 5 and 9.
    uninterrupted = take(StatefulBatchSampler(10, 3, seed=11), 12)

    first = StatefulBatchSampler(10, 3, seed=11)
    assert take(first, consumed) == uninterrupted[:consumed]
    state = first.state_dict()

    resumed = StatefulBatchSampler(10, 3, seed=11)
    resumed.load_state_dict(state)
    assert take(resumed, 12 - consumed) == uninterrupted[consumed:]


def test_resume_after_three_batches_gives_the_fourth():
    run = StatefulBatchSampler(20, 4, seed=0)
    batches = list(itertools.islice(iter(run), 3))
    state = run.state_dict()
    assert state == {"epoch": 0, "position": 3, "seed": 0, "num_items": 20, "batch_size": 4, "shuffle": True,
                     "drop_last": False}
    fourth = take(StatefulBatchSampler(20, 4, seed=0), 4)[3]
    resumed = StatefulBatchSampler(20, 4, seed=99)  # the saved seed wins
    resumed.load_state_dict(state)
    assert next(iter(resumed)) == fourth
    assert fourth not in batches


def test_set_epoch_keeps_position_for_the_same_epoch():
    sampler = StatefulBatchSampler(9, 3, shuffle=False)
    iterator = iter(sampler)
    next(iterator)
    sampler.set_epoch(0)  # a trainer calling set_epoch(current) after a resume must not restart
    assert next(iter(sampler)) == [3, 4, 5]
    sampler.set_epoch(2)
    assert sampler.state_dict()["epoch"] == 2 and sampler.state_dict()["position"] == 0


def test_bad_arguments_and_states():
    with pytest.raises(ValueError, match="num_items"):
        StatefulBatchSampler(0, 2)
    with pytest.raises(ValueError, match="batch_size"):
        StatefulBatchSampler(3, 0)
    with pytest.raises(ValueError, match="yields no batch"):
        StatefulBatchSampler(3, 4, drop_last=True)
    sampler = StatefulBatchSampler(10, 3)
    with pytest.raises(ValueError, match="missing key 'position'"):
        sampler.load_state_dict({"epoch": 0, "seed": 0})
    with pytest.raises(ValueError, match="key 'num_items' is 12"):
        sampler.load_state_dict({"epoch": 0, "position": 0, "seed": 0, "num_items": 12})
    with pytest.raises(ValueError, match="key 'shuffle' is False.*data.shuffle changed"):
        sampler.load_state_dict({**sampler.state_dict(), "shuffle": False})
    with pytest.raises(ValueError, match="key 'drop_last' is True"):
        sampler.load_state_dict({**sampler.state_dict(), "drop_last": True})
    with pytest.raises(ValueError, match="position=5"):
        sampler.load_state_dict({"epoch": 0, "position": 5, "seed": 0})
    sampler.load_state_dict({"epoch": 1, "position": 2, "seed": 0})  # the three documented keys suffice
    assert sampler.state_dict()["position"] == 2


def test_with_a_dataloader_and_identity_collate():
    items = [{"index": i} for i in range(5)]
    sampler = StatefulBatchSampler(len(items), 2, shuffle=False)
    loader = DataLoader(items, batch_sampler=sampler, collate_fn=collate_fn)
    batches = list(loader)
    assert batches == [[{"index": 0}, {"index": 1}], [{"index": 2}, {"index": 3}], [{"index": 4}]]
    assert collate_fn(items[:2]) == items[:2]
