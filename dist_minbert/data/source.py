"""Row sources the streams read from, and the tokenized table they hold.

A tokenized task table has columns id: string, a: list<int32> (token ids without
specials), b: list<int32> (pair tasks), label: float64 (labelled splits), line: int64
(line in the source file, for error messages and rejects).
"""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from dist_minbert.model.tokenizer import WordPieceTokenizer
    from dist_minbert.tasks.readers import TaskRows

TOKENS = pa.list_(pa.int32())


class RowSource(Protocol):
    """Random access to the rows of one tokenized task split."""

    block_rows: int  # rows per storage block; epoch orders permute blocks of this size

    def __len__(self) -> int: ...

    def take(self, rows: Sequence[int] | np.ndarray) -> dict[str, list]: ...

    def take_table(self, rows: Sequence[int] | np.ndarray) -> pa.Table: ...

    def row_lengths(self, start: int, stop: int) -> np.ndarray: ...


class TableSource:
    """A tokenized task table held in memory."""

    def __init__(self, table: pa.Table, block_rows: int = 4096):
        self.table = table
        self.block_rows = block_rows

    def __len__(self) -> int:
        return self.table.num_rows

    def take(self, rows: Sequence[int] | np.ndarray) -> dict[str, list]:
        """The given rows, in the given order, as column name -> list."""
        return self.take_table(rows).to_pydict()

    def take_table(self, rows: Sequence[int] | np.ndarray) -> pa.Table:
        """The given rows, in the given order, as Arrow (what collate reads fastest)."""
        return self.table.take(pa.array(np.asarray(rows, dtype=np.int64)))

    def row_lengths(self, start: int, stop: int) -> np.ndarray:
        """Tokens (a + b, no specials) of rows start .. stop - 1, for length grouping."""
        return token_counts(self.table.slice(start, stop - start))


def token_counts(rows: pa.Table | pa.RecordBatch) -> np.ndarray:
    counts = pc.list_value_length(rows.column("a")).to_numpy()
    if "b" in rows.column_names:
        counts = counts + pc.list_value_length(rows.column("b")).to_numpy()
    return counts.astype(np.int64)


def task_schema(pair: bool, labelled: bool) -> pa.Schema:
    fields = [pa.field("id", pa.string()), pa.field("a", TOKENS)]
    if pair:
        fields.append(pa.field("b", TOKENS))
    if labelled:
        fields.append(pa.field("label", pa.float64()))
    fields.append(pa.field("line", pa.int64()))
    return pa.schema(fields)


def tokenize_rows(rows: TaskRows, tokenizer: WordPieceTokenizer, max_tokens: int | None = None) -> pa.Table:
    """Tokenize a task's rows into the table schema above.

    `max_tokens` cuts each side to that many tokens at rest; pass max_length - 1 (one more
    than any encoding keeps) so collate() still sees, and counts, every truncated row.
    """
    columns: dict[str, pa.Array] = {"id": pa.array(rows.ids, pa.string())}
    sides = {"a": rows.a} if rows.b is None else {"a": rows.a, "b": rows.b}
    for name, texts in sides.items():
        columns[name] = encode_texts(tokenizer, texts, max_tokens)
    if rows.labels is not None:
        columns["label"] = pa.array(rows.labels, pa.float64())
    columns["line"] = pa.array(rows.lines, pa.int64())
    return pa.table(columns, schema=task_schema(rows.b is not None, rows.labels is not None))


def encode_texts(tokenizer: WordPieceTokenizer, texts: list[str], max_tokens: int | None = None) -> pa.Array:
    """Token lists (cut to max_tokens) as one Arrow list array built from flat numpy buffers:
    pa.array() on a list of Python lists cost two thirds of the tokenizer's own time here."""
    ids = tokenizer.encode(texts)
    if max_tokens is not None and max(map(len, ids), default=0) > max_tokens:
        ids = [seq[:max_tokens] for seq in ids]
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, ids), np.int32, len(ids)), out=offsets[1:])
    values = np.fromiter(chain.from_iterable(ids), np.int32, int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)).cast(TOKENS)
