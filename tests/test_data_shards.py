"""Prepared task shards: round trip, standard Arrow format, verification of size and checksums."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from dist_minbert.data.config import DataConfig
from dist_minbert.data.prepare import prepare_task_shards
from dist_minbert.data.shards import MANIFEST, ShardError, open_source
from dist_minbert.data.source import TableSource, tokenize_rows
from dist_minbert.data.stream import TaskStream
from dist_minbert.model.tokenizer import WordPieceTokenizer
from dist_minbert.tasks.config import TaskConfig
from dist_minbert.tasks.readers import read_task_file
from dist_minbert.tasks.registry import BUILTIN_TASKS

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cs224n")
STS = TaskConfig(**BUILTIN_TASKS["sts"])


@pytest.fixture(scope="module")
def tokenizer() -> WordPieceTokenizer:
    return WordPieceTokenizer.from_checkpoint("embedded")


@pytest.fixture(scope="module")
def sts_dev(tmp_path_factory, tokenizer):
    """sts-dev (863 rows) in shards of 256 rows, blocks of 64."""
    out = str(tmp_path_factory.mktemp("shards") / "sts" / "dev")
    data = DataConfig(shard_rows=256, shuffle_block_rows=64, prepare_workers=1)
    manifest = prepare_task_shards(os.path.join(DATA, "sts-dev.csv"), STS, True, out, tokenizer, 32, data)
    return out, manifest


def test_shards_hold_exactly_the_tokenized_rows(sts_dev, tokenizer):
    out, manifest = sts_dev
    rows = read_task_file(os.path.join(DATA, "sts-dev.csv"), STS, True, "error")
    expected = tokenize_rows(rows, tokenizer, max_tokens=31)
    source = open_source(out)
    assert len(source) == manifest.num_rows == 863 and source.block_rows == 64
    assert [s.rows for s in manifest.shards] == [256, 256, 256, 95]
    assert source.take(np.arange(863)) == expected.to_pydict()
    # Each shard is a standard Arrow IPC stream; concatenated they are the table.
    tables = [pa.ipc.open_stream(open(os.path.join(out, s.path), "rb").read()).read_all() for s in manifest.shards]
    assert pa.concat_tables(tables).equals(expected)
    assert manifest.tokenizer_fingerprint == tokenizer.fingerprint and manifest.max_tokens == 31


def test_take_across_blocks_keeps_the_requested_order(sts_dev):
    source = open_source(sts_dev[0])
    rows = [800, 3, 64, 3, 255, 256, 862]
    every = source.take(np.arange(863))
    assert source.take(rows)["id"] == [every["id"][r] for r in rows]
    assert source.take([])["id"] == []
    assert source.row_lengths(64, 128).tolist() == [len(a) + len(b) for a, b in zip(every["a"][64:128], every["b"][64:128])]


def test_sharded_stream_reads_what_the_in_memory_stream_reads(sts_dev, tokenizer):
    out, _ = sts_dev
    table = tokenize_rows(read_task_file(os.path.join(DATA, "sts-dev.csv"), STS, True, "error"), tokenizer, 31)
    sharded = [TaskStream(open_source(out), 5, 2, r) for r in range(2)]
    memory = [TaskStream(TableSource(table, block_rows=64), 5, 2, r) for r in range(2)]
    for _ in range(30):  # 30 * 64 rows: more than two epochs
        for s, m in zip(sharded, memory):
            assert s.next_batch(64) == m.next_batch(64)


def _copy(src: str, dst) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_a_truncated_shard_fails_at_open(sts_dev, tmp_path):
    out = _copy(sts_dev[0], tmp_path / "copy")
    path = os.path.join(out, "shard-00001.arrows")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(ShardError, match=r"shard-00001\.arrows: \d+ bytes, the manifest says \d+ bytes"):
        open_source(out)
    os.remove(path)
    with pytest.raises(ShardError, match="shard-00001.arrows: missing"):
        open_source(out)


def test_a_changed_block_fails_its_checksum_when_read(sts_dev, tmp_path):
    out = _copy(sts_dev[0], tmp_path / "copy")
    manifest = json.loads(open(os.path.join(out, MANIFEST)).read())
    block = manifest["shards"][2]["blocks"][1]
    path = os.path.join(out, "shard-00002.arrows")
    data = bytearray(open(path, "rb").read())
    data[block["offset"] + block["length"] - 1] ^= 0xFF  # same size, one bit pattern changed
    open(path, "wb").write(bytes(data))
    source = open_source(out)
    source.take([0, 700])  # other blocks (0, 10) still read
    with pytest.raises(ShardError, match=r"shard-00002\.arrows: block 9 .* manifest checksum"):
        source.take([256 * 2 + 64 + 3])


def test_missing_or_foreign_manifests(sts_dev, tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest"):
        open_source(str(tmp_path / "nothing"))
    out = _copy(sts_dev[0], tmp_path / "copy")
    manifest = json.loads(open(os.path.join(out, MANIFEST)).read())
    open(os.path.join(out, MANIFEST), "w").write(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ShardError, match="format_version 99"):
        open_source(out)
    manifest["num_rows"] += 1
    manifest["format_version"] = 1
    open(os.path.join(out, MANIFEST), "w").write(json.dumps(manifest))
    with pytest.raises(ShardError, match="do not add up"):
        open_source(out)
    open(os.path.join(out, MANIFEST), "w").write("{not json")
    with pytest.raises(ShardError, match="not a shard manifest"):
        open_source(out)


def test_memory_filesystem_round_trip(tokenizer):
    data = DataConfig(shard_rows=512, shuffle_block_rows=128, prepare_workers=1)
    sst = TaskConfig(**BUILTIN_TASKS["sst"])
    manifest = prepare_task_shards(os.path.join(DATA, "ids-sst-dev.csv"), sst, True, "memory://t/sst/dev", tokenizer,
                                   64, data)
    source = open_source("memory://t/sst/dev")
    assert len(source) == manifest.num_rows == 1101
    assert sorted(source.take(np.arange(1101))["line"]) == list(range(2, 1103))
