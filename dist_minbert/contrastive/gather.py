"""All-gather with gradient: every rank's embeddings as negatives, with an exact backward.

Each rank's loss depends on every rank's gathered rows, so the gradient of a rank's own slice is the sum
of what every rank's loss sends it: a reduce-scatter (sum) of the incoming (N·B, H) gradient. Keeping
only the local slice would drop the other ranks' loss terms (wrong by more than a scale).

Scale: with each rank's loss the mean over its own B rows, the sum in backward makes rank r's parameter
gradient the gradient of Σ_s loss_s through rank r's samples; DeepSpeed's average over the N ranks then
divides by N, which is exactly the gradient of the union batch's mean loss (1/N)·Σ_s loss_s. So no extra
factor N is applied anywhere.

Our own autograd.Function over the public c10d collectives, rather than the functional collectives'
all_gather_single_autograd (which does hold under gloo, checked with torch 2.13): that lives in the private
`_functional_collectives` module, was renamed between torch 2.4 (all_gather_tensor_autograd) and 2.13, and
returns a lazily waited AsyncCollectiveTensor. gloo has all_gather_into_tensor and reduce_scatter_tensor on
CPU tensors (checked), as NCCL has on GPU ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor


def all_gather_with_grad(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """(B, ...) on each of N ranks -> (N·B, ...), rank r's rows at [r·B, (r+1)·B); every rank must pass the same B.

    Without a process group (or with one rank) it is x itself.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x
    return _AllGather.apply(x, group)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        x = x.contiguous()
        gathered = x.new_empty((dist.get_world_size(group) * x.size(0), *x.shape[1:]))  # (N·B, ...)
        _all_gather()(gathered, x, group=group)
        return gathered

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        # grad: (N·B, ...) on every rank, from that rank's loss. This rank's slice of the sum over ranks.
        grad = grad.contiguous()
        own = grad.new_empty((grad.size(0) // dist.get_world_size(ctx.group), *grad.shape[1:]))  # (B, ...)
        _reduce_scatter()(own, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return own, None


def _all_gather() -> Callable:
    """Looked up at each call (record_collectives patches dist); torch 2.13 renamed it, the project allows ≥ 2.4."""
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce_scatter() -> Callable:
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
