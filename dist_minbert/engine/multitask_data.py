"""The multitask job's data on one rank: each task's splits, its train stream, and the schedule over them.

The sample order of every task and the tasks of every step are pure functions of the seed and the
step's position, so every rank computes the same plan and a resumed run continues it from the
positions alone (docs/ARCHITECTURE.md, "Invariants").
"""
from __future__ import annotations

import math
import zlib

from dist_minbert.config import RunConfig
from dist_minbert.data.collate import collator
from dist_minbert.data.schedule import sampling_probabilities, steps_in_epoch, tasks_for_step
from dist_minbert.data.step_reader import Position, StepReader, step_positions
from dist_minbert.data.stream import TaskStream
from dist_minbert.engine.dist_context import DistContext
from dist_minbert.engine.task_inputs import load_task_splits
from dist_minbert.model.tokenizer import WordPieceTokenizer
from dist_minbert.tasks.config import encoding_for


def task_seed(seed: int, task: str) -> int:
    """Each task's sample order gets its own seed, stable under renaming of other tasks."""
    return (seed * 1_000_003 + zlib.crc32(task.encode())) % 2**31


class MultitaskData:
    def __init__(self, cfg: RunConfig, ctx: DistContext, output_dir: str) -> None:
        """Prepares the shards (rank 0; the others wait) and opens this rank's streams. Collective."""
        self.cfg = cfg
        self.tokenizer = WordPieceTokenizer.from_checkpoint(cfg.model.checkpoint)
        self.collators = {name: collator(self.tokenizer, encoding_for(spec), cfg.model.max_length)
                          for name, spec in cfg.tasks.items()}
        self.inputs = load_task_splits(cfg.tasks, cfg.data, self.tokenizer, cfg.model.max_length, str(output_dir),
                                       ctx.is_main, ctx.barrier)
        self.streams = {
            name: TaskStream(splits.sources["train"], task_seed(cfg.train.seed, name), ctx.world_size, ctx.rank,
                             length_group_rows=cfg.data.length_group_rows)
            for name, splits in self.inputs.items()}
        # What the schedule counts: a contrastive task's corpus up to its size_cap.
        self.sizes = {name: min(len(s.source), cfg.tasks[name].size_cap or len(s.source))
                      for name, s in self.streams.items()}
        self.batch_sizes = {name: task.batch_size for name, task in cfg.tasks.items()}
        self.epoch_steps = [steps_in_epoch(cfg.schedule, epoch, self.sizes, self.batch_sizes, cfg.train.epochs)
                            for epoch in range(cfg.train.epochs)]
        self.total_steps = min(sum(self.epoch_steps), cfg.train.max_steps or math.inf)

    def positions(self, first_step: int = 0) -> list[Position]:
        """(epoch, step in epoch) of every optimizer step from global step `first_step` on, up to max_steps."""
        return step_positions(self.epoch_steps, first_step, self.total_steps)

    def plan(self, position: Position) -> dict[str, int]:
        """The tasks the step at `position` draws, with their global batch sizes."""
        epoch, step = position
        return tasks_for_step(self.cfg.schedule, self.cfg.train.seed, epoch, step, self.sizes, self.batch_sizes,
                              self.cfg.train.epochs)

    def probabilities(self, epoch: int) -> dict[str, float]:
        return sampling_probabilities(self.cfg.schedule, epoch, self.sizes, self.cfg.train.epochs)

    def reader(self) -> StepReader:
        return StepReader(self.streams, self.collators, self.plan, self.cfg.deepspeed.gradient_accumulation_steps)
