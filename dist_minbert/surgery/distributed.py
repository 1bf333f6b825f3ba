"""The all-reduce-aware surgery hook: per-task gradients of one rank in, the gradient to hand to the engine out.

Pure torch.distributed; the engine feeds it each task's gradient as that task's backward ends and
hands the result to DeepSpeed (docs/ARCHITECTURE.md, "One optimizer step"). Sample-weighting makes the result
independent of how samples fall on ranks: the task-t gradient of the union batch's mean loss is
ḡ_t = Σ_r (n_t^r / n_t) g_t^r = (1/N) Σ_r s_t^r g_t^r with s_t^r = N·n_t^r / n_t, so each rank
scales its gradients by s^r and every later mean over ranks is the union batch's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dist_minbert.surgery.comm import CommCounter, Pending
from dist_minbert.surgery.config import SurgeryConfig
from dist_minbert.surgery.pcgrad import WEIGHTINGS, combine, gram_matrix
from dist_minbert.surgery.stats import SurgeryStats, surgery_stats

Plan = Literal["allreduce", "sharded"]


@dataclass(frozen=True)
class SurgeryResult:
    gradient: Tensor  # (P,) what this rank hands to the engine
    global_counts: Tensor  # (T,) int64 samples of each task in the step over all ranks
    stats: SurgeryStats | None  # None when no Gram matrix was formed (sum mode, or fewer than 2 tasks present)
    # True: `gradient` is the step's update itself, bitwise equal on every rank, so averaging it again over
    # ranks would cost a unit and change nothing. False: its mean over ranks is the update.
    is_global: bool = False


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


class TaskReduction:
    """One step of the hook, task by task, so communication and memory follow the backward passes.

    Construct it with this rank's sample count of each task (one all-reduce of T numbers: every rank
    needs n_t before scaling), write task t's scaled gradient s_t·g_t into row(t), and call
    reduce([t]) as soon as it is final: in exact mode the plan's collective starts asynchronously and
    overlaps the next task's forward and backward. Then gram() (optional) and finish(). Tasks absent from
    the whole step are never written, reduced or read. With fewer than two tasks every mode acts as sum.

    Buffers, by plan (exact mode):
    - allreduce: the T×P rows (every rank needs every global task gradient): T units, T·P memory.
    - sharded, gather_update: one P staging row, reused (a task's row is free once its reduce-scatter
      ends; with micro-batches interleaving tasks, a task that finds it taken gets its own) and T shards
      of P/N; the rank's shard of the update is all-gathered into the staging row: (T+1)/2 units,
      P + T·P/N memory, not T·P.
    - sharded, not gather_update: the T×P local rows are kept to return the local combination
      Σ_t w_t s_t g_t, whose mean over ranks is the update (for an engine that must reduce it itself).
    """

    def __init__(self, local_counts: Tensor, num_params: int, config: SurgeryConfig, comm: CommCounter, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 gather_update: bool = False, rows: Tensor | None = None) -> None:
        """rows: an existing T×P buffer to write the task gradients into (reused across steps to spare the
        page faults of fresh allocations); allocated here when None and the plan needs one."""
        self.config, self.comm, self.num_params = config, comm, num_params
        self.dtype, self.device = dtype, torch.device(device)
        local_counts = local_counts.to(device=self.device, dtype=torch.int64)
        self.global_counts = local_counts.clone()
        comm.all_reduce(self.global_counts)  # T numbers
        self.world_size = comm.world_size
        self.scales = sample_scales(local_counts, self.global_counts, self.world_size)
        self.present = (self.global_counts > 0).nonzero().flatten().tolist()
        exact = config.mode == "pcgrad" and len(self.present) >= 2 and self.world_size > 1
        backend = torch.distributed.get_backend(comm.group)
        self.plan: Plan | None = resolve_plan(config.plan, backend) if exact else None  # None: rows stay local
        self.gather_update = gather_update and self.plan == "sharded"
        self.shard_size = -(-num_params // self.world_size)
        num_tasks = len(local_counts)
        self._staging: Tensor | None = None  # gather_update: (N·shard,) padded row, allocated on first use
        self._staging_owner: int | None = None  # the task whose gradient the staging row holds or is sending
        self._padded: list[Tensor | None] = [None] * num_tasks  # gather_update: each task's padded buffer
        self._matrix: Tensor | None = None  # otherwise: the T×P rows
        self._rows: list[Tensor | None] = [None] * num_tasks
        if not self.gather_update:
            self._matrix = rows if rows is not None else torch.empty(num_tasks, num_params, dtype=dtype,
                                                                     device=device)
            self._rows = [self._matrix[t] if t in self.present else None for t in range(num_tasks)]
        self._shards = (torch.empty(num_tasks, self.shard_size, dtype=dtype, device=device)
                        if self.plan == "sharded" else None)
        self._pending: list[Pending] = []
        self._gram: Tensor | None = None
        self._gram_formed = False

    # -- feeding -------------------------------------------------------------------------------
    def row(self, t: int) -> Tensor:
        """(P,) buffer for task t's scaled gradient; uninitialised: the caller writes it before adding to it."""
        if not self.gather_update:
            row = self._rows[t]
            assert row is not None, f"task {t} is absent from the whole step"
            return row
        if self._rows[t] is None:
            self._rows[t] = self._take_buffer(t)[: self.num_params]
        return self._rows[t]

    def _take_buffer(self, t: int) -> Tensor:
        """The staging row once no task still being written holds it, else a buffer of t's own."""
        size = self.shard_size * self.world_size
        if self._staging_owner is None or self._rows[self._staging_owner] is None:
            self._wait()  # the staging row is free once the reduce-scatter reading it has ended
            if self._staging is None:
                self._staging = torch.empty(size, dtype=self.dtype, device=self.device)
            self._staging_owner, buffer = t, self._staging
        else:
            buffer = torch.empty(size, dtype=self.dtype, device=self.device)
        buffer[self.num_params:].zero_()  # padding
        self._padded[t] = buffer
        return buffer

    def reduce(self, tasks: list[int]) -> None:
        """The rows of `tasks` are final: start their reduction (in exact mode; a no-op otherwise).

        allreduce: one all-reduce of the rows as one bucket when they are consecutive (one task: its
        row), else of a gathered copy. sharded: one reduce-scatter per task into its shard.
        """
        if self.plan == "allreduce":
            if tasks == list(range(tasks[0], tasks[-1] + 1)):
                bucket = self._matrix[tasks[0]: tasks[-1] + 1]
                self._pending.append(self.comm.all_reduce(bucket, async_op=True))  # Σ_r s_t^r g_t^r
            else:  # absent tasks between them: gather the present rows, reduce, scatter back
                bucket = torch.stack([self._rows[t] for t in tasks])
                self.comm.all_reduce(bucket)
                for row, reduced in zip((self._rows[t] for t in tasks), bucket):
                    row.copy_(reduced)
        elif self.plan == "sharded":
            padding = self.shard_size * self.world_size - self.num_params
            for t in tasks:
                if self.gather_update:
                    padded = self._padded[t]
                    self._rows[t] = None  # the local row is not needed again: its buffer is free after the send
                else:
                    padded = F.pad(self._rows[t], (0, padding)) if padding else self._rows[t]
                # This rank's shard of Σ_r s_t^r g_t^r.
                self._pending.append(self.comm.reduce_scatter(self._shards[t], padded, async_op=True))

    def _wait(self) -> None:
        for pending in self._pending:
            pending.wait()
        self._pending.clear()
        # Buffers whose reduce-scatter has ended and whose task is done are released.
        self._padded = [buffer if self._rows[t] is not None else None for t, buffer in enumerate(self._padded)]

    # -- result ----------------------------------------------------------------------------------
    def gram(self) -> Tensor | None:
        """Waits for the reductions; the Gram matrix of the step's task gradients (global in exact mode, this
        rank's own in local mode), formed once. None when nothing is weighed (sum mode, fewer than 2 tasks).

        Its diagonal lets the caller check for non-finite gradients before any weighting runs on them.
        """
        if self._gram_formed:
            return self._gram
        self._wait()
        self._gram_formed = True
        if self.config.mode == "sum" or len(self.present) < 2:
            self._gram = None
        elif self.plan is None:  # pcgrad_local, or exact mode on one rank (its rows are the global gradients)
            self._gram = gram_matrix(self._rows)
        elif self.plan == "allreduce":
            # The rows hold N·ḡ_t; the 1/N is folded into the T×T Gram matrix and the T weights, not the T×P rows.
            self._gram = gram_matrix(self._rows) / self.world_size**2
        else:
            self._shards /= self.world_size  # this rank's 1/N of every ḡ_t
            self._gram = gram_matrix([self._shards[t] if t in self.present else None for t in range(len(self._rows))])
            self.comm.all_reduce(self._gram)  # Σ over shards of the partial Gram matrices: T² numbers
        return self._gram

    def finish(self, generator: torch.Generator) -> SurgeryResult:
        """Weights from the Gram matrix, and the gradient for the engine.

        generator: seeded identically on every rank (pcgrad.step_generator(seed, step)), so every rank
        draws the same random orders; in exact mode the Gram matrix, and so the weights, are bitwise
        equal on every rank.
        """
        gram = self.gram()
        if gram is None:
            ones = (self.global_counts > 0).to(torch.float64)
            return self._result(combine(ones, self._rows, out=self._first_row()), None, self._rows_are_global)
        weights = WEIGHTINGS[self.config.weighting](gram.cpu(), generator)
        stats = surgery_stats(gram, weights)
        if self.gather_update:
            return self._result(self._gathered_update(weights), stats, True)
        row_weights = weights / self.world_size if self.plan == "allreduce" else weights
        return self._result(combine(row_weights, self._rows, out=self._first_row()), stats, self._rows_are_global)

    def _gathered_update(self, weights: Tensor) -> Tensor:
        """wᵀḡ: this rank's shard of it from its shards, then one all-gather (1/2 unit) into the staging row."""
        assert self._staging is not None and self._shards is not None
        shard = combine(weights, list(self._shards))
        self.comm.all_gather(self._staging, shard)
        self._shards = None  # freed before the engine allocates anything else
        return self._staging[: self.num_params]

    @property
    def _rows_are_global(self) -> bool:
        """After finish's reductions: every rank holds the same global task gradients (or there is one rank)."""
        return self.world_size == 1 or self.plan == "allreduce"

    def _first_row(self) -> Tensor | None:
        """The rows are scratch once reduced: the combination is written into the first present one."""
        return next((row for row in self._rows if row is not None), None)

    def _result(self, gradient: Tensor, stats: SurgeryStats | None, is_global: bool) -> SurgeryResult:
        return SurgeryResult(gradient=gradient, global_counts=self.global_counts, stats=stats, is_global=is_global)

    def held_tensors(self) -> list[Tensor]:
        """The gradient buffers this reduction holds now (for memory accounting)."""
        buffers = [self._matrix, self._staging, self._shards, *self._padded]
        return [t for t in buffers if t is not None]


def combine_task_gradients(grads: Tensor, local_counts: Tensor, config: SurgeryConfig, generator: torch.Generator,
                           comm: CommCounter) -> SurgeryResult:
    """Combine this rank's task gradients of the shared parameters, given all at once, into the engine's gradient.

    grads (T,P): row t is the gradient of task t's mean loss over this rank's local_counts[t] samples
    (zeros when that count is 0); it is scaled in place and used as the communication buffer.
    Collectives: one all-reduce of T counts, then by mode:
    - sum: none; the gradient is Σ_t s_t g_t, which the engine's mean turns into Σ_t ḡ_t.
    - pcgrad_local: none; the weighting of this rank's own scaled gradients, then the engine's mean.
    - pcgrad, plan allreduce: one all-reduce of the present tasks' rows (T units); every rank forms the
      global update wᵀḡ itself and returns it (is_global).
    - pcgrad, plan sharded: reduce-scatter of each present task (T/2 units), Gram matrix from the
      shards (T² numbers all-reduced); returns the local combination Σ_t w_t s_t g_t, whose mean over
      ranks is wᵀḡ.
    """
    reduction = TaskReduction(local_counts, grads.shape[1], config, comm, dtype=grads.dtype, device=grads.device,
                              rows=grads)
    grads.mul_(reduction.scales.to(torch.promote_types(grads.dtype, torch.float32))[:, None])  # product in ≥ fp32
    if reduction.present:
        reduction.reduce(reduction.present)
    return reduction.finish(generator)
