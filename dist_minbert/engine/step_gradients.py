"""How one optimizer step's task losses become the gradient DeepSpeed applies.

`summed`: the baseline — losses weighted and summed, one engine.backward per micro-batch.
`surgery`: each task gets its own backward through torch.autograd.grad (which fires none of
DeepSpeed's reduction hooks and leaves .grad alone); the per-task gradients of the shared encoder
go through the all-reduce-aware combination (dist_minbert.surgery.distributed), and the result is
handed to DeepSpeed through a linear surrogate, engine.backward(Σ_p ⟨p, c_p⟩), so DeepSpeed's own
reduction, clipping and ZeRO partitioning apply unchanged at stages 0, 1 and 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_minbert.surgery.comm import CommCounter
from dist_minbert.surgery.config import SurgeryConfig
from dist_minbert.surgery.distributed import combine_task_gradients, sample_scales
from dist_minbert.surgery.pcgrad import step_generator
from dist_minbert.surgery.stats import SurgeryStats
from dist_minbert.tasks.multitask import MultitaskModel


class NonFiniteStep(RuntimeError):
    """A NaN or infinite loss or gradient on some rank: every rank skips the step together."""


def all_finite(values: torch.Tensor) -> bool:
    """One all-reduced flag, so all ranks take the same decision in the same step."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(values).all()) else 1.0], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(bad)
    return bad.item() == 0.0


@dataclass
class StepOutcome:
    losses: dict[str, float]  # this rank's mean loss per task, over the step's micro-batches
    stats: SurgeryStats | None  # surgery statistics of the step (None in sum mode)


class SummedGradients:
    """Baseline: Σ_t w_t L_t, backward once per micro-batch; DeepSpeed accumulates and averages."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def run(self, micro_batches, loss_of, weights: dict[str, float]) -> StepOutcome:
        """`micro_batches`: iterable of {task: batch}; `loss_of(task, batch)` → mean loss over the local batch."""
        losses: dict[str, float] = {}
        for batches in micro_batches:
            total, local = 0.0, {}
            for task, batch in batches.items():
                local[task] = loss_of(task, batch)
                total = total + weights[task] * local[task]
            if not all_finite(torch.stack([l.detach() for l in local.values()])):
                raise NonFiniteStep(f"non-finite loss: {_fmt(local)}")
            self.engine.backward(total)
            self.engine.step()
            for task, loss in local.items():
                losses[task] = losses.get(task, 0.0) + loss.item() / len(micro_batches)
        return StepOutcome(losses, None)


class SurgeryGradients:
    """Per-task gradients, accumulated over micro-batches, combined across ranks before one optimizer step."""

    def __init__(self, engine, model: MultitaskModel, cfg: SurgeryConfig, seed: int, comm: CommCounter) -> None:
        self.engine, self.model, self.cfg, self.seed, self.comm = engine, model, cfg, seed, comm
        self.tasks = list(model.tasks)
        self.shared = [p for p in model.shared_parameters() if p.requires_grad]
        self.num_shared = sum(p.numel() for p in self.shared)
        dtype = torch.float32 if self.shared[0].dtype != torch.float64 else torch.float64
        # T×P accumulator of the rank's per-task gradients of the encoder (fp32 even under bf16 training).
        self.task_grads = torch.zeros(len(self.tasks), self.num_shared, dtype=dtype, device=self.shared[0].device)

    def run(self, micro_batches, loss_of, weights: dict[str, float], step: int) -> StepOutcome:
        self.task_grads.zero_()
        head_grads: dict[str, list[torch.Tensor]] = {}
        local_counts = torch.zeros(len(self.tasks), dtype=torch.int64)
        losses: dict[str, float] = {}
        for batches in micro_batches:
            for task, batch in batches.items():
                t = self.tasks.index(task)
                loss = loss_of(task, batch)
                head = self.model.task_parameters(task)
                grads = torch.autograd.grad(weights[task] * loss / len(micro_batches), self.shared + head,
                                            allow_unused=True)
                n = len(batch["labels"])
                # Accumulate n-weighted so that a task's row ends as the gradient of its mean over all micro-batches.
                self.task_grads[t] += n * _flatten(grads[: len(self.shared)], self.shared)
                previous = head_grads.get(task)
                head_grads[task] = [n * _dense(g, p) + (previous[i] if previous else 0)
                                    for i, (g, p) in enumerate(zip(grads[len(self.shared):], head))]
                local_counts[t] += n
                losses[task] = losses.get(task, 0.0) + loss.item() / len(micro_batches)
        present = local_counts > 0
        self.task_grads[present] /= local_counts[present, None].to(self.task_grads.dtype) / len(micro_batches)
        if not all_finite(torch.cat([torch.tensor(list(losses.values()), dtype=torch.float64),
                                     self.task_grads.norm(dim=1).double().cpu()])):
            raise NonFiniteStep(f"non-finite loss or gradient: {_fmt(losses)}")
        result = combine_task_gradients(self.task_grads, local_counts, self.cfg, step_generator(self.seed, step),
                                        self.comm)
        scales = sample_scales(local_counts, result.global_counts, self.comm.world_size)
        surrogate = _surrogate(self.shared, result.gradient)
        for task, grads in head_grads.items():
            t = self.tasks.index(task)
            # Heads keep their own task's gradient, sample-weighted like the encoder's (s_t / n_t^r per sample).
            scale = float(scales[t]) * len(micro_batches) / int(local_counts[t])
            surrogate = surrogate + sum((p * (g * scale).to(p.dtype)).sum()
                                        for p, g in zip(self.model.task_parameters(task), grads))
        self.engine.backward(surrogate)
        self.engine.step()
        return StepOutcome(losses, result.stats)


def _flatten(grads, params) -> torch.Tensor:
    return torch.cat([_dense(g, p).reshape(-1).float() for g, p in zip(grads, params)])


def _dense(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(param) if grad is None else grad


def _surrogate(params, flat: torch.Tensor) -> torch.Tensor:
    """Σ_p ⟨p, c_p⟩: its gradient with respect to each p is exactly c_p."""
    total, offset = 0.0, 0
    for p in params:
        chunk = flat[offset: offset + p.numel()].view_as(p).to(p.dtype)
        total = total + (p * chunk).sum()
        offset += p.numel()
    return total


def _fmt(losses) -> str:
    return ", ".join(f"{t}={float(v):.4g}" for t, v in losses.items())
