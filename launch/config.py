"""The `workers` section of a run config: where and on how many Ray Train workers a job runs.

A leaf module (no dist_minbert import), so that the run config can hold it without the package importing the
launcher back.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorkersConfig:
    num_workers: int = 2  # Ray Train workers, one DeepSpeed rank each
    use_gpu: bool = False  # one GPU per worker, NCCL; CPU workers use gloo
    cpus_per_worker: float = 1.0  # Ray CPU resources reserved per worker
    threads_per_worker: int = 0  # torch intra-op threads per worker; 0 = cpus_per_worker (rounded down, ≥ 1)
    address: str = ""  # Ray address; "" = RAY_ADDRESS if set, else a local instance
    max_failures: int = 0  # Ray Train FailureConfig: restarts from the latest checkpoint

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers: {self.num_workers} must be ≥ 1")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker: {self.cpus_per_worker} must be > 0")
        if self.threads_per_worker < 0:
            raise ValueError(f"threads_per_worker: {self.threads_per_worker} must be ≥ 0 (0 = automatic)")
        if self.max_failures < -1:
            raise ValueError(f"max_failures: {self.max_failures}; allowed: -1 (unlimited) or ≥ 0")
