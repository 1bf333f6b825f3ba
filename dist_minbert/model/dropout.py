"""Dropout at a fraction of torch's CPU cost: the same Bernoulli(1 - p) keep masks, drawn and applied faster.

torch's CPU dropout draws one float per element with `bernoulli_` (mt19937, one thread, ~5.5 ns per element
here) and applies the mask in three more passes (the bool mask copied to floats, then two products): a BERT
training step spent ~15% of its time there (README, `bench encoder`). Here each element gets 32 uniform bits
from numpy's SFC64 (one 64-bit draw per two elements) and is kept when they fall below (1 - p)·2³², so p is
honoured to 2⁻³² (finer than p's float32 rounding). The draw writes the mask's factors directly (the kept
value's bit pattern, or 0) in two halves, the second on a helper thread when torch has more than one. The
factors are applied by one product each way: 1/(1 - p) or 0 in float32, in the residual add's own pass
(`Dropout(x, residual)`), or, for attention weights, 1 or 0 in their dtype (bert.py moves the 1/(1 - p) into
the output projection's matmul).

Each half's generator state is drawn from torch's default generator, so torch.manual_seed fixes the masks
and saving/restoring torch's RNG state replays them (GradCache); the halves are the same on 1 thread or 2.
On another device torch's own kernels are used; they are fast there.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_PARALLEL_MIN = 1 << 16  # elements below which the second half is drawn on this thread (a hand-off costs ~50 µs)
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}  # unsigned numpy type of a torch float type's width
_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def keep_factors(shape: torch.Size, p: float, value: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(shape) `dtype` on CPU: `value` with probability 1 - p, else 0, independently per element.

    Built from the value's bit pattern in numpy, in the same pass as the draw: torch's own bool-to-float copy or
    `where` over a bool mask costs 3-4× numpy's.
    """
    threshold = min(round((1.0 - p) * 2**32), 2**32 - 1)  # p < 2⁻³³ rounds to dropping 1 in 2³²
    out = torch.empty(shape, dtype=dtype)
    width = out.element_size()
    pattern = torch.tensor(value, dtype=dtype).view(_INT[width]).item() % 2 ** (8 * width)
    flat = out.view(-1).view(_INT[width]).numpy().view(_UINT[width])
    half = (flat.size + 1) // 2
    states = torch.empty(2, 3, dtype=torch.int64).random_(-(2**63), None).numpy().view(np.uint64)
    parts = [(states[0], flat[:half]), (states[1], flat[half:])]
    if torch.get_num_threads() > 1 and flat.size >= _PARALLEL_MIN:
        second = _helper().submit(_draw, 1, *parts[1], threshold, pattern)
        _draw(0, *parts[0], threshold, pattern)
        second.result()
    else:
        for which, (state, target) in enumerate(parts):
            _draw(which, state, target, threshold, pattern)
    return out


def _draw(which: int, state: np.ndarray, out: np.ndarray, threshold: int, pattern: int) -> None:
    """out = pattern where 32 uniform bits fall below threshold, else 0; from generator `which` set to `state`
    (3 words drawn from torch; SFC64's fourth is its counter)."""
    generator = _generators()[which]
    generator.state = {"bit_generator": "SFC64", "state": {"state": np.append(state, np.uint64(1))},
                       "has_uint32": 0, "uinteger": 0}
    bits = generator.random_raw((out.size + 1) // 2).view(np.uint32)[: out.size]
    np.less(bits, np.uint32(threshold), out=out)  # 0 or 1
    np.multiply(out, out.dtype.type(pattern), out=out)


@functools.lru_cache(maxsize=None)
def _generators_of(pid: int) -> tuple[np.random.SFC64, np.random.SFC64]:
    return np.random.SFC64(0), np.random.SFC64(0)  # one per half: the helper thread never shares this thread's


@functools.lru_cache(maxsize=None)
def _helper_of(pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="dropout-mask")


def _generators() -> tuple[np.random.SFC64, np.random.SFC64]:
    return _generators_of(os.getpid())  # per process: a forked child gets its own


def _helper() -> ThreadPoolExecutor:
    return _helper_of(os.getpid())  # a thread pool does not survive a fork


class Dropout(nn.Dropout):
    """nn.Dropout (same p, same train/eval behaviour), optionally fused with a residual add.

    dropout(x) alone is x times float32 factors 1/(1 - p) or 0 (torch's dropout multiplies by the mask, then by
    the float32 scale: the same single rounding); dropout(x, residual) is residual + dropout(x) in one pass
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
        factors = keep_factors(x.shape, self.p, 1.0 / (1.0 - self.p))  # x · factors: torch's dropout, bit for bit
        return x * factors if residual is None else torch.addcmul(residual, x, factors)
