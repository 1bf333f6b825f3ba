"""Which tasks each optimizer step draws, and with what global batch sizes.

Every function here is pure in (config, seed, epoch, step, task sizes, batch sizes,
number of epochs): each rank computes the same schedule without communication and a
resumed run continues it from (epoch, step) alone. `step` counts from 0 inside an epoch;
`epoch` counts from 0. Task order follows the order of `sizes`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np

from dist_minbert.data.config import ScheduleConfig

_DRAW_TAG = 2  # keeps schedule draws apart from the sample-order seeds in order.py


def largest_epoch_steps(sizes: dict[str, int], batch_sizes: dict[str, int]) -> int:
    """Steps for the largest task (in steps) to see all its rows once at its batch size."""
    return max(math.ceil(sizes[t] / batch_sizes[t]) for t in sizes)


def capped_steps(cfg: ScheduleConfig, sizes: dict[str, int], batch_sizes: dict[str, int]) -> int:
    """An epoch's steps: steps_per_epoch, else the fraction of the largest task's epoch, else all of it."""
    if cfg.steps_per_epoch is not None:
        return cfg.steps_per_epoch
    full = largest_epoch_steps(sizes, batch_sizes)
    if cfg.steps_per_epoch_fraction is not None:
        return max(1, round(cfg.steps_per_epoch_fraction * full))
    return full


def anneal_alpha(epoch: int, num_epochs: int, decay: float) -> float:
    """Stickland & Murray (2019): alpha = 1 - decay * (e - 1) / (E - 1) for 1-based e; 1 when E = 1."""
    return 1.0 if num_epochs == 1 else 1.0 - decay * epoch / (num_epochs - 1)


class Schedule(NamedTuple):
    steps_in_epoch: Callable[[ScheduleConfig, int, dict[str, int], dict[str, int], int | None], int]
    tasks_for_step: Callable[[ScheduleConfig, int, int, int, dict[str, int], dict[str, int], int | None], dict[str, int]]
    probabilities: Callable[[ScheduleConfig, int, dict[str, int], int | None], dict[str, float]]


def _uniform(tasks: list[str], sizes: dict[str, int]) -> dict[str, float]:
    return {t: (1.0 / len(tasks) if t in tasks else 0.0) for t in sizes}


# round_robin (capped when steps_per_epoch or its fraction is set): every task every step.
def _rr_steps(cfg, epoch, sizes, batch_sizes, num_epochs):
    return capped_steps(cfg, sizes, batch_sizes)


def _rr_tasks(cfg, seed, epoch, step, sizes, batch_sizes, num_epochs):
    return {t: batch_sizes[t] for t in sizes}


def _rr_probabilities(cfg, epoch, sizes, num_epochs):
    return _uniform(list(sizes), sizes)


# proportional_batch: every task every step, batch_i = ceil(N_i / K) for an epoch of K steps.
def _proportional_tasks(cfg, seed, epoch, step, sizes, batch_sizes, num_epochs):
    num_steps = capped_steps(cfg, sizes, batch_sizes)
    return {t: math.ceil(math.ceil(sizes[t] / num_steps) / cfg.batch_multiple) * cfg.batch_multiple for t in sizes}


# annealed / temperature: k distinct tasks per step, drawn with p_i proportional to N_i ** exponent.
def _annealed_probabilities(cfg, epoch, sizes, num_epochs):
    if num_epochs is None:
        raise ValueError("num_epochs: needed by the annealed schedule (alpha depends on it); allowed: an integer >= 1")
    return _power_probabilities(sizes, anneal_alpha(epoch, num_epochs, cfg.anneal_decay))


def _temperature_probabilities(cfg, epoch, sizes, num_epochs):
    return _power_probabilities(sizes, 1.0 / cfg.temperature)


def _power_probabilities(sizes: dict[str, int], exponent: float) -> dict[str, float]:
    weights = np.array([float(sizes[t]) for t in sizes]) ** exponent
    return dict(zip(sizes, (weights / weights.sum()).tolist()))


def _sampled(probabilities):
    def tasks_for_step(cfg, seed, epoch, step, sizes, batch_sizes, num_epochs):
        p = np.array(list(probabilities(cfg, epoch, sizes, num_epochs).values()))
        gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, _DRAW_TAG, step])))
        chosen = set(gen.choice(len(sizes), size=min(cfg.tasks_per_step, len(sizes)), replace=False, p=p).tolist())
        return {t: batch_sizes[t] for i, t in enumerate(sizes) if i in chosen}

    return tasks_for_step


# staggered: stagger_epochs full passes over the stagger tasks alone, then capped round-robin.
def _stagger_tasks(cfg: ScheduleConfig, sizes: dict[str, int]) -> list[str]:
    missing = [t for t in cfg.stagger_tasks if t not in sizes]
    if missing:
        raise ValueError(f"stagger_tasks: {missing} are not tasks of this run; allowed: {list(sizes)}")
    return [t for t in sizes if t in cfg.stagger_tasks]


def _staggered_steps(cfg, epoch, sizes, batch_sizes, num_epochs):
    if epoch < cfg.stagger_epochs:
        tasks = _stagger_tasks(cfg, sizes)
        return largest_epoch_steps({t: sizes[t] for t in tasks}, batch_sizes)
    return capped_steps(cfg, sizes, batch_sizes)


def _staggered_tasks(cfg, seed, epoch, step, sizes, batch_sizes, num_epochs):
    tasks = _stagger_tasks(cfg, sizes) if epoch < cfg.stagger_epochs else list(sizes)
    return {t: batch_sizes[t] for t in tasks}


def _staggered_probabilities(cfg, epoch, sizes, num_epochs):
    return _uniform(_stagger_tasks(cfg, sizes) if epoch < cfg.stagger_epochs else list(sizes), sizes)


SCHEDULES: dict[str, Schedule] = {
    "round_robin": Schedule(_rr_steps, _rr_tasks, _rr_probabilities),
    "proportional_batch": Schedule(_rr_steps, _proportional_tasks, _rr_probabilities),
    "annealed": Schedule(_rr_steps, _sampled(_annealed_probabilities), _annealed_probabilities),
    "temperature": Schedule(_rr_steps, _sampled(_temperature_probabilities), _temperature_probabilities),
    "staggered": Schedule(_staggered_steps, _staggered_tasks, _staggered_probabilities),
}


def steps_in_epoch(
    cfg: ScheduleConfig,
    epoch: int,
    sizes: dict[str, int],
    batch_sizes: dict[str, int],
    num_epochs: int | None = None,
) -> int:
    """Optimizer steps in `epoch` (staggered epochs differ; the others are equal)."""
    _check_tasks(sizes, batch_sizes)
    return SCHEDULES[cfg.name].steps_in_epoch(cfg, epoch, sizes, batch_sizes, num_epochs)


def tasks_for_step(
    cfg: ScheduleConfig,
    seed: int,
    epoch: int,
    step: int,
    sizes: dict[str, int],
    batch_sizes: dict[str, int],
    num_epochs: int | None = None,
) -> dict[str, int]:
    """Task -> global batch size drawn at `step` of `epoch`. `num_epochs` (E) is needed by annealed."""
    num_steps = steps_in_epoch(cfg, epoch, sizes, batch_sizes, num_epochs)
    if not 0 <= step < num_steps:
        raise ValueError(f"step: {step} is outside epoch {epoch} of {num_steps} steps; allowed: 0 <= step < {num_steps}")
    return SCHEDULES[cfg.name].tasks_for_step(cfg, seed, epoch, step, sizes, batch_sizes, num_epochs)


def sampling_probabilities(
    cfg: ScheduleConfig, epoch: int, sizes: dict[str, int], num_epochs: int | None = None
) -> dict[str, float]:
    """Each task's probability per draw in `epoch` (uniform over the tasks a deterministic schedule draws), for logging."""
    return SCHEDULES[cfg.name].probabilities(cfg, epoch, sizes, num_epochs)


def _check_tasks(sizes: dict[str, int], batch_sizes: dict[str, int]) -> None:
    if not sizes:
        raise ValueError("sizes: no tasks; allowed: at least one task with rows")
    if set(sizes) != set(batch_sizes):
        raise ValueError(f"batch_sizes: tasks {sorted(batch_sizes)} differ from the sized tasks {sorted(sizes)}")
    for t in sizes:
        if sizes[t] < 1 or batch_sizes[t] < 1:
            raise ValueError(f"{t}: {sizes[t]} rows with batch size {batch_sizes[t]}; allowed: both >= 1")
