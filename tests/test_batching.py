"""Packing, padding masks, token-budget batching and deterministic batch order."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqebm.data.batching import (
    BatchSchedule, ListSource, PackedLMSource, lm_batch, pack_lm, sequence_batch, token_budget_batches,
)


def test_pack_lm_layout():
    rows, lengths = pack_lm([[4, 5], [6, 7, 8]], 3, bos_id=1, eos_id=2)
    # stream: 4 5 2 6 7 8 2 -> rows of 3 after BOS
    assert rows.tolist() == [[1, 4, 5, 2], [1, 6, 7, 8], [1, 2, 0, 0]]
    assert lengths.tolist() == [3, 3, 1]
    b = lm_batch(rows, lengths)
    assert b.inputs.tolist()[2] == [1, 2, 0] and b.targets.tolist()[2] == [2, 0, 0]
    assert b.mask.tolist()[2] == [True, False, False] and b.num_tokens == 7
    with pytest.raises(ValueError, match="empty list of documents"):
        pack_lm([], 3, bos_id=1, eos_id=2)


def test_sequence_batch_shifts_and_masks():
    b = sequence_batch([[4, 5, 6], [7]], bos_id=1, eos_id=2, sources=[[9, 9], [8]])
    assert b.inputs.tolist() == [[1, 4, 5, 6], [1, 7, 0, 0]]
    assert b.targets.tolist() == [[4, 5, 6, 2], [7, 2, 0, 0]]
    assert b.mask.sum(1).tolist() == [4, 2]
    assert b.source.tolist() == [[9, 9], [8, 0]] and b.source_mask.tolist() == [[True, True], [True, False]]
    with pytest.raises(ValueError, match="source 1 is empty"):
        sequence_batch([[4], [5]], bos_id=1, eos_id=2, sources=[[3], []])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=200), st.integers(50, 400), st.sampled_from([1, 2, 4]))
def test_token_budget_batches_cover_everything_within_budget(lengths, max_tokens, multiple_of):
    batches = token_budget_batches(lengths, max_tokens, multiple_of=multiple_of)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= max_tokens


def test_token_budget_rejects_oversized_example():
    with pytest.raises(ValueError, match="example 1 has 30 tokens, more than max_tokens=20"):
        token_budget_batches([5, 30], 20)


def test_sources_are_deterministic_per_epoch_and_shuffle_between_epochs():
    rows, lengths = pack_lm([list(range(4, 19))] * 20, 4, bos_id=1, eos_id=2)  # 80 rows, 20 batches
    a = PackedLMSource(rows, lengths, 4, seed=7)
    b = PackedLMSource(rows, lengths, 4, seed=7)
    assert torch.equal(a.batch(3, 2).inputs, b.batch(3, 2).inputs)
    epoch0 = torch.cat([a.batch(0, i).inputs for i in range(a.num_batches())])
    epoch1 = torch.cat([a.batch(1, i).inputs for i in range(a.num_batches())])
    assert not torch.equal(epoch0, epoch1)
    assert sorted(map(tuple, epoch0.tolist())) == sorted(map(tuple, epoch1.tolist()))
    with pytest.raises(ValueError, match="fewer than one batch"):
        PackedLMSource(rows[:2], lengths[:2], 4)
    s = ListSource([sequence_batch([[i + 4]], bos_id=1, eos_id=2) for i in range(5)], seed=1)
    assert sorted(int(s.batch(0, i).inputs[0, 1]) for i in range(5)) == [4, 5, 6, 7, 8]
    assert BatchSchedule(5, seed=1).order(2) == BatchSchedule(5, seed=1).order(2)


def test_shard_splits_rows_contiguously():
    b = sequence_batch([[4], [5], [6], [7]], bos_id=1, eos_id=2)
    assert b.shard(1, 2).inputs[:, 1].tolist() == [6, 7]
    with pytest.raises(ValueError, match="cannot be split evenly over 3 ranks"):
        b.shard(0, 3)
