"""Where this process sits in the process group: what every distributed part of the engine is handed."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def current(cls, use_gpu: bool) -> DistContext:
        """The initialised process group's rank and size (0 of 1 without one); this rank's device."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
        return cls(rank, world, device)

    @classmethod
    def single(cls) -> DistContext:
        """One CPU process, no group: `evaluate` and `predict`."""
        return cls(0, 1, torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()
