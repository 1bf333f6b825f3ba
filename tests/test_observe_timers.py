"""The train loop's data time is the wait for the next step, also when a thread prefetches it."""
from __future__ import annotations

import time

from dist_minbert.data.prefetch import Prefetcher
from dist_minbert.observe.timers import StepTimers, timed_iter


def _slow(position: int) -> int:
    time.sleep(0.05)
    return position


def test_a_prefetched_stall_is_timed_as_data():
    """The producer needs 50 ms a step and the consumer nothing: each step waits ~50 ms on the prefetch
    thread. Timing the produce call instead (what ran on the train thread before) would give ~0."""
    timers = StepTimers()
    waits = []
    with Prefetcher(_slow, range(6), 2) as steps:
        for item, waited in timed_iter(steps, timers, "data"):
            waits.append(waited)
    data_s = timers.drain()["time/data_s"]
    assert len(waits) == 6 and abs(data_s - sum(waits)) < 1e-3
    assert data_s >= 6 * 0.05 * 0.8


def test_a_fast_source_costs_no_data_time():
    timers = StepTimers()
    items = [item for item, _ in timed_iter(range(5), timers, "data")]
    assert items == list(range(5)) and timers.drain()["time/data_s"] < 0.01
