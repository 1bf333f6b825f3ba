"""`bench data`: prepare and streaming throughput and memory, beside their limit and their naive peer.

The targets are ratios of two rates measured in the same run, so they hold on any machine of this
kind, where absolute rates differ up to 2×: prepare against the bare Rust tokenizer on the same
lines with as many threads as prepare tokenizes on (what prepare could reach if everything else
it does were free), and streaming against the in-memory CSV path. Absolute rates are figures only.

The corpus is `dist-minbert corpus --generated`'s (data/corpus.py): distinct joins of two or three
sentences of the CS224N train files, so nothing downstream can cache a repeat. Each rank runs
in a freshly spawned process so its memory is its own: RSS growth is the peak while
streaming minus the RSS right after imports (no model is loaded). On a machine shared
with other work, wall-clock rates understate the code: the CPU-time rates beside them
(samples per CPU second of the process and its workers) and the load average say by how much.
With `--engine ray` prepare runs on Ray Data (a local instance of this machine's cores unless
RAY_ADDRESS names a cluster); Ray's actors are not this process's children, so no CPU-time
rate is given for it.
"""

from __future__ import annotations

import itertools
import os
import resource
import shutil
import time
from multiprocessing import get_context
from typing import Any

from dist_minbert.data.config import DataConfig
from dist_minbert.data.corpus import generated_lines, task_corpus, write_lines
from dist_minbert.data.engine_local import CHUNK_LINES
from dist_minbert.data.prepare import prepare_corpus
from dist_minbert.model.tokenizer import WordPieceTokenizer
from dist_minbert.tasks.config import TaskConfig
from dist_minbert.tasks.readers import read_task_file

TARGETS = {  # lower bounds on ratios of rates measured side by side (issue 8)
    "prepare_vs_tokenizer": 0.85,
    "stream_vs_csv_ratio": 5.0,
}


def run_data_benchmark(
    work_dir: str,
    num_lines: int = 1_000_000,
    max_length: int = 128,
    batch_size_per_rank: int = 64,
    num_ranks: int = 2,
    csv_rows: int = 200_000,
    prefetch: int = 2,
    prepare_workers: int = 0,
    prepare_engine: str = "local",
    checkpoint: str = "embedded",
    data_root: str = DataConfig().root,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure, side by side: prepare (tokenize + write shards), streaming by `num_ranks` ranks
    at once (shuffled, prefetched, collated to padded int64 tensors) and the in-memory CSV path."""
    os.makedirs(work_dir, exist_ok=True)
    corpus = os.path.join(work_dir, "corpus.txt")
    shards = os.path.join(work_dir, "corpus-shards")
    csv_path = os.path.join(work_dir, "corpus.tsv")
    sentences = task_corpus(DataConfig(root=data_root)).sentences
    write_lines(corpus, generated_lines(sentences, num_lines))
    write_lines(csv_path, (f"{k}\tl{k}\t{line}" for k, line in enumerate(generated_lines(sentences, csv_rows))),
                header="\tid\tsentence\n")
    tokenizer = WordPieceTokenizer.from_checkpoint(checkpoint)
    data = DataConfig(root=data_root, prepare_workers=prepare_workers, prefetch=prefetch, prepare_engine=prepare_engine)

    shutil.rmtree(shards, ignore_errors=True)  # measure a build, not a no-op
    load_before = os.getloadavg()[0]
    cpu_before = _cpu_s()
    start = time.perf_counter()
    manifest = prepare_corpus(corpus, shards, tokenizer, max_length, data, progress=False)
    prepare_s = time.perf_counter() - start
    prepare_cpu_s = _cpu_s() - cpu_before
    workers = prepare_workers or os.cpu_count()
    # The pool's processes tokenize on one thread each; a single worker is this process, on Rust's default
    # thread pool (one thread per core).
    threads = workers if workers > 1 else os.cpu_count()
    tokenizer_pass = _tokenizer_pass(corpus, checkpoint, threads, manifest.max_tokens)

    ranks = _stream_ranks(shards, num_ranks, batch_size_per_rank, prefetch, max_length, checkpoint, seed)
    csv_per_s = _csv_in_memory(csv_path, tokenizer, max_length, batch_size_per_rank, seed)

    stream_per_s = min(r["samples_per_s"] for r in ranks)
    result = {
        "num_lines": num_lines,
        "max_length": max_length,
        "batch_size_per_rank": batch_size_per_rank,
        "num_ranks": num_ranks,
        "prefetch": prefetch,
        "cpu_count": os.cpu_count(),
        "prepare_engine": prepare_engine,
        "prepare_workers": workers,
        "tokenizer_threads": threads,
        "prepare_seconds": prepare_s,
        "prepare_sentences_per_s": num_lines / prepare_s,
        "prepare_sentences_per_cpu_s": num_lines / prepare_cpu_s if prepare_engine == "local" else None,
        "prepare_rejects": manifest.rejects["count"],
        "shard_bytes": sum(s.bytes for s in manifest.shards),
        "tokenizer_sentences_per_s": tokenizer_pass["sentences_per_s"],
        "tokenizer_lines": tokenizer_pass["lines"],
        "tokenizer_tokens_kept": tokenizer_pass["tokens_kept"],
        "prepare_vs_tokenizer": num_lines / prepare_s / tokenizer_pass["sentences_per_s"],
        "stream_samples_per_s_per_rank": stream_per_s,
        "stream_samples_per_s_each_rank": [r["samples_per_s"] for r in ranks],
        "stream_samples_per_cpu_s_per_rank": min(r["samples_per_cpu_s"] for r in ranks),
        "stream_rss_growth_mb": max(r["rss_growth_mb"] for r in ranks),
        "stream_samples_per_rank": ranks[0]["samples"],
        "csv_rows": csv_rows,
        "csv_in_memory_samples_per_s": csv_per_s,
        "stream_vs_csv_ratio": stream_per_s / csv_per_s,
        "prepare_vs_csv_ratio": num_lines / prepare_s / csv_per_s,
        "load_average_1m": [load_before, os.getloadavg()[0]],
        "targets": dict(TARGETS),
    }
    result["passed"] = passed_targets(result)
    return result


def passed_targets(result: dict[str, Any]) -> dict[str, bool]:
    """Each ratio in TARGETS against its lower bound."""
    return {name: result[name] >= bound for name, bound in TARGETS.items()}


def _stream_ranks(url, num_ranks, batch_size_per_rank, prefetch, max_length, checkpoint, seed) -> list[dict]:
    ctx = get_context("spawn")  # fresh processes: their RSS is theirs alone
    start, results = ctx.Barrier(num_ranks), ctx.Queue()
    procs = [ctx.Process(target=_stream_rank, args=(url, rank, num_ranks, batch_size_per_rank, prefetch, max_length,
                                                     checkpoint, seed, start, results)) for rank in range(num_ranks)]
    for p in procs:
        p.start()
    out = sorted((results.get() for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    if failed := [r for r in out if "error" in r]:
        raise RuntimeError(f"stream benchmark rank {failed[0]['rank']} failed: {failed[0]['error']}")
    return out


def _tokenizer_pass(corpus: str, checkpoint: str, threads: int, max_tokens: int) -> dict[str, float]:
    """The bare tokenizer's rate on the corpus, in a fresh process: Rust's thread pool is sized once per process."""
    ctx = get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_encode_corpus, args=(corpus, checkpoint, threads, max_tokens, results))
    proc.start()
    out = results.get()
    proc.join()
    if "error" in out:
        raise RuntimeError(f"tokenizer pass failed: {out['error']}")
    return out


def _encode_corpus(corpus, checkpoint, threads, max_tokens, results):
    """Times only the Rust calls, on prepare's chunks of lines; reading the file and counting stay outside."""
    try:
        os.environ.update(RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true")
        encode_batch = WordPieceTokenizer.from_checkpoint(checkpoint).encode_batch
        seconds, lines, tokens_kept = 0.0, 0, 0
        with open(corpus, encoding="utf-8") as f:
            while chunk := [line.rstrip("\n") for line in itertools.islice(f, CHUNK_LINES)]:
                began = time.perf_counter()
                encodings = encode_batch(chunk)
                seconds += time.perf_counter() - began
                lines += len(chunk)
                tokens_kept += sum(min(len(encoding), max_tokens) for encoding in encodings)
        results.put({"sentences_per_s": lines / seconds, "lines": lines, "tokens_kept": tokens_kept})
    except BaseException as exc:  # reported to the parent, which raises
        results.put({"error": repr(exc)})


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (prepare's tokenizer pool)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _stream_rank(url, rank, num_ranks, batch_size_per_rank, prefetch, max_length, checkpoint, seed, start, results):
    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        from dist_minbert.data.collate import collator
        from dist_minbert.data.prefetch import Prefetcher
        from dist_minbert.data.step_reader import StepReader
        from dist_minbert.data.shards import open_source
        from dist_minbert.data.stream import TaskStream
        from dist_minbert.observe.memory import peak_rss_mb, rss_mb

        torch.set_num_threads(1)
        tok = WordPieceTokenizer.from_checkpoint(checkpoint)
        rss_after_imports = rss_mb()
        streams = {"corpus": TaskStream(open_source(url), seed, num_ranks, rank)}
        global_batch = batch_size_per_rank * num_ranks
        steps = len(streams["corpus"].source) // global_batch

        read = StepReader(streams, {"corpus": collator(tok, "single", max_length)},
                          lambda position: {"corpus": global_batch})
        start.wait()
        began, began_cpu = time.perf_counter(), time.process_time()
        samples = 0
        with Prefetcher(read, [(0, step) for step in range(steps)], prefetch) as batches:
            for step in batches:
                samples += step.micro_batches[0]["corpus"].tensors["input_ids"].shape[0]
        elapsed, cpu = time.perf_counter() - began, time.process_time() - began_cpu
        peak = peak_rss_mb()
        results.put({"rank": rank, "samples": samples, "samples_per_s": samples / elapsed,
                     "samples_per_cpu_s": samples / cpu,
                     "rss_growth_mb": peak - rss_after_imports})
    except BaseException as exc:  # reported to the parent, which raises
        start.abort()
        results.put({"rank": rank, "error": repr(exc)})


def _csv_in_memory(path: str, tokenizer: WordPieceTokenizer, max_length: int, batch_size: int, seed: int) -> float:
    """The naive peer: read the CSV, tokenize it all in memory, then one shuffled epoch of collated batches."""
    from dist_minbert.data.collate import collator
    from dist_minbert.data.source import TableSource, tokenize_rows
    from dist_minbert.data.stream import TaskStream

    task = TaskConfig(kind="classification", text_columns=["sentence"], label_column="label", num_classes=2)
    began = time.perf_counter()
    rows = read_task_file(path, task, labelled=False, on_bad_row="reject")
    stream = TaskStream(TableSource(tokenize_rows(rows, tokenizer, max_length - 1)), seed, 1, 0)
    steps = len(rows.ids) // batch_size
    collate = collator(tokenizer, "single", max_length)
    for _ in range(steps):
        collate(stream.next_batch(batch_size))
    return steps * batch_size / (time.perf_counter() - began)
