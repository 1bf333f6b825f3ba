"""EpochOrder: a permutation per epoch, deterministic, block-local, world-size free."""

from __future__ import annotations

import numpy as np
import pytest

from dist_minbert.data.order import EpochOrder


@pytest.mark.parametrize("num_rows,block_rows", [(1, 4), (10, 3), (100, 100), (1000, 7), (5000, 4096), (37, 1)])
def test_each_epoch_is_a_permutation_that_changes_with_epoch_and_seed(num_rows, block_rows):
    every = np.arange(num_rows)
    rows = EpochOrder(3, 0, num_rows, block_rows).position_to_row(every)
    assert sorted(rows.tolist()) == every.tolist()
    again = EpochOrder(3, 0, num_rows, block_rows).position_to_row(every)
    assert np.array_equal(rows, again)
    if num_rows >= 10:
        assert not np.array_equal(rows, EpochOrder(3, 1, num_rows, block_rows).position_to_row(every))
        assert not np.array_equal(rows, EpochOrder(4, 0, num_rows, block_rows).position_to_row(every))


def test_positions_in_any_grouping_give_the_same_rows():
    order = EpochOrder(0, 2, 1003, 64)
    full = order.position_to_row(np.arange(1003))
    rng = np.random.default_rng(0)
    scattered = rng.permutation(1003)
    assert np.array_equal(EpochOrder(0, 2, 1003, 64).position_to_row(scattered), full[scattered])
    # piecewise, as ranks read it: every 3rd position from offset 1
    assert np.array_equal(order.position_to_row(np.arange(1, 1003, 3)), full[1::3])


@pytest.mark.parametrize("num_rows", [13, 1013, 1037])
def test_interleaved_order_with_a_short_last_block_is_a_permutation(num_rows):
    rows = EpochOrder(7, 0, num_rows, 50, window_blocks=4).position_to_row(np.arange(num_rows))
    assert sorted(rows.tolist()) == list(range(num_rows))


def test_a_window_of_positions_reads_only_its_blocks():
    block_rows, window = 50, 4
    rows = EpochOrder(7, 0, 1000, block_rows, window_blocks=window).position_to_row(np.arange(1000))
    blocks = rows // block_rows
    # Consecutive windows of 4 blocks (200 positions): each touches exactly 4 blocks, none of another window's.
    seen = [set(blocks[start: start + window * block_rows].tolist()) for start in range(0, 1000, window * block_rows)]
    assert all(len(s) == window for s in seen)
    assert len(set().union(*seen)) == sum(len(s) for s in seen)


def test_interleaving_mixes_a_file_sorted_by_label():
    # 4 blocks of 64 rows, each block one label (a sorted file, as CS224N's SST train is): every batch of 8
    # consecutive positions holds two rows of each label, not 8 of one.
    labels = np.repeat(np.arange(4), 64)
    rows = EpochOrder(3, 1, 256, 64, window_blocks=4).position_to_row(np.arange(256))
    for start in range(0, 256, 8):
        assert np.bincount(labels[rows[start: start + 8]], minlength=4).tolist() == [2, 2, 2, 2]


def test_out_of_range_positions_and_bad_sizes():
    order = EpochOrder(0, 0, 10, 4)
    with pytest.raises(IndexError, match="epoch 0"):
        order.position_to_row([10])
    with pytest.raises(ValueError, match="num_rows"):
        EpochOrder(0, 0, 0)
    with pytest.raises(ValueError, match="block_rows"):
        EpochOrder(0, 0, 5, 0)
