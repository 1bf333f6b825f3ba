"""`dist-minbert bench simcse`: SimCSE steps streamed on 2 workers, GradCache's memory, and our step against
sentence-transformers' own, side by side; then a projection for bert-base on GPUs, labelled as one.

Every measurement runs in fresh processes (forked from a server that only imported modules), so each peak
RSS (VmHWM) is that process's own and no run's memory mixes with another's; a group of workers is a gloo
process group of such processes:
- stream: a generated corpus (`corpus --generated`'s lines) prepared to shards, streamed by every worker
  (TaskStream, StepReader, Prefetcher: the data service's reading path) for warm-up + timed steps.
  A step is SimCSE's: each sentence twice in one forward over the doubled batch (independent dropout
  masks), loss (3) against every worker's second views (all-gathered with an exact backward), the
  gradient all-reduced (averaged), fused AdamW. That is the work of DeepSpeed's ZeRO-0 step on CPU (one
  all-reduce, the optimizer step); the SimCSE job (`dist-minbert simcse`) runs the same step inside
  DeepSpeed on Ray Train workers, which is not what runs here.
- memory: the same step, once, in a fresh group per setting: the SimCSE batch without the cache, the
  large global batch through GradCache in chunks, and (when memory allows) the large batch without the
  cache. A priming step on two sentences comes first: AdamW allocates its state in its first step,
  after that step's activations are freed, so only from the second step on do activations, gradients
  and optimizer state coexist as in training.
- compare: one worker (no process group), our step against sentence-transformers' training step with
  MultipleNegativesRankingLoss (scale 1/τ) on the same checkpoint, the same texts (each side tokenizes
  them itself, each batch padded to its longest row: the token ids come out equal, a checked figure),
  batch, length, torch threads and optimizer, alternating step by step after warm-up (the order
  flipped every pair). The ratio is the median over pairs of their step time over ours, so load from
  other processes on a shared machine falls on both alike. Measured on two corpora: the task sentences
  (real single sentences, ~half of a batch padding at length 32: where skipping padding pays) and the
  generated lines (two or three sentences joined, mostly cut at 32 tokens: little padding to skip).

Pooling is the mean over real tokens on both sides (the checkpoint's own pooling, so both compute the
same embedding); SimCSE's [CLS]+MLP adds one H×H matmul per sentence, nothing measurable here.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

from dist_minbert.bench.common import (PROCESS_TIMEOUT_S, encoder_num_params, scratch_folder, spawn_group,
                                       start_process)
from dist_minbert.bench.flops import forward_flops_per_token
from dist_minbert.data.config import DataConfig

log = logging.getLogger(__name__)

TARGETS = {"step_ratio_vs_sentence_transformers": 1.2}  # ours faster by this much: our encoder skips padding
EPOCH_SENTENCES = 1_000_000  # epoch_hours_here: the study's corpus, 1M sentences
POOLING = "mean"
COMPARE_CORPORA = ("tasks", "generated")  # the headline ratio is on the first: real sentences


@dataclass
class ProjectionConfig:
    """Parameters of the bert-base GPU projection (not measurements: every figure derived from them is a projection).

    Compute per sentence on one GPU = the measured CPU seconds per sentence × the FLOP ratio bert-base/MiniLM
    (counted from both architectures at the measured tokens per sentence) / `gpu_vs_cpu_worker`.
    Communication per step: a ring all-gather of the second views (B×H per rank, forward) and its
    reduce-scatter (backward), and a ring all-reduce of the gradient (P values), none overlapped with compute.
    """

    gpu_counts: tuple[int, ...] = (8, 64)
    batch_size_per_gpu: int = 64  # SimCSE's batch per worker
    # One GPU's SimCSE step throughput over one CPU worker here (samples per second, same model). 2000 ≈ an A100
    # sustaining ~140 TFLOP/s (45% of its bf16 peak) against the ~70 GFLOP/s one CPU thread of this machine
    # reaches; the report gives the GPU FLOP/s it implies.
    gpu_vs_cpu_worker: float = 2000.0
    gpus_per_node: int = 8  # a ring within one node runs on NVLink; across nodes, on the network
    intra_node_gb_s: float = 150.0  # ring bus bandwidth within a node (NVLink; NCCL's busbw), GB/s
    intra_node_latency_us: float = 5.0  # per ring hop within a node
    inter_node_gb_s: float = 20.0  # ring bus bandwidth across nodes (one 200 Gb/s NIC per GPU, ~80% of line rate)
    inter_node_latency_us: float = 15.0  # per ring hop across nodes
    embedding_bytes: int = 2  # bf16 embeddings gathered
    gradient_bytes: int = 4  # fp32: DeepSpeed's bf16 mode accumulates gradients in fp32 (its default) and reduces those

    def __post_init__(self) -> None:
        if not self.gpu_counts or min(self.gpu_counts) < 2:
            raise ValueError(f"gpu_counts: {self.gpu_counts}; allowed: GPU counts >= 2")
        for name in ("gpu_vs_cpu_worker", "intra_node_gb_s", "inter_node_gb_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: {getattr(self, name)} must be > 0")


@dataclass
class SimCSEBenchConfig:
    checkpoint: str = "embedded"  # the encoder: "embedded" = all-MiniLM-L6-v2, or an HF BERT folder
    data_root: str = DataConfig().root  # CS224N files: the task sentences the corpus is generated from
    num_lines: int = 1_000_000  # generated corpus lines (streamed, prepared to shards first)
    num_workers: int = 2  # workers of the stream and memory groups
    threads_per_worker: int = 1  # torch threads of every process, both sides of the comparison included
    batch_size_per_worker: int = 64  # sentences per worker per step (SimCSE's 64)
    max_length: int = 32  # tokens per sentence, [CLS] and [SEP] included (SimCSE's 32)
    dropout: float = 0.1  # encoder dropout: the source of SimCSE's two views
    temperature: float = 0.05  # τ; sentence-transformers' scale = 1/τ
    lr: float = 3e-5  # AdamW, both sides
    prefetch: int = 2  # steps the data thread reads ahead
    prepare_workers: int = 0  # processes tokenizing the corpus (0 = one per core; 1 = this process, no pool to start)
    warmup_steps: int = 2  # untimed steps first (stream), and untimed steps of each side (compare)
    stream_steps: int = 12  # timed 2-worker steps
    cache_global_batch: int = 1024  # the GradCache run's global batch (sentences over all workers)
    cache_chunk_size: int = 32  # rows of the doubled batch per GradCache forward (grad_cache.simcse_gradients)
    uncached_large_batch: bool = True  # also the large batch without the cache, if it fits in available memory
    compare_batch_size: int = 64  # sentences per step of both sides of the comparison
    compare_pairs: int = 8  # timed pairs per corpus
    seed: int = 0
    output_dir: str = ""  # scratch folder (corpus, shards); "" = a temporary folder, removed afterwards
    projection: ProjectionConfig = dataclasses.field(default_factory=ProjectionConfig)

    def __post_init__(self) -> None:
        if isinstance(self.projection, dict):
            self.projection = ProjectionConfig(**self.projection)
        for name in ("num_lines", "num_workers", "threads_per_worker", "stream_steps", "compare_pairs",
                     "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} must be ≥ 1")
        for name in ("batch_size_per_worker", "compare_batch_size"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name}: {getattr(self, name)}; allowed: ≥ 2 (a sentence needs negatives)")
        if self.warmup_steps < 0 or self.prefetch < 0:
            raise ValueError("warmup_steps and prefetch must be ≥ 0")
        if self.cache_global_batch % self.num_workers or self.cache_global_batch // self.num_workers < 2:
            raise ValueError(f"cache_global_batch: {self.cache_global_batch} must divide by num_workers "
                             f"{self.num_workers}, ≥ 2 per worker")
        if self.cache_chunk_size < 1:
            raise ValueError(f"cache_chunk_size: {self.cache_chunk_size} must be ≥ 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: {self.dropout}; allowed: 0 <= dropout < 1")

    @property
    def cache_batch_per_worker(self) -> int:
        return self.cache_global_batch // self.num_workers


def quick_config(**overrides) -> SimCSEBenchConfig:
    """Seconds instead of minutes (tests, smoke runs): a small corpus and batches, few steps; same keys out."""
    quick = dict(num_lines=2000, prepare_workers=1, batch_size_per_worker=8, warmup_steps=1, stream_steps=3,
                 cache_global_batch=256, cache_chunk_size=8, compare_batch_size=16, compare_pairs=3)
    return SimCSEBenchConfig(**{**quick, **overrides})


# -- driver ------------------------------------------------------------------------------------------------------
def run_simcse_benchmark(config: SimCSEBenchConfig | None = None) -> dict:
    """Prepares the corpus, runs every group in fresh processes, returns the report (JSON-serialisable).

    The workers' stdout goes to stderr, so a caller can print the report alone on stdout.
    """
    config = config or SimCSEBenchConfig()
    start = time.perf_counter()
    load_before = os.getloadavg()
    with scratch_folder(config.output_dir, "bench-simcse-") as scratch:
        corpus, shards, prepare_s = _prepare(config, scratch)
        stream = _run_group(config, scratch, "stream", shards, config.batch_size_per_worker, None,
                            config.warmup_steps + config.stream_steps, num_timed=config.stream_steps)
        memory = {"batch_small_uncached": _memory_run(config, scratch, "memory-small", shards,
                                                      config.batch_size_per_worker, None),
                  "batch_large_cached": _memory_run(config, scratch, "memory-cached", shards,
                                                    config.cache_batch_per_worker, config.cache_chunk_size)}
        skipped = _uncached_large_skip(config, memory["batch_small_uncached"])
        if not skipped:
            try:
                memory["batch_large_uncached"] = _memory_run(config, scratch, "memory-uncached", shards,
                                                             config.cache_batch_per_worker, None)
            except RuntimeError as exc:  # killed for memory after all: the figure is missing, the rest stands
                skipped = f"failed: {exc}"
        began = time.perf_counter()
        compare = spawn_group(config, _compare_worker, 1, scratch / "compare", corpus)[0]
        log.info("bench simcse: compare took %.1f s", time.perf_counter() - began)
    return report(config, stream, memory, skipped, compare, prepare_s, wall_s=time.perf_counter() - start,
                  load_average=[round(x, 2) for x in (*load_before, *os.getloadavg())])


def _prepare(config: SimCSEBenchConfig, scratch: Path) -> tuple[str, str, float]:
    """The generated corpus and its shards (rebuilt only when the corpus changed: prepare's build key)."""
    from dist_minbert.data.corpus import generated_lines, task_corpus, write_lines
    from dist_minbert.data.prepare import prepare_corpus
    from dist_minbert.model.tokenizer import WordPieceTokenizer

    corpus, shards = str(scratch / "corpus.txt"), str(scratch / "corpus-shards")
    data = DataConfig(root=config.data_root)
    write_lines(corpus, generated_lines(task_corpus(data).sentences, config.num_lines))
    began = time.perf_counter()
    prepare_corpus(corpus, shards, WordPieceTokenizer.from_checkpoint(config.checkpoint), config.max_length,
                   dataclasses.replace(data, prepare_workers=config.prepare_workers), progress=False)
    prepare_s = time.perf_counter() - began
    log.info("bench simcse: %d lines prepared in %.1f s", config.num_lines, prepare_s)
    return corpus, shards, prepare_s


def _run_group(config: SimCSEBenchConfig, scratch: Path, name: str, shards: str, batch_per_worker: int,
               chunk_size: int | None, num_steps: int, num_timed: int, prime: bool = False) -> dict:
    """A fresh group of workers taking `num_steps` steps (after a priming step on two sentences if `prime`);
    rates over the last `num_timed`, the largest peak RSS."""
    job = {"shards": shards, "batch_per_worker": batch_per_worker, "chunk_size": chunk_size, "num_steps": num_steps,
           "prime": prime}
    began = time.perf_counter()
    ranks = spawn_group(config, _simcse_worker, config.num_workers, scratch / name, job)
    log.info("bench simcse: %s (%d per worker, chunk %s, %d steps) took %.1f s", name, batch_per_worker, chunk_size,
             num_steps, time.perf_counter() - began)
    for rank in ranks:
        rank["sentences_per_s"] = batch_per_worker * num_timed / sum(rank["step_s_all"][-num_timed:])
        rank["sentences_per_cpu_s"] = batch_per_worker * num_timed / sum(rank["cpu_s_all"][-num_timed:])
    return {"batch_size_per_worker": batch_per_worker, "global_batch": batch_per_worker * len(ranks),
            "chunk_size": chunk_size, "num_steps": num_steps, "num_timed_steps": num_timed,
            "sentences_per_s_per_worker": min(r["sentences_per_s"] for r in ranks),
            "sentences_per_cpu_s_per_worker": min(r["sentences_per_cpu_s"] for r in ranks),
            "peak_rss_mb_per_worker": max(r["peak_rss_mb"] for r in ranks),
            "step_s": statistics.median(s for r in ranks for s in r["step_s_all"][-num_timed:]),
            "ranks": ranks}


def _memory_run(config: SimCSEBenchConfig, scratch: Path, name: str, shards: str, batch_per_worker: int,
                chunk_size: int | None) -> dict:
    """One step in a fresh group, AdamW's state already in place (the priming step)."""
    return _run_group(config, scratch, name, shards, batch_per_worker, chunk_size, 1, num_timed=1, prime=True)


def _uncached_large_skip(config: SimCSEBenchConfig, small: dict) -> str:
    """Why the large uncached batch is not run (empty when it is): it is off, or would not fit in memory now.

    Its activations are extrapolated from the small batch's: the peak over the RSS after loading, less the
    gradients and AdamW's two moments (3 × 4 bytes per parameter), grows linearly in rows. On a machine shared
    with other work, a run that cannot fit must not push others out of memory.
    """
    if not config.uncached_large_batch:
        return "off (uncached_large_batch: false)"
    fixed = 3 * 4 * small["ranks"][0]["num_params"] / 2**20
    rows = config.cache_batch_per_worker / config.batch_size_per_worker
    needed_mb = config.num_workers * max(rank["rss_after_load_mb"] + fixed
                                         + (rank["peak_rss_mb"] - rank["rss_after_load_mb"] - fixed) * rows
                                         for rank in small["ranks"])
    available_mb = _mem_available_mb()
    if needed_mb > 0.8 * available_mb:
        return f"needs ~{needed_mb:.0f} MB, {available_mb:.0f} MB available"
    return ""


def _mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 1024  # kB


# -- report ------------------------------------------------------------------------------------------------------
def report(config: SimCSEBenchConfig, stream: dict, memory: dict, skipped: str, compare: dict, prepare_s: float,
           wall_s: float, load_average: list[float]) -> dict:
    """The JSON object: headline figures, GradCache's memory, the comparison, the projection, targets and verdicts."""
    rate = stream["sentences_per_s_per_worker"]
    ratios = {corpus: paired_ratio(compare["corpora"][corpus]) for corpus in COMPARE_CORPORA}
    passed = {"step_ratio_vs_sentence_transformers": ratios["tasks"] >= TARGETS["step_ratio_vs_sentence_transformers"]}
    peaks = {name: run["peak_rss_mb_per_worker"] for name, run in memory.items()}
    grad_cache = {
        "global_batch": config.cache_global_batch, "chunk_size": config.cache_chunk_size,
        "small_batch_per_worker": config.batch_size_per_worker, "num_workers": config.num_workers,
        "peak_rss_mb_per_worker": peaks,
        "step_s": {name: run["step_s"] for name, run in memory.items()},
        "sentences_per_s_per_worker": {name: run["sentences_per_s_per_worker"] for name, run in memory.items()},
        "sentences_per_cpu_s_per_worker": {name: run["sentences_per_cpu_s_per_worker"] for name, run in memory.items()},
        "cached_large_over_uncached_small_rss": peaks["batch_large_cached"] / peaks["batch_small_uncached"],
        "uncached_large_skipped": skipped,
        "runs": memory,
    }
    if "batch_large_uncached" in peaks:
        grad_cache["cached_large_over_uncached_large_rss"] = peaks["batch_large_cached"] / peaks["batch_large_uncached"]
    return {
        "sentences_per_s_per_worker": rate,
        "sentences_per_cpu_s_per_worker": stream["sentences_per_cpu_s_per_worker"],
        "peak_rss_mb_per_worker": stream["peak_rss_mb_per_worker"],
        "epoch_hours_here": EPOCH_SENTENCES / (rate * config.num_workers) / 3600,
        "grad_cache": grad_cache,
        "step_ratio_vs_sentence_transformers": ratios["tasks"],
        "step_ratio_vs_sentence_transformers_generated_lines": ratios["generated"],
        "cpu_ratio_vs_sentence_transformers": paired_ratio(compare["corpora"]["tasks"], "cpu_s_all"),
        "compare": compare,
        "projection": projection(config.projection, compare, config.max_length),
        "targets": dict(TARGETS),
        "passed": passed,
        "all_passed": all(passed.values()),
        "pooling": POOLING,
        "stream": stream,
        "prepare_s": prepare_s,
        "config": asdict(config),
        "load_average_before_after": load_average,
        "wall_s": wall_s,
    }


def paired_ratio(corpus: dict, key: str = "step_s_all") -> float:
    """Median over the timed pairs of sentence-transformers' step time over ours (> 1: ours is faster); the two
    steps of a pair ran back to back, under the same load from other processes, so each ratio cancels most of it."""
    return statistics.median(st / ours for st, ours in zip(corpus["st"][key], corpus["ours"][key]))


# -- projection --------------------------------------------------------------------------------------------------
def train_flops_per_sentence(bert: dict, tokens: float) -> float:
    """FLOPs of one SimCSE training sentence: two views, each a forward and a backward (2× the forward)."""
    return 2 * 3 * tokens * forward_flops_per_token(bert, tokens)


def ring_all_gather_s(num_ranks: int, bytes_per_rank: float, gb_s: float, latency_us: float) -> float:
    """Ring all-gather of `bytes_per_rank` from each of N ranks: N − 1 hops, each moving one rank's piece.
    A reduce-scatter of the same total (its backward) costs the same."""
    return (num_ranks - 1) * (latency_us * 1e-6 + bytes_per_rank / (gb_s * 1e9))


def ring_all_reduce_s(num_ranks: int, total_bytes: float, gb_s: float, latency_us: float) -> float:
    """Ring all-reduce of `total_bytes` on every rank: a reduce-scatter, then an all-gather; 2(N − 1) hops of
    1/N of the bytes each."""
    return 2 * (num_ranks - 1) * (latency_us * 1e-6 + total_bytes / num_ranks / (gb_s * 1e9))


def projection(params: ProjectionConfig, compare: dict, max_length: int) -> dict:
    """bert-base SimCSE steps on N GPUs, from our measured step on the generated lines (the scale corpus): its
    median CPU seconds, the compute itself (one thread: wall-clock adds only the waits for a shared core)."""
    from dist_minbert.model.bert import BertConfig

    measured = compare["corpora"]["generated"]
    tokens = measured["tokens_per_sentence"]
    cpu_s_per_sentence = statistics.median(measured["ours"]["cpu_s_all"]) / compare["batch_size"]
    small, base = compare["encoder_config"], asdict(BertConfig())  # BertConfig's defaults are bert-base's
    small_flops, base_flops = train_flops_per_sentence(small, tokens), train_flops_per_sentence(base, tokens)
    flop_ratio = base_flops / small_flops
    gpu_s_per_sentence = cpu_s_per_sentence * flop_ratio / params.gpu_vs_cpu_worker
    num_params = encoder_num_params(BertConfig())
    batch = params.batch_size_per_gpu
    rows = {}
    for num_gpus in params.gpu_counts:
        intra = num_gpus <= params.gpus_per_node
        gb_s = params.intra_node_gb_s if intra else params.inter_node_gb_s
        latency = params.intra_node_latency_us if intra else params.inter_node_latency_us
        compute = batch * gpu_s_per_sentence
        # forward: all-gather of the second views (B×H per rank); backward: its reduce-scatter, the same cost.
        gather = 2 * ring_all_gather_s(num_gpus, batch * base["hidden_size"] * params.embedding_bytes, gb_s, latency)
        reduce = ring_all_reduce_s(num_gpus, num_params * params.gradient_bytes, gb_s, latency)
        step = compute + gather + reduce
        rows[f"{num_gpus}_gpus"] = {
            "num_gpus": num_gpus, "global_batch": batch * num_gpus, "ring": "intra-node" if intra else "inter-node",
            "compute_s": compute, "embedding_gather_s": gather, "gradient_all_reduce_s": reduce, "step_s": step,
            "comm_fraction": (gather + reduce) / step, "sentences_per_s": batch * num_gpus / step,
            "epoch_minutes": EPOCH_SENTENCES / (batch * num_gpus / step) / 60,
        }
    return {
        "label": "projection",
        "note": "derived from one measurement and stated parameters, not measured on GPUs; communication is not "
                "overlapped with compute (the step time is an upper bound on the model's own terms)",
        "model": "bert-base (BertConfig defaults)", "num_params": num_params,
        "measured_cpu_s_per_sentence": cpu_s_per_sentence, "tokens_per_sentence": tokens,
        "train_flops_per_sentence": {"measured_encoder": small_flops, "bert_base": base_flops},
        "flop_ratio_bert_base_over_measured": flop_ratio,
        "measured_cpu_flop_s": small_flops / cpu_s_per_sentence,
        "implied_gpu_flop_s": base_flops / gpu_s_per_sentence,
        "gpu_s_per_sentence": gpu_s_per_sentence,
        "max_length": max_length,
        "parameters": asdict(params),
        "gpus": rows,
    }


# -- worker side -------------------------------------------------------------------------------------------------
def _simcse_worker(rank: int, world_size: int, store: str, raw: dict, job: dict, results) -> None:
    """One worker of a group: streams its share of each step's global batch and takes SimCSE steps."""
    try:
        started = time.perf_counter()
        start_process(raw)
        import torch
        import torch.distributed as dist

        from dist_minbert.contrastive.grad_cache import simcse_gradients
        from dist_minbert.contrastive.model import SentenceEncoder
        from dist_minbert.data.collate import collator
        from dist_minbert.data.prefetch import Prefetcher
        from dist_minbert.data.shards import open_source
        from dist_minbert.data.step_reader import StepReader
        from dist_minbert.data.stream import TaskStream
        from dist_minbert.model.checkpoint import load_encoder
        from dist_minbert.model.tokenizer import WordPieceTokenizer
        from dist_minbert.observe.memory import peak_rss_mb, rss_mb

        config = SimCSEBenchConfig(**raw)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=PROCESS_TIMEOUT_S))
        torch.manual_seed(config.seed + rank)  # each worker its own dropout masks
        tokenizer = WordPieceTokenizer.from_checkpoint(config.checkpoint)
        embed = SentenceEncoder(load_encoder(config.checkpoint, dropout=config.dropout), POOLING).train()
        parameters = list(embed.parameters())
        optimizer = torch.optim.AdamW(parameters, lr=config.lr, fused=True)
        rss_after_load = rss_mb()
        load_s = time.perf_counter() - started
        if job["prime"]:
            _prime(embed, tokenizer, parameters, optimizer, config, world_size)
        global_batch = job["batch_per_worker"] * world_size
        read = StepReader({"corpus": TaskStream(open_source(job["shards"]), config.seed, world_size, rank)},
                          {"corpus": collator(tokenizer, "single", config.max_length)},
                          lambda position: {"corpus": global_batch})
        wall, cpu, wait, reduce_s, tokens = [], [], [], [], []
        with Prefetcher(read, [(0, step) for step in range(job["num_steps"])], config.prefetch) as steps:
            began, began_cpu = time.perf_counter(), time.process_time()
            for step in steps:
                batch = step.micro_batches[0]["corpus"].tensors
                read_s = time.perf_counter() - began
                loss, grads = simcse_gradients(embed, batch, parameters, temperature=config.temperature,
                                               negatives="global", chunk_size=job["chunk_size"])
                reduce_began = time.perf_counter()
                _average_gradients(parameters, grads, world_size)
                reduce_s.append(time.perf_counter() - reduce_began)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                now, now_cpu = time.perf_counter(), time.process_time()
                wall.append(now - began)
                cpu.append(now_cpu - began_cpu)
                wait.append(read_s)
                tokens.append(float(batch["attention_mask"].sum()) / len(batch["attention_mask"]))
                began, began_cpu = now, now_cpu
        results.put({"rank": rank, "step_s_all": wall, "cpu_s_all": cpu, "data_wait_s_all": wait,
                     "all_reduce_s_all": reduce_s, "tokens_per_sentence": statistics.mean(tokens),
                     "last_loss": float(loss), "num_params": sum(p.numel() for p in parameters),
                     "rss_after_load_mb": rss_after_load, "peak_rss_mb": peak_rss_mb(), "load_s": load_s,
                     "run_s": time.perf_counter() - started})
        dist.destroy_process_group()
    except BaseException as exc:  # reported to the driver, which raises
        results.put({"rank": rank, "error": repr(exc)})


def _prime(embed, tokenizer, parameters: list, optimizer, config: SimCSEBenchConfig, world_size: int) -> None:
    """One step on two short sentences, not measured: it allocates AdamW's state (and the gradients' first
    buffers), so the measured step holds what every later training step holds."""
    from dist_minbert.contrastive.grad_cache import simcse_gradients
    from dist_minbert.data.collate import collate

    batch = collate({"a": tokenizer.encode(["a short sentence .", "another one ."])}, "single", config.max_length,
                    tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id).tensors
    _, grads = simcse_gradients(embed, batch, parameters, temperature=config.temperature, negatives="global")
    _average_gradients(parameters, grads, world_size)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _average_gradients(parameters: list, grads: list, world_size: int) -> None:
    """The data-parallel reduction DeepSpeed's ZeRO-0 does: one all-reduce of every gradient, divided by N; the
    result set as .grad. Parameters the loss never reaches (the unused pooler) have None on every rank alike."""
    import torch
    import torch.distributed as dist

    present = [(p, g) for p, g in zip(parameters, grads) if g is not None]
    flat = torch.cat([g.reshape(-1) for _, g in present])  # one bucket: one collective
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in present:
        p.grad = flat[offset:offset + g.numel()].view_as(g)
        offset += g.numel()


def _compare_worker(rank: int, world_size: int, store: str, raw: dict, corpus: str, results) -> None:
    """One process, no group: our SimCSE step and sentence-transformers' MNRL step, alternating."""
    try:
        start_process(raw)
        os.environ["HF_HUB_OFFLINE"] = "1"
        import numpy as np

        from dist_minbert.data.corpus import task_corpus

        config = SimCSEBenchConfig(**raw)
        rng = np.random.default_rng(config.seed)
        num_batches = config.warmup_steps + config.compare_pairs
        with open(corpus, encoding="utf-8") as f:
            lines = f.read().splitlines()
        sources = {"tasks": task_corpus(DataConfig(root=config.data_root)).sentences, "generated": lines}
        texts = {name: [[sentences[i] for i in rng.choice(len(sentences), config.compare_batch_size, replace=False)]
                        for _ in range(num_batches)] for name, sentences in sources.items()}
        sides = _Sides(config)
        out = {"rank": rank, "batch_size": config.compare_batch_size, "threads": config.threads_per_worker,
               "encoder_config": asdict(sides.encoder.config),
               "same_function": sides.same_function(texts[COMPARE_CORPORA[0]][0]), "corpora": {}}
        for name in COMPARE_CORPORA:
            out["corpora"][name] = sides.compare(texts[name], config.warmup_steps)
        results.put(out)
    except BaseException as exc:
        results.put({"rank": rank, "error": repr(exc)})


class _Sides:
    """Both models from the same checkpoint, each with its own fused AdamW; the step functions that are timed."""

    def __init__(self, config: SimCSEBenchConfig) -> None:
        import torch
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        from dist_minbert.contrastive.model import SentenceEncoder
        from dist_minbert.model.checkpoint import load_encoder, resolve_checkpoint
        from dist_minbert.model.tokenizer import WordPieceTokenizer

        self.config = config
        torch.manual_seed(config.seed)
        self.tokenizer = WordPieceTokenizer.from_checkpoint(config.checkpoint)
        self.embed = SentenceEncoder(load_encoder(config.checkpoint, dropout=config.dropout), POOLING).train()
        self.encoder = self.embed.encoder
        self.parameters = list(self.embed.parameters())
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, fused=True)
        self.st = SentenceTransformer(resolve_checkpoint(config.checkpoint), device="cpu")
        self.st.max_seq_length = config.max_length
        for module in self.st.modules():  # every dropout, attention's too (BERT's SDPA path passes its .p)
            if isinstance(module, torch.nn.Dropout):
                module.p = config.dropout
        self.st.train()
        self.st_loss = MultipleNegativesRankingLoss(self.st, scale=1.0 / config.temperature)
        self.st_optimizer = torch.optim.AdamW(self.st.parameters(), lr=config.lr, fused=True)

    def ours(self, batch: dict) -> float:
        from dist_minbert.contrastive.grad_cache import simcse_gradients

        loss, grads = simcse_gradients(self.embed, batch, self.parameters, temperature=self.config.temperature,
                                       negatives="local")
        for p, g in zip(self.parameters, grads):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss)

    def theirs(self, features: dict) -> float:
        """sentence-transformers' training step: the loss runs the model on each column (anchor, positive: the same
        texts, so two forwards with independent dropout), then backward and the optimizer."""
        loss = self.st_loss([dict(features), dict(features)], None)  # copies: the model writes into its inputs
        loss.backward()
        self.st_optimizer.step()
        self.st_optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def compare(self, batches: list[list[str]], warmup_steps: int) -> dict:
        from dist_minbert.data.collate import collate

        tok, max_length = self.tokenizer, self.config.max_length
        ours_in = [collate({"a": tok.encode(texts)}, "single", max_length, tok.cls_id, tok.sep_id,
                           tok.pad_id).tensors for texts in batches]
        theirs_in = [self.st.preprocess(texts) for texts in batches]
        same_ids = all(a["input_ids"].equal(b["input_ids"]) for a, b in zip(ours_in, theirs_in))
        timed = {"ours": {"step_s_all": [], "cpu_s_all": [], "loss_all": []},
                 "st": {"step_s_all": [], "cpu_s_all": [], "loss_all": []}}
        steps = {"ours": (self.ours, ours_in), "st": (self.theirs, theirs_in)}
        for i in range(len(batches)):
            for side in (("ours", "st") if i % 2 == 0 else ("st", "ours")):
                fn, inputs = steps[side]
                wall, cpu = time.perf_counter(), time.process_time()
                loss = fn(inputs[i])
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if i >= warmup_steps:
                    timed[side]["step_s_all"].append(wall)
                    timed[side]["cpu_s_all"].append(cpu)
                    timed[side]["loss_all"].append(loss)
        masks = [batch["attention_mask"] for batch in ours_in]
        return {**timed, "same_token_ids": same_ids,
                "tokens_per_sentence": float(sum(m.sum() for m in masks)) / sum(len(m) for m in masks),
                "padding_fraction": 1 - float(sum(m.sum() for m in masks)) / sum(m.numel() for m in masks)}

    def same_function(self, texts: list[str]) -> dict[str, float]:
        """Both sides on one batch before any step, dropout off: the largest difference of the unit embeddings
        (the loss sees cosines only), and both losses with each sentence's positive swapped for its neighbour's
        (a few nats; with the sentence itself as positive and no dropout both are ~1e-6, below what rounding
        lets one compare). Equal up to rounding: both sides compute the same function of the same texts."""
        import torch
        import torch.nn.functional as F

        from dist_minbert.contrastive.loss import simcse_loss
        from dist_minbert.data.collate import collate

        tok = self.tokenizer
        ours_in = collate({"a": tok.encode(texts)}, "single", self.config.max_length, tok.cls_id, tok.sep_id,
                          tok.pad_id).tensors
        self.embed.eval()
        self.st.eval()
        try:
            with torch.no_grad():
                z = self.embed(ours_in)  # (B, H)
                e = self.st(self.st.preprocess(texts))["sentence_embedding"]  # (B, H); unit if it has Normalize
                ours = simcse_loss(z, z.roll(1, 0), self.config.temperature, "local")
                theirs = self.st_loss.compute_loss_from_embeddings([e, e.roll(1, 0)], None)
        finally:
            self.embed.train()
            self.st.train()
        return {"embedding_max_abs_diff": float((F.normalize(z, dim=-1) - F.normalize(e, dim=-1)).abs().max()),
                "loss_ours": float(ours), "loss_st": float(theirs)}
