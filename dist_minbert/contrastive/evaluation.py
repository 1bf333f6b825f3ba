"""Zero-shot sentence-embedding quality: STS Pearson/Spearman of cosines, alignment and uniformity.

Alignment and uniformity are Wang & Isola's (2020), as the SimCSE paper reports them: on normalised
embeddings, alignment = E ‖f(x) − f(x⁺)‖² over positive pairs (STS pairs scored ≥ 4), uniformity =
log E exp(−2 ‖f(x) − f(y)‖²) over all pairs of sentences. Lower is better for both.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dist_minbert.tasks.config import TaskConfig
from dist_minbert.tasks.metrics import compute_metrics

POSITIVE_SCORE = 4.0  # STS pairs at least this similar are the positives of alignment


def sts_metrics(task: TaskConfig, a: torch.Tensor, b: torch.Tensor, scores: np.ndarray) -> dict[str, float]:
    """`task`: the STS task (its metric); `a`, `b`: (N, H) embeddings of each pair's sentences; `scores`: the N
    gold scores (0–5)."""
    cosines = F.cosine_similarity(a.double(), b.double(), dim=-1).numpy()
    correlations = compute_metrics(task, cosines, scores)  # pearson, spearman
    za, zb = F.normalize(a.double(), dim=-1), F.normalize(b.double(), dim=-1)
    positive = torch.from_numpy(scores >= POSITIVE_SCORE)
    alignment = float((za[positive] - zb[positive]).pow(2).sum(-1).mean()) if positive.any() else float("nan")
    z = torch.cat([za, zb])
    uniformity = float(torch.pdist(z).pow(2).mul(-2).exp().mean().log())
    return {**correlations, "alignment": alignment, "uniformity": uniformity}
