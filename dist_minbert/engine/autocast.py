"""`deepspeed.precision: autocast_bf16`: the training forward under bf16 autocast, everything else fp32.

DeepSpeed runs as in fp32 (fp32 weights, gradients, optimizer state and all-reduces); only the forward's
matmuls, and so their backward's, run in bf16 — on a CPU with AMX several times faster than fp32's. The
forward's output is cast back to fp32, so what follows it (the task losses, SimCSE's gather of the views,
the gradients PCGrad's Gram matrix is made of) stays fp32. Evaluation does not use it: dev figures are fp32's.
"""
from __future__ import annotations

from typing import Callable

import torch

Forward = Callable[..., torch.Tensor]


def training_forward(module: Forward, precision: str, device: torch.device) -> Forward:
    """`module` itself, or, under autocast_bf16, a call of it under torch.autocast(bfloat16) on `device`'s kind,
    its output cast to fp32."""
    if precision != "autocast_bf16":
        return module

    def forward(*args, **kwargs) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            output = module(*args, **kwargs)
        return output.float()

    return forward
