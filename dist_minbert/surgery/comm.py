"""Collectives that count their cost, so benchmarks compare plans in one unit whatever the backend.

The unit is one ideal ring all-reduce of P elements (the shared parameters): a ring all-reduce
of n elements moves 2(N−1)/N·n per rank, a reduce-scatter (n = its input) or an all-gather
(n = its output) half that, so all_reduce(kP) = k, reduce_scatter(kP) = k/2, all_gather(P) = 1/2.
A broadcast or reduce of n (pipelined) moves as much as an all-gather of n: 1/2 per P.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch import Tensor

Collective = Literal["all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all", "barrier"]
UNITS_PER_PARAMETER_COUNT: dict[str, float] = {"all_reduce": 1.0, "reduce_scatter": 0.5, "all_gather": 0.5,
                                               "broadcast": 0.5, "reduce": 0.5, "all_to_all": 0.5, "barrier": 0.0}


def _numel(tensors: Tensor | list[Tensor] | None) -> int:
    if tensors is None:
        return 0
    return tensors.numel() if isinstance(tensors, Tensor) else sum(t.numel() for t in tensors)


# torch.distributed function → (collective, how many elements of its arguments count). Names absent from the
# running torch are skipped; the flat-tensor collectives were renamed in torch 2.13 (the old names call the new).
_COUNTED: dict[str, tuple[Collective, Callable[..., int]]] = {
    "all_reduce": ("all_reduce", lambda tensor, *a, **k: _numel(tensor)),
    "all_reduce_coalesced": ("all_reduce", lambda tensors, *a, **k: _numel(tensors)),
    "reduce_scatter": ("reduce_scatter", lambda output, input_list, *a, **k: _numel(input_list)),
    "reduce_scatter_tensor": ("reduce_scatter", lambda output, input, *a, **k: _numel(input)),
    "reduce_scatter_single": ("reduce_scatter", lambda output, input, *a, **k: _numel(input)),
    "_reduce_scatter_base": ("reduce_scatter", lambda output, input, *a, **k: _numel(input)),
    "all_gather": ("all_gather", lambda tensor_list, tensor, *a, **k: _numel(tensor_list)),
    "all_gather_into_tensor": ("all_gather", lambda output_tensor, input_tensor, *a, **k: _numel(output_tensor)),
    "all_gather_single": ("all_gather", lambda output_tensor, input_tensor, *a, **k: _numel(output_tensor)),
    "_all_gather_base": ("all_gather", lambda output_tensor, input_tensor, *a, **k: _numel(output_tensor)),
    "all_gather_coalesced": ("all_gather", lambda output_tensor_lists, *a, **k:
                             sum(_numel(lst) for lst in output_tensor_lists)),
    "broadcast": ("broadcast", lambda tensor, *a, **k: _numel(tensor)),
    "reduce": ("reduce", lambda tensor, *a, **k: _numel(tensor)),
    "all_to_all_single": ("all_to_all", lambda output, input, *a, **k: _numel(input)),
    "all_to_all": ("all_to_all", lambda output_tensor_list, input_tensor_list, *a, **k: _numel(input_tensor_list)),
    "barrier": ("barrier", lambda *a, **k: 0),
}


class Pending:
    """An asynchronous collective in flight; wait() adds the time it blocks to the counter's seconds."""

    def __init__(self, work, counter: CommCounter, tensor: Tensor) -> None:
        self._work, self._counter, self._tensor = work, counter, tensor

    def wait(self) -> None:
        if self._work is None:
            return
        with self._counter.timed():
            start = time.perf_counter()
            self._work.wait()
            self._counter.seconds += self._counter._elapsed(start, self._tensor)
        self._work = None


@dataclass
class CommCounter:
    num_params: int  # P: one ideal ring all-reduce of P elements is one unit
    group: dist.ProcessGroup | None = None  # process group of the collectives; None = the default group
    sync_cuda: bool = False  # wait for CUDA collectives so `seconds` is device time (a sync point: benchmarks only)
    units: float = 0.0  # communication so far, in units
    seconds: float = 0.0  # wall time spent blocked in collectives so far (issue + wait)
    num_calls: int = 0  # collectives so far
    # Wraps every blocking call (a collective's issue, an asynchronous one's wait): the train loop passes its
    # `communication` phase (observe.timers), so collectives inside surgery or a backward are timed as such.
    timed: Callable[[], AbstractContextManager] = contextlib.nullcontext

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def record(self, collective: Collective, numel: int, seconds: float = 0.0) -> None:
        """Counts a collective issued elsewhere (e.g. by DeepSpeed), so totals include it."""
        self.units += UNITS_PER_PARAMETER_COUNT[collective] * numel / self.num_params
        self.seconds += seconds
        self.num_calls += 1

    def all_reduce(self, tensor: Tensor, async_op: bool = False) -> Pending | None:
        """In-place sum over ranks."""
        work = self._issue("all_reduce", tensor.numel(), tensor,
                           lambda: dist.all_reduce(tensor, group=self.group, async_op=async_op))
        return Pending(work, self, tensor) if async_op else None

    def reduce_scatter(self, output: Tensor, input: Tensor, async_op: bool = False) -> Pending | None:
        """output = this rank's 1/N slice of the sum over ranks of input."""
        work = self._issue("reduce_scatter", input.numel(), input,
                           lambda: _reduce_scatter()(output, input, group=self.group, async_op=async_op))
        return Pending(work, self, output) if async_op else None

    def all_gather(self, output: Tensor, input: Tensor, async_op: bool = False) -> Pending | None:
        """output = the concatenation of every rank's input, in rank order."""
        work = self._issue("all_gather", output.numel(), output,
                           lambda: _all_gather()(output, input, group=self.group, async_op=async_op))
        return Pending(work, self, output) if async_op else None

    def _issue(self, collective: Collective, numel: int, tensor: Tensor, call: Callable[[], object]):
        """Runs `call` (the collective), counted and timed; returns its work handle (None unless asynchronous)."""
        with self.timed():
            start = time.perf_counter()
            work = call()
            self.record(collective, numel, self._elapsed(start, tensor))
        return work

    def _elapsed(self, start: float, tensor: Tensor) -> float:
        if self.sync_cuda and tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)
        return time.perf_counter() - start


def _reduce_scatter() -> Callable:
    """Looked up at each call, so record_collectives sees it; torch 2.13 renamed it, the project allows ≥ 2.4."""
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather() -> Callable:
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _TimedWork:
    """The handle of an asynchronous collective issued under record_collectives: wait() counts its blocking time."""

    def __init__(self, work, counter: CommCounter) -> None:
        self._work, self._counter = work, counter

    def wait(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._counter.seconds += time.perf_counter() - start

    def __getattr__(self, name: str):
        return getattr(self._work, name)


@contextlib.contextmanager
def record_collectives(counter: CommCounter) -> Iterator[CommCounter]:
    """Counts every collective any code in this process issues (DeepSpeed's own included) into `counter`.

    Wraps the torch.distributed functions in both namespaces (DeepSpeed calls some through
    distributed_c10d); a collective implemented by another (reduce_scatter_tensor → reduce_scatter_single,
    all_gather_object → all_gather) is counted once, at the outermost call. A benchmark tool: it patches
    module attributes for the duration of the block, so use it in one thread.
    """
    depth = threading.local()
    saved: list[tuple[object, str, Callable]] = []

    def wrap(original: Callable, collective: Collective, count: Callable[..., int]) -> Callable:
        @functools.wraps(original)
        def counted(*args, **kwargs):
            if getattr(depth, "value", 0):
                return original(*args, **kwargs)
            depth.value = 1
            start = time.perf_counter()
            try:
                work = original(*args, **kwargs)
            finally:
                depth.value = 0
            counter.record(collective, count(*args, **kwargs), time.perf_counter() - start)
            return work if work is None else _TimedWork(work, counter)  # only asynchronous calls return a handle

        return counted

    for name, (collective, count) in _COUNTED.items():
        original = getattr(c10d, name, None) or getattr(dist, name, None)
        if original is None:
            continue
        counted = wrap(original, collective, count)
        for module in (dist, c10d):
            if getattr(module, name, None) is original:
                saved.append((module, name, original))
                setattr(module, name, counted)
    try:
        yield counter
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
