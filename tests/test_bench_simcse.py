"""`bench simcse` in quick mode on the tiny random BERT: every key, and figures that must agree with the raw
measurements the report carries beside them; then the projection's cost model on hand-worked numbers.

The tiny encoder (hidden 32, 2 layers) keeps every step in milliseconds, so the run's time is process starts;
its activations at the large batch still stand far above the processes' baseline RSS: 256 sentences per
worker, 512 rows of the doubled batch × ~31 tokens × 2 layers, against one chunk of 8 rows with the cache.
"""
from __future__ import annotations

import math
import statistics

import pytest

from dist_minbert.bench.simcse import (EPOCH_SENTENCES, ProjectionConfig, quick_config, ring_all_gather_s,
                                       ring_all_reduce_s, run_simcse_benchmark, train_flops_per_sentence)
from dist_minbert.model.bert import BertConfig


@pytest.fixture(scope="module")
def bench(tiny_checkpoint, shared_data, tmp_path_factory) -> dict:
    config = quick_config(checkpoint=tiny_checkpoint, data_root=str(shared_data), cache_global_batch=512,
                          output_dir=str(tmp_path_factory.mktemp("bench-simcse")))
    return run_simcse_benchmark(config)


def test_report_has_every_key(bench) -> None:
    for key in ("sentences_per_s_per_worker", "peak_rss_mb_per_worker", "epoch_hours_here",
                "step_ratio_vs_sentence_transformers", "step_ratio_vs_sentence_transformers_generated_lines"):
        assert math.isfinite(bench[key]) and bench[key] > 0, key
    assert bench["targets"] == {"step_ratio_vs_sentence_transformers": 1.2}
    assert set(bench["passed"]) == set(bench["targets"])
    assert bench["pooling"] == "mean"
    assert bench["projection"]["label"] == "projection"
    assert len(bench["load_average_before_after"]) == 6
    assert bench["config"]["num_workers"] == 2 and bench["config"]["batch_size_per_worker"] == 8


def test_headline_figures_follow_from_the_stream_workers(bench) -> None:
    stream, config = bench["stream"], bench["config"]
    assert len(stream["ranks"]) == 2
    timed = config["stream_steps"]
    rates = [config["batch_size_per_worker"] * timed / sum(rank["step_s_all"][-timed:]) for rank in stream["ranks"]]
    assert all(len(rank["step_s_all"]) == config["warmup_steps"] + timed for rank in stream["ranks"])
    assert bench["sentences_per_s_per_worker"] == pytest.approx(min(rates), rel=1e-12)
    assert bench["peak_rss_mb_per_worker"] == max(rank["peak_rss_mb"] for rank in stream["ranks"])
    assert bench["epoch_hours_here"] == pytest.approx(EPOCH_SENTENCES / (2 * min(rates)) / 3600, rel=1e-12)
    for rank in stream["ranks"]:  # the generated lines: 2-3 sentences joined, most cut at max_length 32
        assert 2 < rank["tokens_per_sentence"] <= config["max_length"]


def test_ratio_is_the_median_of_the_paired_ratios(bench) -> None:
    for key, corpus in (("step_ratio_vs_sentence_transformers", "tasks"),
                        ("step_ratio_vs_sentence_transformers_generated_lines", "generated")):
        timings = bench["compare"]["corpora"][corpus]
        ours, st = timings["ours"]["step_s_all"], timings["st"]["step_s_all"]
        assert len(ours) == len(st) == bench["config"]["compare_pairs"]
        assert bench[key] == statistics.median(s / o for s, o in zip(st, ours))
    ratio = bench["step_ratio_vs_sentence_transformers"]
    assert bench["passed"]["step_ratio_vs_sentence_transformers"] == (ratio >= 1.2)
    assert bench["all_passed"] == all(bench["passed"].values())


def test_both_sides_see_the_same_tokens_and_compute_the_same_function(bench) -> None:
    compare = bench["compare"]
    for corpus in ("tasks", "generated"):
        assert compare["corpora"][corpus]["same_token_ids"], corpus
    # single real sentences pad more than joined lines cut at the maximum length
    assert compare["corpora"]["tasks"]["padding_fraction"] > compare["corpora"]["generated"]["padding_fraction"]
    same = compare["same_function"]
    assert same["embedding_max_abs_diff"] < 1e-5
    assert same["loss_ours"] == pytest.approx(same["loss_st"], rel=1e-5)
    assert same["loss_ours"] > 0.1  # neighbours as positives: a loss that can tell two functions apart


def test_grad_cache_holds_less_than_the_uncached_large_batch(bench) -> None:
    cache = bench["grad_cache"]
    assert cache["uncached_large_skipped"] == ""
    peaks = cache["peak_rss_mb_per_worker"]
    assert set(peaks) == {"batch_small_uncached", "batch_large_cached", "batch_large_uncached"}
    assert peaks["batch_large_cached"] < peaks["batch_large_uncached"]
    assert cache["cached_large_over_uncached_large_rss"] == peaks["batch_large_cached"] / peaks["batch_large_uncached"]
    runs = cache["runs"]
    assert runs["batch_large_cached"]["global_batch"] == runs["batch_large_uncached"]["global_batch"] == 512
    assert runs["batch_large_cached"]["chunk_size"] == 8 and runs["batch_large_uncached"]["chunk_size"] is None
    assert runs["batch_small_uncached"]["global_batch"] == 16


def test_projection_rows_add_up(bench) -> None:
    projection = bench["projection"]
    assert projection["flop_ratio_bert_base_over_measured"] > 100  # bert-base over the tiny 2-layer, hidden-32 BERT
    rows = projection["gpus"]
    assert set(rows) == {"8_gpus", "64_gpus"}
    for row in rows.values():
        parts = row["compute_s"] + row["embedding_gather_s"] + row["gradient_all_reduce_s"]
        assert row["step_s"] == pytest.approx(parts)
        assert row["sentences_per_s"] == pytest.approx(64 * row["num_gpus"] / row["step_s"])
    # the same per-GPU compute; across nodes the ring is slower and longer
    assert rows["8_gpus"]["compute_s"] == rows["64_gpus"]["compute_s"]
    assert rows["64_gpus"]["gradient_all_reduce_s"] > rows["8_gpus"]["gradient_all_reduce_s"]


def test_ring_costs_by_hand() -> None:
    # all-reduce of 1 GB on 8 ranks at 100 GB/s: 2·7 hops of 1/8 GB at 1.25 ms each = 17.5 ms, plus 14 hops' 5 µs
    assert ring_all_reduce_s(8, 1e9, 100.0, 5.0) == pytest.approx(0.0175 + 14 * 5e-6)
    # all-gather of 1 MB per rank on 4 ranks at 10 GB/s: 3 hops of 1 MB at 0.1 ms each, plus 3 latencies of 10 µs
    assert ring_all_gather_s(4, 1e6, 10.0, 10.0) == pytest.approx(3 * 1e-4 + 3 * 1e-5)


def test_flop_ratio_of_bert_base_over_minilm_by_hand() -> None:
    # per token per layer, forward: 2·(4H² + 2HI) + 4TH; MiniLM H=384, I=1536, 6 layers; bert-base 768, 3072, 12.
    # T = 32: MiniLM 6·(2·(589,824 + 1,179,648) + 49,152) = 21,528,576; bert-base 12·(2·(2,359,296 + 4,718,592)
    # + 98,304) = 171,048,960: a ratio of 7.945.
    minilm = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6}
    base = {key: getattr(BertConfig(), key) for key in minilm}
    assert train_flops_per_sentence(minilm, 32) == 2 * 3 * 32 * 21_528_576
    assert train_flops_per_sentence(base, 32) / train_flops_per_sentence(minilm, 32) == pytest.approx(7.945, abs=1e-3)
    with pytest.raises(ValueError):
        ProjectionConfig(gpu_counts=(1, 8))


def test_cli_offers_bench_simcse() -> None:
    from dist_minbert.cli import build_parser

    args = build_parser().parse_args(["bench", "simcse", "--json", "--lines", "5000"])
    assert (args.what, args.json, args.lines) == ("simcse", True, 5000)
