"""The Ray Data prepare engine: a corpus cut into line-aligned byte ranges, each read and tokenized
where Ray places it, the results brought back in file order to the one writer.

Workers read their range straight from the file's URL (s3://, gs://, a shared filesystem), so
only tokens travel, not text. Ranges are whole lines, numbered on the driver as they come back
in order, so the shards, their checksums and the rejects file are byte-for-byte those of the
local engine (tested). The input must be seekable: compressed files need the local engine.
"""

from __future__ import annotations

import os
from typing import Iterator

import fsspec
import pyarrow as pa

from dist_minbert.data.config import DataConfig
from dist_minbert.data.corpus_lines import CorpusChunk, JudgedLines, chunk_of, judge_lines
from dist_minbert.data.source import TOKENS, encode_texts
from dist_minbert.model.tokenizer import WordPieceTokenizer

RANGE_BYTES = 8 << 20  # input bytes per Ray Data task: ~80k lines of Wikipedia sentences

_RANGE_SCHEMA = pa.schema([
    pa.field("ids", pa.list_(TOKENS)),
    pa.field("good", pa.list_(pa.int64())),
    pa.field("bad", pa.list_(pa.struct([("index", pa.int64()), ("reason", pa.string()),
                                        ("detail", pa.string()), ("raw", pa.string())]))),
    pa.field("bytes", pa.int64()),
])


def line_ranges(path: str, range_bytes: int) -> list[tuple[int, int]]:
    """[start, end) byte ranges of about range_bytes that begin and end at line starts and cover the file."""
    fs, file_path = fsspec.core.url_to_fs(path)
    size = fs.size(file_path)
    bounds = [0]
    with fs.open(file_path, "rb") as f:
        while bounds[-1] + range_bytes < size:
            f.seek(bounds[-1] + range_bytes)
            f.readline()  # to the end of the line the cut fell in
            if f.tell() >= size:
                break
            bounds.append(f.tell())
    return list(zip(bounds, bounds[1:] + [size])) if size else []


def ray_chunks(path: str, tokenizer: WordPieceTokenizer, max_tokens: int, data: DataConfig,
               workers: int) -> Iterator[CorpusChunk]:
    """The corpus at `path` in file order, one chunk per byte range, tokenized by up to `workers` Ray actors."""
    import ray.data

    if fsspec.utils.infer_compression(path) is not None:
        raise ValueError(f"{path}: compressed input cannot be split into byte ranges; "
                         "decompress it or set data.prepare_engine=local")
    ranges = line_ranges(path, RANGE_BYTES)
    if not ranges:
        return
    ds = ray.data.from_items([{"start": s, "end": e} for s, e in ranges], override_num_blocks=len(ranges))
    ds.context.execution_options.preserve_order = True  # the writer needs file order; numbering depends on it
    ds.context.enable_progress_bars = False  # prepare shows its own, by bytes
    # The driver's fsspec settings for the protocol (endpoint, credentials from its env or config) go with
    # the actors, so they read the file as the driver sees it; nodes without those settings could not.
    storage = fsspec.config.conf.get(fsspec.utils.get_protocol(path), {})
    ds = ds.map_batches(_RangeEncoder, fn_constructor_args=(path, storage, tokenizer, max_tokens, data.max_line_bytes),
                        batch_size=1, batch_format="pyarrow", num_cpus=1,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, workers)))
    first = 1
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in range(batch.num_rows):
            part = batch.slice(row, 1)
            judged = JudgedLines([], part["good"][0].as_py(), [tuple(b.values()) for b in part["bad"][0].as_py()])
            ids = part["ids"].combine_chunks().flatten()
            yield chunk_of(judged, ids, first, path, data.on_bad_row, part["bytes"][0].as_py())
            first += len(judged.good) + len(judged.bad)


def available_cpus() -> int:
    """CPUs of the Ray cluster this process is connected to (RAY_ADDRESS's, or a new local one, if none yet)."""
    import ray

    if not ray.is_initialized():
        ray.init()
    return int(ray.cluster_resources().get("CPU", 1))


class _RangeEncoder:
    """A Ray Data actor: reads byte ranges of one corpus file, judges and tokenizes their lines."""

    def __init__(self, path: str, storage: dict, tokenizer: WordPieceTokenizer, max_tokens: int,
                 max_line_bytes: int):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one CPU per actor: Rust threads would oversubscribe
        self.fs, self.file_path = fsspec.core.url_to_fs(path, **storage)
        self.tokenizer, self.max_tokens, self.max_line_bytes = tokenizer, max_tokens, max_line_bytes

    def __call__(self, batch: pa.Table) -> pa.Table:
        start, end = batch["start"][0].as_py(), batch["end"][0].as_py()
        data = self.fs.cat_file(self.file_path, start=start, end=end)
        pieces = data.split(b"\n")  # as a file iterates: lines end at \n only
        if pieces[-1] == b"":
            pieces.pop()
        bodies = [piece.rstrip(b"\r\n") for piece in pieces]
        judged = judge_lines(bodies, self.max_line_bytes)
        ids = encode_texts(self.tokenizer, judged.texts, self.max_tokens)
        nested = pa.ListArray.from_arrays(pa.array([0, len(ids)], pa.int32()), ids)
        bad = [dict(zip(("index", "reason", "detail", "raw"), b)) for b in judged.bad]
        return pa.table({"ids": nested, "good": [judged.good], "bad": [bad], "bytes": [len(data)]},
                        schema=_RANGE_SCHEMA)
