"""Wall-clock split of a step (data / forward+backward / surgery / optimizer), summed between log writes."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator


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
