"""What the run reports and how often."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ObserveConfig:
    tensorboard: bool = True  # event files under <output_dir>/tensorboard
    log_every: int = 10  # optimizer steps between scalar writes
    progress: bool = True  # a progress bar on rank 0

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ValueError(f"log_every: {self.log_every} must be ≥ 1")
