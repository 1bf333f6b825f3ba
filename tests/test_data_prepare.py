"""prepare: rejects (nothing lost silently), reject bound, no-op re-runs and rebuilds, corpora."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from dist_minbert.data.config import DataConfig
from dist_minbert.data.prepare import (
    TooManyRejectsError,
    prepare_corpus,
    prepare_task_shards,
    prepare_tasks,
    task_shards_url,
)
from dist_minbert.data.shards import MANIFEST, REJECTS, open_source, read_manifest
from dist_minbert.model.tokenizer import WordPieceTokenizer
from dist_minbert.tasks.config import TaskConfig
from dist_minbert.tasks.readers import BadRowError
from dist_minbert.tasks.registry import BUILTIN_TASKS

QQP = TaskConfig(**BUILTIN_TASKS["qqp"])
HEADER = "\tid\tsentence1\tsentence2\tis_duplicate\n"


@pytest.fixture(scope="module")
def tokenizer() -> WordPieceTokenizer:
    return WordPieceTokenizer.from_checkpoint("embedded")


def _data(**kw) -> DataConfig:
    return DataConfig(**{"shard_rows": 64, "shuffle_block_rows": 16, "prepare_workers": 1, **kw})


def _qqp_file(tmp_path, good: int, bad_lines: list[bytes]) -> str:
    """`good` valid rows, then the given malformed rows (one per line, after the header)."""
    body = b"".join(f"{i}\tid{i}\tWhat is {i}?\tIs {i} a number?\t{i % 2}.0\n".encode() for i in range(good))
    path = tmp_path / "qqp.csv"
    path.write_bytes(HEADER.encode() + body + b"".join(bad_lines))
    return str(path)


def _rejects(out: str) -> list[dict[str, str]]:
    limit = csv.field_size_limit(2**31 - 1)  # a rejected 1 MB row is written whole
    try:
        with open(os.path.join(out, REJECTS), newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t"))
    finally:
        csv.field_size_limit(limit)


BAD_ROWS = [
    b"90\tid90\t\tIs it empty?\t1.0\n",  # empty text
    b"91\tid91\tWhat?\tWhy?\tmaybe\n",  # bad label
    b"92\tid92\tWhat?\tWhy?\t3.0\n",  # label out of range
    b"93\tid93\tW\xffhat?\tWhy?\t1.0\n",  # bad UTF-8
    b"94\tid94\tonly four fields\t1.0\n",  # column count
    b"95\tid95\t" + b"x" * 1_000_000 + b"\tWhy?\t1.0\n",  # a 1 MB field
]


def test_task_rejects_are_listed_with_their_lines_and_counted(tmp_path, tokenizer):
    path = _qqp_file(tmp_path, 200, BAD_ROWS)
    out = str(tmp_path / "out")
    manifest = prepare_task_shards(path, QQP, True, out, tokenizer, 32, _data(max_reject_fraction=0.05))
    assert manifest.num_rows == 200 and len(open_source(out)) == 200
    rejects = _rejects(out)
    assert [int(r["line"]) for r in rejects] == list(range(202, 208))
    assert [r["reason"] for r in rejects] == ["empty_text", "bad_label", "label_out_of_range", "bad_utf8",
                                              "column_count", "bad_quoting"]  # the 1 MB field passes csv's limit
    assert manifest.rejects["count"] == 6 and sum(manifest.rejects["by_reason"].values()) == 6
    assert all(r["path"] == path for r in rejects)


def test_on_bad_row_error_names_file_and_line(tmp_path, tokenizer):
    path = _qqp_file(tmp_path, 10, BAD_ROWS[1:2])
    with pytest.raises(BadRowError, match=rf"{path}:12: bad_label"):
        prepare_task_shards(path, QQP, True, str(tmp_path / "out"), tokenizer, 32, _data(on_bad_row="error"))


def test_missing_column_is_an_error_naming_the_file(tmp_path, tokenizer):
    path = tmp_path / "qqp.csv"
    path.write_text("\tid\tsentence1\tis_duplicate\n0\ta\tb\t1.0\n")
    with pytest.raises(ValueError, match=r"qqp\.csv:1: column 'sentence2' missing"):
        prepare_task_shards(str(path), QQP, True, str(tmp_path / "out"), tokenizer, 32, _data())


def test_too_many_rejects_fail_without_a_manifest(tmp_path, tokenizer):
    path = _qqp_file(tmp_path, 20, BAD_ROWS)  # 6 of 26 rejected: 23%
    out = str(tmp_path / "out")
    with pytest.raises(TooManyRejectsError, match=r"6 of 26 rows rejected .*max_reject_fraction=0.2"):
        prepare_task_shards(path, QQP, True, out, tokenizer, 32, _data(max_reject_fraction=0.2))
    assert not os.path.exists(os.path.join(out, MANIFEST))
    assert len(_rejects(out)) == 6  # the rows are there to inspect
    prepare_task_shards(path, QQP, True, out, tokenizer, 32, _data(max_reject_fraction=0.25))
    assert read_manifest(out).num_rows == 20


def _mtimes(out: str) -> dict[str, int]:
    return {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in sorted(os.listdir(out))}


def test_rerun_is_a_no_op_and_changes_rebuild(tmp_path, tokenizer):
    path = _qqp_file(tmp_path, 150, [])
    out = str(tmp_path / "out")
    first = prepare_task_shards(path, QQP, True, out, tokenizer, 32, _data())
    assert len(first.shards) == 3
    before = _mtimes(out)
    assert prepare_task_shards(path, QQP, True, out, tokenizer, 32, _data()) == first
    assert _mtimes(out) == before  # nothing written
    # Another max_length rebuilds: new key, tokens cut at the new bound.
    second = prepare_task_shards(path, QQP, True, out, tokenizer, 8, _data())
    assert second.build_key != first.build_key and max(map(len, open_source(out).take(range(150))["a"])) <= 7
    # Changed input rebuilds; fewer rows leave no stale shard behind.
    path = _qqp_file(tmp_path, 40, [])
    third = prepare_task_shards(path, QQP, True, out, tokenizer, 8, _data())
    assert third.num_rows == 40 and sorted(n for n in os.listdir(out) if n.startswith("shard")) == ["shard-00000.arrows"]
    # A damaged shard is rebuilt by the next run.
    with open(os.path.join(out, "shard-00000.arrows"), "ab") as f:
        f.write(b"junk")
    prepare_task_shards(path, QQP, True, out, tokenizer, 8, _data())
    assert len(open_source(out)) == 40


def test_prepare_tasks_lays_out_every_split(tmp_path, tokenizer):
    data_dir = tmp_path / "raw"
    data_dir.mkdir()
    path = _qqp_file(data_dir, 30, [])
    tasks = {"qqp": TaskConfig(**{**BUILTIN_TASKS["qqp"], "train": "qqp.csv", "dev": path, "test": ""})}
    data = _data(root=str(data_dir), shards=str(tmp_path / "shards"))
    manifests = prepare_tasks(tasks, data, tokenizer, 32)
    assert set(manifests["qqp"]) == {"train", "dev"}
    assert len(open_source(task_shards_url(data.shards, "qqp", "train"))) == 30
    with pytest.raises(ValueError, match="^shards: "):
        prepare_tasks(tasks, _data(root=str(data_dir)), tokenizer, 32)


CORPUS_LINES = [
    b"A man is playing a guitar.\n",
    b"\n",  # empty: a reject, not a silent skip
    b"The cat sat on the mat \xc3\x28 twice.\n",  # bad UTF-8
    b"y" * 200_000 + b"\n",  # longer than max_line_bytes
    b"   \t \n",  # whitespace only
    b"Last line without a newline",
]


def test_corpus_rejects_and_rows(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"".join(CORPUS_LINES))
    out = str(tmp_path / "out")
    manifest = prepare_corpus(str(path), out, tokenizer, 16, _data(max_reject_fraction=1.0), progress=False)
    assert manifest.kind == "corpus" and manifest.num_rows == 2
    rows = open_source(out).take([0, 1])
    assert rows["line"] == [1, 6]
    assert rows["a"] == [ids[:15] for ids in tokenizer.encode(["A man is playing a guitar.", "Last line without a newline"])]
    rejects = _rejects(out)
    assert [(int(r["line"]), r["reason"]) for r in rejects] == [
        (2, "empty_text"), (3, "bad_utf8"), (4, "line_too_long"), (5, "empty_text")]
    assert len(rejects[2]["raw"]) < 300  # the 200 kB line is shown shortened
    with pytest.raises(BadRowError, match=r"corpus\.txt:2: empty_text"):
        prepare_corpus(str(path), str(tmp_path / "out2"), tokenizer, 16, _data(on_bad_row="error"), progress=False)


def test_corpus_parallel_equals_serial(tmp_path, tokenizer):
    sentences = [f"Sentence number {i} says {'very ' * (i % 7)}little." for i in range(12_000)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(sentences) + "\n")
    serial = prepare_corpus(str(path), str(tmp_path / "serial"), tokenizer, 16,
                            _data(shard_rows=8192, shuffle_block_rows=1024), progress=False)
    parallel = prepare_corpus(str(path), str(tmp_path / "parallel"), tokenizer, 16,
                              _data(shard_rows=8192, shuffle_block_rows=1024, prepare_workers=2), progress=False)
    assert parallel.build_key == serial.build_key and parallel.shards == serial.shards  # same bytes, same checksums
    rows = open_source(str(tmp_path / "parallel")).take(np.arange(0, 12_000, 997))
    assert rows["a"] == [ids[:15] for ids in tokenizer.encode([sentences[i] for i in range(0, 12_000, 997)])]
