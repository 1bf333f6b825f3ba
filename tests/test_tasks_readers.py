from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from dist_minbert.tasks.config import TaskConfig
from dist_minbert.tasks.readers import BadRowError, Reject, read_task_file, write_rejects
from dist_minbert.tasks.registry import BUILTIN_TASKS

SST = TaskConfig(**BUILTIN_TASKS["sst"])
STS = TaskConfig(**BUILTIN_TASKS["sts"])
SST_HEADER = b"\tid\tsentence\tsentiment\n"
STS_HEADER = b"\tid\tsentence1\tsentence2\tsimilarity\n"


def _write(tmp_path: Path, content: bytes, name: str = "task.csv") -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


# One malformed row per reason, placed on line 3 after a good row (line 2).
BAD_ROWS = [
    (SST, SST_HEADER, b"1\tid1\tonly the text\n", "column_count"),
    (SST, SST_HEADER, b"1\tid1\t   \t2\n", "empty_text"),
    (SST, SST_HEADER, b"1\tid1\ttext\tfour\n", "bad_label"),
    (SST, SST_HEADER, b"1\tid1\ttext\tnan\n", "bad_label"),
    (SST, SST_HEADER, b"1\tid1\ttext\t5\n", "label_out_of_range"),
    (SST, SST_HEADER, b"1\tid1\ttext\t1.5\n", "label_out_of_range"),
    (SST, SST_HEADER, b"1\tid1\tcaf\xe9 au lait\t2\n", "bad_utf8"),
    (SST, SST_HEADER, b"1\t \ttext\t2\n", "missing_id"),
    (SST, SST_HEADER, b'1\tid1\t"' + b"x" * 200_000 + b"\t2\n", "bad_quoting"),
    (STS, STS_HEADER, b"1\tid1\tfirst\t\t2.5\n", "empty_text"),
    (STS, STS_HEADER, b"1\tid1\tfirst\tsecond\t5.01\n", "label_out_of_range"),
    (STS, STS_HEADER, b"1\tid1\tfirst\tsecond\t-0.1\n", "label_out_of_range"),
]
GOOD_ROW = {id(SST): b"0\tid0\tgood\t3\n", id(STS): b"0\tid0\tfirst\tsecond\t3.5\n"}
LAST_ROW = {id(SST): b"2\tid2\tlast\t0\n", id(STS): b"2\tid2\tfirst\tsecond\t0.0\n"}


@pytest.mark.parametrize("task, header, bad, reason", BAD_ROWS)
def test_bad_row_errors_with_file_line_and_reason(tmp_path, task, header, bad, reason):
    path = _write(tmp_path, header + GOOD_ROW[id(task)] + bad + LAST_ROW[id(task)])
    with pytest.raises(BadRowError, match=rf"^{re.escape(path)}:3: {reason}: ") as caught:
        read_task_file(path, task, labelled=True, on_bad_row="error")
    assert (caught.value.path, caught.value.line, caught.value.reason) == (path, 3, reason)


@pytest.mark.parametrize("task, header, bad, reason", BAD_ROWS)
def test_bad_row_is_rejected_and_the_rest_kept(tmp_path, task, header, bad, reason):
    path = _write(tmp_path, header + GOOD_ROW[id(task)] + bad + LAST_ROW[id(task)])
    rows = read_task_file(path, task, labelled=True, on_bad_row="reject")
    assert rows.ids == ["id0", "id2"]
    assert rows.lines == [2, 4]
    assert [(r.path, r.line, r.reason) for r in rows.rejects] == [(path, 3, reason)]
    assert rows.rejects[0].raw.startswith("1\t")


def test_bad_utf8_reject_keeps_the_bytes_escaped(tmp_path):
    path = _write(tmp_path, SST_HEADER + b"1\tid1\tcaf\xe9\t2\n")
    (reject,) = read_task_file(path, SST, labelled=True, on_bad_row="reject").rejects
    assert reject.raw == "1\tid1\tcaf\\xe9\t2"


@pytest.mark.parametrize("on_bad_row", ["error", "reject"])
@pytest.mark.parametrize("labelled", [True, False])
def test_missing_header_column_is_an_error_in_both_modes(tmp_path, on_bad_row, labelled):
    path = _write(tmp_path, b"\tid\ttext\tsentiment\n0\tid0\tgood\t3\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}:1: column 'sentence' missing from the header"):
        read_task_file(path, SST, labelled=labelled, on_bad_row=on_bad_row)


@pytest.mark.parametrize("on_bad_row", ["error", "reject"])
def test_missing_label_column_is_an_error_only_when_labelled(tmp_path, on_bad_row):
    path = _write(tmp_path, b"\tid\tsentence\n0\tid0\tgood\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}:1: column 'sentiment' missing from the header"):
        read_task_file(path, SST, labelled=True, on_bad_row=on_bad_row)
    assert read_task_file(path, SST, labelled=False, on_bad_row=on_bad_row).a == ["good"]


def test_mixed_file_counts_every_row(tmp_path):
    content = (
        SST_HEADER
        + b"0\tid0\t  padded text  \t4\n"  # 2
        + b"1\tid1\tnot a row\n"  # 3
        + b'2\tid2\t"spans\ntwo lines"\t1.0\n'  # 4-5: one row, starting on line 4
        + b"\n"  # 6: blank, not a row
        + b'3\tid3\t"quoted ""word"""\t0\n'  # 7
        + b"4\tid4\ttext\t9\n"  # 8
    )
    rows = read_task_file(_write(tmp_path, content), SST, labelled=True, on_bad_row="reject")
    assert rows.ids == ["id0", "id2", "id3"]
    assert rows.a == ["padded text", "spans\ntwo lines", 'quoted "word"']
    assert rows.labels == [4.0, 1.0, 0.0]
    assert rows.lines == [2, 4, 7]
    assert rows.b is None
    assert [(r.line, r.reason) for r in rows.rejects] == [(3, "column_count"), (8, "label_out_of_range")]


def test_write_rejects_round_trips_rows_with_tabs_and_quotes(tmp_path):
    rejects = [Reject("a.csv", 3, "column_count", '1\tid1\t"x"'), Reject("b.csv", 9, "bad_utf8", "caf\\xe9")]
    out = tmp_path / "rejects.tsv"
    write_rejects(rejects, str(out))
    with open(out, newline="", encoding="utf-8") as f:
        table = list(csv.reader(f, delimiter="\t"))
    assert table == [["path", "line", "reason", "raw"], ["a.csv", "3", "column_count", '1\tid1\t"x"'],
                     ["b.csv", "9", "bad_utf8", "caf\\xe9"]]


@pytest.mark.parametrize(
    "name, split, num_rows",
    [("sst", "train", 8544), ("sst", "dev", 1101), ("sts", "train", 6040), ("sts", "dev", 863),
     ("sts", "test", 1725), ("qqp", "dev", 2000)],
)
def test_shared_files_read_completely(shared_data, name, split, num_rows):
    task = TaskConfig(**BUILTIN_TASKS[name])
    rows = read_task_file(str(shared_data / getattr(task, split)), task, labelled=split != "test", on_bad_row="error")
    assert len(rows.ids) == len(rows.a) == len(rows.lines) == num_rows
    assert rows.lines == list(range(2, num_rows + 2))  # no multi-line rows in these files


def test_shared_sst_test_file_with_irregular_header(shared_data):
    rows = read_task_file(str(shared_data / SST.test), SST, labelled=False, on_bad_row="error")
    assert len(rows.ids) == 2210 and rows.labels is None
    assert rows.ids[:2] == ["b7573736a6ddf7be102b7fee0", "d17a8752e342834fd18b31aaa"]
    assert rows.a[0] == "Effective but too-tepid biopic"
    assert all(len(i) == 25 for i in rows.ids)


def test_shared_qqp_train_has_two_malformed_rows(shared_data):
    # 14,214 data rows; pandas reads a NaN label on line 1777 and a NaN sentence2 on line 10001.
    qqp = TaskConfig(**BUILTIN_TASKS["qqp"])
    rows = read_task_file(str(shared_data / qqp.train), qqp, labelled=True, on_bad_row="reject")
    assert len(rows.ids) == len(rows.b) == len(rows.labels) == 14212
    assert [(r.line, r.reason) for r in rows.rejects] == [(1777, "bad_label"), (10001, "empty_text")]
    assert set(rows.labels) == {0.0, 1.0}
    assert rows.a[0].startswith('"Which is correct grammar')
    with pytest.raises(BadRowError, match=r"quora-train.csv:1777: bad_label"):
        read_task_file(str(shared_data / qqp.train), qqp, labelled=True, on_bad_row="error")
