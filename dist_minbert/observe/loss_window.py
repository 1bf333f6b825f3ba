"""Per-task losses and throughput between two log writes, averaged over ranks when drained."""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist


class LossWindow:
    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.samples, self.seconds = 0, 0.0

    def add(self, losses: dict[str, float], samples: int, seconds: float) -> None:
        """One step: its per-task losses on this rank, its global samples and its seconds (data wait included)."""
        for task, loss in losses.items():
            self.sums[task] += loss
            self.counts[task] += 1
        self.samples += samples
        self.seconds += seconds

    def drain(self) -> dict[str, float]:
        """`loss/<task>` (mean over steps and ranks) and `throughput/samples_per_s`; empties the window.

        Collective: one small all-reduce (ranks see disjoint samples, so their mean is the step's loss)."""
        tasks = sorted(self.sums)
        values = torch.tensor([self.sums[t] / self.counts[t] for t in tasks], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values)
            values /= dist.get_world_size()
        out = {f"loss/{t}": float(v) for t, v in zip(tasks, values)}
        out["throughput/samples_per_s"] = self.samples / self.seconds if self.seconds else 0.0
        self.__init__()
        return out
