"""PCGrad and other Gramian weightings as pure tensor functions.

Every PCGrad-projected task gradient stays in the span of the original ones, so the update is
wᵀg with weights w derived from the T×T Gram matrix G = g gᵀ alone (DESIGN.md, "Gradient
surgery"). That is what lets the distributed hook exchange T² numbers instead of gradients.
A task whose Gram diagonal is 0 (absent from the step) drops out: its weight is 0 and nothing
is ever divided by its norm.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

# (gram (T,T) float64, generator) -> weights (T,) float64; the update is weightsᵀ grads.
Weighting = Callable[[Tensor, torch.Generator], Tensor]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step's random orders: equal on every rank and on resume, fresh each step."""
    mixed = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))


def gram_matrix(grads: Tensor, chunk_columns: int = 1 << 20) -> Tensor:
    """G = grads gradsᵀ in float64, cast chunk by chunk so no float64 copy of the whole T×P matrix exists."""
    gram = torch.zeros(grads.shape[0], grads.shape[0], dtype=torch.float64, device=grads.device)
    for chunk in grads.split(chunk_columns, dim=1):
        chunk = chunk.to(torch.float64)
        gram += chunk @ chunk.T
    return gram


def pcgrad_weights_from_gram(gram: Tensor, generator: torch.Generator) -> Tensor:
    """PCGrad's weights w (update wᵀg) from the Gram matrix of the task gradients.

    Coefficients C start at I; row i is task i's projected gradient C[i]ᵀg. For each task i in
    order i = 0..T−1, one permutation of range(T) is drawn with torch.randperm(T, generator=generator)
    (drawn for every i, absent tasks included, so the stream of draws depends on T alone); in that
    order, for each j ≠ i whose task is present: d = C[i]·G[:, j]; if d < 0, C[i, j] −= d / G[j, j].
    Then w = Cᵀ1 over the present rows. These are the orders torchjd's PCGradWeighting draws from
    torch's global generator, so both agree when that generator is seeded like `generator`.
    """
    gram = gram.to(torch.float64)
    num_tasks = gram.shape[0]
    present = gram.diagonal() > 0
    weights = torch.zeros(num_tasks, dtype=torch.float64, device=gram.device)
    for i in range(num_tasks):
        order = torch.randperm(num_tasks, generator=generator).tolist()
        if not present[i]:
            continue
        row = torch.zeros(num_tasks, dtype=torch.float64, device=gram.device)
        row[i] = 1.0
        for j in order:
            if j == i or not present[j]:
                continue
            d = row @ gram[:, j]
            if d < 0:
                row[j] -= d / gram[j, j]
        weights += row
    return weights


def combine(weights: Tensor, grads: Tensor) -> Tensor:
    """wᵀ grads, accumulated in at least float32 (weights cast to bf16 would lose digits), row by row so
    no float32 copy of a low-precision T×P matrix is made."""
    update = torch.zeros(grads.shape[1], dtype=torch.promote_types(grads.dtype, torch.float32), device=grads.device)
    for weight, row in zip(weights.tolist(), grads):
        if weight:
            update.add_(row, alpha=weight)
    return update.to(grads.dtype)


def pcgrad(grads: Tensor, generator: torch.Generator) -> Tensor:
    """PCGrad update (P,) of the task gradients grads (T,P), through their float64 Gram matrix."""
    return combine(pcgrad_weights_from_gram(gram_matrix(grads), generator), grads)


def sum_weights(gram: Tensor, generator: torch.Generator) -> Tensor:
    """No surgery: every present task with weight 1."""
    return (gram.diagonal() > 0).to(torch.float64)


def _torchjd_weighting(class_name: str, install_hint: str) -> Weighting:
    """A weighting from torchjd.aggregation, imported on first use so torchjd stays optional."""

    def weights(gram: Tensor, generator: torch.Generator) -> Tensor:
        try:
            from torchjd import aggregation

            weighting = getattr(aggregation, class_name)()
        except (ImportError, AttributeError) as error:
            raise ImportError(f"surgery weighting torchjd.aggregation.{class_name} is unavailable ({error}); "
                              f"it needs {install_hint}") from error
        present = (gram.diagonal() > 0).nonzero().flatten()
        result = torch.zeros(gram.shape[0], dtype=torch.float64, device=gram.device)
        if len(present):  # absent tasks are left out of the Gramian torchjd sees
            sub = gram.to(torch.float64)[present][:, present]
            result[present] = weighting(sub).to(torch.float64)
        return result

    return weights


WEIGHTINGS: dict[str, Weighting] = {
    "sum": sum_weights,
    "pcgrad": pcgrad_weights_from_gram,
    "upgrad": _torchjd_weighting("UPGradWeighting",
                                 'torchjd>=0.18 with its QP solver: pip install "torchjd[quadprog_projector]"'),
    "mgda": _torchjd_weighting("MGDAWeighting", "torchjd>=0.18: pip install torchjd"),
}


def check_weighting(name: str) -> None:
    """Fail at start, not at the first step, when a weighting is unknown or its optional packages are missing."""
    if name not in WEIGHTINGS:
        raise ValueError(f"weighting: {name!r} is unknown; allowed: {', '.join(WEIGHTINGS)}")
    WEIGHTINGS[name](torch.eye(2, dtype=torch.float64), torch.Generator().manual_seed(0))
