"""The global sample order of one epoch of one task: a pure function of (seed, epoch, num_rows).

Block-wise: the rows are cut into contiguous blocks of `block_rows`; an epoch visits the
blocks in a permuted order, `window_blocks` at a time, and the rows of each block in a
permuted order, each permutation drawn from a generator seeded by (seed, epoch[, block]).
Inside a window the blocks are interleaved (position q takes offset q // k of block q % k),
so every batch mixes rows from k distant regions of the file: files sorted by label (the
CS224N SST file is) would otherwise give batches of one label and a model that learns only
the block's marginal. Memory is one int per block plus the inner permutations of one
window — never a corpus-sized index — and a shard reader holds one window of blocks at a
time. The order never depends on the world size: ranks only choose which positions to read
(stream.py).

Optional length grouping sorts each window of `group_rows` consecutive positions of a
block by token count (ascending or descending, a seeded coin per window), so batches
drawn from a window pad to similar lengths; it depends on the data, never on the ranks.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import numpy as np

_BLOCK_ORDER_TAG = 0
_ROW_ORDER_TAG = 1
_GROUP_TAG = 3
_CACHED_BLOCKS = 4


class EpochOrder:
    """Maps positions 0 .. num_rows - 1 of an epoch to row indices (a permutation of the rows)."""

    def __init__(
        self,
        seed: int,
        epoch: int,
        num_rows: int,
        block_rows: int = 4096,
        block_lengths: Callable[[int], np.ndarray] | None = None,
        group_rows: int = 0,
        window_blocks: int = 8,
    ):
        """`block_lengths(b)` gives the token counts of block b's rows; needed when group_rows > 0."""
        if group_rows and block_lengths is None:
            raise ValueError("group_rows: length grouping needs the rows' lengths; allowed: 0 without block_lengths")
        if num_rows < 1:
            raise ValueError(f"num_rows: {num_rows}; allowed: >= 1 (an epoch of an empty table has no order)")
        if block_rows < 1:
            raise ValueError(f"block_rows: {block_rows}; allowed: >= 1")
        if window_blocks < 1:
            raise ValueError(f"window_blocks: {window_blocks}; allowed: >= 1")
        self.seed, self.epoch, self.num_rows, self.block_rows = seed, epoch, num_rows, block_rows
        self._block_lengths, self._group_rows = block_lengths, group_rows
        num_blocks = -(-num_rows // block_rows)
        gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, _BLOCK_ORDER_TAG])))
        self._block_at = gen.permutation(num_blocks)  # block visited at order slot k
        self._sizes = np.minimum(block_rows, num_rows - self._block_at * block_rows)  # rows of the block at slot k
        self._window_blocks = window_blocks
        window_rows = np.add.reduceat(self._sizes, np.arange(0, num_blocks, window_blocks))
        self._window_start = np.concatenate([[0], np.cumsum(window_rows)])  # first position of window w
        self._inner: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_blocks = max(_CACHED_BLOCKS, window_blocks)

    def position_to_row(self, positions: np.ndarray | list[int]) -> np.ndarray:
        """Row indices (int64) at the given positions of this epoch."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.num_rows):
            raise IndexError(f"positions outside 0 .. {self.num_rows - 1} of epoch {self.epoch}")
        slots, offsets = self._slot_and_offset(positions)
        rows = np.empty_like(positions)
        for slot in np.unique(slots):
            here = slots == slot
            block = int(self._block_at[slot])
            rows[here] = block * self.block_rows + self._rows_of(block)[offsets[here]]
        return rows

    def _slot_and_offset(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Interleave the k blocks of each window: offset-major, blocks in slot order, short blocks dropping out.

        Only the dataset's last block can be short, so a window holds at most two block sizes:
        the first k·m positions (m = its smallest size) cycle through all k blocks, the rest
        through the full-size ones.
        """
        windows = np.searchsorted(self._window_start, positions, side="right") - 1
        slots, offsets = np.empty_like(positions), np.empty_like(positions)
        for window in np.unique(windows):
            here = windows == window
            first = int(window) * self._window_blocks
            sizes = self._sizes[first: first + self._window_blocks]
            q = positions[here] - self._window_start[window]
            k, smallest = len(sizes), int(sizes.min())
            full = np.flatnonzero(sizes > smallest)
            in_round = q < k * smallest
            rest = q - k * smallest
            slots[here] = first + np.where(in_round, q % k, full[rest % max(len(full), 1)] if len(full) else 0)
            offsets[here] = np.where(in_round, q // k, smallest + rest // max(len(full), 1))
        return slots, offsets

    def _rows_of(self, block: int) -> np.ndarray:
        """The permuted row offsets inside `block`, cached for the few blocks being read."""
        perm = self._inner.get(block)
        if perm is None:
            size = min(self.block_rows, self.num_rows - block * self.block_rows)
            seq = np.random.SeedSequence([self.seed, self.epoch, _ROW_ORDER_TAG, block])
            gen = np.random.Generator(np.random.PCG64(seq))
            perm = gen.permutation(size)
            if self._group_rows:
                window = np.arange(size) // self._group_rows
                # One coin per window index, shared by all blocks: interleaved blocks then line up rows of
                # similar rank, so a batch of consecutive positions still pads to similar lengths.
                coins = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.epoch, _GROUP_TAG])))
                direction = coins.choice([-1, 1], size=int(window[-1]) + 1)
                lengths = self._block_lengths(block)[perm]
                perm = perm[np.lexsort((lengths * direction[window], window))]
            self._inner[block] = perm
            if len(self._inner) > self._cached_blocks:
                self._inner.popitem(last=False)
        else:
            self._inner.move_to_end(block)
        return perm
