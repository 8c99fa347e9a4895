"""The controller's pure planning helpers: the balanced split over ranks, what each rank is sent, and the old
log-prob shortcut."""

from __future__ import annotations

import pytest
import torch

from pebr.config import load_config
from pebr.protocol import Batch
from pebr.trainer.ray_trainer import balanced_order, on_policy_samples, rank_shares, share_payload
from tests.trainer.test_config import REQUIRED, stage


def batch_of_lengths(lengths: list[int]) -> Batch:
    """Samples whose prompt + response is `length` tokens (one response token each)."""
    return Batch(prompt_ids=[[1] * (n - 1) for n in lengths], response_ids=[[2] for _ in lengths],
                 images=[[] for _ in lengths])


def test_balanced_order_by_hand():
    # Longest first to the lighter chunk: 10 -> A, 9 -> B, 2 -> B (9 < 10), 1 -> A; both chunks hold 11 tokens.
    assert balanced_order(batch_of_lengths([10, 9, 1, 2]), 2) == [0, 2, 1, 3]


def test_balanced_order_is_a_permutation_with_equal_chunk_sizes():
    lengths = [50, 3, 7, 44, 12, 12, 90, 1]
    order = balanced_order(batch_of_lengths(lengths), 4)
    assert sorted(order) == list(range(8))
    loads = [sum(lengths[i] for i in order[c * 2:(c + 1) * 2]) for c in range(4)]
    assert max(loads) - min(loads) < max(lengths)  # far better than the contiguous split (53 vs 91)


def cfg_with(*overrides: str):
    return load_config([stage("pebr_stage2.yaml"), stage("pebr_cpu.yaml"), *REQUIRED, *overrides])


@pytest.mark.parametrize("overrides, samples, expected", [
    # pebr_cpu.yaml: rollout 4 prompts, global 2, n 4 -> two optimizer steps per rollout: the first one's 8.
    ((), 16, 8),
    (("worker.actor.global_batch_size=4",), 16, 16),  # one mini-batch: the whole pass is skipped
    (("worker.actor.global_batch_size=4", "worker.actor.ppo_epochs=2"), 16, 16),  # epoch 1 supplies epoch 2's
    (("worker.actor.global_batch_size=4", "algorithm.use_kl_loss=false"), 16, 0),  # KL in the reward
    (("worker.actor.global_batch_size=4", "algorithm.use_kl_loss=false", "algorithm.disable_kl=true"), 16, 16),
])
def test_old_logprob_pass_is_skipped_only_where_exact(overrides, samples, expected):
    assert on_policy_samples(cfg_with(*overrides), samples) == expected


def batch_of_groups(lengths: list[int], image_of: list[str | None]) -> Batch:
    """Samples of the given lengths; samples with the same label share one image object (None: no image)."""
    images = {label: object() for label in set(image_of) if label is not None}
    return Batch(prompt_ids=[[1] * (n - 1) for n in lengths], response_ids=[[2] for _ in lengths],
                 images=[[images[label]] if label else [] for label in image_of])


def test_image_groups_are_samples_sharing_their_image_objects():
    batch = batch_of_groups([3] * 6, ["a", "b", None, "a", None, "b"])
    assert batch.image_groups() == [[0, 3], [1, 5], [2], [4]]
    assert batch.select([5, 0, 1, 3]).image_groups() == [[0, 2], [1, 3]]  # b a b a: select keeps objects shared


def test_balanced_order_keeps_a_prompts_responses_on_one_rank():
    # Prompts A, B, C, D with 2 responses each, interleaved: A = {0, 4} (20 tokens), B = {1, 5} (18), C = {2, 6} (4),
    # D = {3, 7} (2). Largest group first to the lighter chunk with room: A -> 0, B -> 1, C -> 1 (18 < 20), D -> 0.
    batch = batch_of_groups([10, 9, 2, 1, 10, 9, 2, 1], ["A", "B", "C", "D"] * 2)
    assert balanced_order(batch, 2) == [0, 3, 4, 7, 1, 2, 5, 6]
    # Dealt one sample at a time (no images), the two samples of every pair land in different chunks:
    # with images, both ranks would encode all four.
    assert balanced_order(batch_of_lengths([10, 9, 2, 1, 10, 9, 2, 1]), 2) == [0, 1, 2, 3, 4, 5, 6, 7]


def test_balanced_order_cuts_a_group_that_fits_no_chunk():
    # One image, 4 responses, 2 chunks of 2: the two longest go to the first chunk, the rest to the other.
    assert balanced_order(batch_of_groups([2, 5, 3, 4], ["A"] * 4), 2) == [1, 3, 0, 2]


def test_rank_shares_balance_each_mini_batch_by_hand():
    # Two mini-batches of 4 over 2 ranks. Block 0 = lengths [10, 9, 1, 2]: balanced_order -> [0, 2 | 1, 3].
    # Block 1 = [1, 1, 8, 8]: 8 -> A, 8 -> B, 1 -> A, 1 -> B -> [4, 6 | 5, 7] (ties keep batch order).
    shares = rank_shares(batch_of_lengths([10, 9, 1, 2, 1, 1, 8, 8]), ranks=2, mini_batch=4)
    assert shares == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # Every optimizer step (block) gives each rank 2 samples, in block order: update_policy's mini-batches.
    assert rank_shares(batch_of_lengths([5, 4, 3, 2]), ranks=1, mini_batch=2) == [[0, 1, 2, 3]]


def test_rank_shares_refuse_an_uneven_split():
    with pytest.raises(ValueError, match="6 samples in mini-batches of 4"):
        rank_shares(batch_of_lengths([1] * 6), ranks=2, mini_batch=4)


def test_share_payload_sends_positions_only_for_samples_the_rank_generated():
    batch = batch_of_lengths([3, 3, 3, 3])
    batch.non_tensors["origin"] = [("r2", 0, 0), ("r2", 0, 1), ("r2", 1, 0), ("r1", 0, 2)]
    assert share_payload(batch, [1, 0], group=0, last_rollout="r2") == ("r2", [1, 0])
    # Another group's sample, an older rollout's, or no origin at all: the samples themselves travel.
    for share, group in (([0, 2], 0), ([2], 0), ([3], 0)):
        sent = share_payload(batch, share, group, "r2")
        assert isinstance(sent, Batch) and sent.non_tensors["origin"] == [batch.non_tensors["origin"][i] for i in share]
    assert share_payload(batch, [2], group=1, last_rollout="r2") == ("r2", [0])
    assert isinstance(share_payload(batch_of_lengths([3]), [0], group=0, last_rollout="r2"), Batch)


def test_prompt_groups_stay_apart_when_filtering_tries_cross_an_epoch():
    """Online filtering's tries within one step read past the epoch's end into a new shuffle, where a prompt may
    come back: each draw of it is a group of its own (one uid for both merged two groups' advantages)."""
    import types

    from pebr.data import StatefulBatchSampler
    from pebr.trainer.ray_trainer import RayPPOTrainer

    sampler = StatefulBatchSampler(10, 4, shuffle=True, seed=1, drop_last=True)
    trainer = types.SimpleNamespace(sampler=sampler, _batches=iter(sampler), global_step=1,
                                    train_dataset=[{"index": i, "prompt": f"q{i}"} for i in range(10)])
    draws = [[(p["index"], p["uid"]) for p in RayPPOTrainer._next_prompts(trainer, attempt)]
             for attempt in (1, 2, 3)]  # 12 prompts from 10
    indices = [index for draw in draws for index, _ in draw]
    assert len(set(indices)) < len(indices)  # a prompt came again
    uids = [uid for draw in draws for _, uid in draw]
    assert len(set(uids)) == len(uids)


def test_kl_in_the_reward_by_hand():
    """use_kl_loss=false: each response's score loses kl_coef x its summed KL (k1 here) before GRPO."""
    from pebr.config import AlgorithmConfig
    from pebr.trainer.ray_trainer import batch_advantages

    lengths = [2, 3, 1, 2, 1]
    batch = Batch(prompt_ids=[[1]] * 5, response_ids=[[2] * n for n in lengths], images=[[]] * 5,
                  non_tensors={"uid": ["a", "a", "a", "b", "b"]})
    pad = -9.0  # past a response's end: must not count
    batch.tensors["scores"] = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    batch.tensors["old_logprobs"] = torch.tensor([[-1.0, -2.0, pad], [-1.0, -1.0, -1.0], [-0.5, pad, pad],
                                                  [-1.0, -1.0, pad], [-1.0, pad, pad]])
    batch.tensors["ref_logprobs"] = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, -1.0, -2.0], [-0.5, 0.0, 0.0],
                                                  [-1.0, -3.0, 0.0], [-1.0, 0.0, 0.0]])
    algorithm = AlgorithmConfig(use_kl_loss=False, kl_coef=0.5, kl_penalty="kl")
    assert algorithm.kl_in_reward
    batch_advantages(batch, algorithm)
    # Summed KL per response: -0.5, 1, 0, 2, 0; scores 1.25, -0.5, 0 | 0, 1.
    # Group a: mean 0.25, deviations 1, -0.75, -0.25, std sqrt(1.625 / 2) = 0.901388.
    # Group b: 0 and 1, +-1/sqrt(2) (without the penalty both scored 1: advantage 0).
    expected = [1.0 / 0.901388, -0.75 / 0.901388, -0.25 / 0.901388, -0.707107, 0.707107]
    mask = batch.tensors["response_mask"]
    assert mask.sum(-1).tolist() == lengths
    advantages = batch.tensors["advantages"]
    for row, value in enumerate(expected):
        assert advantages[row, :lengths[row]].tolist() == pytest.approx([value] * lengths[row], abs=1e-5)
    assert torch.all(advantages[mask == 0] == 0)


def test_concat_refuses_batches_with_other_keys_and_an_empty_batch_has_empty_response_tensors():
    """concat took the first batch's keys: it dropped keys only later batches had, or raised a bare KeyError."""
    def one(**non_tensors):
        return Batch(prompt_ids=[[1]], response_ids=[[2, 3]], images=[[]],
                     non_tensors={k: [v] for k, v in non_tensors.items()}, tensors={"scores": torch.zeros(1)})

    joined = Batch.concat([one(uid="a"), one(uid="b")])
    assert joined.non_tensors["uid"] == ["a", "b"] and joined.tensors["scores"].shape == (2,)
    for batches in ([one(uid="a"), one(uid="b", extra=1)], [one(uid="b", extra=1), one(uid="a")]):
        with pytest.raises(ValueError, match="batches must have the same keys"):
            Batch.concat(batches)
    assert Batch().response_tensor("old_logprobs").shape == (0, 0)  # raised on max() of no lengths


def test_a_filtered_batch_keeps_token_tensors_as_wide_as_its_own_longest_response():
    """Online filtering with the rollout's log-probs as the old ones: a dropped group's 10-token response left the
    kept batch's old log-probs 10 wide while the reference log-probs were 6 wide, and the KL raised."""
    from pebr.algorithms.advantages import group_ids_from_uids
    from pebr.algorithms.filtering import groups_within
    from pebr.config import AlgorithmConfig
    from pebr.trainer.ray_trainer import batch_advantages

    def generated(tag, lengths, accuracy):  # as the workers return it: padded to this try's longest response
        width = max(lengths)
        return Batch(prompt_ids=[[1, 2]] * 4, response_ids=[[5] * n for n in lengths], images=[[]] * 4,
                     non_tensors={"uid": [f"{tag}-{i // 2}" for i in range(4)]},
                     tensors={"rollout_logprobs": torch.tensor([[-0.5] * n + [0.0] * (width - n) for n in lengths]),
                              "scores": torch.tensor(accuracy)})

    kept = []
    for tag, lengths, accuracy in (("t1", [10, 4, 3, 5], [0., 0., 1., 0.]), ("t2", [6, 2, 3, 3], [1., 0., 1., 1.])):
        b = generated(tag, lengths, accuracy)  # each try keeps its one mixed group
        kept.append(b.select(torch.nonzero(groups_within(b.tensors["scores"], group_ids_from_uids(
            b.non_tensors["uid"]), 0.01, 0.99)).flatten().tolist()))
    batch = Batch.concat(kept)
    assert batch.response_lengths.tolist() == [3, 5, 6, 2]
    assert batch.tensors["rollout_logprobs"].shape == (4, 6)
    assert batch.select([0, 3]).tensors["rollout_logprobs"].tolist() == [[-0.5] * 3, [-0.5] * 2 + [0.0]]
    batch.tensors["old_logprobs"] = batch.tensors.pop("rollout_logprobs")
    batch.tensors["ref_logprobs"] = batch.tensors["old_logprobs"] - 0.25 * batch.response_mask()
    batch_advantages(batch, AlgorithmConfig(use_kl_loss=False, kl_coef=0.1, old_logprobs="rollout",
                                            online_filtering=True))
    advantages = batch.tensors["advantages"]
    assert advantages.shape == (4, 6) and torch.all(advantages[batch.response_mask() == 0] == 0)
    assert torch.all(advantages[:, 0] != 0)  # each group has a right and a wrong answer
