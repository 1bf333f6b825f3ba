"""How one optimizer step's task losses become the gradient DeepSpeed applies.

Both strategies run the forward on the plain module and take gradients with torch.autograd.grad,
which fires none of DeepSpeed's reduction hooks and leaves .grad alone. Each accumulates its
micro-batches itself and checks losses and gradients for NaN/inf on every rank before DeepSpeed sees
anything; then it hands DeepSpeed the step's gradient through a surrogate loss whose backward yields
exactly that gradient (engine.backward(_HandOver)), so DeepSpeed's reduction, clipping and ZeRO
partitioning apply unchanged at stages 0, 1 and 2. DeepSpeed therefore always runs with
gradient_accumulation_steps 1, and a skipped step leaves no trace in it (no micro-step counted, no
.grad left over).

`sum`: the baseline, Σ_t w_t L_t, one backward per micro-batch.
`pcgrad` / `pcgrad_local`: each task gets its own backward; the per-task gradients of the shared
encoder go through the all-reduce-aware combination (dist_minbert.surgery.distributed).
SimCSE (`ContrastiveGradients`): one contrastive loss over every rank's views (dist_minbert.contrastive).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from dist_minbert.contrastive.config import SimCSEConfig
from dist_minbert.contrastive.grad_cache import simcse_gradients
from dist_minbert.engine.autocast import training_forward
from dist_minbert.engine.config import DeepSpeedConfig, OptimConfig
from dist_minbert.engine.deepspeed_engine import build_engine
from dist_minbert.observe.timers import StepTimers
from dist_minbert.surgery.comm import CommCounter
from dist_minbert.surgery.config import SurgeryConfig
from dist_minbert.surgery.distributed import TaskReduction, resolve_plan
from dist_minbert.surgery.pcgrad import step_generator
from dist_minbert.surgery.stats import SurgeryStats
from dist_minbert.tasks.multitask import MultitaskModel

Batch = dict[str, torch.Tensor]
LossOf = Callable[[str, Batch], torch.Tensor]  # (task, this rank's batch) → mean loss over the batch


class NonFiniteStep(RuntimeError):
    """A NaN or infinite loss or gradient on some rank: every rank skips the step together."""


def all_finite(values: torch.Tensor, timers: StepTimers, device: torch.device) -> bool:
    """One all-reduced flag, so all ranks take the same decision in the same step; on the rank's device, since
    NCCL reduces no CPU tensor."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(values).all()) else 1.0], dtype=torch.float64, device=device)
    if dist.is_initialized():
        with timers.phase("communication"):
            dist.all_reduce(bad)
    return bad.item() == 0.0


@dataclass
class StepOutcome:
    losses: dict[str, float]  # this rank's mean loss per task, over the step's micro-batches
    stats: SurgeryStats | None  # surgery statistics of the step (None in sum mode)


def build_gradients(model: MultitaskModel, surgery: SurgeryConfig, deepspeed: DeepSpeedConfig, optim: OptimConfig,
                    total_steps: int, use_gpu: bool, world_size: int, seed: int, comm: CommCounter,
                    timers: StepTimers) -> SummedGradients | SurgeryGradients:
    """The DeepSpeed engine around `model` and the strategy that feeds it (`.engine`), built together:
    the strategy accumulates micro-batches itself, so DeepSpeed is built to accumulate nothing. The strategy
    times its phases of each step into `timers`."""
    engine = build_engine(model, deepspeed, optim, total_steps, use_gpu, world_size)
    # The hand-over's backward passes its gradient unscaled: DeepSpeed must not divide by accumulation steps.
    assert engine.gradient_accumulation_steps() == 1, "the gradient strategies accumulate micro-batches themselves"
    if surgery.mode == "sum":
        return SummedGradients(engine, model, timers)
    return SurgeryGradients(engine, model, surgery, seed, comm, timers)


class SummedGradients:
    """Baseline: the gradient of Σ_t w_t L_t, accumulated over micro-batches, then one hand-over to DeepSpeed.

    The first micro-batch's autograd outputs are the accumulators (one P-sized set, as .grad would be);
    each later micro-batch's gradients are added into them, and the hand-over adopts them as .grad.
    """

    def __init__(self, engine, model: MultitaskModel, timers: StepTimers) -> None:
        self.engine, self.model, self.timers = engine, model, timers
        self.parameters = [p for p in model.parameters() if p.requires_grad]

    def run(self, micro_batches: list[dict[str, Batch]], loss_of: LossOf, weights: dict[str, float],
            step: int) -> StepOutcome:
        """`micro_batches`: list of {task: batch}, equally many rows each; returns the mean loss per task.

        `step` seeds nothing here (a sum has no task order); it keeps one signature for both strategies.
        """
        losses: dict[str, float] = {}
        summed: list[torch.Tensor | None] = [None] * len(self.parameters)
        for batches in micro_batches:
            with self.timers.phase("forward_backward"):
                local = {task: loss_of(task, batch) for task, batch in batches.items()}
                # Each micro-batch's mean over its rows / their number: the gradient of the step's mean loss.
                total = sum(weights[task] * loss for task, loss in local.items()) / len(micro_batches)
                for i, grad in enumerate(torch.autograd.grad(total, self.parameters, allow_unused=True)):
                    if grad is not None:
                        summed[i] = grad if summed[i] is None else summed[i].add_(grad)
                for task, loss in local.items():
                    losses[task] = losses.get(task, 0.0) + loss.item() / len(micro_batches)
        # Heads of absent tasks stay untouched (AdamW would decay weights it is handed a zero gradient for).
        _check_and_hand_over(self.engine, self.parameters, summed, list(losses.values()),
                             f"non-finite loss or gradient: {_fmt(losses)}", self.timers)
        return StepOutcome(losses, None)


class ContrastiveGradients:
    """SimCSE: loss (3) of this rank's sentences against every rank's views, its gradient (through GradCache
    when simcse.chunk_size is set), checked for NaN/inf on every rank, handed to DeepSpeed."""

    def __init__(self, engine, model: torch.nn.Module, cfg: SimCSEConfig, timers: StepTimers, precision: str) -> None:
        """`precision`: deepspeed.precision (autocast_bf16 runs the embedding forward under bf16 autocast)."""
        self.engine, self.model, self.cfg, self.timers = engine, model, cfg, timers
        self.embed = training_forward(model, precision, engine.device)
        self.parameters = [p for p in model.parameters() if p.requires_grad]

    def run(self, batch: Batch) -> float:
        """One optimizer step on this rank's sentences; returns this rank's loss."""
        # The views' all-gather (and its reduce-scatter backward) run inside autograd: timed with it.
        with self.timers.phase("forward_backward"):
            loss, grads = simcse_gradients(self.embed, batch, self.parameters, temperature=self.cfg.temperature,
                                           negatives=self.cfg.negatives, chunk_size=self.cfg.chunk_size or None)
        # The loss never reaches some parameters (the pooler under mean pooling, say): they stay untouched.
        _check_and_hand_over(self.engine, self.parameters, grads, [float(loss)],
                             f"non-finite contrastive loss or gradient: loss={float(loss):.4g}", self.timers)
        return float(loss)


def _check_and_hand_over(engine, parameters: list[torch.Tensor], grads: list[torch.Tensor | None],
                         losses: list[float], cause: str, timers: StepTimers) -> None:
    """Hand this rank's `grads` (None where the loss never reached a parameter) to DeepSpeed as the step's
    gradient, unless a loss or gradient is NaN/inf on some rank (then NonFiniteStep(cause) on every rank).
    `grads` is emptied: autograd adopts the tensors as .grad, no copy."""
    touched = [i for i, g in enumerate(grads) if g is not None]
    kept = [grads[i] for i in touched]
    grads.clear()
    norms = torch.stack(torch._foreach_norm(kept)).double().cpu()
    if not all_finite(torch.cat([torch.tensor(losses, dtype=torch.float64), norms]), timers, engine.device):
        raise NonFiniteStep(cause)
    hand_over(engine, [parameters[i] for i in touched], kept, timers)


def hand_over(engine, parameters: list[torch.Tensor], grads: list[torch.Tensor], timers: StepTimers) -> None:
    """Apply `grads` (one per parameter, this rank's) as the step's gradient: DeepSpeed reduces, clips and
    steps as after any backward. The list is emptied (autograd adopts the tensors as .grad, no copy).

    The surrogate's backward computes nothing (it returns the given tensors), so engine.backward is DeepSpeed's
    gradient reduction: timed as communication. engine.step (clipping, the optimizer, and at ZeRO 1/2 the
    all-gather of the updated partitions) is timed as optimizer."""
    with timers.phase("communication"):
        engine.backward(_HandOver.apply(grads, *parameters))
    with timers.phase("optimizer"):
        engine.step()


class SurgeryGradients:
    """Per-task gradients, accumulated over micro-batches, combined across ranks before one optimizer step.

    Each task's gradient goes to the surgery hook (TaskReduction) as soon as its last backward ends,
    so its reduction overlaps the next task's forward and backward. At ZeRO 0 a gradient that every
    rank already holds (exact mode's update, or anything on one rank) is handed to DeepSpeed with its
    reduction switched off, and the heads are all-reduced here: communication is exactly the plan's.
    At ZeRO 1/2 DeepSpeed's own reduction partitions the gradient, so it always runs.
    """

    def __init__(self, engine, model: MultitaskModel, cfg: SurgeryConfig, seed: int, comm: CommCounter,
                 timers: StepTimers) -> None:
        """Collectives through `comm` are timed by it (the trainer passes the timers' communication phase)."""
        self.engine, self.model, self.cfg, self.seed, self.comm, self.timers = engine, model, cfg, seed, comm, timers
        self.tasks = list(model.tasks)
        self.shared = [p for p in model.shared_parameters() if p.requires_grad]
        self.num_shared = sum(p.numel() for p in self.shared)
        # Task gradients are accumulated in fp32 even under bf16 training.
        self.dtype = torch.float32 if self.shared[0].dtype != torch.float64 else torch.float64
        self.device = self.shared[0].device
        self.own_reduction = engine.zero_optimization_stage() == 0
        if self.own_reduction:
            assert hasattr(engine, "enable_backward_allreduce"), "DeepSpeed's ZeRO-0 reduction switch is missing"
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        # The sharded plan gathering the update never needs the T×P rows: they are not kept between steps.
        self.lean = (self.own_reduction and cfg.mode == "pcgrad" and world_size > 1
                     and resolve_plan(cfg.plan, dist.get_backend()) == "sharded")
        # ZeRO 0 with fp32 parameters: backward straight into the task rows (.grad preset to views of them).
        self.into_grad = self.own_reduction and self.shared[0].dtype == self.dtype
        self._task_grads: torch.Tensor | None = None  # T×P rows reused across steps (fresh ones cost page faults)
        self.peak_gradient_bytes = 0  # most bytes of gradient buffers (.grad, task rows, shards) held at once

    def run(self, micro_batches: list[dict[str, Batch]], loss_of: LossOf, weights: dict[str, float],
            step: int) -> StepOutcome:
        """`micro_batches`: list of {task: batch}, the same tasks on every rank; returns the mean loss per task."""
        local_counts = torch.tensor([sum(_num_rows(b[task]) for b in micro_batches if task in b)
                                     for task in self.tasks], dtype=torch.int64)
        reduction = TaskReduction(local_counts, self.num_shared, self.cfg, self.comm, dtype=self.dtype,
                                  device=self.device, gather_update=self.own_reduction, rows=self._rows())
        last_micro_batch = {task: i for i, batches in enumerate(micro_batches) for task in batches}
        head_grads: dict[str, list[torch.Tensor]] = {}
        losses: dict[str, float] = {}
        for i, batches in enumerate(micro_batches):
            for task, batch in batches.items():
                t, n = self.tasks.index(task), _num_rows(batch)
                if t not in reduction.present:
                    continue
                first = i == min(j for j, b in enumerate(micro_batches) if task in b)
                if n:
                    with self.timers.phase("forward_backward"):
                        loss = loss_of(task, batch)
                        losses[task] = losses.get(task, 0.0) + loss.item() / len(micro_batches)
                        # s_t·n/n_t^r: the row ends as s_t times the gradient of the mean loss over the rank's rows.
                        scale = weights[task] * float(reduction.scales[t]) * n / int(local_counts[t])
                        backward = self._backward_into_row if self.into_grad else self._grad_into_row
                        _accumulate(head_grads, task, backward(scale * loss, task, reduction, first, head_grads))
                elif first:
                    reduction.row(t).zero_()
                if i == last_micro_batch[task]:
                    reduction.reduce([t])
        # The hook's collectives (the waits for the reductions, the Gram matrix's all-reduce, the update's gather)
        # are timed as communication through CommCounter.timed, and so left out of this phase.
        with self.timers.phase("surgery"):
            # Checked before any weighting runs on them; in exact mode the Gram matrix is global already.
            gram = reduction.gram()
            checked = (gram.diagonal() if gram is not None else
                       torch.tensor([float(reduction.row(t).norm()) for t in reduction.present], dtype=torch.float64))
            if not all_finite(torch.cat([torch.tensor(list(losses.values()), dtype=torch.float64),
                                         checked.double().cpu()]), self.timers, self.device):
                raise NonFiniteStep(f"non-finite loss or gradient: {_fmt(losses)}")
            result = reduction.finish(step_generator(self.seed, step))
            self._track([result.gradient], reduction, head_grads)
            skip_engine_reduction = self.own_reduction and result.is_global
            if skip_engine_reduction and reduction.world_size > 1:
                self._all_reduce_heads(head_grads, reduction)
            handover = _HandOver.apply(self._per_parameter(result.gradient, head_grads),
                                       *self._parameters(head_grads))
        with self.timers.phase("communication"):  # DeepSpeed's reduction, when it runs (see hand_over)
            self._backward(handover, reduce=not skip_engine_reduction)
        self._track([p.grad for p in self.model.parameters() if p.grad is not None], reduction, {})
        with self.timers.phase("optimizer"):
            self.engine.step()
        return StepOutcome(losses, result.stats)

    def _backward_into_row(self, loss: torch.Tensor, task: str, reduction: TaskReduction, first: bool,
                           head_grads: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
        """ZeRO 0 (no DeepSpeed hooks on parameters): the backward accumulates straight into the task's row,
        each encoder parameter's .grad preset to a view of it, so no P-sized set of autograd outputs exists
        besides the row. Returns the head's gradients (taken off .grad, which the handover fills later)."""
        row = reduction.row(self.tasks.index(task))  # (sharded plan: waits for the previous task's reduce-scatter)
        if first:
            row.zero_()
        head = self.model.task_parameters(task)
        for p, slot in zip(self.shared, _views(row, self.shared)):
            p.grad = slot
        try:
            torch.autograd.backward(loss, inputs=self.shared + head)
        finally:
            for p in self.shared:
                p.grad = None
        grads = [_dense(p.grad, p) for p in head]
        for p in head:
            p.grad = None
        self._track(grads, reduction, head_grads)
        return grads

    def _grad_into_row(self, loss: torch.Tensor, task: str, reduction: TaskReduction, first: bool,
                       head_grads: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
        """ZeRO 1/2 (and bf16 parameters): torch.autograd.grad fires none of ZeRO's reduction hooks; its outputs
        are copied (first micro-batch) or added into the task's row, each dropped as soon as it is written."""
        head = self.model.task_parameters(task)
        grads = list(torch.autograd.grad(loss, self.shared + head, allow_unused=True))
        self._track(grads, reduction, head_grads)
        row = reduction.row(self.tasks.index(task))
        for i, slot in enumerate(_views(row, self.shared)):
            if grads[i] is None:
                if first:
                    slot.zero_()
            elif first:
                slot.copy_(grads[i])
            else:
                slot.add_(grads[i])
            grads[i] = None
        return [_dense(g, p) for g, p in zip(grads[len(self.shared):], head)]

    def _rows(self) -> torch.Tensor | None:
        if self.lean:
            return None
        if self._task_grads is None:
            self._task_grads = torch.empty(len(self.tasks), self.num_shared, dtype=self.dtype, device=self.device)
        return self._task_grads

    def _all_reduce_heads(self, head_grads: dict[str, list[torch.Tensor]], reduction: TaskReduction) -> None:
        """Mean over ranks of the heads' sample-scaled gradients (one small bucket; every rank lists the same
        tensors: the heads of the tasks present in the step, zeros where a rank had no rows of a task)."""
        present = [task for t, task in enumerate(self.tasks) if t in reduction.present]
        for task in present:
            if task not in head_grads:
                head_grads[task] = [torch.zeros_like(p) for p in self.model.task_parameters(task)]
        tensors = [g for task in present for g in head_grads[task]]
        if not tensors:
            return
        bucket = torch.cat([g.reshape(-1).float() for g in tensors])
        self.comm.all_reduce(bucket)  # the heads' parameters only: a few thousand numbers
        bucket /= reduction.world_size
        offset = 0
        for g in tensors:
            g.copy_(bucket[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def _parameters(self, head_grads: dict[str, list[torch.Tensor]]) -> list[torch.nn.Parameter]:
        return self.shared + [p for task in head_grads for p in self.model.task_parameters(task)]

    def _per_parameter(self, flat: torch.Tensor, head_grads: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
        """Views of the flat update shaped like each encoder parameter (no copy), then the heads' gradients."""
        views = [view.to(p.dtype) for view, p in zip(_views(flat, self.shared), self.shared)]
        heads = [g.to(p.dtype) for task in head_grads
                 for g, p in zip(head_grads[task], self.model.task_parameters(task))]
        return views + heads

    def _backward(self, handover: torch.Tensor, reduce: bool) -> None:
        """engine.backward, with DeepSpeed's ZeRO-0 all-reduce switched off when every rank holds the gradient."""
        if reduce:
            self.engine.backward(handover)
            return
        self.engine.enable_backward_allreduce = False
        try:
            self.engine.backward(handover)
        finally:
            self.engine.enable_backward_allreduce = True

    def _track(self, tensors, reduction: TaskReduction, head_grads: dict[str, list[torch.Tensor]]) -> None:
        held = [t for t in tensors if t is not None] + reduction.held_tensors() + [
            g for grads in head_grads.values() for g in grads]
        self.peak_gradient_bytes = max(self.peak_gradient_bytes, gradient_bytes(held))


class _HandOver(torch.autograd.Function):
    """A zero-valued surrogate whose backward hands each parameter a given gradient tensor.

    engine.backward on it routes an exact gradient through DeepSpeed (its reduction, ZeRO partitioning,
    clipping) like any loss. Autograd adopts the given tensors as .grad without copying them when nothing
    else references them, so the update's views become the .grad of the encoder's parameters.
    """

    @staticmethod
    def forward(ctx, grads: list[torch.Tensor], *params: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grads, ctx.grads = ctx.grads, None
        out = (None, *grads)
        grads.clear()  # no reference but the returned one is left, so autograd adopts them instead of copying
        return out


def gradient_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _views(flat: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Consecutive slices of a flat buffer shaped like each parameter (no copies)."""
    views, offset = [], 0
    for p in params:
        views.append(flat[offset: offset + p.numel()].view_as(p))
        offset += p.numel()
    return views


def _accumulate(head_grads: dict[str, list[torch.Tensor]], task: str, grads: list[torch.Tensor]) -> None:
    previous = head_grads.get(task)
    if previous is None:
        head_grads[task] = grads
    else:
        for acc, g in zip(previous, grads):
            acc.add_(g)


def _num_rows(batch: Batch) -> int:
    """Rows of a task's batch (a contrastive task's has no labels)."""
    return len(next(iter(batch.values())))


def _dense(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(param) if grad is None else grad


def _fmt(losses) -> str:
    return ", ".join(f"{t}={float(v):.4g}" for t, v in losses.items())
