"""benchmarks/gpu_check.py (`make gpu-check`) where no GPU is: its clear exit without CUDA, its arguments, and
its verdicts — loss curves against a tolerance worked out by hand, PCGrad's weights every step, and the figures
it reads back from a run folder written by our own TensorBoard logger."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def test_without_cuda_it_says_so_and_exits_2():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(SCRIPT), "--steps", "2"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "no CUDA device here" in done.stderr and done.stdout == ""


def test_arguments():
    args = gpu_check.parse_args(["--steps", "5", "--rtol", "0.1", "sst.batch_size=8"])
    assert (args.steps, args.rtol, args.atol, args.gpus, args.overrides) == (5, 0.1, 0.05, 0, ["sst.batch_size=8"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", "1"])


REFERENCE = {"sst": {1: 1.60, 2: 1.50}, "sts": {1: 4.00, 2: 3.00}}


def test_curves_within_and_past_tolerance():
    # tolerance at rtol 0.05, atol 0.05: sst 0.05 + 0.08 = 0.13 at step 1; sts 0.05 + 0.15 = 0.20 at step 2.
    close = {"sst": {1: 1.72, 2: 1.50}, "sts": {1: 4.00, 2: 3.19}}
    got = gpu_check.compare_curves(REFERENCE, close, rtol=0.05, atol=0.05)
    assert got["passed"] and got["max_abs_difference"] == pytest.approx(0.19)
    assert got["max_excess_over_tolerance"] == pytest.approx(-0.01)  # sts step 2: 0.19 − 0.20
    far = {"sst": {1: 1.75, 2: 1.50}, "sts": {1: 4.00, 2: 3.00}}  # 0.15 > 0.13
    got = gpu_check.compare_curves(REFERENCE, far, rtol=0.05, atol=0.05)
    assert not got["passed"] and got["max_excess_over_tolerance"] == pytest.approx(0.02)
    gap = {"sst": {1: 1.60, 2: math.nan}, "sts": {1: 4.00}}  # a non-finite and a missing step
    got = gpu_check.compare_curves(REFERENCE, gap, rtol=0.05, atol=0.05)
    assert not got["passed"] and got["missing"] == ["sst@2", "sts@2"]


def test_every_step_needs_a_loss_and_finite_pcgrad_weights():
    assert gpu_check.trained_every_step(REFERENCE, 2)["passed"]
    assert gpu_check.trained_every_step({"sst": {1: 1.0, 3: 1.0}}, 3)["steps_without_loss"] == [2]
    weights = {"surgery/weight/sst": {1: 0.9, 2: 1.0}, "surgery/weight/sts": {1: 1.0, 2: 1.0}, "loss/sst": {1: 1.0}}
    assert gpu_check.pcgrad_ran(weights, 2)["passed"]
    weights["surgery/weight/sts"][2] = math.inf
    assert gpu_check.pcgrad_ran(weights, 2)["missing_or_non_finite"] == ["surgery/weight/sts@2"]
    assert not gpu_check.pcgrad_ran({"loss/sst": {1: 1.0}}, 1)["passed"]  # no PCGrad at all


def test_checks_compare_bf16_with_fp32_and_zero_stages_with_zero0(tmp_path):
    from dist_minbert.observe.metrics_logger import MetricsLogger

    losses = {"fp32_zero0": [1.6, 1.5], "bf16_zero0": [1.61, 1.52], "bf16_zero1": [1.61, 1.52],
              "bf16_zero2": [1.8, 1.52],  # ZeRO 2 off by 0.2 at step 1 (past 0.13 and 0.1305)
              "autocast_bf16_zero0": [1.6, 1.51]}
    runs = {}
    for name, curve in losses.items():
        folder = tmp_path / name
        logger = MetricsLogger(str(folder / "tensorboard"))
        for step, loss in enumerate(curve, start=1):
            logger.scalars(step, {"loss/sst": loss, "surgery/weight/sst": 1.0, "memory/gpu_peak_mb/rank0": 100.0 * step,
                                  "memory/gpu_peak_mb/rank1": 90.0})
        logger.close()
        (folder / "summary.json").write_text(json.dumps({"steps": 2, "samples_per_s": 10.0, "tokens_per_s": 300.0,
                                                         "peak_rss_mb": 900.0}))
        runs[name] = gpu_check.run_figures(folder)
    assert runs["bf16_zero1"]["peak_gpu_mb"] == {"rank0": 200.0, "rank1": 90.0}
    assert runs["bf16_zero1"]["losses"]["sst"] == {1: pytest.approx(1.61), 2: pytest.approx(1.52)}
    verdicts = gpu_check.checks(runs, steps=2, rtol=0.05, atol=0.05)
    failed = sorted(name for name, verdict in verdicts.items() if not verdict["passed"])
    assert failed == ["bf16_zero2_vs_bf16_zero0", "bf16_zero2_vs_fp32_zero0"]
    # Every run: steps, PCGrad; bf16 and autocast vs fp32; ZeRO 1, 2 vs bf16 ZeRO 0 (autocast's engine is fp32's).
    assert len(verdicts) == 5 * 2 + 4 + 2 and "autocast_bf16_zero0_vs_fp32_zero0" in verdicts
