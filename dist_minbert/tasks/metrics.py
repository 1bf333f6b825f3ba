"""Dev metrics per task, and the study's single overall score; numpy only, so evaluation needs no scipy."""

from __future__ import annotations

import numpy as np

from dist_minbert.tasks.config import TaskConfig


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r; NaN when either side is constant (a collapsed regressor has no correlation to report)."""
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (what Spearman's rho needs)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    return (last_rank - (counts - 1) / 2.0)[inverse]


def compute_metrics(task: TaskConfig, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """{"accuracy"} for the classification kinds; {"pearson", "spearman"} for regression."""
    preds, labels = np.asarray(preds, dtype=np.float64).ravel(), np.asarray(labels, dtype=np.float64).ravel()
    if preds.shape != labels.shape or preds.size == 0:
        raise ValueError(f"preds/labels: {preds.size} predictions for {labels.size} labels; "
                         "allowed: equally many, at least one")
    if task.metric == "accuracy":
        return {"accuracy": float((preds == labels).mean())}
    return {"pearson": _pearson(preds, labels),
            "spearman": _pearson(_average_ranks(preds), _average_ranks(labels))}


def overall_score(dev: dict[str, dict[str, float]]) -> float:
    """Mean over tasks of accuracy, or of Pearson mapped to [0, 1] as (r + 1) / 2 (the study's score)."""
    if not dev:
        raise ValueError("dev: no task metrics; allowed: one metrics dict per task")
    scores = []
    for name, metrics in dev.items():
        if "accuracy" in metrics:
            scores.append(metrics["accuracy"])
        elif "pearson" in metrics:
            scores.append((metrics["pearson"] + 1.0) / 2.0)
        else:
            raise ValueError(f"dev.{name}: {sorted(metrics)} has no score; allowed: 'accuracy' or 'pearson'")
    return float(np.mean(scores))
