"""bench data: the generated corpus and the measurement's bookkeeping (small sizes; speed is not asserted)."""

from __future__ import annotations

import math
import os

from dist_minbert.data.bench import TARGETS, generated_lines, run_data_benchmark, shared_sentences

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cs224n")


def test_generated_lines_are_distinct_joins_of_two_or_three_real_sentences():
    sentences = shared_sentences(DATA)
    assert 40_000 < len(sentences) < 60_000 and len(set(sentences)) == len(sentences)
    lines = list(generated_lines(sentences, 150_000))
    assert len(set(lines)) == 150_000
    known = set(sentences)
    assert lines[1] == f"{sentences[1]} {sentences[2]}" and sentences[0] in lines[0] and lines[0] not in known
    assert lines[len(sentences) + 1] == f"{sentences[1]} {sentences[3]}"  # second pass pairs sentences differently


def test_benchmark_reports_every_measure(tmp_path):
    result = run_data_benchmark(str(tmp_path), num_lines=4_000, csv_rows=1_000, num_ranks=2, prepare_workers=1,
                                data_root=DATA)
    assert result["stream_samples_per_rank"] == (4_000 // 128) * 64  # full steps of a global batch of 2 x 64
    assert len(result["stream_samples_per_s_each_rank"]) == 2 and result["prepare_rejects"] == 0
    for key in ("prepare_sentences_per_s", "prepare_sentences_per_cpu_s", "stream_samples_per_s_per_rank",
                "stream_samples_per_cpu_s_per_rank", "csv_in_memory_samples_per_s"):
        assert math.isfinite(result[key]) and result[key] > 0
    assert 0 <= result["stream_rss_growth_mb"] < TARGETS["stream_rss_growth_mb"]
    assert result["stream_vs_csv_ratio"] == result["stream_samples_per_s_per_rank"] / result["csv_in_memory_samples_per_s"]
    assert set(result["meets_targets"]) == set(TARGETS)
