"""`dist-minbert bench scaling`: the full multitask step in production form against a plain PyTorch DDP loop doing
the same maths, on 1 and 2 workers, side by side in one run.

Ours: bench pcgrad's run (3 tasks, every task every step, exact PCGrad on the default plan) in the real Trainer
on Ray Train workers, through DeepSpeed. The DDP loop: fresh processes in a gloo group (no Ray), the same
model (our BertEncoder and heads from the same checkpoint and seed), the same batches (read by the same data
path from the same run config, untimed on both sides: production prefetches them on a thread), one
torch.autograd.grad per task, one all-reduce of the T per-task gradients of the shared parameters (and one of
the heads'), PCGrad on the result (surgery/pcgrad.py's pure functions, the same generator per step), gradient
clipping and the same fused AdamW. Both sides run each worker with the same torch threads (1), and both time
the same span: from a step's batches in memory to its optimizer step done.

efficiency = 1-worker step time / (2 × 2-worker step time) at the fixed global batch (the throughput ratio);
step_ratio_vs_ddp = the DDP loop's 2-worker step time / ours: ≥ 0.97 means the engine, Ray and DeepSpeed add
at most 3% to hand-written DDP. Step times are medians over the timed steps after warm-up.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from dist_minbert.bench.common import start_process
from dist_minbert.bench.pcgrad import TASK_FILES, PCGradBenchConfig, run_config, trainer_builder

TARGET_STEP_RATIO_VS_DDP = 0.97
MODE, PLAN = "pcgrad", "auto"  # the production step: exact PCGrad, the backend's default plan


def report(config: PCGradBenchConfig, ours: dict[int, dict], ddp: dict[int, dict], wall_s: float,
           load_average: list[float]) -> dict:
    """The JSON object: the headline ratios, each side's medians per group, the target and whether it passed."""
    step = {side: {n: statistics.median(group["step_s_all"]) for n, group in groups.items()}
            for side, groups in (("ours", ours), ("ddp", ddp))}
    ratio = step["ddp"][2] / step["ours"][2]
    cpu = {side: {n: statistics.median(group["cpu_s_all"]) for n, group in groups.items()}
           for side, groups in (("ours", ours), ("ddp", ddp))}
    return {
        "efficiency": step["ours"][1] / (2 * step["ours"][2]),
        "ddp_efficiency": step["ddp"][1] / (2 * step["ddp"][2]),
        "step_ratio_vs_ddp": ratio,
        "step_ratio_vs_ddp_1w": step["ddp"][1] / step["ours"][1],
        # CPU seconds of the worker process (all its threads, Ray's and DeepSpeed's included) per step: they hardly
        # move with load from other processes, which wall-clock times on a shared machine do.
        "cpu_ratio_vs_ddp": cpu["ddp"][2] / cpu["ours"][2],
        "cpu_ratio_vs_ddp_1w": cpu["ddp"][1] / cpu["ours"][1],
        "step_s": {side: {f"{n}w": s for n, s in by_n.items()} for side, by_n in step.items()},
        "samples_per_s": {side: {f"{n}w": config.batch_size * len(TASK_FILES) / s for n, s in by_n.items()}
                          for side, by_n in step.items()},
        "cpu_s": {side: {f"{n}w": s for n, s in by_n.items()} for side, by_n in cpu.items()},
        "targets": {"step_ratio_vs_ddp": TARGET_STEP_RATIO_VS_DDP},
        "passed": {"step_ratio_vs_ddp": ratio >= TARGET_STEP_RATIO_VS_DDP},
        "num_tasks": len(TASK_FILES),
        "global_batch": config.batch_size * len(TASK_FILES),
        "groups": {"ours": {f"{n}w": g for n, g in ours.items()}, "ddp": {f"{n}w": g for n, g in ddp.items()}},
        "config": asdict(config),
        "load_average_before_after": load_average,
        "wall_s": wall_s,
    }


# -- ours: on each Ray Train worker ------------------------------------------------------------------------------
def ours_worker(loop_config: dict) -> None:
    """The Trainer's production step, timed from batches in memory to the optimizer step; rank 0 writes."""
    import json

    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # the report alone on the driver's stdout
    config = PCGradBenchConfig(**loop_config["bench"])
    trainer = trainer_builder(config, loop_config, loop_config["num_workers"])(MODE, PLAN, "ours")
    timings = _timed_steps(config, trainer.positions(), trainer.read_step, trainer.train_step)
    if dist.get_rank() == 0:
        Path(loop_config["result_path"]).write_text(json.dumps(timings))


def _timed_steps(config: PCGradBenchConfig, positions, read, run) -> dict:
    """Warm-up, then timed steps: `run(read(position))`, only `run` timed (wall and this process's CPU)."""
    wall, cpu = [], []
    for step, position in zip(range(config.warmup_steps + config.timed_steps), positions):
        batches = read(position)
        started, started_cpu = time.perf_counter(), time.process_time()
        run(batches)
        if step >= config.warmup_steps:
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
    return {"step_s_all": wall, "cpu_s_all": cpu}


# -- the DDP loop: in each process of a gloo group -----------------------------------------------------------------
class DDPLoop:
    """Hand-written data parallelism doing our step's maths: per-task backward passes, one all-reduce of the T
    per-task gradients (and one of the heads'), PCGrad on their mean, clipping, AdamW."""

    def __init__(self, cfg, ctx, out: Path) -> None:
        from dist_minbert.engine.deepspeed_engine import build_optimizer, lr_lambda, param_groups
        from dist_minbert.engine.multitask_data import MultitaskData
        from dist_minbert.model.checkpoint import load_encoder
        from dist_minbert.tasks.multitask import MultitaskModel

        self.cfg, self.ctx = cfg, ctx
        self.data = MultitaskData(cfg, ctx, out)
        torch.manual_seed(cfg.train.seed)  # the Trainer's seeding: the same heads
        self.model = MultitaskModel(load_encoder(cfg.model.checkpoint, dropout=cfg.model.dropout), cfg.tasks,
                                    cfg.model.pooling).train()
        torch.manual_seed(cfg.train.seed + 1 + ctx.rank)
        self.shared = self.model.shared_parameters()
        self.tasks = list(self.model.tasks)
        self.heads = [p for task in self.tasks for p in self.model.task_parameters(task)]
        self.rows = torch.empty(len(self.tasks), sum(p.numel() for p in self.shared))  # (T, P), reused
        self.head_grads = torch.zeros(sum(p.numel() for p in self.heads))  # (H,)
        self.optimizer = build_optimizer(param_groups(self.model, cfg.optim), cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                          lr_lambda(cfg.optim, self.data.total_steps))
        self.step_count = 0

    def read(self, position) -> dict:
        """This rank's batches of the step, as tensors (one micro-batch: the bench config's)."""
        (batches,) = self.data.reader()(position).micro_batches
        return {task: collated.tensors for task, collated in batches.items()}

    def gradients(self, batches: dict) -> None:
        """The step's update into .grad: the mean over ranks of each task's gradient, then PCGrad's combination."""
        from dist_minbert.surgery.pcgrad import combine, gram_matrix, pcgrad_weights_from_gram, step_generator

        self.step_count += 1
        self.head_grads.zero_()
        head_offsets = self._offsets(self.heads)
        for t, task in enumerate(self.tasks):  # every task every step (round robin)
            batch = batches[task]
            loss = self.model.loss(task, self.model(task, batch), batch.get("labels"))
            heads = self.model.task_parameters(task)
            grads = torch.autograd.grad(loss, [*self.shared, *heads], allow_unused=True)
            # A parameter no task reaches (the pooler under mean pooling) has no gradient: its columns are 0.
            torch.cat([g.reshape(-1) if g is not None else p.new_zeros(p.numel())
                       for p, g in zip(self.shared, grads)], out=self.rows[t])
            for param, grad in zip(heads, grads[len(self.shared):]):
                if grad is not None:
                    start = head_offsets[id(param)]
                    self.head_grads[start: start + grad.numel()] = grad.reshape(-1)
        world = dist.get_world_size()
        dist.all_reduce(self.rows)  # T per-task gradients summed over ranks (equal shares: /N is the union mean)
        dist.all_reduce(self.head_grads)  # each head's gradient
        self.rows /= world
        self.head_grads /= world
        weights = pcgrad_weights_from_gram(gram_matrix(self.rows), step_generator(self.cfg.train.seed, self.step_count))
        update = combine(weights, self.rows)
        self._scatter(update, self.shared)
        self._scatter(self.head_grads, self.heads)

    def step(self, batches: dict) -> None:
        self.gradients(batches)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.deepspeed.gradient_clipping)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=False)

    def flat_gradient(self) -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in [*self.shared, *self.heads]])

    @staticmethod
    def _offsets(params: list) -> dict[int, int]:
        offsets, start = {}, 0
        for param in params:
            offsets[id(param)] = start
            start += param.numel()
        return offsets

    @staticmethod
    def _scatter(flat: torch.Tensor, params: list) -> None:
        start = 0
        for param in params:
            view = flat[start: start + param.numel()].view_as(param)
            if param.grad is None:
                param.grad = view.clone()
            else:
                param.grad.copy_(view)
            start += param.numel()


def ddp_worker(rank: int, world_size: int, store: str, raw: dict, job: dict, results) -> None:
    """One process of the DDP group: the loop's warm-up and timed steps; rank 0 may also save its first
    step's gradient (job["gradient_path"]) for the equivalence test."""
    try:
        start_process(raw)  # stdout to stderr, OMP and torch threads
        from dist_minbert.config import config_from_dict
        from dist_minbert.engine.dist_context import DistContext

        config = PCGradBenchConfig(**raw)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=600))
        out = Path(job["scratch"]) / f"{world_size}w-ddp"
        cfg = config_from_dict(run_config(config, job["data_root"], str(out), world_size, MODE, PLAN))
        loop = DDPLoop(cfg, DistContext.current(use_gpu=False), out)
        if job.get("gradient_path"):
            position = loop.data.positions()[0]
            loop.gradients(loop.read(position))
            if rank == 0:
                torch.save(loop.flat_gradient(), job["gradient_path"])
            results.put({"rank": rank})
            return
        results.put({"rank": rank, **_timed_steps(config, loop.data.positions(), loop.read, loop.step)})
    except Exception as exc:  # the driver turns it into its error
        import traceback

        results.put({"rank": rank, "error": f"{exc!r}\n{traceback.format_exc()}"})
