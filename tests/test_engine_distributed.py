"""The train loop on 2 Ray Train workers with DeepSpeed (gloo), compared with 1 worker.

Equivalence in a form that can fail: dropout 0, fp32, clipping set explicitly (0 = off, since DeepSpeed
0.19.8 clips to 1.0 when the key is absent), plain SGD (an AdamW step ignores the gradient's scale and
would hide a sum-instead-of-mean), and the same global batch on 1 and 2 workers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.ray_workers import run_on_workers, write_slice

pytestmark = pytest.mark.distributed

NUM_ROWS = 48
STEPS = 3


def _flat_params(module):
    import torch

    return torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])


def loop_losses_and_sync(config: dict) -> None:
    """Train a few steps; after each, all-gather the flat parameters and record the largest rank difference."""
    import torch
    import torch.distributed as dist

    from dist_minbert.config import config_from_dict
    from dist_minbert.engine.dist_context import DistContext
    from dist_minbert.engine.trainer import Trainer

    torch.set_num_threads(1)
    cfg = config_from_dict(config["run"])
    trainer = Trainer(cfg, DistContext.current(use_gpu=False))
    losses, max_rank_diff = [], []
    for (epoch, step), _ in zip(trainer.positions(), range(config["steps"])):
        losses.append(trainer.train_step(trainer.read_step((epoch, step))))
        flat = _flat_params(trainer.engine.module)
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        max_rank_diff.append(max(float((g - gathered[0]).abs().max()) for g in gathered))
    if dist.get_rank() == 0:
        Path(config["result_path"]).write_text(json.dumps({"losses": losses, "max_rank_diff": max_rank_diff}))


def loop_sgd_gradients(config: dict) -> None:
    """Record the gradient DeepSpeed hands to the optimizer at each step, and the parameters at the end."""
    import torch
    import torch.distributed as dist

    from dist_minbert.config import config_from_dict
    from dist_minbert.engine.dist_context import DistContext
    from dist_minbert.engine.trainer import Trainer

    torch.set_num_threads(1)
    cfg = config_from_dict(config["run"])
    trainer = Trainer(cfg, DistContext.current(use_gpu=False))
    optimizer = trainer.engine.optimizer
    assert isinstance(optimizer, torch.optim.SGD), type(optimizer)  # ZeRO 0: DeepSpeed steps our optimizer
    grads, original_step = [], optimizer.step

    def recording_step(*args, **kwargs):
        grads.append(torch.cat([p.grad.reshape(-1).double() for g in optimizer.param_groups for p in g["params"]]))
        return original_step(*args, **kwargs)

    optimizer.step = recording_step
    start = _flat_params(trainer.engine.module)
    for (epoch, step), _ in zip(trainer.positions(), range(config["steps"])):
        trainer.train_step(trainer.read_step((epoch, step)))
    if dist.get_rank() == 0:
        torch.save({"grads": grads, "start": start, "end": _flat_params(trainer.engine.module)},
                   config["result_path"] + ".pt")
        Path(config["result_path"]).write_text("{}")


@pytest.fixture(scope="module")
def data_slice(tmp_path_factory, shared_data) -> Path:
    folder = tmp_path_factory.mktemp("slice")
    for name in ("ids-sst-train.csv", "quora-train.csv", "sts-train.csv"):
        write_slice(shared_data / name, folder / name, NUM_ROWS)
    return folder


def engine_run_config(tiny_checkpoint: str, data_root: Path, out: Path, num_workers: int, **optim) -> dict:
    from dist_minbert.config import config_from_dict
    from dist_minbert.config_loader import to_plain

    tasks = {
        "sst": {"train": "ids-sst-train.csv", "dev": "", "test": "", "batch_size": 8},
        "qqp": {"train": "quora-train.csv", "dev": "", "test": "", "batch_size": 8, "head": "cross"},
        "sts": {"train": "sts-train.csv", "dev": "", "test": "", "batch_size": 8, "head": "bi_mlp"},
    }
    raw = {
        "model": {"checkpoint": tiny_checkpoint, "dropout": 0.0, "max_length": 32},
        "tasks": tasks,
        "data": {"root": str(data_root)},
        "deepspeed": {"zero_stage": 0, "precision": "fp32", "gradient_clipping": 0.0},
        "optim": {"warmup_fraction": 0.0, "schedule": "constant", "weight_decay": 0.0, **optim},
        "train": {"output_dir": str(out), "epochs": 3, "seed": 7},
        "workers": {"num_workers": num_workers},
        "observe": {"tensorboard": False, "progress": False},
    }
    return to_plain(config_from_dict(raw))


def test_two_workers_loss_falls_and_ranks_stay_identical(ray_session, tiny_checkpoint, data_slice, tmp_path):
    run = engine_run_config(tiny_checkpoint, data_slice, tmp_path / "run", 2, lr=1e-3)
    steps_per_epoch = NUM_ROWS // 8
    result = run_on_workers(loop_losses_and_sync, {"run": run, "steps": 3 * steps_per_epoch}, 2, tmp_path)
    # DeepSpeed averages gradients and every rank applies the same update: parameters stay bit-identical.
    assert result["max_rank_diff"] == [0.0] * 3 * steps_per_epoch
    # Three passes over the same 48 rows per task: the summed loss of the third pass is below the first's.
    total = [sum(losses.values()) for losses in result["losses"]]
    first, third = np.mean(total[:steps_per_epoch]), np.mean(total[-steps_per_epoch:])
    assert third < 0.85 * first, total


def test_two_workers_equal_one_worker_with_the_union_batch(ray_session, tiny_checkpoint, data_slice, tmp_path):
    import torch

    # The global batch (8 per task) is the same on 1 and 2 workers: rank r of 2 reads positions c + r, c + r + 2, …
    # of the one global order, so the two ranks' batches together are exactly the 1-worker batch. Each rank's loss
    # is the mean over its 4 rows and DeepSpeed averages the 2 gradients, so the gradient handed to SGD is the
    # gradient of the mean over all 8 rows — as on 1 worker. A sum instead of a mean would be off by 2×.
    results = {}
    for n in (1, 2):
        run = engine_run_config(tiny_checkpoint, data_slice, tmp_path / f"sgd{n}", n, name="sgd", lr=0.05)
        run_on_workers(loop_sgd_gradients, {"run": run, "steps": STEPS}, n, tmp_path)
        results[n] = torch.load(str(tmp_path / f"result-{n}w.json.pt"))
    one, two = results[1], results[2]
    assert len(one["grads"]) == len(two["grads"]) == STEPS
    for g1, g2 in zip(one["grads"], two["grads"]):
        assert float((g2 - g1).norm()) <= 1e-4 * float(g1.norm())
    assert torch.equal(one["start"], two["start"])
    change = float((one["end"] - one["start"]).norm())
    assert change > 0
    assert float((two["end"] - one["end"]).norm()) <= 1e-4 * change
