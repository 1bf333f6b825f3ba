"""One optimizer step's batches for this rank: the reader training, `bench data` and the tests share.

Streams advance when a batch is read, which with prefetch is before the trainer uses it; so each
step carries a snapshot of every stream's position taken right after its batches were read. A
checkpoint stores the snapshot of the last step trained, never the streams' live state, and a run
resumed from it repeats and skips nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from dist_minbert.data.collate import Collated
from dist_minbert.data.stream import TaskStream

Position = tuple[int, int]  # (epoch, step in epoch)


def step_positions(epoch_steps: list[int], first_step: int, total_steps: int) -> list[Position]:
    """(epoch, step in epoch) of global steps first_step … total_steps - 1, epochs of `epoch_steps` steps."""
    every = [(epoch, step) for epoch, num_steps in enumerate(epoch_steps) for step in range(num_steps)]
    return every[first_step: total_steps]


@dataclass(frozen=True)
class StepBatches:
    position: Position
    micro_batches: list[dict[str, Collated]]  # per micro-batch: task → this rank's collated batch
    ids: list[dict[str, list[str]]]  # per micro-batch: task → row ids (empty for sources without ids)
    stream_states: dict[str, dict[str, int]]  # every stream's position after this step: what a checkpoint stores


class StepReader:
    """`reader(position)` reads the step's plan (task → global batch size) from the streams, split into
    `num_micro_batches` equal micro-batches, and collates each rank-local batch."""

    def __init__(self, streams: dict[str, TaskStream], collators: dict[str, Callable[[pa.Table], Collated]],
                 plan_of: Callable[[Position], dict[str, int]], num_micro_batches: int = 1) -> None:
        self.streams, self.collators, self.plan_of = streams, collators, plan_of
        self.num_micro_batches = num_micro_batches

    def __call__(self, position: Position) -> StepBatches:
        plan = self.plan_of(position)
        micro_batches, ids = [], []
        for _ in range(self.num_micro_batches):
            batches, batch_ids = {}, {}
            for task, global_batch_size in plan.items():
                rows = self.streams[task].next_table(global_batch_size // self.num_micro_batches)
                batches[task] = self.collators[task](rows)
                batch_ids[task] = rows.column("id").to_pylist() if "id" in rows.column_names else []
            micro_batches.append(batches)
            ids.append(batch_ids)
        states = {task: stream.state_dict() for task, stream in self.streams.items()}
        return StepBatches(position, micro_batches, ids, states)
