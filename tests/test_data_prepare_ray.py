"""prepare on Ray Data: byte ranges, the same shards as the local engine, errors naming the line."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from dist_minbert.cli import main
from dist_minbert.data import engine_ray
from dist_minbert.data.config import DataConfig
from dist_minbert.data.engine_ray import line_ranges
from dist_minbert.data.prepare import prepare_corpus, resolve_engine
from dist_minbert.data.shards import open_source
from dist_minbert.model.tokenizer import WordPieceTokenizer
from dist_minbert.tasks.readers import BadRowError

REPO = Path(__file__).resolve().parents[1]
BAD = {7: b"", 100: b"bad \xff utf-8", 1500: b"x" * 3000, 2100: b"  \r"}  # 0-based line -> body


@pytest.fixture(scope="module")
def tokenizer() -> WordPieceTokenizer:
    return WordPieceTokenizer.from_checkpoint("embedded")


@pytest.fixture
def corpus(tmp_path) -> str:
    lines = [BAD.get(i, f"Sentence {i} says {'more ' * (i % 7)}than the last.".encode()) for i in range(2500)]
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"\n".join(lines) + b"\r\n")  # CRLF on the last line, as files from Windows end
    return str(path)


@pytest.fixture
def small_ranges(monkeypatch):
    monkeypatch.setattr(engine_ray, "RANGE_BYTES", 4096)  # ~20 ranges, several per shard block


def _data(engine: str, **kw) -> DataConfig:
    return DataConfig(shard_rows=512, shuffle_block_rows=128, max_reject_fraction=1.0, max_line_bytes=2000,
                      prepare_engine=engine, prepare_workers=2, **kw)


def _files(folder: str) -> dict[str, bytes]:
    return {name: Path(folder, name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("size", [1, 17, 4096, 10**6])
def test_line_ranges_cover_the_file_and_start_at_lines(tmp_path, size):
    body = b"a\n\nlonger line here\n" + b"y" * 5000 + b"\nlast line without newline"
    path = tmp_path / "f.txt"
    path.write_bytes(body)
    ranges = line_ranges(str(path), size)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(body)
    assert all(end == start for (_, end), (start, _) in zip(ranges, ranges[1:]))
    assert all(start < end for start, end in ranges)
    assert all(body[start - 1:start] == b"\n" for start, _ in ranges[1:])
    (tmp_path / "empty.txt").write_bytes(b"")
    assert line_ranges(str(tmp_path / "empty.txt"), size) == []


def test_ray_engine_writes_the_local_engines_bytes(ray_session, tmp_path, corpus, tokenizer, small_ranges):
    local = prepare_corpus(corpus, str(tmp_path / "local"), tokenizer, 16, _data("local"), progress=False)
    on_ray = prepare_corpus(corpus, str(tmp_path / "ray"), tokenizer, 16, _data("ray"), progress=False)
    assert len(line_ranges(corpus, engine_ray.RANGE_BYTES)) > 10
    assert on_ray == local and local.num_rows == 2500 - len(BAD)
    assert _files(str(tmp_path / "ray")) == _files(str(tmp_path / "local"))  # shards, manifest, rejects.tsv
    assert local.rejects["by_reason"] == {"empty_text": 2, "bad_utf8": 1, "line_too_long": 1}
    lines = open_source(str(tmp_path / "ray")).take(range(local.num_rows))["line"]
    assert lines == [i + 1 for i in range(2500) if i not in BAD]  # 1-based, across every range


def test_switching_engines_is_a_no_op(ray_session, tmp_path, corpus, tokenizer, small_ranges):
    out = str(tmp_path / "out")
    first = prepare_corpus(corpus, out, tokenizer, 16, _data("local"), progress=False)
    before = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out)}
    assert prepare_corpus(corpus, out, tokenizer, 16, _data("ray"), progress=False) == first
    assert {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out)} == before


def test_ray_engine_error_names_the_line_in_a_later_range(ray_session, tmp_path, corpus, tokenizer, small_ranges):
    with pytest.raises(BadRowError, match=r"corpus\.txt:8: empty_text"):
        prepare_corpus(corpus, str(tmp_path / "out"), tokenizer, 16, _data("ray", on_bad_row="error"), progress=False)
    text = Path(corpus).read_bytes().replace(b"\n\n", b"\nfilled in\n").replace(b"bad \xff", b"good ")
    Path(corpus).write_bytes(text)
    with pytest.raises(BadRowError, match=r"corpus\.txt:1501: line_too_long: 3000 bytes"):
        prepare_corpus(corpus, str(tmp_path / "out"), tokenizer, 16, _data("ray", on_bad_row="error"), progress=False)


def test_ray_engine_refuses_compressed_input(ray_session, tmp_path, tokenizer):
    path = tmp_path / "corpus.txt.gz"
    path.write_bytes(gzip.compress(b"one line\n"))
    with pytest.raises(ValueError, match=r"corpus\.txt\.gz: compressed input .* data.prepare_engine=local"):
        prepare_corpus(str(path), str(tmp_path / "out"), tokenizer, 16, _data("ray"), progress=False)


def test_auto_is_ray_when_a_cluster_is_given(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_engine(DataConfig()) == "local"
    assert resolve_engine(DataConfig(), address="ray://head:10001") == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert resolve_engine(DataConfig()) == "ray"
    assert resolve_engine(DataConfig(prepare_engine="local")) == "local"


def test_prepare_command_on_the_connected_cluster(ray_session, tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # what `ray job submit` sets; this session is already connected
    out = str(tmp_path / "shards")
    argv = ["prepare", "--config", str(REPO / "configs" / "demo.yaml"), "--corpus", corpus, "--out", out,
            "data.max_line_bytes=2000", "--max-reject-fraction", "0.01"]
    assert main(argv) == 0
    assert f"{corpus}: 2496 rows in 1 shards at {out} (4 rejected; engine ray)" in capsys.readouterr().out
    assert len(open_source(out)) == 2496
