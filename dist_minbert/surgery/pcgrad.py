"""PCGrad and other Gramian weightings as pure tensor functions.

Every PCGrad-projected task gradient stays in the span of the original ones, so the update is
wᵀg with weights w derived from the T×T Gram matrix G = g gᵀ alone (docs/ARCHITECTURE.md, "Exact
PCGrad needs only the Gram matrix"). That is what lets the distributed hook exchange T² numbers instead of gradients.
A task whose Gram diagonal is 0 (absent from the step) drops out: its weight is 0 and nothing
is ever divided by its norm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

# (gram (T,T) float64, generator) -> weights (T,) float64; the update is weightsᵀ grads.
Weighting = Callable[[Tensor, torch.Generator], Tensor]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step's random orders: equal on every rank and on resume, fresh each step."""
    mixed = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))


def gram_matrix(grads: Tensor | Sequence[Tensor | None], chunk_columns: int = 1 << 17) -> Tensor:
    """G = grads gradsᵀ in float64, cast chunk by chunk so no float64 copy of the whole T×P matrix exists.

    grads: a T×P matrix or T rows of P; a row given as None (a task absent from the step, whose buffer
    was never written) gets a zero row and column. Chunks of 2^17 columns stay in cache: ~2× faster here
    than 2^20 for T = 3, P = 22.7M.
    """
    rows = list(grads)
    present = [i for i, row in enumerate(rows) if row is not None]
    device = rows[present[0]].device if present else None
    gram = torch.zeros(len(rows), len(rows), dtype=torch.float64, device=device)
    if not present:
        return gram
    num_columns = rows[present[0]].numel()
    chunk = torch.empty(len(present), min(chunk_columns, num_columns), dtype=torch.float64, device=device)
    partial = torch.zeros(len(present), len(present), dtype=torch.float64, device=device)
    for start in range(0, num_columns, chunk_columns):
        width = min(chunk_columns, num_columns - start)
        for k, i in enumerate(present):
            chunk[k, :width].copy_(rows[i][start: start + width])
        partial += chunk[:, :width] @ chunk[:, :width].T
    index = torch.tensor(present, device=device)
    gram[index[:, None], index] = partial
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


def combine(weights: Tensor, grads: Tensor | Sequence[Tensor | None], out: Tensor | None = None) -> Tensor:
    """wᵀ grads, accumulated in at least float32 (weights cast to bf16 would lose digits), row by row so
    no float32 copy of a low-precision T×P matrix is made. Rows with weight 0 are never read (they may
    be None). `out`, if given, receives the sum and may be the first row with a non-zero weight, which
    is then combined in place (no P-sized allocation)."""
    terms = [(weight, row) for weight, row in zip(weights.tolist(), grads) if weight]
    reference = next(row for row in grads if row is not None)
    dtype = torch.promote_types(reference.dtype, torch.float32)
    if out is None:
        out = torch.zeros(reference.numel(), dtype=dtype, device=reference.device)
    elif terms and out.data_ptr() == terms[0][1].data_ptr():
        weight, _ = terms.pop(0)
        out.mul_(weight)
    else:
        out.zero_()
    for weight, row in terms:
        out.add_(row, alpha=weight)
    return out.to(reference.dtype)


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
