"""Wall-clock split of the train loop's steps: data / forward+backward / surgery / communication / optimizer.

Each phase is timed once, exclusively: a phase opened inside another (a collective inside the surgery hook,
the wait for a reduce-scatter inside a backward) is taken out of the enclosing one, so the phases of a step
add up to its time without double counting. Times are this process's host wall clock: on CUDA a kernel is
counted in the phase that waits for it (a .item(), a collective), not in the one that launched it.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

# The phases of summary.json's step_time_s, in order; `step` is the whole step, data wait included.
STEP_PHASES = ("data", "forward_backward", "surgery", "communication", "optimizer", "step")


class StepTimers:
    def __init__(self) -> None:
        self._window: dict[str, float] = defaultdict(float)  # seconds per phase since the last drain
        self._run: dict[str, float] = defaultdict(float)  # seconds per phase over the run
        self._window_steps = self._run_steps = 0
        self._open: list[float] = []  # for each open phase, the seconds of the phases nested in it so far

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the block as `name`, less the time of any phase opened inside it."""
        start = time.perf_counter()
        self._open.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            nested = self._open.pop()
            if self._open:
                self._open[-1] += elapsed
            self._add(name, elapsed - nested)

    def end_step(self, seconds: float) -> None:
        """One step ended; `seconds` is its whole wall time (data wait included), kept as `step`."""
        self._add("step", seconds)
        self._window_steps += 1
        self._run_steps += 1

    def drain(self) -> dict[str, float]:
        """Mean seconds per step of each phase since the last drain, as `time/<phase>_s`: every phase of
        STEP_PHASES (0 where a job has none, SimCSE's surgery), so every run has the same tags."""
        totals, steps = self._window, max(self._window_steps, 1)
        self._window, self._window_steps = defaultdict(float), 0
        return {f"time/{name}_s": totals[name] / steps for name in (*STEP_PHASES, *totals)}

    def run_means(self) -> dict[str, float]:
        """Mean seconds per step of every phase in STEP_PHASES over the run so far (0 for one never entered)."""
        steps = max(self._run_steps, 1)
        return {name: self._run[name] / steps for name in STEP_PHASES}

    def _add(self, name: str, seconds: float) -> None:
        self._window[name] += seconds
        self._run[name] += seconds


def timed_iter(items: Iterable[T], timers: StepTimers, phase: str) -> Iterator[tuple[T, float]]:
    """Each item with the seconds spent waiting for it, also added to `phase`.

    A prefetched step is produced on another thread, so the time the train loop loses to data is the
    wait in next(), not the time of the call that produced it.
    """
    iterator = iter(items)
    while True:
        start = time.perf_counter()
        with timers.phase(phase):
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield item, time.perf_counter() - start
