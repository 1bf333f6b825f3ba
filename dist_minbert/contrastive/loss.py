"""Unsupervised SimCSE's loss: equation (3) of the study, from Gao et al. (2021).

For B sentences, each encoded twice with independent dropout masks (z_i, z'_i):
    ℓ_i = −log( e^{sim(z_i, z'_i)/τ} / Σ_j e^{sim(z_i, z'_j)/τ} ),   sim = cosine,   loss = mean_i ℓ_i,
a cross-entropy over the rows of the B×M cosine matrix whose target is the row's own second view. This is
sentence-transformers' MultipleNegativesRankingLoss with scale = 1/τ (20 for τ = 0.05).

With `negatives="global"` the candidates z'_j are every rank's second views (M = N·B, all-gathered with
an exact backward, gather.py); with `"local"` only this rank's (M = B). Either way the loss is the mean
over this rank's own B rows, so the mean over ranks is the union batch's mean loss (gather.py says why
DeepSpeed's averaging of the gradients then needs no extra factor).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from dist_minbert.contrastive.gather import all_gather_with_grad

Negatives = Literal["global", "local"]
TEMPERATURE = 0.05  # SimCSE's τ


def info_nce(queries: Tensor, keys: Tensor, targets: Tensor, temperature: float = TEMPERATURE) -> Tensor:
    """Mean over rows i of −log softmax_j(cos(q_i, k_j) / τ)[targets_i].

    In fp32 at least whatever the embeddings' dtype: at τ = 0.05 logits reach ±20, where bf16 keeps ~0.1.
    """
    dtype = torch.promote_types(queries.dtype, torch.float32)
    q = F.normalize(queries.to(dtype), dim=-1)  # (B, H)
    k = F.normalize(keys.to(dtype), dim=-1)  # (M, H)
    logits = q @ k.T / temperature  # (B, M): cos(q_i, k_j) / τ
    return F.cross_entropy(logits, targets)


def simcse_loss(z: Tensor, z_pos: Tensor, temperature: float = TEMPERATURE, negatives: Negatives = "global",
                group: dist.ProcessGroup | None = None) -> Tensor:
    """z, z_pos: (B, H) the two views of this rank's B sentences; every rank must pass the same B.

    Returns this rank's loss: the mean of ℓ_i over its own rows (0-dim, fp32 or fp64).
    """
    if negatives not in get_args(Negatives):
        raise ValueError(f"negatives: {negatives!r} is not supported; allowed: {', '.join(get_args(Negatives))}")
    offset = 0
    if negatives == "global":
        keys = all_gather_with_grad(z_pos, group)  # (N·B, H): rank r's second views at rows [r·B, (r+1)·B)
        if keys is not z_pos:
            offset = dist.get_rank(group) * z.size(0)
    else:
        keys = z_pos  # (B, H)
    targets = torch.arange(offset, offset + z.size(0), device=z.device)  # (B,): row i's positive is z'_i
    return info_nce(z, keys, targets, temperature)
