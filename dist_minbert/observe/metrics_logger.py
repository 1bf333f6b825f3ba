"""Rank-0 TensorBoard writer; every other rank gets a logger that writes nothing."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping


class MetricsLogger:
    def __init__(self, log_dir: str | None) -> None:
        self._writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), step)

    def nested(self, step: int, prefix: str, values: Mapping[str, Mapping[str, float]]) -> None:
        """task → metric → value, written as `prefix/task/metric`."""
        self.scalars(step, {f"{prefix}/{task}/{name}": v for task, metrics in values.items() for name, v in metrics.items()})

    def hparams(self, step: int, params: Mapping[str, float | int | str], metrics: Mapping[str, float]) -> None:
        """The run's row in TensorBoard's HParams view: `params` and, as scalars at `step`, `metrics`.

        Written into this run's own folder. torch's add_hparams writes them into a sub-folder, which
        TensorBoard lists as a run of its own beside the run (`<run>/tensorboard/<name>`, holding copies of
        the metrics); here the session is the run itself, so `tensorboard --logdir runs/` shows one row per run
        and the metric columns read the run's own scalars.
        """
        if self._writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(dict(params), dict(metrics)):  # experiment, session start, session end
            self._writer.file_writer.add_summary(summary, step)
        self.scalars(step, metrics)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
