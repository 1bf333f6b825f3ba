"""The all-reduce-aware surgery hook: per-task gradients of one rank in, the gradient to hand to the engine out.

Pure torch.distributed; the engine calls it after the per-task backward passes and hands the
returned gradient to DeepSpeed's own averaging (DESIGN.md, "Gradient surgery"). Sample-weighting
makes the result independent of how samples fall on ranks: the task-t gradient of the union
batch's mean loss is ḡ_t = Σ_r (n_t^r / n_t) g_t^r = (1/N) Σ_r s_t^r g_t^r with s_t^r = N·n_t^r / n_t,
so each rank scales its gradients by s^r and every later mean over ranks is the union batch's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dist_minbert.surgery.comm import CommCounter
from dist_minbert.surgery.config import SurgeryConfig
from dist_minbert.surgery.pcgrad import WEIGHTINGS, combine, gram_matrix
from dist_minbert.surgery.stats import SurgeryStats, surgery_stats

Plan = Literal["allreduce", "sharded"]


@dataclass(frozen=True)
class SurgeryResult:
    gradient: Tensor  # (P,) what this rank hands to the engine; its mean over ranks is the step's update
    global_counts: Tensor  # (T,) int64 samples of each task in the step over all ranks
    stats: SurgeryStats | None  # None when no Gram matrix was formed (sum mode, or fewer than 2 tasks present)


def resolve_plan(plan: str, backend: str) -> Plan:
    """auto: allreduce on gloo, whose reduce-scatter of 3P took ~2× its all-reduce here; sharded on NCCL and others."""
    if plan == "auto":
        return "allreduce" if backend == "gloo" else "sharded"
    return plan  # type: ignore[return-value]


def sample_scales(local_counts: Tensor, global_counts: Tensor, world_size: int) -> Tensor:
    """s_t = N·n_t^r / n_t in float64; 0 for tasks absent from the whole step (never divides by n_t = 0)."""
    local = local_counts.to(torch.float64)
    total = global_counts.to(torch.float64)
    return torch.where(total > 0, world_size * local / total.clamp(min=1), 0.0)


def combine_task_gradients(grads: Tensor, local_counts: Tensor, config: SurgeryConfig, generator: torch.Generator,
                           comm: CommCounter) -> SurgeryResult:
    """Combine this rank's task gradients of the shared parameters into the gradient for the engine.

    grads (T,P): row t is the gradient of task t's mean loss over this rank's local_counts[t] samples
    (zeros when that count is 0); it is scaled in place and used as the communication buffer.
    generator: seeded identically on every rank (pcgrad.step_generator(seed, step)), so every rank
    draws the same random orders. Collectives: one all-reduce of T counts, then by mode:
    - sum: none; the gradient is Σ_t s_t g_t, which the engine's mean turns into Σ_t ḡ_t.
    - pcgrad_local: none; the weighting of this rank's own scaled gradients, then the engine's mean.
    - pcgrad, plan allreduce: all-reduce of the present tasks' rows (T units); every rank forms the
      global update wᵀḡ itself and returns it (the engine's mean of equal vectors leaves it unchanged).
    - pcgrad, plan sharded: reduce-scatter of each present task (T/2 units), Gram matrix from the
      shards (T² numbers all-reduced); returns the local combination Σ_t w_t s_t g_t, whose mean over
      ranks is wᵀḡ.
    With fewer than two tasks in the step there is nothing to resolve: every mode then acts as sum.
    """
    local_counts = local_counts.to(device=grads.device, dtype=torch.int64)
    global_counts = local_counts.clone()
    comm.all_reduce(global_counts)  # every rank needs n_t before scaling; T numbers
    scales = sample_scales(local_counts, global_counts, comm.world_size)
    grads.mul_(scales.to(torch.promote_types(grads.dtype, torch.float32))[:, None])  # product in ≥ float32
    present = (global_counts > 0).nonzero().flatten()
    if config.mode == "sum" or len(present) < 2:
        return SurgeryResult(gradient=grads.sum(dim=0), global_counts=global_counts, stats=None)
    if config.mode == "pcgrad_local":
        gram = gram_matrix(grads)
    elif resolve_plan(config.plan, torch.distributed.get_backend(comm.group)) == "allreduce":
        gram = _all_reduce_task_gradients(grads, present, comm)
    else:
        gram = _gram_from_shards(grads, present, comm)
    # In exact mode the Gram matrix is bitwise equal on every rank, and so are the weights.
    weights = WEIGHTINGS[config.weighting](gram.cpu(), generator)
    return SurgeryResult(gradient=combine(weights, grads), global_counts=global_counts,
                         stats=surgery_stats(gram, weights))


def _all_reduce_task_gradients(grads: Tensor, present: Tensor, comm: CommCounter) -> Tensor:
    """Turns grads into the global task gradients ḡ in place; returns their Gram matrix."""
    whole = len(present) == grads.shape[0]
    rows = grads if whole else grads[present]  # absent tasks (rows of zeros) are not sent
    comm.all_reduce(rows)  # the T×P bucket: Σ_r s_t^r g_t^r
    rows /= comm.world_size
    if not whole:
        grads[present] = rows
    return gram_matrix(grads)


def _gram_from_shards(grads: Tensor, present: Tensor, comm: CommCounter) -> Tensor:
    """Global Gram matrix of ḡ from this rank's 1/N shard of each global task gradient; grads stay local."""
    num_tasks, num_params = grads.shape
    world_size = comm.world_size
    shard_size = -(-num_params // world_size)
    padding = shard_size * world_size - num_params
    shards = grads.new_zeros(num_tasks, shard_size)
    for t in present.tolist():
        row = F.pad(grads[t], (0, padding)) if padding else grads[t]
        comm.reduce_scatter(shards[t], row)  # this rank's shard of Σ_r s_t^r g_t^r
    shards /= world_size
    gram = gram_matrix(shards)
    comm.all_reduce(gram)  # Σ over shards of the partial Gram matrices: T² numbers
    return gram
