"""The pure pieces of a training step: noise rewards, mini-batches, shares per rank, normalizers."""

import pytest
import torch

from services.trainer.batch import flip_negatives, mini_batches, normalizer, shard


def test_noise_flips_only_valid_negatives_at_about_the_asked_rate():
    rewards = torch.tensor([[1.0, 0.0] * 5000], dtype=torch.float64)
    valid = torch.ones_like(rewards, dtype=torch.bool)
    valid[0, :100] = False
    flipped_rewards, flipped = flip_negatives(rewards, valid, 0.3, torch.Generator().manual_seed(0))
    assert not flipped[0, :100].any() and not flipped[rewards > 0].any()  # failed gradings and positives stay
    negatives = (rewards == 0) & valid
    assert abs(float(flipped[negatives].double().mean()) - 0.3) < 0.03
    assert torch.equal(flipped_rewards, torch.where(flipped, 1.0, rewards))
    again, _ = flip_negatives(rewards, valid, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(again, flipped_rewards)  # the same draws on every rank
    assert not flip_negatives(rewards, valid, 0.0, torch.Generator())[1].any()
    with pytest.raises(ValueError, match="fraction"):
        flip_negatives(rewards, valid, 1.5, torch.Generator())


def test_mini_batches_cover_every_group_once_in_order():
    assert mini_batches(10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert mini_batches(4, 4) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError):
        mini_batches(4, 0)


def test_shards_of_a_mini_batch_partition_it():
    index = list(range(8, 16))
    parts = [shard(index, rank, 4) for rank in range(4)]
    assert sorted(g for part in parts for g in part) == index and all(len(p) == 2 for p in parts)


def test_normalizers_count_tokens_or_responses_of_real_answers():
    valid = torch.tensor([[True, True, False], [True, True, True]])
    lengths = torch.tensor([[3, 0, 5], [2, 2, 1]])
    assert normalizer(valid, lengths, "token") == 3 + 2 + 2 + 1  # the masked 5 and the empty answer count nothing
    assert normalizer(valid, lengths, "sequence") == 4
    assert normalizer(valid & False, lengths, "token") == 1  # never a division by zero
    with pytest.raises(ValueError, match="aggregation"):
        normalizer(valid, lengths, "prompt")
