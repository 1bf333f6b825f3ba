"""Dropout at a fraction of torch's CPU cost: the same Bernoulli(1 - p) keep masks, drawn and applied faster.

torch's CPU dropout draws one float per element with `bernoulli_` on one thread (~5.5 ns per element here)
and applies the mask in three more passes (the bool mask copied to floats, then two products): a BERT
training step spent ~15% of its time there (README, `bench encoder`). Here each element gets 32 uniform
bits from one full-range int64 draw per two elements (~1.4 ns per element) and is kept when the bits fall
below (1 - p)·2³², so p is honoured to 2⁻³² (finer than p's float32 rounding). The mask is then applied in
one pass each way: as float32 factors 1/(1 - p) or 0 (in the residual add's own pass, `Dropout(x, residual)`),
or, for attention weights, as zeros only (bert.py moves the 1/(1 - p) into the output projection's matmul).
On another device torch's own kernels are used; they are fast there. The masks come from torch's default
generator, so seeding and RNG-state replay (GradCache) hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_INT64_MIN = -(2**63)  # random_(_INT64_MIN, None): every 64-bit pattern equally likely


def _uniform_int32(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """(shape) int32, every bit pattern equally likely: two elements per 64-bit draw."""
    numel = shape.numel()
    bits = torch.empty((numel + 1) // 2, dtype=torch.int64, device=device).random_(_INT64_MIN, None)
    return bits.view(torch.int32)[:numel].view(shape)


def _keep_threshold(p: float) -> int:
    """A uniform int32 falls below this with probability 1 - p (p < 2⁻³³ rounds to dropping 1 in 2³²)."""
    return min(round((1.0 - p) * 2**32) - 2**31, 2**31 - 1)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """(shape) bool: True with probability 1 - p, independently per element."""
    return _uniform_int32(shape, device) < _keep_threshold(p)


def drop_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """(shape) bool: True with probability p, independently per element (keep_mask's complement, no extra pass)."""
    return _uniform_int32(shape, device) >= _keep_threshold(p)


def scaled_keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """(shape) float32: 1 / (1 - p) with probability 1 - p, else 0; x times it is torch's dropout of float32 x,
    bit for bit (torch multiplies by the mask, then by the float32 scale: the same single rounding)."""
    return torch.where(keep_mask(shape, p, device), 1.0 / (1.0 - p), 0.0)


class Dropout(nn.Dropout):
    """nn.Dropout (same p, same train/eval behaviour), optionally fused with a residual add.

    dropout(x) alone is x times scaled_keep_mask; dropout(x, residual) is residual + dropout(x) in one pass
    (addcmul), and its backward one product. The factors are float32, so a bf16 x (a linear's output under
    autocast) is scaled in float32 and the sum is float32, as autocast's own residual add gives: torch's
    dropout would round the scaled values to bf16 first.
    """

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x if residual is None else residual + x
        if x.device.type != "cpu":
            dropped = F.dropout(x, self.p, training=True)
            return dropped if residual is None else residual + dropped
        factors = scaled_keep_mask(x.shape, self.p, x.device)
        return x * factors if residual is None else torch.addcmul(residual, x, factors)
