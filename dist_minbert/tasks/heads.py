"""Task heads on pooled encodings: one vector (linear, cross) or a bi-encoder pair (bi_mlp, bi_cosine).

Every head returns the raw output its task's objective expects: (B, C) logits for CE, (B,)
for a BCE logit or a regression score.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_minbert.tasks.config import TaskConfig, objective_for


def num_outputs(task: TaskConfig) -> int:
    return task.num_classes if objective_for(task) == "ce" else 1


def _squeeze_single(out: Tensor) -> Tensor:
    return out.squeeze(-1) if out.shape[-1] == 1 else out


class ProjectionHead(nn.Module):
    """Dropout + Linear on one pooled vector: a single text's, or a cross-encoded pair's."""

    def __init__(self, hidden_size: int, num_outputs: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden_size, num_outputs)

    def forward(self, pooled: Tensor) -> Tensor:
        return _squeeze_single(self.proj(self.dropout(pooled)))


class BiMLPHead(nn.Module):
    """One-hidden-layer MLP over [u; v; |u−v|; u*v] of the two separately encoded texts (SBERT features)."""

    def __init__(self, hidden_size: int, num_outputs: int, dropout: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(4 * hidden_size, hidden_size), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden_size, num_outputs),
        )

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        features = torch.cat([u, v, (u - v).abs(), u * v], dim=-1)  # (B, 4H)
        return _squeeze_single(self.mlp(features))


class CosineScoreHead(nn.Module):
    """Score = scale · cos + bias, starting at lo + cos · (hi − lo) (SBERT's cosine target: cos 0 → lo, 1 → hi).

    The map is learnable so that fitting the label range is the head's job: with a fixed map the
    encoder itself must bend every pair's cosine onto it, which measurably cost a pretrained
    sentence encoder STS correlation here (Pearson is blind to the affine map the head learns).
    """

    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([hi - lo]))  # (1,): DeepSpeed cannot broadcast 0-d parameters
        self.bias = nn.Parameter(torch.tensor([lo]))

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        return self.scale * F.cosine_similarity(u, v, dim=-1) + self.bias  # (B,)


class CosineLogitHead(nn.Module):
    """Binary logit scale · cos + bias; starts at 10 · (cos − 0.5), a boundary at cos 0.5 with a usable slope."""

    def __init__(self) -> None:
        super().__init__()
        # Shape (1,), not 0-d: DeepSpeed's parameter broadcast cannot view a 0-d tensor as bytes.
        self.scale = nn.Parameter(torch.tensor([10.0]))
        self.bias = nn.Parameter(torch.tensor([-5.0]))

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        return self.scale * F.cosine_similarity(u, v, dim=-1) + self.bias  # (B,)


def _projection(task: TaskConfig, hidden_size: int, dropout: float) -> nn.Module:
    return ProjectionHead(hidden_size, num_outputs(task), dropout)


def _bi_mlp(task: TaskConfig, hidden_size: int, dropout: float) -> nn.Module:
    return BiMLPHead(hidden_size, num_outputs(task), dropout)


def _bi_cosine(task: TaskConfig, hidden_size: int, dropout: float) -> nn.Module:
    if task.label_range is not None:
        return CosineScoreHead(*task.label_range)
    return CosineLogitHead()


# Head name → builder(task, hidden_size, dropout).
HEADS: dict[str, Callable[[TaskConfig, int, float], nn.Module]] = {
    "linear": _projection,
    "cross": _projection,
    "bi_mlp": _bi_mlp,
    "bi_cosine": _bi_cosine,
    "none": lambda task, hidden_size, dropout: nn.Identity(),  # a contrastive task compares embeddings as they are
}
