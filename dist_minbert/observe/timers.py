"""Wall-clock split of a step (data / forward+backward / surgery / optimizer), summed between log writes."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


class StepTimers:
    def __init__(self) -> None:
        self._totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._totals[name] += time.perf_counter() - start

    def drain(self) -> dict[str, float]:
        """Seconds per phase since the last drain, as `time/<phase>_s`."""
        totals, self._totals = self._totals, defaultdict(float)
        return {f"time/{name}_s": seconds for name, seconds in totals.items()}


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
