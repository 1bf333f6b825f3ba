"""Read task files exactly as CS224N ships them, turning each malformed row into a located reject.

The files are tab-separated with a header line, a leading unnamed index column and pandas
quoting. Columns are found by header name, because the SST test file's header is irregular
(`0<TAB><TAB>id<TAB>sentence`). Bytes are decoded per physical line, so one bad-UTF-8 row
is one reject instead of a crashed file.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Literal

import fsspec

from dist_minbert.tasks.config import TaskConfig

RejectReason = Literal["bad_utf8", "bad_quoting", "column_count", "missing_id", "empty_text", "bad_label",
                       "label_out_of_range"]


class BadRowError(ValueError):
    """A malformed row under on_bad_row="error"; the message names file, line and reason."""

    def __init__(self, path: str, line: int, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{path}:{line}: {reason}: {detail}")
        self.path, self.line, self.reason = path, line, reason


@dataclass
class Reject:
    path: str  # the file the row came from
    line: int  # 1-based physical line the row starts on
    reason: str  # one of RejectReason, a stable code to count by
    raw: str  # the row as written (undecodable bytes backslash-escaped)


@dataclass
class TaskRows:
    ids: list[str] = field(default_factory=list)
    a: list[str] = field(default_factory=list)  # first (or only) text
    b: list[str] | None = None  # second text of pair tasks
    labels: list[float] | None = None  # labelled files only; class index as float for classification
    lines: list[int] = field(default_factory=list)  # source line of each row
    rejects: list[Reject] = field(default_factory=list)


class _RowProblem(Exception):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class _PhysicalLines:
    """Decoded lines for the csv module, keeping the bytes of the record being parsed.

    csv.reader pulls exactly the lines of one record, so after each record `record` holds its
    bytes and `number` the last line read: the record starts at number - len(record) + 1.
    """

    def __init__(self, binary: IO[bytes]) -> None:
        self._binary = binary
        self.number = 0
        self.record: list[bytes] = []

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        raw = next(self._binary)
        self.number += 1
        self.record.append(raw)
        # Surrogates stand in for bad bytes so parsing goes on; the record is rejected afterwards.
        return raw.decode("utf-8", errors="surrogateescape")

    def take_record(self) -> tuple[int, bytes]:
        """(start line, bytes) of the record just parsed; the next record starts empty."""
        start, raw = self.number - len(self.record) + 1, b"".join(self.record)
        self.record = []
        return start, raw


def read_task_file(path: str, task: TaskConfig, labelled: bool,
                   on_bad_row: Literal["error", "reject"]) -> TaskRows:
    """All rows of one task file; blank lines are not rows (as in pandas), every other bad row is a reject."""
    if on_bad_row not in ("error", "reject"):
        raise ValueError(f"on_bad_row: {on_bad_row!r} is not a policy; allowed: 'error', 'reject'")
    pair = len(task.text_columns) == 2
    rows = TaskRows(b=[] if pair else None, labels=[] if labelled else None)
    with fsspec.open(path, "rb", compression="infer") as binary:
        lines = _PhysicalLines(binary)
        records = csv.reader(lines, delimiter="\t", quotechar='"', doublequote=True)
        header = _read_header(path, records, lines)
        required = [task.id_column, *task.text_columns, *([task.label_column] if labelled else [])]
        positions = _column_positions(path, header, required)
        for line, raw, fields, csv_error in _records(records, lines):
            try:
                if csv_error is not None:
                    raise _RowProblem("bad_quoting", csv_error)
                row_id, texts, label = _parse_row(raw, fields, len(header), positions, task, labelled)
            except _RowProblem as bad:
                if on_bad_row == "error":
                    raise BadRowError(path, line, bad.reason, bad.detail) from None
                text = raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
                rows.rejects.append(Reject(path, line, bad.reason, text))
                continue
            rows.ids.append(row_id)
            rows.a.append(texts[0])
            if rows.b is not None:
                rows.b.append(texts[1])
            if rows.labels is not None:
                rows.labels.append(label)
            rows.lines.append(line)
    return rows


def _records(records: Iterator[list[str]], lines: _PhysicalLines
             ) -> Iterator[tuple[int, bytes, list[str], str | None]]:
    """(start line, raw bytes, fields, csv error or None) per non-blank record."""
    while True:
        try:
            fields, csv_error = next(records), None
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. an unclosed quote running past csv's field size limit
            fields, csv_error = [], str(exc)
        line, raw = lines.take_record()
        if fields or csv_error is not None:
            yield line, raw, fields, csv_error


def _read_header(path: str, records: Iterator[list[str]], lines: _PhysicalLines) -> list[str]:
    try:
        header = next(records)
    except StopIteration:
        raise ValueError(f"{path}: empty file; expected a header line") from None
    except csv.Error as exc:
        raise ValueError(f"{path}:1: header line is not parseable: {exc}") from None
    _, raw = lines.take_record()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}:1: header line is not valid UTF-8: {exc}") from None
    return [name.strip().lstrip("\ufeff") for name in header]


def _column_positions(path: str, header: list[str], required: list[str]) -> dict[str, int]:
    for name in required:
        count = header.count(name)
        if count != 1:
            problem = "missing from" if count == 0 else "repeated in"
            raise ValueError(f"{path}:1: column {name!r} {problem} the header; header has {header}")
    return {name: header.index(name) for name in required}


def _parse_row(raw: bytes, fields: list[str], num_columns: int, positions: dict[str, int], task: TaskConfig,
               labelled: bool) -> tuple[str, list[str], float | None]:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _RowProblem("bad_utf8", str(exc)) from None
    if len(fields) != num_columns:
        raise _RowProblem("column_count", f"{len(fields)} fields, the header has {num_columns}")
    row_id = fields[positions[task.id_column]].strip()
    if not row_id:
        raise _RowProblem("missing_id", f"column {task.id_column!r} is empty")
    texts = [fields[positions[name]].strip() for name in task.text_columns]
    for name, text in zip(task.text_columns, texts):
        if not text:
            raise _RowProblem("empty_text", f"column {name!r} is empty")
    label = _parse_label(fields[positions[task.label_column]], task) if labelled else None
    return row_id, texts, label


def _parse_label(text: str, task: TaskConfig) -> float:
    where = f"column {task.label_column!r} = {text!r}"
    try:
        value = float(text)
    except ValueError:
        raise _RowProblem("bad_label", f"{where} is not a number") from None
    if not math.isfinite(value):
        raise _RowProblem("bad_label", f"{where} is not a finite number")
    if task.label_range is not None:
        lo, hi = task.label_range
        if not lo <= value <= hi:
            raise _RowProblem("label_out_of_range", f"{where} is outside [{lo}, {hi}]")
    elif not (value.is_integer() and 0 <= value < task.num_classes):
        raise _RowProblem("label_out_of_range", f"{where} is not a class index in [0, {task.num_classes})")
    return value


def write_rejects(rejects: list[Reject], path: str) -> None:
    """Rejects as TSV (path, line, reason, raw) with a header; raw rows hold tabs, so fields are csv-quoted."""
    with fsspec.open(path, "w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out, delimiter="\t", lineterminator="\n")
        writer.writerow(["path", "line", "reason", "raw"])
        writer.writerows([r.path, r.line, r.reason, r.raw] for r in rejects)
