"""tokenize_rows + TableSource on a real CS224N file, the real reader and the real tokenizer."""

from __future__ import annotations

import os

import pyarrow as pa

from dist_minbert.data.source import TableSource, task_schema, tokenize_rows
from dist_minbert.model.tokenizer import WordPieceTokenizer
from dist_minbert.tasks.config import TaskConfig
from dist_minbert.tasks.readers import read_task_file
from dist_minbert.tasks.registry import BUILTIN_TASKS

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cs224n")


def test_tokenized_pair_table_matches_tokenizer_and_source_lines(tmp_path):
    task = TaskConfig(**BUILTIN_TASKS["sts"])
    src = tmp_path / "sts.csv"
    with open(os.path.join(DATA, "sts-dev.csv"), encoding="utf-8") as f:
        src.write_text("".join(line for _, line in zip(range(41), f)), encoding="utf-8")
    rows = read_task_file(str(src), task, labelled=True, on_bad_row="error")
    tok = WordPieceTokenizer.from_checkpoint("embedded")
    table = tokenize_rows(rows, tok, max_tokens=12)
    assert table.schema == task_schema(pair=True, labelled=True)
    assert table.num_rows == 40 and table.column("line").to_pylist() == list(range(2, 42))
    a_full, b_full = tok.encode(rows.a), tok.encode(rows.b)
    assert table.column("a").to_pylist() == [x[:12] for x in a_full]
    assert table.column("b").to_pylist() == [x[:12] for x in b_full]
    assert any(len(x) > 12 for x in a_full + b_full)  # the cut happened somewhere
    taken = TableSource(table).take([5, 0, 5])
    assert taken["id"] == [rows.ids[5], rows.ids[0], rows.ids[5]]
    assert taken["label"] == [rows.labels[5], rows.labels[0], rows.labels[5]]


def test_unlabelled_single_table_has_no_label_or_b():
    task = TaskConfig(**BUILTIN_TASKS["sst"])
    rows = read_task_file(os.path.join(DATA, "ids-sst-test-student.csv"), task, labelled=False, on_bad_row="error")
    table = tokenize_rows(rows, WordPieceTokenizer.from_checkpoint("embedded"))
    assert table.schema == task_schema(pair=False, labelled=False)
    assert table.num_rows == 2210 and len(TableSource(table)) == 2210
    assert pa.types.is_int32(table.schema.field("a").type.value_type)
