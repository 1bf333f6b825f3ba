"""Prefetch and the step reader: same steps as reading inline, off the caller's thread, bounded, errors surface, resumable."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest

from dist_minbert.data.collate import collate
from dist_minbert.data.prefetch import Prefetcher
from dist_minbert.data.source import TableSource, task_schema
from dist_minbert.data.step_reader import StepReader
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


COLLATORS = {task: (lambda rows, e=encoding: collate(rows, e, 16, cls_id=1, sep_id=2, pad_id=0))
             for task, encoding in ENCODING.items()}


def _plan(position):
    return {"sst": 8, "qqp": 16} if position[1] % 3 else {"qqp": 8}


POSITIONS = [(0, s) for s in range(40)]


def _steps(depth: int, positions=POSITIONS, streams=None, num_micro_batches=1):
    reader = StepReader(streams or _streams(), COLLATORS, _plan, num_micro_batches)
    with Prefetcher(reader, positions, depth) as steps:
        return list(steps)


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetched_steps_equal_inline_steps(depth):
    inline, ahead = _steps(0), _steps(depth)
    assert len(ahead) == len(POSITIONS)
    for a, b in zip(inline, ahead):
        assert a.position == b.position and a.ids == b.ids and a.stream_states == b.stream_states
        for task, batch in a.micro_batches[0].items():
            assert all(batch.tensors[k].equal(v) for k, v in b.micro_batches[0][task].tensors.items())


def test_micro_batches_split_the_step_in_stream_order():
    whole, split = _steps(0), _steps(0, num_micro_batches=2)
    for a, b in zip(whole, split):
        assert a.stream_states == b.stream_states
        for task, ids in a.ids[0].items():
            assert [len(m[task]) for m in b.ids] == [len(ids) // 2] * 2
            assert b.ids[0][task] + b.ids[1][task] == ids


def test_snapshot_resumes_exactly_although_streams_ran_ahead():
    streams = _streams()
    with Prefetcher(StepReader(streams, COLLATORS, _plan), POSITIONS, 4) as steps:
        consumed = [next(steps) for _ in range(10)]
        time.sleep(0.2)  # let the thread read ahead
        assert streams["qqp"].state_dict() != consumed[-1].stream_states["qqp"]
    resumed = _streams()
    for task, state in consumed[-1].stream_states.items():
        resumed[task].load_state_dict(state)
    assert [s.ids for s in _steps(2, POSITIONS[10:], resumed)] == [s.ids for s in _steps(0)[10:]]


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
