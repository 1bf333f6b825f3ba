"""Schedules against their formulas, on the shared data's task sizes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from dist_minbert.data.config import ScheduleConfig
from dist_minbert.data.schedule import (
    SCHEDULES,
    anneal_alpha,
    sampling_probabilities,
    steps_in_epoch,
    tasks_for_step,
)

SIZES = {"sst": 8544, "qqp": 14214, "sts": 6040}
BATCH = {"sst": 64, "qqp": 64, "sts": 32}


def test_round_robin_full_and_capped_epochs():
    # largest epoch: qqp ceil(14214 / 64) = 223; sts at 32 would need ceil(6040 / 32) = 189.
    cfg = ScheduleConfig()
    assert steps_in_epoch(cfg, 0, SIZES, BATCH) == 223
    assert tasks_for_step(cfg, 0, 0, 222, SIZES, BATCH) == BATCH
    assert steps_in_epoch(ScheduleConfig(steps_per_epoch=500), 3, SIZES, BATCH) == 500
    # the study's cap as a fraction: round(0.11 * 223) = 25
    assert steps_in_epoch(ScheduleConfig(steps_per_epoch_fraction=0.11), 0, SIZES, BATCH) == 25
    with pytest.raises(ValueError, match="step: 223"):
        tasks_for_step(cfg, 0, 0, 223, SIZES, BATCH)


def test_proportional_batch_sizes():
    # K = 500: ceil(8544/500)=18 -> 24, ceil(14214/500)=29 -> 32, ceil(6040/500)=13 -> 16 (multiples of 8)
    cfg = ScheduleConfig(name="proportional_batch", steps_per_epoch=500)
    assert tasks_for_step(cfg, 0, 0, 7, SIZES, BATCH) == {"sst": 24, "qqp": 32, "sts": 16}
    one = ScheduleConfig(name="proportional_batch", steps_per_epoch=500, batch_multiple=1)
    assert tasks_for_step(one, 0, 0, 0, SIZES, BATCH) == {"sst": 18, "qqp": 29, "sts": 13}
    # Without a cap, K is the largest epoch (223 steps): qqp keeps ~its batch, others shrink.
    cfg = ScheduleConfig(name="proportional_batch", batch_multiple=1)
    assert tasks_for_step(cfg, 0, 0, 0, SIZES, BATCH) == {"sst": 39, "qqp": 64, "sts": 28}


@pytest.mark.parametrize("num_epochs,expected", [(1, [1.0]), (2, [1.0, 0.2]), (5, [1.0, 0.8, 0.6, 0.4, 0.2])])
def test_anneal_alpha_per_epoch(num_epochs, expected):
    assert [anneal_alpha(e, num_epochs, 0.8) for e in range(num_epochs)] == pytest.approx(expected)


def test_annealed_probabilities_and_draw_frequencies():
    cfg = ScheduleConfig(name="annealed", steps_per_epoch=3000)
    for epoch, alpha in [(0, 1.0), (2, 0.6), (4, 0.2)]:
        p = sampling_probabilities(cfg, epoch, SIZES, num_epochs=5)
        weights = {t: n**alpha for t, n in SIZES.items()}
        assert p == pytest.approx({t: w / sum(weights.values()) for t, w in weights.items()})
    p = sampling_probabilities(cfg, 0, SIZES, num_epochs=5)
    counts = {t: 0 for t in SIZES}
    for step in range(3000):
        drawn = tasks_for_step(cfg, 5, 0, step, SIZES, BATCH, num_epochs=5)
        assert len(drawn) == 1 and all(BATCH[t] == b for t, b in drawn.items())
        counts[next(iter(drawn))] += 1
    # binomial std <= sqrt(3000 / 4) ~ 27 draws; allow 4 std
    assert all(abs(counts[t] - 3000 * p[t]) < 110 for t in SIZES)
    with pytest.raises(ValueError, match="num_epochs"):
        tasks_for_step(cfg, 5, 0, 0, SIZES, BATCH)


@pytest.mark.parametrize("name", ["annealed", "temperature"])
def test_k_distinct_tasks_per_step(name):
    cfg = ScheduleConfig(name=name, steps_per_epoch=200, tasks_per_step=2)
    draws = [tasks_for_step(cfg, 9, 1, s, SIZES, BATCH, num_epochs=3) for s in range(200)]
    assert all(len(d) == 2 for d in draws)
    assert draws != [tasks_for_step(cfg, 10, 1, s, SIZES, BATCH, num_epochs=3) for s in range(200)]  # seed matters
    # Every pair shows up, and task order follows `sizes`.
    assert {tuple(d) for d in draws} == {("sst", "qqp"), ("sst", "sts"), ("qqp", "sts")}


# What one rank computes: for every schedule, the steps of epochs 0-2, each as its [(task, global batch), ...].
_RANK = """
import json, sys
from dist_minbert.data.config import ScheduleConfig
from dist_minbert.data.schedule import SCHEDULES, steps_in_epoch, tasks_for_step
sizes, batch = json.loads(sys.argv[1])
out = {"task_set_order": list(set(sizes))}
for name in SCHEDULES:
    cfg = ScheduleConfig(name=name, steps_per_epoch_fraction=0.5, tasks_per_step=2)
    out[name] = [[list(tasks_for_step(cfg, 9, e, s, sizes, batch, 3).items())
                  for s in range(steps_in_epoch(cfg, e, sizes, batch, 3))] for e in range(3)]
print(json.dumps(out))
"""


def test_every_rank_computes_the_same_schedule():
    # Two processes stand in for two ranks: each computes the schedule alone, as the trainer's ranks do. Their
    # hash seeds differ, so a schedule that leaned on set order, hash() or unseeded global random state would
    # differ between them; the per-step task order must match too, since ranks run the tasks' collectives in it.
    ranks = [subprocess.run([sys.executable, "-c", _RANK, json.dumps([SIZES, BATCH])], capture_output=True, text=True,
                            check=True, env={**os.environ, "PYTHONHASHSEED": str(hash_seed)}) for hash_seed in (1, 2)]
    first, second = (json.loads(rank.stdout) for rank in ranks)
    assert first.pop("task_set_order") != second.pop("task_set_order")  # the processes do iterate sets differently
    assert set(first) == set(SCHEDULES) and first == second
    assert first["annealed"] != first["temperature"]  # not one trivial schedule for all


def test_temperature_probabilities():
    cfg = ScheduleConfig(name="temperature", temperature=2.0)
    weights = {t: math.sqrt(n) for t, n in SIZES.items()}
    assert sampling_probabilities(cfg, 0, SIZES) == pytest.approx({t: w / sum(weights.values()) for t, w in weights.items()})
    # T = 1 is size-proportional
    assert sampling_probabilities(ScheduleConfig(name="temperature", temperature=1.0), 0, SIZES)["qqp"] == pytest.approx(
        14214 / sum(SIZES.values()))


def test_staggered_phase_boundaries():
    cfg = ScheduleConfig(name="staggered", stagger_tasks=["qqp"], stagger_epochs=2, steps_per_epoch=50)
    # epochs 0, 1: full passes over qqp alone (223 steps); epoch 2 on: capped round-robin (50 steps).
    assert [steps_in_epoch(cfg, e, SIZES, BATCH) for e in range(4)] == [223, 223, 50, 50]
    assert tasks_for_step(cfg, 0, 1, 222, SIZES, BATCH) == {"qqp": 64}
    assert tasks_for_step(cfg, 0, 2, 0, SIZES, BATCH) == BATCH
    assert sampling_probabilities(cfg, 0, SIZES) == {"sst": 0.0, "qqp": 1.0, "sts": 0.0}
    with pytest.raises(ValueError, match="stagger_tasks"):
        steps_in_epoch(ScheduleConfig(name="staggered", stagger_tasks=["mnli"]), 0, SIZES, BATCH)


def test_registry_and_input_checks():
    assert set(SCHEDULES) == {"round_robin", "proportional_batch", "annealed", "temperature", "staggered"}
    with pytest.raises(ValueError, match="batch_sizes"):
        steps_in_epoch(ScheduleConfig(), 0, SIZES, {"sst": 64})
    with pytest.raises(ValueError, match="sst"):
        steps_in_epoch(ScheduleConfig(), 0, {**SIZES, "sst": 0}, BATCH)
