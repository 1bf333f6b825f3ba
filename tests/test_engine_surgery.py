"""Exact PCGrad inside the DeepSpeed workers on 2 Ray ranks ≡ PCGrad on the union batch in one process.

The reference is worked out in the test, independently of the engine: from the stream state before the
step, a 1-rank stream yields the union of both ranks' rows; each task's gradient of its mean loss over
those rows is taken on a plain copy of the model; PCGrad (pure function, same seed and step) combines
the encoder rows; each head keeps its own task's gradient. With dropout 0, fp32, clipping off and plain
SGD, that is exactly what DeepSpeed must hand the optimizer on every rank.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tests.ray_workers import run_on_workers
from tests.test_engine_distributed import data_slice, engine_run_config  # noqa: F401  (fixture)

pytestmark = pytest.mark.distributed
STEPS = 2


def _union_reference(trainer, states: dict, plan: dict, step: int):
    """Expected optimizer gradient (flat, over all parameters in engine order) for one step."""
    import torch

    from dist_minbert.data.stream import TaskStream
    from dist_minbert.surgery.pcgrad import pcgrad, step_generator

    model = copy.deepcopy(trainer.engine.module)
    shared = model.shared_parameters()
    task_rows, head_grads = [], {}
    for task, size in plan.items():
        union = TaskStream(trainer.data.streams[task].source, trainer.data.streams[task].seed, 1, 0)
        union.load_state_dict(states[task])
        batch = trainer.data.collators[task](union.next_table(size)).tensors
        loss = model.loss(task, model(task, batch), batch["labels"])
        grads = torch.autograd.grad(loss, shared + model.task_parameters(task), allow_unused=True)
        task_rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                   for g, p in zip(grads[: len(shared)], shared)]))
        head_grads[task] = grads[len(shared):]
    update = pcgrad(torch.stack(task_rows).double(), step_generator(trainer.cfg.train.seed, step))
    expected = {}
    offset = 0
    for p in shared:
        expected[id(p)] = update[offset: offset + p.numel()].view_as(p)
        offset += p.numel()
    for task in plan:
        for p, g in zip(model.task_parameters(task), head_grads[task]):
            expected[id(p)] = g.double()
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[k]: v for k, v in expected.items()}
    return torch.cat([by_name[n].reshape(-1) for n, _ in trainer.engine.module.named_parameters()])


def loop_pcgrad(config: dict) -> None:
    import torch
    import torch.distributed as dist

    from dist_minbert.config import config_from_dict
    from dist_minbert.data.schedule import tasks_for_step
    from dist_minbert.engine.dist_context import DistContext
    from dist_minbert.engine.trainer import Trainer

    torch.set_num_threads(1)
    cfg = config_from_dict(config["run"])
    trainer = Trainer(cfg, DistContext.current(use_gpu=False))
    params = list(trainer.engine.module.parameters())
    recorded = []
    if cfg.deepspeed.zero_stage == 0:
        optimizer = trainer.engine.optimizer
        original = optimizer.step

        def recording_step(*args, **kwargs):
            missing = [n for n, p in trainer.engine.module.named_parameters() if p.grad is None]
            assert not missing, missing
            recorded.append(torch.cat([p.grad.reshape(-1).double() for p in params]))
            return original(*args, **kwargs)

        optimizer.step = recording_step
    start = torch.cat([p.detach().reshape(-1).double() for p in params])
    errors = []
    for (epoch, step), _ in zip(trainer.positions(), range(config["steps"])):
        states = {t: s.state_dict() for t, s in trainer.data.streams.items()}
        plan = tasks_for_step(cfg.schedule, cfg.train.seed, epoch, step, trainer.data.sizes, trainer.data.batch_sizes,
                              cfg.train.epochs)
        expected = (_union_reference(trainer, states, plan, trainer.global_step + 1)
                    if cfg.deepspeed.zero_stage == 0 else None)
        trainer.train_step(trainer.read_step((epoch, step)))
        if cfg.deepspeed.zero_stage == 0:
            got = recorded[-1]
            errors.append(float((got - expected).norm() / expected.norm()))
    final = torch.cat([p.detach().reshape(-1).double() for p in params])
    if dist.get_rank() == 0:
        torch.save({"start": start, "end": final}, config["result_path"] + ".pt")
        Path(config["result_path"]).write_text(json.dumps({"relative_errors": errors}))


def _pcgrad_run(tiny_checkpoint, data_root, out, zero_stage: int, plan: str) -> dict:
    run = engine_run_config(tiny_checkpoint, data_root, out, 2, name="sgd", lr=0.05)
    run["surgery"] = {"mode": "pcgrad", "plan": plan}
    run["deepspeed"]["zero_stage"] = zero_stage
    return run


@pytest.fixture(scope="module")
def exact_zero0(ray_session, tiny_checkpoint, data_slice, tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("pcgrad0")
    result = run_on_workers(loop_pcgrad, {"run": _pcgrad_run(tiny_checkpoint, data_slice, out / "run", 0, "allreduce"),
                                          "steps": STEPS}, 2, out)
    return result, torch.load(str(out / "result-2w.json.pt"))


def test_exact_pcgrad_on_two_workers_equals_union_batch_pcgrad(exact_zero0):
    result, _ = exact_zero0
    assert len(result["relative_errors"]) == STEPS
    assert max(result["relative_errors"]) <= 1e-4, result


@pytest.mark.parametrize("zero_stage,plan", [(0, "sharded"), (1, "allreduce"), (2, "sharded")])
def test_plans_and_zero_stages_agree(exact_zero0, zero_stage, plan, tiny_checkpoint, data_slice, tmp_path):
    import torch

    _, reference = exact_zero0
    run_on_workers(loop_pcgrad, {"run": _pcgrad_run(tiny_checkpoint, data_slice, tmp_path / "run", zero_stage, plan),
                                 "steps": STEPS}, 2, tmp_path)
    params = torch.load(str(tmp_path / "result-2w.json.pt"))
    assert torch.equal(params["start"], reference["start"])
    change = float((reference["end"] - reference["start"]).norm())
    assert change > 0
    assert float((params["end"] - reference["end"]).norm()) <= 1e-4 * change
