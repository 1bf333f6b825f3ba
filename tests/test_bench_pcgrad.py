"""`bench pcgrad` in quick mode on the tiny random BERT: every key, and communication that matches the plans' formulas.

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

from dist_minbert.bench.pcgrad import SMALL_COLLECTIVES_UNITS, quick_config, run_pcgrad_benchmark

pytestmark = pytest.mark.distributed
SMALL = 64  # numbers of the small all-reduces per step (T counts, T² Gram entries, flags, norms), generously


@pytest.fixture(scope="module")
def bench(ray_session, tiny_checkpoint, shared_data, tmp_path_factory) -> dict:
    config = quick_config(checkpoint=tiny_checkpoint, data_root=str(shared_data), max_rows=32,
                          output_dir=str(tmp_path_factory.mktemp("bench")))
    return run_pcgrad_benchmark(config)


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
    assert bench["all_passed"] == all(bench["passed"].values())
    assert bench["targets"]["comm_units_pcgrad_sharded"] == 2.0  # (T+1)/2 for T = 3
    for group in ("1w", "2w"):
        for mode in ("sum", "pcgrad"):
            run = bench["workers"][group]["runs"][mode]
            assert len(run["step_s_all"]) == len(run["cpu_s_all"]) == 2 and run["step_s"] > 0 and run["cpu_s"] > 0


def test_num_params_is_the_tiny_encoders(bench, tiny_checkpoint) -> None:
    from dist_minbert.model.checkpoint import load_encoder

    assert bench["num_params"] == sum(p.numel() for p in load_encoder(tiny_checkpoint).parameters())
    assert bench["num_head_params"] == 32 * 5 + 5 + 2 * (32 + 1)  # sst linear (5 classes), qqp and sts cross


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


def test_sharded_plan_holds_one_row_and_the_shards_not_every_task_row(bench) -> None:
    # in units of P floats: sum holds .grad (1); allreduce the T rows (3), the update being one of them;
    # sharded one staging row (1) and T shards of P/2 (1.5), the update all-gathered into the staging row.
    peak = bench["peak_gradient_in_P_2w"]
    slack = 2 * (bench["num_head_params"] + 2) / bench["num_params"]  # heads, and the padding of P
    assert peak["sum"] == pytest.approx(1.0, abs=slack)
    assert peak["pcgrad_allreduce"] == pytest.approx(3.0, abs=slack)
    assert peak["pcgrad_sharded"] == pytest.approx(2.5, abs=slack)
