"""Prefetch: same steps as reading inline, off the caller's thread, bounded, errors surface, resumable."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest

from dist_minbert.data.collate import collate
from dist_minbert.data.prefetch import Prefetcher, read_step
from dist_minbert.data.source import TableSource, task_schema
from dist_minbert.data.stream import TaskStream


def _source(num_rows: int, pair: bool) -> TableSource:
    cols = {"id": [f"r{i}" for i in range(num_rows)], "a": [[5 + i % 7] * (1 + i % 5) for i in range(num_rows)]}
    if pair:
        cols["b"] = [[9] * (1 + i % 3) for i in range(num_rows)]
    cols["label"] = [float(i % 2) for i in range(num_rows)]
    cols["line"] = list(range(num_rows))
    return TableSource(pa.table(cols, schema=task_schema(pair, True)), block_rows=32)


def _streams(world_size=1, rank=0):
    return {"sst": TaskStream(_source(100, False), 1, world_size, rank),
            "qqp": TaskStream(_source(250, True), 2, world_size, rank)}


ENCODING = {"sst": "single", "qqp": "cross"}


def _collate(task, rows):
    return collate(rows, ENCODING[task], 16, cls_id=1, sep_id=2, pad_id=0)


PLAN = [{"sst": 8, "qqp": 16} if s % 3 else {"qqp": 8} for s in range(40)]


def _steps(depth: int, plan=PLAN, streams=None):
    streams = streams or _streams()
    with Prefetcher(lambda p: read_step(streams, p, _collate), plan, depth) as steps:
        return list(steps)


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetched_steps_equal_inline_steps(depth):
    inline, ahead = _steps(0), _steps(depth)
    assert len(ahead) == len(PLAN)
    for a, b in zip(inline, ahead):
        assert a.ids == b.ids and a.stream_states == b.stream_states
        for task in a.batches:
            assert all(a.batches[task].tensors[k].equal(v) for k, v in b.batches[task].tensors.items())


def test_snapshot_resumes_exactly_although_streams_ran_ahead():
    streams = _streams()
    with Prefetcher(lambda p: read_step(streams, p, _collate), PLAN, 4) as steps:
        consumed = [next(steps) for _ in range(10)]
        time.sleep(0.2)  # let the thread read ahead
        assert streams["qqp"].state_dict() != consumed[-1].stream_states["qqp"]
    resumed = _streams()
    for task, state in consumed[-1].stream_states.items():
        resumed[task].load_state_dict(state)
    assert [s.ids for s in _steps(2, PLAN[10:], resumed)] == [s.ids for s in _steps(0)[10:]]


def test_runs_off_the_callers_thread_and_stays_bounded():
    produced_on, produced = set(), []

    def produce(item):
        produced_on.add(threading.get_ident())
        produced.append(item)
        return item

    with Prefetcher(produce, range(100), 2) as items:
        assert next(items) == 0
        time.sleep(0.2)
        assert len(produced) <= 1 + 2 + 1  # consumed + queued + one being handed over
    assert threading.get_ident() not in produced_on


def test_errors_surface_in_order():
    def produce(item):
        if item == 3:
            raise KeyError("boom")
        return item

    with Prefetcher(produce, range(10), 2) as items:
        assert [next(items) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(KeyError, match="boom"):
            next(items)
    with pytest.raises(ValueError, match="prefetch"):
        Prefetcher(produce, [], -1)
