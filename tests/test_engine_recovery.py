"""Recovery: a worker that dies mid-run is restarted by Ray Train and the run ends where it would have ended.

The run of test_engine_checkpoint (2 Ray workers, ZeRO-1, a checkpoint every 2 steps, 12 steps) with
`workers.max_failures=1` and fault injection: rank 0 SIGKILLs itself right after step 9, before that step
could be checkpointed. Ray Train restarts both workers; they continue from the run's latest checkpoint
(step 8), replay step 9 without dying again (the marker), and finish.
"""
from __future__ import annotations

import json

import pytest

from dist_minbert.engine import checkpointing
from tests.test_engine_checkpoint import (NUM_STEPS, assert_continues, data_slices, logged_attempts, reference_run,
                                          run_config, train)

pytestmark = pytest.mark.distributed

KILL_AT_STEP = 9


def test_killed_worker_restarts_from_the_latest_checkpoint_and_matches_the_uninterrupted_run(
        ray_session, tmp_path_factory, tiny_checkpoint, shared_data, tmp_path):
    reference = reference_run(tmp_path_factory, tiny_checkpoint, shared_data)
    out = tmp_path / "recovered"
    raw = run_config(tiny_checkpoint, data_slices(tmp_path_factory, shared_data), out, 2,
                     kill_at_step=KILL_AT_STEP, kill_rank=0)
    raw["workers"]["max_failures"] = 1
    summary = train(raw)

    assert checkpointing.fault_marker(out, KILL_AT_STEP).exists()  # the kill happened, once
    first, restarted = logged_attempts(out)
    # Rank 0 flushes its log at every checkpoint: the first start's steps up to step 8 are on disk. The restart
    # logged from step 9 on: it continued from the step-8 checkpoint, not from the start.
    assert set(range(1, KILL_AT_STEP)) <= set(first) <= set(range(1, KILL_AT_STEP + 1))
    assert sorted(restarted) == list(range(KILL_AT_STEP, NUM_STEPS + 1))
    # Same losses at every step, the same samples consumed after every step, the same final state: nothing was
    # repeated or skipped across the restart. Same world size: equal to the last bit TensorBoard keeps.
    assert_continues(out, reference, first_step=1, tolerance=1e-6)
    ref_summary = json.loads((reference / "summary.json").read_text())
    assert summary["steps"] == NUM_STEPS
    assert summary["best_score"] == pytest.approx(ref_summary["best_score"], abs=1e-6)
    assert (out / "checkpoints" / checkpointing.BEST).resolve().name == \
        (reference / "checkpoints" / checkpointing.BEST).resolve().name
