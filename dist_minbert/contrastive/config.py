"""The `simcse` section of a SimCSE run: what the contrastive job trains on and how."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SimCSEPooling = Literal["cls_mlp", "cls", "mean"]


@dataclass
class SimCSEConfig:
    corpus: str = ""  # shards folder (fsspec URL) of a one-sentence-per-line corpus, from `prepare --corpus`
    batch_size_per_worker: int = 64  # sentences per worker per step (the SimCSE paper's 64); negatives: all N × B
    temperature: float = 0.05  # τ of loss (3)
    negatives: Literal["global", "local"] = "global"  # every worker's views (all-gathered), or this worker's only
    # [CLS] with an MLP used only in training (the paper's unsupervised setting), [CLS], or the mean of real tokens.
    pooling: SimCSEPooling = "cls_mlp"
    chunk_size: int = 0  # GradCache: rows of the doubled batch embedded per forward (0 = off, one forward)
    eval_every_steps: int = 125  # STS dev (zero-shot), alignment and uniformity every this many steps (0 = epoch ends)
    sts_dev: str = "sts-dev.csv"  # STS dev file under data.root: the zero-shot evaluation and `best` (Spearman)

    def __post_init__(self) -> None:
        if self.batch_size_per_worker < 2:
            raise ValueError(f"batch_size_per_worker: {self.batch_size_per_worker}; allowed: >= 2 (a sentence "
                             f"needs other sentences as negatives)")
        if self.temperature <= 0:
            raise ValueError(f"temperature: {self.temperature} must be > 0")
        if self.chunk_size < 0 or self.eval_every_steps < 0:
            raise ValueError("chunk_size / eval_every_steps must be >= 0 (0 = off / epoch ends only)")

    def embedding_pooling(self) -> str:
        """The pooling of the sentence embedding (evaluation, export): the training MLP is dropped."""
        return "mean" if self.pooling == "mean" else "cls"
