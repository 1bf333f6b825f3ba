"""TaskStream / eval_shard: coverage across ranks, world-size independence, resume (also elastic)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from dist_minbert.data.source import TableSource, task_schema
from dist_minbert.data.stream import TaskStream, eval_shard


def _table(num_rows: int) -> pa.Table:
    """Row i holds id "r{i}", tokens [i, i+1], label i % 5 — easy to trace back."""
    return pa.table(
        {
            "id": [f"r{i}" for i in range(num_rows)],
            "a": [[i, i + 1] for i in range(num_rows)],
            "label": [float(i % 5) for i in range(num_rows)],
            "line": list(range(2, num_rows + 2)),
        },
        schema=task_schema(pair=False, labelled=True),
    )


def _streams(table: pa.Table, world_size: int, seed: int = 11, block_rows: int = 16) -> list[TaskStream]:
    return [TaskStream(TableSource(table), seed, world_size, r, block_rows=block_rows) for r in range(world_size)]


def _global_batch(streams: list[TaskStream], batch: int) -> list[str]:
    """Interleave ranks back into global position order: position c + r + N*k is rank r's k-th row."""
    per_rank = [s.next_batch(batch)["id"] for s in streams]
    return [per_rank[r][k] for k in range(batch // len(streams)) for r in range(len(streams))]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_are_disjoint_and_complete(world_size):
    num_rows, batch = 120, 12
    streams = _streams(_table(num_rows), world_size)
    epoch0 = [_global_batch(streams, batch) for _ in range(num_rows // batch)]
    seen = [i for b in epoch0 for i in b]
    assert sorted(seen) == sorted(f"r{i}" for i in range(num_rows))  # each row once
    assert all(s.state_dict()["epoch"] == 1 and s.state_dict()["consumed"] == 0 for s in streams)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_union_of_the_ranks_is_the_single_rank_sequence(world_size):
    num_rows, batch, num_steps = 126, 12, 21  # two epochs; 126 is not a multiple of 12, so a batch spans both
    single = _streams(_table(num_rows), 1)[0]
    expected = [single.next_batch(batch)["id"] for _ in range(num_steps)]
    streams = _streams(_table(num_rows), world_size)
    for step in expected:
        per_rank = [s.next_batch(batch)["id"] for s in streams]
        assert sorted(i for ids in per_rank for i in ids) == sorted(step)  # together, the ranks take the global batch
        # and in its order: position r + N*k of the global batch is rank r's k-th row.
        assert [per_rank[r][k] for k in range(batch // world_size) for r in range(world_size)] == step


def test_epochs_roll_over_with_full_batches_and_a_new_order():
    num_rows, batch = 50, 16  # 50 is not a multiple of 16: batch 4 spans epochs 0 and 1
    stream = _streams(_table(num_rows), 2)
    sequence = [i for _ in range(25) for i in _global_batch(stream, batch)]  # 400 = 8 epochs
    epochs = [sequence[e * num_rows:(e + 1) * num_rows] for e in range(8)]
    assert all(sorted(e) == sorted(f"r{i}" for i in range(num_rows)) for e in epochs)
    assert epochs[0] != epochs[1]
    assert stream[0].state_dict() == stream[1].state_dict() == {
        "version": 1, "epoch": 8, "consumed": 0, "seed": 11, "num_rows": 50}
    # A batch larger than the table spans several epochs at once.
    big = _streams(_table(5), 1)[0]
    ids = big.next_batch(12)["id"]
    assert sorted(ids[:5]) == sorted(ids[5:10]) == [f"r{i}" for i in range(5)]
    assert big.state_dict()["epoch"] == 2 and big.state_dict()["consumed"] == 2


def test_rows_carry_all_columns_of_the_same_row():
    stream = _streams(_table(40), 1)[0]
    rows = stream.next_batch(8)
    for id_, a, label, line in zip(rows["id"], rows["a"], rows["label"], rows["line"]):
        i = int(id_[1:])
        assert (a, label, line) == ([i, i + 1], float(i % 5), i + 2)


@pytest.mark.parametrize("before,after", [(2, 2), (2, 1), (1, 2), (3, 2), (2, 4), (4, 3)])
def test_resume_equals_uninterrupted_also_on_another_world_size(before, after):
    num_rows, batch, stop, total = 97, 12, 11, 30  # stop mid-epoch 1
    uninterrupted_streams = _streams(_table(num_rows), 1)
    uninterrupted = [_global_batch(uninterrupted_streams, batch) for _ in range(total)]

    first = _streams(_table(num_rows), before)
    head = [_global_batch(first, batch) for _ in range(stop)]
    state = first[0].state_dict()
    assert all(s.state_dict() == state for s in first)
    resumed = _streams(_table(num_rows), after)
    for s in resumed:
        s.load_state_dict(dict(state))
    tail = [_global_batch(resumed, batch) for _ in range(total - stop)]
    assert head + tail == uninterrupted


def test_state_checks():
    stream = _streams(_table(10), 1)[0]
    state = stream.state_dict()
    with pytest.raises(ValueError, match="version"):
        stream.load_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="seed"):
        stream.load_state_dict({**state, "seed": 12})
    with pytest.raises(ValueError, match="num_rows"):
        stream.load_state_dict({**state, "num_rows": 11})
    with pytest.raises(ValueError, match="consumed"):
        stream.load_state_dict({**state, "consumed": 10})
    with pytest.raises(ValueError, match="divisible by the world size"):
        _streams(_table(10), 3)[0].next_batch(8)
    with pytest.raises(ValueError, match="rank"):
        TaskStream(TableSource(_table(10)), 0, 2, 2)
    with pytest.raises(ValueError, match="no rows"):
        TaskStream(TableSource(_table(0)), 0, 1, 0)


@pytest.mark.parametrize("num_rows", [0, 1, 7, 1101])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_eval_shards_cover_every_row_once_in_order(num_rows, world_size):
    shards = [eval_shard(num_rows, world_size, r) for r in range(world_size)]
    assert [i for s in shards for i in s] == list(range(num_rows))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def _varied_table(num_rows: int) -> pa.Table:
    rng = np.random.default_rng(0)
    return pa.table(
        {
            "id": [f"r{i}" for i in range(num_rows)],
            "a": [[7] * int(n) for n in rng.integers(1, 60, num_rows)],
            "line": list(range(num_rows)),
        },
        schema=task_schema(pair=False, labelled=False),
    )


def test_length_grouping_cuts_padding_and_keeps_the_stream_properties():
    table, batch = _varied_table(512), 16

    def padded_tokens(group_rows, world_size=1):
        streams = [TaskStream(TableSource(table), 3, world_size, r, block_rows=128, length_group_rows=group_rows)
                   for r in range(world_size)]
        ids, padded = [], 0
        for _ in range(512 // batch):
            per_rank = [s.next_batch(batch) for s in streams]
            ids += [per_rank[r]["id"][k] for k in range(batch // world_size) for r in range(world_size)]
            lengths = [len(a) for rows in per_rank for a in rows["a"]]
            padded += max(lengths) * batch
        return ids, padded

    plain_ids, plain = padded_tokens(0)
    grouped_ids, grouped = padded_tokens(64)
    assert sorted(grouped_ids) == sorted(plain_ids) and grouped_ids != plain_ids
    assert grouped < 0.75 * plain
    assert padded_tokens(64, world_size=4)[0] == grouped_ids  # still world-size free
