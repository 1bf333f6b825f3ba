"""prepare: raw task files and one-sentence-per-line corpora -> tokenized shards + manifest.

Each input becomes one dataset folder (shards.py). Rejected rows are written to
rejects.tsv next to the manifest with their file, line and reason, and counted by
reason in the manifest; past `max_reject_fraction` the build fails with no manifest.
A build's key hashes the input's bytes, the tokenizer fingerprint, max_length and the
layout options: a re-run with an equal key and intact shards does nothing, anything
else rebuilds. Corpora are read line by line and tokenized in chunks by a pool of
processes (one Rust tokenizer each), so memory stays bounded by a few chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import chain
from multiprocessing import get_all_start_methods, get_context
from typing import IO, Any, Callable, Iterator

import fsspec
import numpy as np
import pyarrow as pa

from dist_minbert.data.config import DataConfig
from dist_minbert.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    REJECTS,
    Manifest,
    ShardError,
    ShardWriter,
    check_shard_sizes,
    read_manifest,
    schema_fields,
)
from dist_minbert.data.source import TOKENS, task_schema, tokenize_rows
from dist_minbert.model.tokenizer import WordPieceTokenizer
from dist_minbert.observe.progress import progress_bar
from dist_minbert.tasks.config import TaskConfig
from dist_minbert.tasks.readers import BadRowError, Reject, read_task_file, write_rejects

CORPUS_SCHEMA = pa.schema([pa.field("a", TOKENS), pa.field("line", pa.int64())])
CHUNK_LINES = 8192  # corpus lines per tokenizer call
_RAW_SHOWN = 200  # characters of an over-long line kept in rejects.tsv


class TooManyRejectsError(ValueError):
    """More of an input's rows were rejected than max_reject_fraction allows."""


def task_shards_url(shards: str, task: str, split: str) -> str:
    """Where prepare_tasks puts one task split: {shards}/{task}/{split}."""
    return posixpath.join(shards, task, split)


def prepare_tasks(
    tasks: dict[str, TaskConfig],
    data: DataConfig,
    tokenizer: WordPieceTokenizer,
    max_length: int,
    splits: tuple[str, ...] = ("train", "dev", "test"),
) -> dict[str, dict[str, Manifest]]:
    """Every split file the tasks name, each into task_shards_url(data.shards, task, split)."""
    if not data.shards:
        raise ValueError("shards: empty; allowed: the folder (fsspec URL) to prepare the task shards into")
    manifests: dict[str, dict[str, Manifest]] = {}
    for name, task in tasks.items():
        for split in splits:
            if path := getattr(task, split):
                out = task_shards_url(data.shards, name, split)
                manifests.setdefault(name, {})[split] = prepare_task_shards(
                    data.resolve(path), task, split != "test", out, tokenizer, max_length, data)
    return manifests


def prepare_task_shards(
    path: str,
    task: TaskConfig,
    labelled: bool,
    out_url: str,
    tokenizer: WordPieceTokenizer,
    max_length: int,
    data: DataConfig,
) -> Manifest:
    """One CS224N-style task file (CSV/TSV, header, pandas quoting) -> shards of (id, a[, b][, label], line)."""
    settings = {
        "task": {k: getattr(task, k) for k in ("kind", "text_columns", "label_column", "id_column",
                                               "num_classes", "label_range")},
        "labelled": labelled,
        "on_bad_row": data.on_bad_row,
    }

    def produce(writer: ShardWriter) -> tuple[int, list[Reject]]:
        rows = read_task_file(path, task, labelled, data.on_bad_row)
        writer.write(tokenize_rows(rows, tokenizer, max_tokens=max_length - 1))
        return len(rows.ids), rows.rejects

    schema = task_schema(pair=len(task.text_columns) == 2, labelled=labelled)
    return _build("task", path, out_url, schema, settings, produce, tokenizer, max_length, data)


def prepare_corpus(
    path: str,
    out_url: str,
    tokenizer: WordPieceTokenizer,
    max_length: int,
    data: DataConfig,
    progress: bool = True,
) -> Manifest:
    """A one-sentence-per-line text file (any fsspec URL, compression inferred) -> shards of (a, line).

    Lines that are empty, not UTF-8, or longer than data.max_line_bytes are rejects.
    """
    settings = {"max_line_bytes": data.max_line_bytes, "on_bad_row": data.on_bad_row}
    workers = data.prepare_workers or os.cpu_count() or 1

    def produce(writer: ShardWriter) -> tuple[int, list[Reject]]:
        rejects: list[Reject] = []
        num_rows = 0
        fs, file_path = fsspec.core.url_to_fs(path)
        with fsspec.open(path, "rb", compression="infer") as binary, _Encoder(tokenizer, workers) as encoder:
            bar = progress_bar(fs.size(file_path), f"prepare {posixpath.basename(path)}", enabled=progress)
            chunks = _corpus_chunks(binary, path, data, rejects, bar.update)
            for ids, lines in encoder.encode(chunks, max_length - 1):
                writer.write(pa.table({"a": ids, "line": pa.array(lines, pa.int64())}, schema=CORPUS_SCHEMA))
                num_rows += len(lines)
            bar.close()
        return num_rows, rejects

    return _build("corpus", path, out_url, CORPUS_SCHEMA, settings, produce, tokenizer, max_length, data)


def _build(
    kind: str,
    path: str,
    out_url: str,
    schema: pa.Schema,
    settings: dict[str, Any],
    produce: Callable[[ShardWriter], tuple[int, list[Reject]]],
    tokenizer: WordPieceTokenizer,
    max_length: int,
    data: DataConfig,
) -> Manifest:
    digest, num_bytes = _file_digest(path)
    settings = {**settings, "block_rows": data.shuffle_block_rows, "shard_rows": data.shard_rows}
    key_parts = [FORMAT_VERSION, kind, digest, tokenizer.fingerprint, max_length, settings]
    build_key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()
    old = _intact_manifest(out_url)
    if old is not None and old.build_key == build_key:
        return old
    fs, folder = fsspec.core.url_to_fs(out_url)
    if fs.exists(posixpath.join(folder, MANIFEST)):
        fs.rm(posixpath.join(folder, MANIFEST))  # the old shards stop being a dataset before they are overwritten

    writer = ShardWriter(out_url, schema, data.shard_rows, data.shuffle_block_rows)
    num_rows, rejects = produce(writer)
    shards = writer.close()
    rejects_url = f"{out_url.rstrip('/')}/{REJECTS}"
    write_rejects(rejects, rejects_url)
    total = num_rows + len(rejects)
    if total and len(rejects) / total > data.max_reject_fraction:
        raise TooManyRejectsError(
            f"{path}: {len(rejects)} of {total} rows rejected ({len(rejects) / total:.2%}), more than "
            f"max_reject_fraction={data.max_reject_fraction}; reasons: {dict(Counter(r.reason for r in rejects))}; "
            f"rows listed in {rejects_url}")
    if num_rows == 0:
        raise ValueError(f"{path}: no usable rows ({len(rejects)} rejected, see {rejects_url})")
    if old is not None:
        for stale in {s.path for s in old.shards} - {s.path for s in shards}:
            fs.rm(posixpath.join(folder, stale))

    schema_b64, columns = schema_fields(schema)
    manifest = Manifest(
        kind=kind,
        num_rows=num_rows,
        block_rows=data.shuffle_block_rows,
        schema=schema_b64,
        columns=columns,
        tokenizer_fingerprint=tokenizer.fingerprint,
        max_length=max_length,
        max_tokens=max_length - 1,
        build_key=build_key,
        inputs={"url": path, "bytes": num_bytes, "sha256": digest},
        rejects={"path": REJECTS, "count": len(rejects), "by_reason": dict(Counter(r.reason for r in rejects))},
        shards=shards,
        settings=settings,
    )
    fs.pipe_file(posixpath.join(folder, MANIFEST), manifest.to_json().encode("utf-8"))  # last: the commit point
    return manifest


def _intact_manifest(url: str) -> Manifest | None:
    """The existing manifest if it and its shards look whole; None means build."""
    try:
        manifest = read_manifest(url)
        if manifest is not None:
            check_shard_sizes(url, manifest)
        return manifest
    except ShardError:
        return None


def _file_digest(path: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with fsspec.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _corpus_chunks(
    binary: IO[bytes], path: str, data: DataConfig, rejects: list[Reject], advance: Callable[[int], Any]
) -> Iterator[tuple[list[str], list[int]]]:
    """(texts, line numbers) of CHUNK_LINES good lines at a time; bad lines go to `rejects` (or raise)."""
    texts: list[str] = []
    lines: list[int] = []
    read = 0
    for number, raw in enumerate(binary, start=1):
        read += len(raw)
        body = raw.rstrip(b"\r\n")
        problem = None
        if len(body) > data.max_line_bytes:
            problem = ("line_too_long", f"{len(body)} bytes, more than max_line_bytes={data.max_line_bytes}")
        else:
            try:
                text = body.decode("utf-8")
                if not text.strip():
                    problem = ("empty_text", "the line holds no text")
            except UnicodeDecodeError as exc:
                problem = ("bad_utf8", str(exc))
        if problem is not None:
            if data.on_bad_row == "error":
                raise BadRowError(path, number, *problem)
            shown = body[:_RAW_SHOWN].decode("utf-8", errors="backslashreplace")
            rejects.append(Reject(path, number, problem[0], shown if len(body) <= _RAW_SHOWN else f"{shown}..."))
            continue
        texts.append(text)
        lines.append(number)
        if len(texts) == CHUNK_LINES:
            advance(read)
            read = 0
            yield texts, lines
            texts, lines = [], []
    advance(read)
    if texts:
        yield texts, lines


_worker_tokenizer: WordPieceTokenizer | None = None


def _init_worker(tokenizer: WordPieceTokenizer) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; Rust threads would fight it
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list[str], max_tokens: int) -> pa.Array:
    return _encode(_worker_tokenizer, texts, max_tokens)


def _encode(tokenizer: WordPieceTokenizer, texts: list[str], max_tokens: int) -> pa.Array:
    """Token lists as one Arrow list array built from flat numpy buffers: pa.array() on a list of
    Python lists cost two thirds of the tokenizer's own time here."""
    ids = tokenizer.encode(texts)
    if max(map(len, ids), default=0) > max_tokens:
        ids = [seq[:max_tokens] for seq in ids]
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, ids), np.int32, len(ids)), out=offsets[1:])
    values = np.fromiter(chain.from_iterable(ids), np.int32, int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)).cast(TOKENS)


class _Encoder:
    """Tokenizes chunks in order, in a process pool (workers > 1) with a bounded number in flight.

    Workers are forked where the OS allows: measured here, a spawned worker took 4.5 s to
    start (it re-imports torch through the tokenizer's package), a forked one 0.06 s. They
    run only the Rust tokenizer, with its own threads off, so nothing inherited is used.
    """

    def __init__(self, tokenizer: WordPieceTokenizer, workers: int):
        self.tokenizer, self.workers = tokenizer, workers
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> _Encoder:
        if self.workers > 1:
            method = "fork" if "fork" in get_all_start_methods() else "spawn"
            self.pool = ProcessPoolExecutor(self.workers, mp_context=get_context(method),
                                            initializer=_init_worker, initargs=(self.tokenizer,))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def encode(self, chunks: Iterator[tuple[list[str], list[int]]], max_tokens: int) -> Iterator[tuple[pa.Array, list[int]]]:
        if self.pool is None:
            for texts, lines in chunks:
                yield _encode(self.tokenizer, texts, max_tokens), lines
            return
        in_flight: deque[tuple[Future, list[int]]] = deque()
        for texts, lines in chunks:
            in_flight.append((self.pool.submit(_encode_in_worker, texts, max_tokens), lines))
            if len(in_flight) >= 2 * self.workers:
                future, done_lines = in_flight.popleft()
                yield future.result(), done_lines
        while in_flight:
            future, done_lines = in_flight.popleft()
            yield future.result(), done_lines
