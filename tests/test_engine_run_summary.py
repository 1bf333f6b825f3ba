"""summary.json is strict JSON whatever the metrics, and names a checkpoint that exists."""
from __future__ import annotations

import json
import math
import time

from dist_minbert.engine.dist_context import DistContext
from dist_minbert.engine.run_checkpoint import RunState
from dist_minbert.engine.run_storage import RunStorage
from dist_minbert.engine.run_summary import write_summary
from dist_minbert.engine.step_policy import DevHistory


def test_a_nan_metric_is_written_as_null_and_the_summary_is_strict_json(tmp_path):
    history = DevHistory()
    history.record({"sts": {"pearson": math.nan}}, math.nan, "step-00000002")  # never best
    state = RunState(global_step=2, dev_history=history)
    summary = write_summary(RunStorage(str(tmp_path)), DistContext.single(), state, 16, 2.0, time.perf_counter(), None,
                            {"predictions": {}}, score=math.nan)
    written = json.loads((tmp_path / "summary.json").read_text(), parse_constant=lambda c: 1 / 0)
    assert written["dev"] == {"sts": {"pearson": None}} and written["score"] is None
    assert written["best_dev"] is None and written["best_score"] is None
    assert written["paths"]["checkpoint"] is None and written["samples_per_s"] == 8.0
    assert math.isnan(summary["score"])  # the returned summary keeps the values


def test_the_final_checkpoint_is_best_else_the_latest(tmp_path):
    from dist_minbert.engine import checkpointing
    from dist_minbert.engine.config import CheckpointConfig
    from dist_minbert.engine.run_checkpoint import RunCheckpointer

    checkpoints = RunCheckpointer(None, RunStorage(str(tmp_path)), CheckpointConfig(), DistContext.single(),
                                  lambda path: None)
    assert checkpoints.final_path() is None
    for step in (2, 4):
        folder = tmp_path / checkpointing.CHECKPOINTS_DIR / checkpointing.step_tag(step)
        folder.mkdir(parents=True)
        (folder / checkpointing.MODEL_STATES).touch()
    assert checkpoints.final_path().name == "step-00000004"  # no evaluation was best: the newest
    checkpointing.point_best(tmp_path / checkpointing.CHECKPOINTS_DIR, folder.parent / "step-00000002")
    assert checkpoints.final_path() == tmp_path / checkpointing.CHECKPOINTS_DIR / checkpointing.BEST


def test_fault_injection_on_a_rank_that_does_not_exist_is_refused():
    import pytest

    from dist_minbert.engine.config import CheckpointConfig
    from dist_minbert.engine.run_checkpoint import RunCheckpointer

    with pytest.raises(ValueError, match="checkpoint.kill_rank: 1 is not a rank of the 1 workers; allowed: 0 to 0"):
        RunCheckpointer(None, RunStorage("/nonexistent"), CheckpointConfig(kill_at_step=3, kill_rank=1),
                        DistContext.single(), lambda path: None)
