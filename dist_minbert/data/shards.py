"""Tokenized Arrow shards on any fsspec URL: manifest, writer and verifying reader.

A dataset is a folder holding manifest.json, shard-00000.arrows, ... and rejects.tsv.
Each shard is a standard Arrow IPC stream (`pyarrow.ipc.open_stream` reads it) whose
record batches are the shuffle blocks of order.py. The manifest records every block's
byte range and sha256, so a reader fetches one block with one ranged read (one GET on
S3), checks it, and holds only a few blocks in memory whatever the corpus size. The
manifest is written last: a folder without one is not a dataset.
"""

from __future__ import annotations

import base64
import hashlib
import json
import posixpath
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import fsspec
import numpy as np
import pyarrow as pa

from dist_minbert.data.source import token_counts

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REJECTS = "rejects.tsv"
_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"


class ShardError(ValueError):
    """Shards or a manifest that do not match what prepare wrote; the message names the file."""


@dataclass
class Block:
    offset: int  # first byte of the block's IPC message in its shard
    length: int  # bytes of that message
    rows: int
    sha256: str


@dataclass
class Shard:
    path: str  # relative to the dataset folder
    rows: int
    bytes: int
    blocks: list[Block]


@dataclass
class Manifest:
    kind: str  # "task" (id, a[, b][, label], line) or "corpus" (a, line)
    num_rows: int
    block_rows: int  # rows per record batch (the last block may be shorter)
    schema: str  # the Arrow schema, IPC-serialised, base64
    columns: dict[str, str]  # column -> Arrow type, for people reading the manifest
    tokenizer_fingerprint: str
    max_length: int  # the model's max_length the shards were cut for
    max_tokens: int  # tokens kept per text at rest (max_length - 1: collate still sees truncation)
    build_key: str  # sha256 of everything that decides the shards' bytes; equal key = nothing to do
    inputs: dict[str, Any]  # url, bytes, sha256 of the source file
    rejects: dict[str, Any]  # path, count, by_reason
    shards: list[Shard]
    format_version: int = FORMAT_VERSION
    settings: dict[str, Any] = field(default_factory=dict)  # the prepare options behind build_key

    def arrow_schema(self) -> pa.Schema:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.schema)))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            raw = json.loads(text)
            version = raw.get("format_version")
            if version != FORMAT_VERSION:
                raise ShardError(f"{where}: format_version {version!r}; this reader reads {FORMAT_VERSION}; re-run prepare")
            shards = [Shard(**{**s, "blocks": [Block(**b) for b in s["blocks"]]}) for s in raw.pop("shards")]
            manifest = cls(**raw, shards=shards)
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
            raise ShardError(f"{where}: not a shard manifest ({exc}); re-run prepare") from None
        manifest._check(where)
        return manifest

    def _check(self, where: str) -> None:
        blocks = [b for s in self.shards for b in s.blocks]
        if sum(b.rows for b in blocks) != self.num_rows or any(s.rows != sum(b.rows for b in s.blocks) for s in self.shards):
            raise ShardError(f"{where}: block row counts do not add up to num_rows={self.num_rows}")
        if any(b.rows != self.block_rows for b in blocks[:-1]):
            raise ShardError(f"{where}: a block other than the last is not block_rows={self.block_rows} rows")


def schema_fields(schema: pa.Schema) -> tuple[str, dict[str, str]]:
    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii"), {f.name: str(f.type) for f in schema}


def read_manifest(url: str) -> Manifest | None:
    """The dataset's manifest, or None when the folder holds none (never prepared, or a build was cut short)."""
    fs, folder = fsspec.core.url_to_fs(url)
    path = posixpath.join(folder, MANIFEST)
    if not fs.exists(path):
        return None
    return Manifest.from_json(fs.cat_file(path).decode("utf-8"), f"{url.rstrip('/')}/{MANIFEST}")


class ShardWriter:
    """Cuts incoming tables into block_rows record batches and shard_rows shard files, hashing as it goes."""

    def __init__(self, url: str, schema: pa.Schema, shard_rows: int, block_rows: int):
        if shard_rows % block_rows:
            raise ValueError(f"shard_rows: {shard_rows} is not a multiple of block_rows {block_rows}")
        self.fs, self.folder = fsspec.core.url_to_fs(url)
        self.fs.makedirs(self.folder, exist_ok=True)
        self.schema, self.shard_rows, self.block_rows = schema, shard_rows, block_rows
        self.shards: list[Shard] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._file = None
        self._offset = 0

    def write(self, table: pa.Table) -> None:
        self._pending.append(table.cast(self.schema))
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.block_rows:
            self._flush_block(self.block_rows)

    def close(self) -> list[Shard]:
        if self._pending_rows:
            self._flush_block(self._pending_rows)
        self._close_shard()
        return self.shards

    def _flush_block(self, rows: int) -> None:
        pending = pa.concat_tables(self._pending).combine_chunks()
        block = pending.slice(0, rows).to_batches()[0]
        rest = pending.slice(rows)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if self._file is None or self.shards[-1].rows == self.shard_rows:
            self._open_shard()
        data = block.serialize().to_pybytes()
        self._file.write(data)
        shard = self.shards[-1]
        shard.blocks.append(Block(self._offset, len(data), rows, hashlib.sha256(data).hexdigest()))
        shard.rows += rows
        self._offset += len(data)

    def _open_shard(self) -> None:
        self._close_shard()
        name = f"shard-{len(self.shards):05d}.arrows"
        self._file = self.fs.open(posixpath.join(self.folder, name), "wb")
        header = self.schema.serialize().to_pybytes()
        self._file.write(header)
        self._offset = len(header)
        self.shards.append(Shard(name, 0, 0, []))

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.write(_END_OF_STREAM)
            self._file.close()
            self.shards[-1].bytes = self._offset + len(_END_OF_STREAM)
            self._file = None


class ShardedSource:
    """A prepared dataset read block by block, every block checked against its manifest checksum."""

    def __init__(self, url: str, cached_blocks: int = 8):
        manifest = read_manifest(url)
        if manifest is None:
            raise FileNotFoundError(f"{url.rstrip('/')}/{MANIFEST}: no manifest; run `dist-minbert prepare` first")
        self.url, self.manifest = url.rstrip("/"), manifest
        self.fs, self.folder = fsspec.core.url_to_fs(url)
        self.schema = manifest.arrow_schema()
        self.block_rows = manifest.block_rows
        self._blocks = [(shard.path, block) for shard in manifest.shards for block in shard.blocks]
        self._cache: OrderedDict[int, pa.RecordBatch] = OrderedDict()
        self._cached_blocks = cached_blocks
        self._lock = threading.Lock()
        check_shard_sizes(url, manifest)

    def __len__(self) -> int:
        return self.manifest.num_rows

    def take(self, rows: Sequence[int] | np.ndarray) -> dict[str, list]:
        """The given rows, in the given order, as column name -> list."""
        return self.take_table(rows).to_pydict()

    def take_table(self, rows: Sequence[int] | np.ndarray) -> pa.Table:
        """The given rows, in the given order, as Arrow; a batch inside one block costs one take."""
        rows = np.asarray(rows, dtype=np.int64)
        blocks = rows // self.block_rows
        if rows.size and blocks.min() == blocks.max():  # the usual batch: one block
            return pa.Table.from_batches([self.read_block(int(blocks[0])).take(pa.array(rows % self.block_rows))])
        by_block = np.argsort(blocks, kind="stable")
        parts = [self.schema.empty_table()]
        for block in np.unique(blocks):
            local = rows[by_block][blocks[by_block] == block] % self.block_rows
            parts.append(pa.Table.from_batches([self.read_block(int(block)).take(pa.array(local))]))
        return pa.concat_tables(parts).take(pa.array(np.argsort(by_block)))

    def row_lengths(self, start: int, stop: int) -> np.ndarray:
        """Tokens (a + b) of rows start .. stop - 1; start is a block start (what order.py asks for)."""
        block = self.read_block(start // self.block_rows)
        return token_counts(block.slice(start % self.block_rows, stop - start))

    def read_block(self, index: int) -> pa.RecordBatch:
        with self._lock:
            batch = self._cache.get(index)
            if batch is not None:
                self._cache.move_to_end(index)
                return batch
        batch = self._fetch(index)
        with self._lock:
            self._cache[index] = batch
            if len(self._cache) > self._cached_blocks:
                self._cache.popitem(last=False)
        return batch

    def _fetch(self, index: int) -> pa.RecordBatch:
        name, block = self._blocks[index]
        where = f"{self.url}/{name}"
        data = self.fs.cat_file(posixpath.join(self.folder, name), start=block.offset, end=block.offset + block.length)
        if len(data) != block.length:
            raise ShardError(f"{where}: truncated: block {index} needs bytes {block.offset}..{block.offset + block.length}")
        if hashlib.sha256(data).hexdigest() != block.sha256:
            raise ShardError(f"{where}: block {index} (bytes {block.offset}..) does not match its manifest checksum; "
                             "the shard changed after prepare: re-run prepare")
        batch = pa.ipc.read_record_batch(pa.py_buffer(data), self.schema)
        if batch.num_rows != block.rows:
            raise ShardError(f"{where}: block {index} holds {batch.num_rows} rows, the manifest says {block.rows}")
        return batch


def check_shard_sizes(url: str, manifest: Manifest) -> None:
    """Every shard of the manifest exists with its recorded size (cheap: no data read)."""
    fs, folder = fsspec.core.url_to_fs(url)
    for shard in manifest.shards:
        path = posixpath.join(folder, shard.path)
        size = fs.size(path) if fs.exists(path) else None
        if size != shard.bytes:
            state = "missing" if size is None else f"{size} bytes"
            raise ShardError(f"{url.rstrip('/')}/{shard.path}: {state}, the manifest says {shard.bytes} bytes "
                             "(truncated or replaced); re-run prepare")


def open_source(url: str) -> ShardedSource:
    """The prepared dataset at `url` (local path, memory://, s3://, gs://, ...)."""
    return ShardedSource(url)
