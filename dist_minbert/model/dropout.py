"""Dropout whose mask costs a third of torch's on CPU: the same Bernoulli(1 - p) keep mask, drawn faster.

torch's CPU `bernoulli_` draws one float per element on one thread (~5.5 ns per element here); a BERT
training step spends ~15% of its time there (the profile in README's `bench encoder` paragraph). Here each
element gets 32 uniform bits from one full-range int64 draw per two elements (~1.4 ns per element) and keeps
its value when the bits fall below (1 - p)·2³², so p is honoured to 2⁻³² (finer than p's float32 rounding).
Values are scaled by 1 / (1 - p) as torch's dropout does; another device keeps torch's own kernel, which
is fast there. The masks come from torch's default generator: seeding and RNG-state replay (GradCache) hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_INT64_MIN = -(2**63)  # random_(_INT64_MIN, None): every 64-bit pattern equally likely


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """(shape) bool: True with probability 1 - p, independently per element."""
    numel = shape.numel()
    bits = torch.empty((numel + 1) // 2, dtype=torch.int64, device=device).random_(_INT64_MIN, None)
    # A uniform int32 falls below this with probability 1 - p; p < 2⁻³³ rounds to dropping 1 in 2³².
    threshold = min(round((1.0 - p) * 2**32) - 2**31, 2**31 - 1)
    return (bits.view(torch.int32)[:numel] < threshold).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout(x, p, training) in distribution; the CPU mask from keep_mask."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    return x.mul(keep_mask(x.shape, p, x.device)).mul_(1.0 / (1.0 - p))  # autograd keeps the bool mask only


class Dropout(nn.Dropout):
    """nn.Dropout (same p, same train/eval behaviour) through `dropout` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
