"""Collectives that count their cost, so benchmarks compare plans in one unit whatever the backend.

The unit is one ideal ring all-reduce of P elements (the shared parameters): a ring all-reduce
of n elements moves 2(N−1)/N·n per rank, a reduce-scatter (n = its input) or an all-gather
(n = its output) half that, so all_reduce(kP) = k, reduce_scatter(kP) = k/2, all_gather(P) = 1/2.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

Collective = Literal["all_reduce", "reduce_scatter", "all_gather"]
UNITS_PER_PARAMETER_COUNT: dict[str, float] = {"all_reduce": 1.0, "reduce_scatter": 0.5, "all_gather": 0.5}

# torch 2.13 renamed the flat-tensor collectives; the project allows torch >= 2.4.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class CommCounter:
    num_params: int  # P: one ideal ring all-reduce of P elements is one unit
    group: dist.ProcessGroup | None = None  # process group of the collectives; None = the default group
    sync_cuda: bool = False  # wait for CUDA collectives so `seconds` is device time (a sync point: benchmarks only)
    units: float = 0.0  # communication so far, in units
    seconds: float = 0.0  # wall time spent in collectives so far
    num_calls: int = 0  # collectives so far

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def record(self, collective: Collective, numel: int, seconds: float = 0.0) -> None:
        """Counts a collective issued elsewhere (e.g. by DeepSpeed), so totals include it."""
        self.units += UNITS_PER_PARAMETER_COUNT[collective] * numel / self.num_params
        self.seconds += seconds
        self.num_calls += 1

    def all_reduce(self, tensor: Tensor) -> None:
        """In-place sum over ranks."""
        start = time.perf_counter()
        dist.all_reduce(tensor, group=self.group)
        self.record("all_reduce", tensor.numel(), self._elapsed(start, tensor))

    def reduce_scatter(self, output: Tensor, input: Tensor) -> None:
        """output = this rank's 1/N slice of the sum over ranks of input."""
        start = time.perf_counter()
        _reduce_scatter(output, input, group=self.group)
        self.record("reduce_scatter", input.numel(), self._elapsed(start, input))

    def all_gather(self, output: Tensor, input: Tensor) -> None:
        """output = the concatenation of every rank's input, in rank order."""
        start = time.perf_counter()
        _all_gather(output, input, group=self.group)
        self.record("all_gather", output.numel(), self._elapsed(start, output))

    def _elapsed(self, start: float, tensor: Tensor) -> float:
        if self.sync_cuda and tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)
        return time.perf_counter() - start
