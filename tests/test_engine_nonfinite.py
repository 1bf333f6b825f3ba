"""A NaN loss on one rank is seen by every rank in the same step: all skip it, then stop after too many in a row."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.ray_workers import run_on_workers
from tests.test_engine_distributed import data_slice, engine_run_config  # noqa: F401  (fixture)

pytestmark = pytest.mark.distributed


def loop_with_nan_on_rank_1(config: dict) -> None:
    import torch
    import torch.distributed as dist

    from dist_minbert.config import config_from_dict
    from dist_minbert.engine.dist_context import DistContext
    from dist_minbert.engine.trainer import Trainer

    torch.set_num_threads(1)
    trainer = Trainer(config_from_dict(config["run"]), DistContext.current(use_gpu=False))
    original = trainer.loss

    def loss(task, batch):
        value = original(task, batch)
        poisoned = dist.get_rank() == 1 and trainer.global_step in config["nan_steps"] and task == "sst"
        return value * float("nan") if poisoned else value

    trainer.loss = loss
    flat = lambda: torch.cat([p.detach().reshape(-1).clone() for p in trainer.engine.module.parameters()])  # noqa: E731
    record, error = [], None
    try:
        for (epoch, step), _ in zip(trainer.positions(), range(config["steps"])):
            before = flat()
            losses = trainer.train_step(trainer.read_step((epoch, step)))
            record.append({"step": trainer.global_step, "skipped": not losses,
                           "unchanged": bool(torch.equal(before, flat()))})
    except RuntimeError as exc:
        error = str(exc)
    if dist.get_rank() == 0:  # rank 0 never saw a NaN itself
        Path(config["result_path"]).write_text(json.dumps({"record": record, "error": error}))


@pytest.mark.parametrize("mode", ["sum", "pcgrad"])
def test_nan_on_one_rank_skips_the_step_everywhere_then_stops(mode, ray_session, tiny_checkpoint, data_slice,
                                                                tmp_path):
    run = engine_run_config(tiny_checkpoint, data_slice, tmp_path / "run", 2, lr=1e-3)
    run["surgery"] = {"mode": mode}
    run["train"]["max_nonfinite_steps"] = 2
    # Step 2 alone is poisoned (skipped, training goes on); steps 4 and 5 in a row stop the run at step 5.
    result = run_on_workers(loop_with_nan_on_rank_1, {"run": run, "steps": 6, "nan_steps": [2, 4, 5]}, 2, tmp_path)
    record = {r["step"]: r for r in result["record"]}
    assert record[2] == {"step": 2, "skipped": True, "unchanged": True}
    assert record[4] == {"step": 4, "skipped": True, "unchanged": True}
    assert not record[1]["skipped"] and not record[1]["unchanged"]
    assert not record[3]["skipped"] and not record[3]["unchanged"]
    assert 5 not in record and "2 steps in a row" in result["error"]
