"""What follows each step (log, evaluate, checkpoint) and which evaluation is best: pure, so swept here."""
from __future__ import annotations

import math

import pytest

from dist_minbert.engine.config import CheckpointConfig, TrainConfig
from dist_minbert.engine.step_policy import DevHistory, StepActions, step_actions
from dist_minbert.observe.config import ObserveConfig


def _run(epoch_steps: list[int], total_steps: int | None = None, log_every: int = 10, evaluate_every: int = 0,
         **kwargs) -> list[tuple]:
    """Every step's actions over a run: (global step, epoch, step in epoch, actions)."""
    checkpoint = CheckpointConfig(every_steps=kwargs.pop("every_steps", 0))
    train = TrainConfig(epochs=len(epoch_steps), **kwargs)
    total = total_steps or sum(epoch_steps)
    out, global_step = [], 0
    for epoch, num_steps in enumerate(epoch_steps):
        for step in range(num_steps):
            global_step += 1
            if global_step > total:
                return out
            out.append((global_step, epoch, step, step_actions(global_step, epoch, step, epoch_steps, total, train,
                                                                checkpoint, ObserveConfig(log_every=log_every),
                                                                evaluate_every)))
    return out


def _steps_where(run, action: str) -> list[int]:
    return [g for g, _, _, actions in run if getattr(actions, action)]


def test_evaluates_and_checkpoints_at_every_epoch_end():
    run = _run([4, 4, 4])
    assert _steps_where(run, "evaluate") == [4, 8, 12]
    assert _steps_where(run, "checkpoint") == [4, 8, 12]


def test_evaluates_only_at_the_last_epoch_without_eval_every_epoch_but_checkpoints_every_end():
    run = _run([4, 4, 4], eval_every_epoch=False)
    assert _steps_where(run, "evaluate") == [12]
    assert _steps_where(run, "checkpoint") == [4, 8, 12]


def test_max_steps_cutting_an_epoch_short_still_ends_with_an_evaluation_and_a_checkpoint():
    run = _run([5, 5], total_steps=7, eval_every_epoch=False)
    assert run[-1][0] == 7
    assert _steps_where(run, "evaluate") == [7]
    assert _steps_where(run, "checkpoint") == [5, 7]


@pytest.mark.parametrize("every_steps, expected", [(3, [3, 5, 6, 9, 10]), (5, [5, 10]), (0, [5, 10])])
def test_periodic_checkpoints_add_to_the_epoch_ends(every_steps, expected):
    assert _steps_where(_run([5, 5], every_steps=every_steps), "checkpoint") == expected


@pytest.mark.parametrize("log_every, expected", [(3, [3, 6, 7]), (10, [7]), (1, list(range(1, 8)))])
def test_logs_every_log_every_steps_and_at_the_last_step(log_every, expected):
    assert _steps_where(_run([7], log_every=log_every), "log") == expected


def test_evaluating_every_n_steps_adds_to_the_epoch_ends_and_checkpoints_each_evaluation():
    run = _run([5, 5], evaluate_every=3, eval_every_epoch=False)
    assert _steps_where(run, "evaluate") == [3, 6, 9, 10]
    assert _steps_where(run, "checkpoint") == [3, 5, 6, 9, 10]


def test_a_middle_step_does_nothing():
    assert _run([5, 5])[1][3] == StepActions(log=False, evaluate=False, checkpoint=False)


def test_dev_history_keeps_the_first_of_equal_scores():
    history = DevHistory()
    assert history.record({"sst": {"accuracy": 0.2}}, 0.2, "step-00000006")
    assert not history.record({"sst": {"accuracy": 0.2}}, 0.2, "step-00000012")
    assert history.record({"sst": {"accuracy": 0.3}}, 0.3, "step-00000018")
    assert (history.best_tag, history.best_score, history.last) == ("step-00000018", 0.3, {"sst": {"accuracy": 0.3}})


def test_a_nan_score_is_never_best_and_does_not_block_later_ones():
    """Constant STS predictions give a NaN Pearson, hence a NaN overall score."""
    history = DevHistory()
    assert not history.record({"sts": {"pearson": math.nan}}, math.nan, "step-00000006")
    assert history.best is None and history.last == {"sts": {"pearson": math.nan}}
    assert history.record({"sts": {"pearson": 0.1}}, 0.55, "step-00000012")
    assert not history.record({"sts": {"pearson": math.nan}}, math.nan, "step-00000018")
    assert history.record({"sts": {"pearson": 0.2}}, 0.6, "step-00000024")
    assert (history.best_tag, history.best_score) == ("step-00000024", 0.6)


def test_skipped_steps_stop_the_run_at_the_limit_in_a_row_only():
    from dist_minbert.engine.step_policy import SkippedSteps
    from dist_minbert.observe.metrics_logger import MetricsLogger

    steps = SkippedSteps(limit=2, logger=MetricsLogger(None))
    steps.skipped(1, ValueError("nan"))
    steps.trained()
    steps.skipped(3, ValueError("nan"))  # one in a row again: goes on
    with pytest.raises(RuntimeError, match="2 steps in a row .*train.max_nonfinite_steps=2.*last: inf"):
        steps.skipped(4, ValueError("inf"))
