"""`bench pcgrad` in quick mode on the tiny random BERT: every key, and communication that matches the plans' formulas;
then the report on hand-built groups, whose ratios and verdicts are worked out by hand.

Units are counted at every collective call, DeepSpeed's own included, in ideal ring all-reduces of P
(the encoder's parameter count). With T = 3 tasks, H head parameters and N = 2 workers at ZeRO 0:
- sum: DeepSpeed all-reduces every gradient once: (P + H)/P;
- pcgrad, allreduce plan: the T task rows (T·P) and the heads (H), DeepSpeed's reduction switched off;
- pcgrad, sharded plan: T reduce-scatters of the padded row (½ each) and one all-gather of the update (½):
  (T+1)/2 of the padded P, plus the heads;
- pcgrad_local: no surgery collectives, DeepSpeed's reduction: (P + H)/P.
Besides those, each mode all-reduces a handful of numbers (sample counts, Gram matrix, finite flags,
DeepSpeed's clipping norm): at most SMALL numbers, far below the head parameters.
"""
from __future__ import annotations

import math

import pytest

from dist_minbert.bench.pcgrad import SMALL_COLLECTIVES_UNITS, PCGradBenchConfig, quick_config, report
from launch.bench_pcgrad import run_pcgrad_benchmark

SMALL = 64  # numbers of the small all-reduces per step (T counts, T² Gram entries, flags, norms), generously


@pytest.fixture(scope="module")
def bench(ray_session, tiny_checkpoint, shared_data, tmp_path_factory) -> dict:
    config = quick_config(checkpoint=tiny_checkpoint, data_root=str(shared_data), max_rows=32,
                          output_dir=str(tmp_path_factory.mktemp("bench")))
    return run_pcgrad_benchmark(config)


@pytest.mark.distributed
def test_report_has_every_key_with_sane_values(bench) -> None:
    for key in ("time_ratio_1w", "time_ratio_2w", "cpu_ratio_1w", "cpu_ratio_2w"):
        assert 0.1 < bench[key] < 10, (key, bench[key])
    for key in ("comm_units_sum", "comm_units_pcgrad_allreduce", "comm_units_pcgrad_sharded",
                "comm_units_pcgrad_local"):
        assert math.isfinite(bench[key]) and bench[key] > 0, key
    runs = ("sum", "pcgrad", "pcgrad_allreduce", "pcgrad_sharded", "pcgrad_local")
    assert sorted(bench["comm_seconds_2w"]) == sorted(runs)
    assert all(seconds >= 0 for seconds in bench["comm_seconds_2w"].values())
    assert bench["default_plan"] == "allreduce"  # gloo
    assert set(bench["passed"]) == {"time_ratio_1w", "time_ratio_2w", "comm_units_pcgrad_sharded"}
    assert bench["targets"]["comm_units_pcgrad_sharded"] == 2.0  # (T+1)/2 for T = 3
    for group in ("1w", "2w"):
        for mode in ("sum", "pcgrad"):
            run = bench["workers"][group]["runs"][mode]
            assert len(run["step_s_all"]) == len(run["cpu_s_all"]) == 2 and run["step_s"] > 0 and run["cpu_s"] > 0


@pytest.mark.distributed
def test_num_params_is_the_tiny_encoders(bench, tiny_checkpoint) -> None:
    from dist_minbert.model.checkpoint import load_encoder

    assert bench["num_params"] == sum(p.numel() for p in load_encoder(tiny_checkpoint).parameters())
    assert bench["num_head_params"] == 32 * 5 + 5 + 2 * (32 + 1)  # sst linear (5 classes), qqp and sts cross


@pytest.mark.distributed
def test_communication_units_match_the_plans(bench) -> None:
    num_params, num_heads, num_tasks = bench["num_params"], bench["num_head_params"], bench["num_tasks"]
    padded = 2 * -(-num_params // 2)  # the sharded plan pads P to a multiple of N = 2
    expected = {
        "comm_units_sum": (num_params + num_heads) / num_params,
        "comm_units_pcgrad_allreduce": (num_tasks * num_params + num_heads) / num_params,
        "comm_units_pcgrad_sharded": ((num_tasks + 1) / 2 * padded + num_heads) / num_params,
        "comm_units_pcgrad_local": (num_params + num_heads) / num_params,
    }
    for key, units in expected.items():
        assert units <= bench[key] <= units + SMALL / num_params, (key, bench[key], units)
    assert bench["comm_units_pcgrad_sharded"] <= (num_tasks + 1) / 2 + SMALL_COLLECTIVES_UNITS
    assert bench["passed"]["comm_units_pcgrad_sharded"]


@pytest.mark.distributed
def test_sharded_plan_holds_one_row_and_the_shards_not_every_task_row(bench) -> None:
    # in units of P floats: sum holds .grad (1); allreduce the T rows (3), the update being one of them;
    # sharded one staging row (1) and T shards of P/2 (1.5), the update all-gathered into the staging row.
    peak = bench["peak_gradient_in_P_2w"]
    slack = 2 * (bench["num_head_params"] + 2) / bench["num_params"]  # heads, and the padding of P
    assert peak["sum"] == pytest.approx(1.0, abs=slack)
    assert peak["pcgrad_allreduce"] == pytest.approx(3.0, abs=slack)
    assert peak["pcgrad_sharded"] == pytest.approx(2.5, abs=slack)


# -- the report on hand-built groups: what the workers measured in, the figures and verdicts out ------------------

def group(sum_s: list[float], pcgrad_s: list[float], sharded_units: float = 2.0) -> dict:
    """One group as bench_worker writes it: T = 3, P = 1000; CPU seconds twice the wall seconds; every run's
    gradient peak one P (4000 bytes)."""
    def run(step_s: list[float], units: float) -> dict:
        return {"step_s_all": step_s, "cpu_s_all": [2 * s for s in step_s], "comm_units": units, "comm_s": 0.01,
                "peak_gradient_bytes": 4000}

    runs = {"sum": run(sum_s, 1.0), "pcgrad": run(pcgrad_s, 3.0), "pcgrad_allreduce": run(pcgrad_s, 3.0),
            "pcgrad_sharded": run(pcgrad_s, sharded_units), "pcgrad_local": run(pcgrad_s, 1.0)}
    return {"num_tasks": 3, "num_params": 1000, "num_head_params": 10, "default_plan": "allreduce", "runs": runs}


def bench_report(groups: dict[int, dict]) -> dict:
    return report(PCGradBenchConfig(), groups, wall_s=1.0, load_average=[])


WITHIN_TARGETS = {1: group([1.0, 2.0, 4.0], [1.03, 2.2, 4.0]), 2: group([1.0, 1.0, 1.0], [1.05, 1.2, 1.08])}


def test_report_takes_the_median_of_the_paired_ratios():
    # 1 worker: pairs (1, 1.03), (2, 2.2), (4, 4.0) → ratios 1.03, 1.10, 1.00 → median 1.03; the ratio of the
    # medians (2.2 / 2.0 = 1.10) would fail the 1.05 target. 2 workers: ratios 1.05, 1.20, 1.08 → median 1.08.
    got = bench_report(WITHIN_TARGETS)
    assert got["time_ratio_1w"] == pytest.approx(1.03) and got["cpu_ratio_1w"] == pytest.approx(1.03)
    assert got["time_ratio_2w"] == pytest.approx(1.08) and got["cpu_ratio_2w"] == pytest.approx(1.08)
    assert got["comm_units_sum"] == 1.0 and got["comm_units_pcgrad_sharded"] == 2.0
    assert got["targets"]["comm_units_pcgrad_sharded"] == 2.0  # (T+1)/2 for T = 3
    assert got["peak_gradient_in_P_2w"]["sum"] == 1.0  # 4000 bytes of float32 = P
    assert got["passed"] == {"time_ratio_1w": True, "time_ratio_2w": True, "comm_units_pcgrad_sharded": True}
    assert got["all_passed"] is True


@pytest.mark.parametrize("failing,groups", [
    # ratios 1.06, 1.10, 1.075 → median 1.075 > 1.05
    ("time_ratio_1w", {**WITHIN_TARGETS, 1: group([1.0, 2.0, 4.0], [1.06, 2.2, 4.3])}),
    # ratios 1.12, 1.20, 1.08 → median 1.12 > 1.10
    ("time_ratio_2w", {**WITHIN_TARGETS, 2: group([1.0, 1.0, 1.0], [1.12, 1.2, 1.08])}),
    # past (T+1)/2 by more than the small collectives' allowance
    ("comm_units_pcgrad_sharded",
     {**WITHIN_TARGETS, 2: group([1.0, 1.0, 1.0], [1.05, 1.2, 1.08], sharded_units=2.0 + 2 * SMALL_COLLECTIVES_UNITS)}),
])
def test_a_figure_past_its_target_fails_that_check_and_the_run(failing, groups):
    got = bench_report(groups)
    assert got["passed"] == {key: key != failing for key in got["passed"]}
    assert got["all_passed"] is False
