"""`bench scaling` on the tiny random BERT: the DDP loop's 2-process gradient equals its 1-process one (the
union batch's), the report's keys from a quick run of both sides, and its ratios on hand-built groups.

The equivalence: each task's batch of 8 rows splits 4 + 4 over two ranks; each rank's gradient is that of its
rows' mean loss, so the union batch's per-task gradient is the mean over ranks — the loop's all-reduce sum
divided by N. PCGrad then sees the same T gradients on 1 and 2 processes and gives the same update (the same
generator per step), and so do the heads. A loop that forgot the 1/N would give twice the gradient; one that
combined local gradients before reducing would give PCGrad of different vectors.
"""
from __future__ import annotations

import pytest
import torch

from dist_minbert.bench.pcgrad import PCGradBenchConfig, quick_config, task_data_root
from dist_minbert.bench.scaling import TARGET_STEP_RATIO_VS_DDP, report
from launch.bench_scaling import ddp_group, run_scaling_benchmark


@pytest.mark.distributed
def test_ddp_loop_on_2_processes_takes_the_1_process_gradient(tiny_checkpoint, shared_data, tmp_path):
    config = quick_config(checkpoint=tiny_checkpoint, data_root=str(shared_data), max_rows=32, dropout=0.0)
    data_root = task_data_root(config, tmp_path / "data")
    gradients = {}
    for n in (1, 2):
        ddp_group(config, data_root, tmp_path, n, gradient_path=str(tmp_path / f"gradient-{n}.pt"))
        gradients[n] = torch.load(tmp_path / f"gradient-{n}.pt")
    assert gradients[1].norm() > 0
    torch.testing.assert_close(gradients[2], gradients[1], rtol=1e-5, atol=1e-7)


@pytest.mark.distributed
def test_quick_run_reports_every_key(ray_session, tiny_checkpoint, shared_data, tmp_path):
    config = quick_config(checkpoint=tiny_checkpoint, data_root=str(shared_data), max_rows=32,
                          output_dir=str(tmp_path / "bench"))
    got = run_scaling_benchmark(config)
    for key in ("efficiency", "ddp_efficiency", "step_ratio_vs_ddp", "step_ratio_vs_ddp_1w", "cpu_ratio_vs_ddp",
                "cpu_ratio_vs_ddp_1w"):
        assert 0.05 < got[key] < 20, (key, got[key])
    for side in ("ours", "ddp"):
        for n in ("1w", "2w"):
            assert len(got["groups"][side][n]["step_s_all"]) == config.timed_steps
            assert got["step_s"][side][n] > 0 and got["cpu_s"][side][n] > 0
            assert got["samples_per_s"][side][n] == pytest.approx(24 / got["step_s"][side][n])  # 3 tasks × 8
    assert got["passed"] == {"step_ratio_vs_ddp": got["step_ratio_vs_ddp"] >= TARGET_STEP_RATIO_VS_DDP}
    assert len(got["load_average_before_after"]) == 6


def test_report_by_hand():
    # ours: 1 worker 1.0 s, 2 workers 0.625 s → efficiency 1.0 / (2 · 0.625) = 0.8;
    # DDP: 0.9 s and 0.6 s → 0.75; step ratio at 2 workers 0.6 / 0.625 = 0.96 < 0.97: failed.
    def group(steps: list[float]) -> dict:
        return {"step_s_all": steps, "cpu_s_all": [2 * s for s in steps]}

    ours = {1: group([1.0, 1.2, 0.9]), 2: group([0.625, 0.7, 0.6])}
    ddp = {1: group([0.9, 0.8, 1.0]), 2: group([0.6, 0.5, 0.9])}
    got = report(PCGradBenchConfig(batch_size=32), ours, ddp, wall_s=1.0, load_average=[])
    assert got["efficiency"] == pytest.approx(0.8) and got["ddp_efficiency"] == pytest.approx(0.75)
    assert got["step_ratio_vs_ddp"] == pytest.approx(0.96) and got["step_ratio_vs_ddp_1w"] == pytest.approx(0.9)
    assert got["cpu_ratio_vs_ddp"] == pytest.approx(0.96) and got["cpu_s"]["ours"]["1w"] == pytest.approx(2.0)
    assert got["samples_per_s"]["ours"]["2w"] == pytest.approx(96 / 0.625)
    assert got["passed"] == {"step_ratio_vs_ddp": False}
