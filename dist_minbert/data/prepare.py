"""prepare: raw task files and one-sentence-per-line corpora -> tokenized shards + manifest.

Each input becomes one dataset folder (shards.py). Rejected rows are written to
rejects.tsv next to the manifest with their file, line and reason, and counted by
reason in the manifest; past `max_reject_fraction` the build fails with no manifest.
A build's key hashes the input's bytes, the tokenizer fingerprint, max_length and the
layout options: a re-run with an equal key and intact shards does nothing, anything
else rebuilds. Corpora are tokenized by one of two engines that write the same bytes: a local
process pool (engine_local.py) or Ray Data on a cluster (engine_ray.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections import Counter
from typing import Any, Callable, Iterator

import fsspec
import pyarrow as pa

from dist_minbert.data.config import DataConfig
from dist_minbert.data.corpus_lines import CorpusChunk
from dist_minbert.data.engine_local import local_chunks
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
from dist_minbert.tasks.readers import Reject, read_task_file, write_rejects

CORPUS_SCHEMA = pa.schema([pa.field("a", TOKENS), pa.field("line", pa.int64())])


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
    """A one-sentence-per-line text file (any fsspec URL) -> shards of (a, line), on data.prepare_engine.

    Lines that are empty, not UTF-8, or longer than data.max_line_bytes are rejects. Both engines
    write the same bytes, so the build key leaves the engine out: switching engines is a no-op.
    """
    settings = {"max_line_bytes": data.max_line_bytes, "on_bad_row": data.on_bad_row}

    def produce(writer: ShardWriter) -> tuple[int, list[Reject]]:
        rejects: list[Reject] = []
        num_rows = 0
        fs, file_path = fsspec.core.url_to_fs(path)
        bar = progress_bar(fs.size(file_path), f"prepare {posixpath.basename(path)}", enabled=progress)
        for chunk in _corpus_chunks(path, tokenizer, max_length - 1, data):
            writer.write(pa.table({"a": chunk.ids, "line": pa.array(chunk.lines, pa.int64())}, schema=CORPUS_SCHEMA))
            num_rows += len(chunk.lines)
            rejects.extend(chunk.rejects)
            bar.update(chunk.bytes_read)
        bar.close()
        return num_rows, rejects

    return _build("corpus", path, out_url, CORPUS_SCHEMA, settings, produce, tokenizer, max_length, data)


def resolve_engine(data: DataConfig, address: str = "") -> str:
    """data.prepare_engine with "auto" decided: Ray Data when a cluster is given (address or RAY_ADDRESS)."""
    if data.prepare_engine != "auto":
        return data.prepare_engine
    return "ray" if address or os.environ.get("RAY_ADDRESS") else "local"


def _corpus_chunks(path: str, tokenizer: WordPieceTokenizer, max_tokens: int, data: DataConfig) -> Iterator[CorpusChunk]:
    if resolve_engine(data) == "ray":
        from dist_minbert.data.engine_ray import available_cpus, ray_chunks

        return ray_chunks(path, tokenizer, max_tokens, data, data.prepare_workers or available_cpus())
    return local_chunks(path, tokenizer, max_tokens, data, data.prepare_workers or os.cpu_count() or 1)


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
