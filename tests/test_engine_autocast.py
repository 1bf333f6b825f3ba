"""`deepspeed.precision: autocast_bf16` on 2 Ray Train workers: one step's gradient, as DeepSpeed hands it to
the optimizer, against fp32's from the same start, for the multitask trainer under exact PCGrad and for SimCSE's
strategy through GradCache; everything but the forward stays fp32.

Dropout 0, clipping off: the two gradients differ only by the forward's bf16 rounding, ~0.3% of the gradient's
norm on the tiny random BERT. The tolerance (2%) is far below a wrong scale (a factor 2 is 50% or 100%), and the
gradient must differ from fp32's at all (the autocast ran). A loss computed from bf16 outputs would be bf16:
every loss is checked to be fp32.

SimCSE is run with mean pooling: the tiny random BERT's [CLS] states are all alike (pairwise cosines 0.99999),
so the loss's gradient there lives in differences that bf16 does not hold (60% off fp32's). Its mean-pooled
embeddings differ as a trained model's do (all-MiniLM-L6-v2: [CLS] + MLP and mean both within ~1% of fp32).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.ray_workers import run_on_workers
from tests.test_engine_distributed import data_slice, engine_run_config  # noqa: F401  (fixture)

pytestmark = pytest.mark.distributed

PRECISIONS = ("fp32", "autocast_bf16")
NUM_SENTENCES = 6  # SimCSE's sentences per rank


def _recorded_step(engine, step) -> dict:
    """Run `step()` (one optimizer step); the flat gradient the optimizer was handed, and the dtypes of the
    parameters, their gradients and the optimizer's state after it."""
    import torch

    optimizer, original, grads = engine.optimizer, engine.optimizer.step, []

    def recording_step(*args, **kwargs):
        grads.append(torch.cat([p.grad.reshape(-1).double() for g in optimizer.param_groups for p in g["params"]
                                if p.grad is not None]))
        return original(*args, **kwargs)

    optimizer.step = recording_step
    step()
    optimizer.step = original
    params = list(engine.module.parameters())
    return {"grad": grads[0].tolist(),
            "dtypes": sorted({str(t.dtype) for t in [*params, *(p.grad for p in params if p.grad is not None),
                                                       *(v for s in optimizer.state.values() for v in s.values()
                                                         if torch.is_tensor(v) and v.ndim)]})}


def autocast_steps(config: dict) -> None:
    import torch
    import torch.distributed as dist

    from dist_minbert.config import config_from_dict
    from dist_minbert.contrastive.config import SimCSEConfig
    from dist_minbert.contrastive.model import SentenceEncoder
    from dist_minbert.engine.config import DeepSpeedConfig, OptimConfig
    from dist_minbert.engine.deepspeed_engine import build_engine
    from dist_minbert.engine.dist_context import DistContext
    from dist_minbert.engine.step_gradients import ContrastiveGradients
    from dist_minbert.engine.trainer import Trainer
    from dist_minbert.model.checkpoint import load_encoder
    from dist_minbert.observe.timers import StepTimers

    torch.set_num_threads(1)
    results = {}
    for precision in PRECISIONS:
        run = {**config["run"], "deepspeed": {**config["run"]["deepspeed"], "precision": precision},
               "train": {**config["run"]["train"], "output_dir": f"{config['out']}/{precision}"}}
        trainer = Trainer(config_from_dict(run), DistContext.current(use_gpu=False))
        loss_dtypes, original = set(), trainer.loss

        def loss(task, batch, original=original, loss_dtypes=loss_dtypes):
            value = original(task, batch)
            loss_dtypes.add(str(value.dtype))
            return value

        trainer.loss = loss
        position = trainer.positions()[0]
        step = _recorded_step(trainer.engine, lambda: trainer.train_step(trainer.read_step(position)))
        results[f"multitask-{precision}"] = {**step, "loss_dtypes": sorted(loss_dtypes)}

        torch.manual_seed(0)  # the same MLP for both precisions
        model = SentenceEncoder(load_encoder(config["checkpoint"], dropout=0.0), "mean")
        engine = build_engine(model, DeepSpeedConfig(precision=precision, gradient_clipping=0.0), OptimConfig(),
                              total_steps=1, use_gpu=False, world_size=dist.get_world_size())
        strategy = ContrastiveGradients(engine, engine.module, SimCSEConfig(chunk_size=4), StepTimers(), precision)
        batch = {key: torch.tensor(value) for key, value in config["sentences"][dist.get_rank()].items()}
        results[f"simcse-{precision}"] = _recorded_step(engine, lambda: strategy.run(batch))
    if dist.get_rank() == 0:
        Path(config["result_path"]).write_text(json.dumps(results))


def test_autocast_bf16_gradients_are_fp32s_within_bf16_rounding(ray_session, tiny_checkpoint, data_slice, tmp_path):
    import numpy as np

    from tests.test_contrastive_grad_cache import sentences

    run = engine_run_config(tiny_checkpoint, data_slice, tmp_path / "run", 2)
    run["surgery"] = {"mode": "pcgrad"}
    run["schedule"]["tasks_per_step"] = 3  # the step's Gram matrix has every task
    batches = [{key: value.tolist() for key, value in sentences(NUM_SENTENCES, seed=rank).items()} for rank in (0, 1)]
    result = run_on_workers(autocast_steps, {"run": run, "checkpoint": tiny_checkpoint, "sentences": batches,
                                             "out": str(tmp_path / "runs")}, 2, tmp_path)
    for job in ("multitask", "simcse"):
        fp32, autocast = (result[f"{job}-{precision}"] for precision in PRECISIONS)
        assert fp32["dtypes"] == autocast["dtypes"] == ["torch.float32"], job
        reference, grad = np.array(fp32["grad"]), np.array(autocast["grad"])
        error = np.linalg.norm(grad - reference) / np.linalg.norm(reference)
        assert 1e-5 < error < 2e-2, (job, error)
    assert result["multitask-fp32"]["loss_dtypes"] == result["multitask-autocast_bf16"]["loss_dtypes"] == ["torch.float32"]
