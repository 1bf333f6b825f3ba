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

    def hparams(self, params: Mapping[str, float | int | str | bool], metrics: Mapping[str, float]) -> None:
        if self._writer is not None:
            self._writer.add_hparams(dict(params), dict(metrics), run_name="hparams")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
