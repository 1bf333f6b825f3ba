"""Per-step diagnostics of the task gradients, all read off the Gram matrix the weights came from."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SurgeryStats:
    gram: Tensor  # (T,T) float64 Gram matrix of the task gradients (global in exact mode, the rank's in local mode)
    weights: Tensor  # (T,) float64 weights w of the update wᵀg; 0 for tasks absent from the step
    norms: Tensor  # (T,) float64 gradient norm of each task
    cosines: Tensor  # (T,T) float64 pairwise cosines of the task gradients; 0 where a task is absent
    num_conflicting_pairs: int  # pairs i < j of present tasks with g_i·g_j < 0 (what PCGrad projects away)


def surgery_stats(gram: Tensor, weights: Tensor) -> SurgeryStats:
    gram = gram.to(torch.float64).cpu()
    norms = gram.diagonal().clamp(min=0).sqrt()
    present = norms > 0
    outer = torch.outer(norms, norms)
    cosines = torch.where(outer > 0, gram / torch.where(outer > 0, outer, 1.0), 0.0)
    both_present = torch.outer(present, present)
    conflicts = torch.triu((gram < 0) & both_present, diagonal=1)
    return SurgeryStats(gram=gram, weights=weights.to(torch.float64).cpu(), norms=norms, cosines=cosines,
                        num_conflicting_pairs=int(conflicts.sum()))
