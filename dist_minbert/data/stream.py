"""Per-rank streams over a task's epoch orders, and the evaluation sharding.

A training stream's position is the global count of samples consumed, so it means the
same thing on any number of workers: rank r of N reads positions c + r, c + r + N, ...,
c + B - 1 of the epoch order (order.py) and every rank then advances c by the global
batch B. Batches stay full across an epoch boundary: positions past the end continue
into the next epoch's order (a different permutation), so shorter tasks cycle and no
short or dropped batch exists. Resuming sets (epoch, c) and reads on; nothing is
fast-forwarded and no shuffle buffer holds state.

Length grouping (`length_group_rows`) changes the order (order.py), not the reading, so
it keeps every property above.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dist_minbert.data.order import EpochOrder
from dist_minbert.data.source import RowSource

STATE_VERSION = 1


class TaskStream:
    """This rank's share of one task's endless, epoch-by-epoch shuffled sample sequence."""

    def __init__(
        self,
        source: RowSource,
        seed: int,
        world_size: int,
        rank: int,
        block_rows: int | None = None,
        length_group_rows: int = 0,
    ):
        """block_rows: shuffle block size, by default the source's storage block (one read per block)."""
        _check_rank(world_size, rank)
        if len(source) < 1:
            raise ValueError("source: holds no rows; allowed: a task split with at least one row")
        self.source, self.seed, self.world_size, self.rank = source, seed, world_size, rank
        self.block_rows = block_rows or source.block_rows
        self.length_group_rows = length_group_rows
        self.num_rows = len(source)
        self.epoch = 0
        self.consumed = 0  # global samples of `epoch` consumed by all ranks together
        self._orders: dict[int, EpochOrder] = {}

    def next_batch(self, global_batch_size: int) -> dict[str, list]:
        """This rank's global_batch_size / world_size rows of the next global batch."""
        return self.next_table(global_batch_size).to_pydict()

    def next_table(self, global_batch_size: int) -> pa.Table:
        """next_batch() as Arrow: what collate() reads fastest."""
        rows = self._rows_of(self.next_positions(global_batch_size))
        self.consumed += global_batch_size
        self.epoch += self.consumed // self.num_rows
        self.consumed %= self.num_rows
        return self.source.take_table(rows)

    def next_positions(self, global_batch_size: int) -> np.ndarray:
        """Positions, counted from the start of the current epoch, that this rank reads next."""
        if global_batch_size < 1 or global_batch_size % self.world_size:
            raise ValueError(
                f"batch_size: {global_batch_size} is not a positive multiple of the {self.world_size} workers; "
                f"allowed: a global batch size divisible by the world size"
            )
        return np.arange(self.consumed + self.rank, self.consumed + global_batch_size, self.world_size)

    def _rows_of(self, positions: np.ndarray) -> np.ndarray:
        epochs = self.epoch + positions // self.num_rows
        in_epoch = positions % self.num_rows
        rows = np.empty_like(positions)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            rows[here] = self._order(int(epoch)).position_to_row(in_epoch[here])
        return rows

    def _order(self, epoch: int) -> EpochOrder:
        order = self._orders.get(epoch)
        if order is None:
            order = EpochOrder(self.seed, epoch, self.num_rows, self.block_rows, self._block_lengths,
                               self.length_group_rows)
            self._orders = {e: o for e, o in self._orders.items() if e >= self.epoch}
            self._orders[epoch] = order
        return order

    def _block_lengths(self, block: int) -> np.ndarray:
        start = block * self.block_rows
        return self.source.row_lengths(start, min(start + self.block_rows, self.num_rows))

    def state_dict(self) -> dict[str, int]:
        """The whole position: identical on every rank, valid for any world size."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "num_rows": self.num_rows,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"version: stream state version {state.get('version')!r} cannot be read; allowed: {STATE_VERSION}"
            )
        for key in ("seed", "num_rows"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"{key}: the saved stream has {key}={state[key]} but this one has {getattr(self, key)}; "
                    f"allowed: resuming the same data with the same seed"
                )
        if not 0 <= state["consumed"] < self.num_rows or state["epoch"] < 0:
            raise ValueError(
                f"consumed: {state['consumed']} (epoch {state['epoch']}) is not a position of a {self.num_rows}-row "
                f"epoch; allowed: 0 <= consumed < num_rows, epoch >= 0"
            )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._orders = {}


def samples_seen(state: dict[str, int]) -> int:
    """Global samples a stream has handed out since its first epoch began, from its state alone."""
    return state["epoch"] * state["num_rows"] + state["consumed"]


def eval_shard(num_rows: int, world_size: int, rank: int) -> range:
    """The contiguous rows rank evaluates; concatenating the ranges of ranks 0..N-1 gives 0..num_rows-1 once.

    Contiguous (not strided) so that rank 0 reassembles predictions in file order by concatenation
    and each rank reads one region of the shards; sizes differ by at most one row.
    """
    _check_rank(world_size, rank)
    return range(rank * num_rows // world_size, (rank + 1) * num_rows // world_size)


def _check_rank(world_size: int, rank: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size: {world_size}; allowed: >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: {rank} is outside the {world_size} workers; allowed: 0 <= rank < world_size")
