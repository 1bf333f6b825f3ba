"""Gradient accumulation on 2 Ray Train workers: 2 micro-batches ≡ 1 batch of twice the size, in both gradient
strategies, and a NaN in the second micro-batch leaves nothing behind in DeepSpeed.

Plain SGD without momentum, dropout 0, fp32, clipping off: an update is lr × the gradient, so a wrong scale
(micro-batch losses summed instead of averaged: 2×) or a leaked micro-batch gradient shows in the parameters.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.ray_workers import run_on_workers
from tests.test_engine_distributed import data_slice, engine_run_config  # noqa: F401  (fixture)

pytestmark = pytest.mark.distributed

STEPS = 3


def accumulation_runs(config: dict) -> None:
    """Each (mode, accumulation) run from the same start; then the NaN runs. Rank 0 writes the results."""
    import torch
    import torch.distributed as dist

    from dist_minbert.config import config_from_dict
    from dist_minbert.engine.dist_context import DistContext
    from dist_minbert.engine.trainer import Trainer

    def build(run: dict, name: str) -> Trainer:
        run = {**run, "train": {**run["train"], "output_dir": f"{config['out']}/{name}"}}
        return Trainer(config_from_dict(run), DistContext.current(use_gpu=False))

    def flat(trainer: Trainer) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).double() for p in trainer.engine.module.parameters()])

    results = {}
    for name, run in config["runs"].items():
        trainer = build(run, name)
        start = flat(trainer)
        for position in trainer.positions()[:STEPS]:
            assert trainer.train_step(trainer.read_step(position))
        results[name] = {"start": start.tolist(), "end": flat(trainer).tolist()}

    for mode, run in config["nan_runs"].items():
        # Poisoned: step 2's second micro-batch is NaN on rank 1 (each micro-batch asks every task for a loss).
        poisoned = build(run, f"nan-{mode}")
        calls = {"step": 0, "count": 0}
        original = poisoned.loss

        def loss(task, batch, trainer=poisoned, original=original):
            if calls["step"] != trainer.global_step:
                calls.update(step=trainer.global_step, count=0)
            calls["count"] += 1
            second = calls["count"] > len(trainer.cfg.tasks)
            value = original(task, batch)
            return value * float("nan") if trainer.global_step == 2 and second and dist.get_rank() == 1 else value

        poisoned.loss = loss
        record = []
        for position in poisoned.positions()[:STEPS]:
            before = flat(poisoned)
            losses = poisoned.train_step(poisoned.read_step(position))
            record.append({"skipped": not losses, "unchanged": bool(torch.equal(before, flat(poisoned)))})
        # Reference: the same steps with step 2's batches read and dropped instead of trained on.
        reference = build(run, f"ref-{mode}")
        for i, position in enumerate(reference.positions()[:STEPS]):
            step = reference.read_step(position)
            if i == 1:
                reference.state.global_step += 1
            else:
                reference.train_step(step)
        results[f"nan-{mode}"] = {"record": record, "end": flat(poisoned).tolist(), "reference": flat(reference).tolist()}
    if dist.get_rank() == 0:
        Path(config["result_path"]).write_text(json.dumps(results))


def _run(tiny_checkpoint, data_root, out: Path, mode: str, accumulation: int) -> dict:
    run = engine_run_config(tiny_checkpoint, data_root, out, 2, name="sgd", lr=0.05)
    run["surgery"] = {"mode": mode}
    run["deepspeed"]["gradient_accumulation_steps"] = accumulation
    return run


def test_two_micro_batches_equal_one_batch_and_a_nan_micro_batch_leaves_no_trace(ray_session, tiny_checkpoint,
                                                                                   data_slice, tmp_path):
    import numpy as np

    modes = ("sum", "pcgrad")
    runs = {f"{mode}-{acc}": _run(tiny_checkpoint, data_slice, tmp_path, mode, acc) for mode in modes for acc in (1, 2)}
    nan_runs = {mode: _run(tiny_checkpoint, data_slice, tmp_path, mode, 2) for mode in modes}
    result = run_on_workers(accumulation_runs, {"runs": runs, "nan_runs": nan_runs, "out": str(tmp_path / "runs")}, 2,
                            tmp_path)
    for mode in modes:
        whole, split = ({k: np.array(v) for k, v in result[f"{mode}-{acc}"].items()} for acc in (1, 2))
        assert np.array_equal(whole["start"], split["start"])
        change = np.linalg.norm(whole["end"] - whole["start"])
        assert change > 1e-3  # the steps moved the parameters
        # Each rank's 4 rows per task come as 2 micro-batches of 2: the mean of the 2 micro-batch means is the
        # 4-row mean, so the updates agree up to float rounding; a sum of micro-batch losses would double them.
        assert np.linalg.norm(split["end"] - whole["end"]) <= 1e-5 * change, mode

        nan = result[f"nan-{mode}"]
        assert nan["record"] == [{"skipped": False, "unchanged": False}, {"skipped": True, "unchanged": True},
                                 {"skipped": False, "unchanged": False}], mode
        # Nothing of step 2's first micro-batch (its gradient, DeepSpeed's micro-step count) reaches step 3.
        end, reference = np.array(nan["end"]), np.array(nan["reference"])
        assert np.linalg.norm(end - reference) <= 1e-6 * np.linalg.norm(reference), mode
