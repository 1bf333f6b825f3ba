"""bench data: the generated corpus and the measurement's bookkeeping (small sizes; speed is not asserted)."""

from __future__ import annotations

import math
import os

from dist_minbert.data.bench import passed_targets, run_data_benchmark
from dist_minbert.data.shards import open_source

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cs224n")


def test_benchmark_reports_every_measure(tmp_path):
    result = run_data_benchmark(str(tmp_path), num_lines=4_000, csv_rows=1_000, num_ranks=2, prepare_workers=1,
                                data_root=DATA)
    assert result["stream_samples_per_rank"] == (4_000 // 128) * 64  # full steps of a global batch of 2 x 64
    assert len(result["stream_samples_per_s_each_rank"]) == 2 and result["prepare_rejects"] == 0
    for key in ("prepare_sentences_per_s", "prepare_sentences_per_cpu_s", "tokenizer_sentences_per_s",
                "stream_samples_per_s_per_rank", "stream_samples_per_cpu_s_per_rank", "csv_in_memory_samples_per_s"):
        assert math.isfinite(result[key]) and result[key] > 0
    assert 0 <= result["stream_rss_growth_mb"] < 200
    # The bare tokenizer ran on the lines prepare wrote: as many, giving the tokens the shards hold.
    shards = open_source(str(tmp_path / "corpus-shards"))
    assert result["tokenizer_lines"] == len(shards) == 4_000
    assert result["tokenizer_tokens_kept"] == int(shards.row_lengths(0, len(shards)).sum())
    # one worker tokenizes in-process on Rust's default pool, so the bare tokenizer gets every core too
    assert result["tokenizer_threads"] == os.cpu_count()
    assert set(result["targets"]) == set(result["passed"]) == {"prepare_vs_tokenizer", "stream_vs_csv_ratio"}


def test_targets_are_lower_bounds_on_ratios():
    assert passed_targets({"prepare_vs_tokenizer": 0.85, "stream_vs_csv_ratio": 4.99}) == {
        "prepare_vs_tokenizer": True, "stream_vs_csv_ratio": False}
    assert passed_targets({"prepare_vs_tokenizer": 0.84, "stream_vs_csv_ratio": 5.0, "prepare_sentences_per_s": 1}) \
        == {"prepare_vs_tokenizer": False, "stream_vs_csv_ratio": True}  # absolute rates are not targets
