"""What happens after an optimizer step — log? evaluate? checkpoint? — and which evaluation is the best.

Pure functions of the step's place in the run and the config, so the train loop and any other job on
the engine (SimCSE) decide alike, and a resumed run decides as the uninterrupted one would.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from dist_minbert.engine.config import CheckpointConfig, TrainConfig
from dist_minbert.observe.config import ObserveConfig
from dist_minbert.observe.metrics_logger import MetricsLogger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepActions:
    log: bool  # write the training scalars of the window that ends here
    evaluate: bool  # evaluate on dev; the checkpoint that follows may become `best`
    checkpoint: bool  # write a checkpoint (always after an evaluation)


def step_actions(global_step: int, epoch: int, step_in_epoch: int, epoch_steps: list[int], total_steps: int,
                 train: TrainConfig, checkpoint: CheckpointConfig, observe: ObserveConfig,
                 evaluate_every: int = 0) -> StepActions:
    """After optimizer step `global_step` (1-based), which was step `step_in_epoch` (0-based) of `epoch`.

    Evaluation at every epoch end (or only at the last one), at the run's last step even when max_steps
    cuts an epoch short, and every `evaluate_every` steps (0 = off); a checkpoint with every evaluation,
    at every epoch end and every checkpoint.every_steps steps.
    """
    last = global_step >= total_steps
    epoch_end = step_in_epoch == epoch_steps[epoch] - 1 or last
    evaluate = (epoch_end and (train.eval_every_epoch or epoch == train.epochs - 1 or last)
                or bool(evaluate_every) and global_step % evaluate_every == 0)
    periodic = bool(checkpoint.every_steps) and global_step % checkpoint.every_steps == 0
    return StepActions(log=global_step % observe.log_every == 0 or last, evaluate=evaluate,
                       checkpoint=evaluate or epoch_end or periodic)


@dataclass
class DevHistory:
    """The dev scores a run has seen: part of the checkpoint's client state, so a resumed run keeps choosing
    `best` as the uninterrupted run would."""

    initial: dict | None = None  # task → metric → value before training
    last: dict | None = None  # at the latest evaluation
    best: dict | None = None  # at the best evaluation so far
    best_score: float = -math.inf
    best_tag: str = ""  # the checkpoint `best` points to, a sibling of the checkpoint holding this history

    def record(self, dev: dict, score: float, tag: str) -> bool:
        """Note an evaluation whose state is saved under `tag`; True if it is the new best.

        A NaN score (constant STS predictions have no Pearson correlation) is never best: it would
        compare false with every later score and keep the best forever.
        """
        self.last = dev
        if math.isnan(score) or (self.best is not None and score <= self.best_score):
            return False
        self.best, self.best_score, self.best_tag = dev, score, tag
        return True


class SkippedSteps:
    """Steps skipped for a NaN/inf loss or gradient (every rank skips together): each is logged; this many in a
    row (train.max_nonfinite_steps) stop the run, since training has diverged rather than met one bad batch."""

    def __init__(self, limit: int, logger: MetricsLogger) -> None:
        self.limit, self.logger = limit, logger
        self.num_in_a_row = 0

    def skipped(self, step: int, cause: Exception) -> None:
        self.num_in_a_row += 1
        log.warning("step %d skipped on every rank: %s (%d in a row)", step, cause, self.num_in_a_row)
        self.logger.scalars(step, {"train/skipped_nonfinite": 1.0})
        if self.num_in_a_row >= self.limit:
            raise RuntimeError(f"{self.num_in_a_row} steps in a row had a non-finite loss or gradient "
                               f"(train.max_nonfinite_steps={self.limit}); last: {cause}")

    def trained(self) -> None:
        self.num_in_a_row = 0
