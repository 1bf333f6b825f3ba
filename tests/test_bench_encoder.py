"""`bench encoder` in quick mode on the tiny random BERT: every key, headline figures that follow from the raw
step times the report carries, MFU by hand, and both sides computing the same function."""
from __future__ import annotations

import math
import statistics

import pytest

from dist_minbert.bench.encoder import TARGETS, EncoderBenchConfig, quick_config, run_encoder_benchmark
from dist_minbert.bench.flops import forward_flops_per_token


@pytest.fixture(scope="module")
def bench(tiny_checkpoint, shared_data) -> dict:
    return run_encoder_benchmark(quick_config(checkpoint=tiny_checkpoint, data_root=str(shared_data)))


def test_report_has_every_key(bench) -> None:
    for key in ("train_ratio_fp32", "train_ratio_bf16", "train_ratio_real_batches", "forward_ratio_fp32",
                "mfu_fp32", "mfu_bf16"):
        assert math.isfinite(bench[key]) and bench[key] > 0, key
    assert bench["targets"] == TARGETS
    assert bench["passed"] == {name: bench[name] >= bound for name, bound in TARGETS.items()}
    assert bench["all_passed"] == all(bench["passed"].values())
    assert len(bench["load_average_before_after"]) == 6
    assert bench["torch_threads"] == 1
    assert set(bench["cases"]) == {"train_fp32_4x16", "train_fp32_4x32", "train_bf16_4x16", "train_bf16_4x32",
                                   "forward_fp32_4x16", "forward_fp32_4x32", "train_fp32_real_max32"}
    assert set(bench["ours_samples_per_s"]) == set(bench["transformers_samples_per_s"]) == set(bench["cases"])
    for precision in ("fp32", "bf16"):
        peak = bench["matmul_peak_flop_s"][precision]
        assert peak["flop_s"] == max(peak["by_shape"].values()) > 0
        assert peak["samples"] == 1 + len(bench["cases"])  # before the cases and after each


def test_headline_ratios_are_the_smallest_paired_medians(bench) -> None:
    cases, pairs = bench["cases"], bench["config"]["pairs"]
    for name, case in cases.items():
        ours, theirs = case["ours"]["step_s_all"], case["transformers"]["step_s_all"]
        assert len(ours) == len(theirs) == pairs
        assert case["ratio"] == statistics.median(t / o for t, o in zip(theirs, ours))
        assert case["fastest_step_ratio"] == min(theirs) / min(ours)
        assert case["ours_samples_per_s"] == pytest.approx(4 * pairs / sum(ours), rel=1e-12)
    assert bench["train_ratio_fp32"] == min(cases["train_fp32_4x16"]["ratio"], cases["train_fp32_4x32"]["ratio"])
    assert bench["train_ratio_bf16"] == min(cases["train_bf16_4x16"]["ratio"], cases["train_bf16_4x32"]["ratio"])
    assert bench["forward_ratio_fp32"] == min(cases["forward_fp32_4x16"]["ratio"], cases["forward_fp32_4x32"]["ratio"])
    assert bench["train_ratio_real_batches"] == cases["train_fp32_real_max32"]["ratio"]


def test_real_batches_are_padded_and_fixed_ones_are_not(bench) -> None:
    cases = bench["cases"]
    real = cases["train_fp32_real_max32"]
    assert 0.3 < real["real_token_fraction"] < 1 and max(real["widths"]) <= 32
    assert cases["train_fp32_4x16"]["real_token_fraction"] == 1 and cases["train_fp32_4x16"]["widths"] == [16]


def test_mfu_by_hand(bench, tiny_checkpoint) -> None:
    # the tiny BERT: H 32, I 64, 2 layers; per token at T = 16: 2 · (2·(4·1024 + 2·2048) + 4·16·32) = 36,864
    bert = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    assert forward_flops_per_token(bert, 16) == 36_864
    case = bench["cases"]["train_fp32_4x16"]
    flop_s = 3 * 36_864 * 16 * case["ours_samples_per_s"]
    assert case["ours_flop_s"] == pytest.approx(flop_s, rel=1e-12)
    assert bench["mfu_fp32"] == pytest.approx(flop_s / bench["matmul_peak_flop_s"]["fp32"]["flop_s"], rel=1e-12)
    forward = bench["cases"]["forward_fp32_4x16"]
    assert forward["transformers_flop_s"] == pytest.approx(36_864 * 16 * forward["transformers_samples_per_s"])
    assert "ours_mfu" not in bench["cases"]["train_fp32_real_max32"]  # padded: no clean FLOP count


def test_both_sides_compute_the_same_function(bench) -> None:
    fp32, bf16 = bench["same_function"]["fp32"], bench["same_function"]["bf16"]
    for same in (fp32, bf16):
        assert same["same_parameters"] and same["padding_fraction"] > 0.1
    assert fp32["hidden_max_abs_diff"] < 1e-5 and fp32["pooled_max_abs_diff"] < 1e-5
    assert fp32["grad_max_abs_diff_over_largest"] < 1e-4
    # bf16 autocast: both round the same matmul inputs; outputs are O(1), bf16 keeps 8 bits of mantissa
    assert bf16["hidden_max_abs_diff"] < 5e-2 and bf16["grad_max_abs_diff_over_largest"] < 5e-2


@pytest.mark.parametrize(("overrides", "field"), [({"threads": 0}, "threads"), ({"lengths": ()}, "lengths"),
                                                  ({"real_max_lengths": (2,)}, "real_max_lengths"),
                                                  ({"warmup_steps": -1}, "warmup_steps")])
def test_config_rejects_bad_values(overrides, field) -> None:
    with pytest.raises(ValueError, match=f"^{field}: .*allowed"):
        EncoderBenchConfig(**overrides)


def test_an_unknown_real_task_is_refused(tiny_checkpoint, shared_data) -> None:
    with pytest.raises(ValueError, match="real_tasks: 'mnli' is not a builtin task; allowed: sst, qqp, sts"):
        run_encoder_benchmark(quick_config(checkpoint=tiny_checkpoint, data_root=str(shared_data),
                                           real_tasks=("mnli",), lengths=(4,), pairs=1, warmup_steps=0))


def test_cli_offers_bench_encoder() -> None:
    from dist_minbert.cli import build_parser

    args = build_parser().parse_args(["bench", "encoder", "--json", "--threads", "1"])
    assert (args.what, args.json, args.threads) == ("encoder", True, 1)
