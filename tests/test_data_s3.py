"""Shards on S3: prepare from and to an S3-compatible server (moto_server on loopback, conftest's `s3`), then stream."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pytest

from dist_minbert.data.config import DataConfig
from dist_minbert.data.prepare import prepare_corpus, prepare_task_shards
from dist_minbert.data.shards import ShardError, open_source
from dist_minbert.data.stream import TaskStream
from dist_minbert.model.tokenizer import WordPieceTokenizer
from dist_minbert.tasks.config import TaskConfig
from dist_minbert.tasks.registry import BUILTIN_TASKS

s3fs = pytest.importorskip("s3fs")
DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cs224n")


@pytest.fixture(scope="module")
def tokenizer() -> WordPieceTokenizer:
    return WordPieceTokenizer.from_checkpoint("embedded")


def _data() -> DataConfig:
    return DataConfig(shard_rows=512, shuffle_block_rows=128, prepare_workers=1)


def test_task_file_on_s3_round_trip(s3, tokenizer, tmp_path):
    src = os.path.join(DATA, "sts-dev.csv")
    s3.put(src, "dist-minbert-test/raw/sts-dev.csv")
    sts = TaskConfig(**BUILTIN_TASKS["sts"])
    url = "s3://dist-minbert-test/shards/sts/dev"
    remote = prepare_task_shards("s3://dist-minbert-test/raw/sts-dev.csv", sts, True, url, tokenizer, 32, _data())
    local = prepare_task_shards(src, sts, True, str(tmp_path / "local"), tokenizer, 32, _data())
    assert remote.shards == local.shards and remote.build_key == local.build_key  # same bytes wherever they live
    assert sorted(s3.ls("dist-minbert-test/shards/sts/dev")) == sorted(
        f"dist-minbert-test/shards/sts/dev/{n}" for n in ["manifest.json", "rejects.tsv", "shard-00000.arrows",
                                                          "shard-00001.arrows"])

    # Two ranks stream from S3 exactly what they stream from the local copy.
    for rank in range(2):
        from_s3 = TaskStream(open_source(url), 7, 2, rank)
        from_disk = TaskStream(open_source(str(tmp_path / "local")), 7, 2, rank)
        for _ in range(20):
            assert from_s3.next_batch(64) == from_disk.next_batch(64)

    # A re-run is a no-op: the manifest object is not rewritten.
    before = s3.info(f"{url}/manifest.json")["LastModified"]
    time.sleep(1.1)
    prepare_task_shards("s3://dist-minbert-test/raw/sts-dev.csv", sts, True, url, tokenizer, 32, _data())
    s3.invalidate_cache()
    assert s3.info(f"{url}/manifest.json")["LastModified"] == before


def test_corpus_to_s3_and_a_changed_object_is_caught(s3, tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"line {i} of the corpus\n" for i in range(1000)))
    url = "s3://dist-minbert-test/shards/corpus"
    manifest = prepare_corpus(str(path), url, tokenizer, 16, _data(), progress=False)
    source = open_source(url)
    assert len(source) == 1000 and source.take(np.arange(1000))["line"] == list(range(1, 1001))

    shard = f"{url}/shard-00001.arrows"
    data = bytearray(s3.cat_file(shard))
    block = manifest.shards[1].blocks[0]
    data[block.offset + 40] ^= 0x01
    s3.pipe_file(shard, bytes(data))
    s3.invalidate_cache()
    with pytest.raises(ShardError, match=r"shard-00001\.arrows: block 4 .*checksum"):
        open_source(url).take([512])


def test_ray_engine_reads_the_corpus_from_s3(ray_session, s3, tokenizer, tmp_path, monkeypatch):
    """Ray actors fetch their byte ranges from S3 themselves, with the driver's endpoint and keys."""
    from dist_minbert.data import engine_ray

    monkeypatch.setattr(engine_ray, "RANGE_BYTES", 2048)
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"".join(f"sentence {i} on the object store\n".encode() if i % 97 else b"\n" for i in range(1500)))
    s3.put(str(path), "dist-minbert-test/raw/corpus.txt")
    data = DataConfig(shard_rows=512, shuffle_block_rows=128, max_reject_fraction=0.05, prepare_engine="ray",
                      prepare_workers=2)
    url = "s3://dist-minbert-test/shards/corpus-ray"
    remote = prepare_corpus("s3://dist-minbert-test/raw/corpus.txt", url, tokenizer, 16, data, progress=False)
    local = prepare_corpus(str(path), str(tmp_path / "local"), tokenizer, 16,
                           dataclasses.replace(data, prepare_engine="local"), progress=False)
    assert remote.shards == local.shards and remote.num_rows == 1500 - 16
    remote_rejects = s3.cat_file(f"{url}/rejects.tsv").decode()
    assert remote_rejects == (tmp_path / "local" / "rejects.tsv").read_text().replace(str(path), "s3://dist-minbert-test/raw/corpus.txt")
    assert "s3://dist-minbert-test/raw/corpus.txt\t98\tempty_text" in remote_rejects
