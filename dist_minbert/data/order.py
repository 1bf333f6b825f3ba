"""The global sample order of one epoch of one task: a pure function of (seed, epoch, num_rows).

Block-wise: the rows are cut into contiguous blocks of `block_rows`; an epoch visits the
blocks in a permuted order and the rows of each block in a permuted order, each
permutation drawn from a generator seeded by (seed, epoch[, block]). Memory is one int
per block plus the few inner permutations in use — never a corpus-sized index — and
consecutive positions stay inside one block, so a shard reader touches one region at a
time. The order never depends on the world size: ranks only choose which positions to
read (stream.py).

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
    ):
        """`block_lengths(b)` gives the token counts of block b's rows; needed when group_rows > 0."""
        if group_rows and block_lengths is None:
            raise ValueError("group_rows: length grouping needs the rows' lengths; allowed: 0 without block_lengths")
        if num_rows < 1:
            raise ValueError(f"num_rows: {num_rows}; allowed: >= 1 (an epoch of an empty table has no order)")
        if block_rows < 1:
            raise ValueError(f"block_rows: {block_rows}; allowed: >= 1")
        self.seed, self.epoch, self.num_rows, self.block_rows = seed, epoch, num_rows, block_rows
        self._block_lengths, self._group_rows = block_lengths, group_rows
        num_blocks = -(-num_rows // block_rows)
        gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, _BLOCK_ORDER_TAG])))
        self._block_at = gen.permutation(num_blocks)  # block visited at order slot k
        sizes = np.minimum(block_rows, num_rows - self._block_at * block_rows)
        self._slot_start = np.concatenate([[0], np.cumsum(sizes)])  # first position of order slot k
        self._inner: OrderedDict[int, np.ndarray] = OrderedDict()

    def position_to_row(self, positions: np.ndarray | list[int]) -> np.ndarray:
        """Row indices (int64) at the given positions of this epoch."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.num_rows):
            raise IndexError(f"positions outside 0 .. {self.num_rows - 1} of epoch {self.epoch}")
        slots = np.searchsorted(self._slot_start, positions, side="right") - 1
        rows = np.empty_like(positions)
        for slot in np.unique(slots):
            here = slots == slot
            block = int(self._block_at[slot])
            offsets = positions[here] - self._slot_start[slot]
            rows[here] = block * self.block_rows + self._rows_of(block)[offsets]
        return rows

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
                direction = gen.choice([-1, 1], size=int(window[-1]) + 1)
                lengths = self._block_lengths(block)[perm]
                perm = perm[np.lexsort((lengths * direction[window], window))]
            self._inner[block] = perm
            if len(self._inner) > _CACHED_BLOCKS:
                self._inner.popitem(last=False)
        else:
            self._inner.move_to_end(block)
        return perm
