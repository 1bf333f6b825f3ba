"""Gradient-surgery statistics as TensorBoard scalars: conflicts, pairwise cosines, norms, weights."""
from __future__ import annotations

from dist_minbert.surgery.stats import SurgeryStats


def surgery_scalars(stats: SurgeryStats, tasks: list[str]) -> dict[str, float]:
    values = {"surgery/conflicting_pairs": float(stats.num_conflicting_pairs)}
    for i, a in enumerate(tasks):
        values[f"surgery/grad_norm/{a}"] = float(stats.norms[i])
        values[f"surgery/weight/{a}"] = float(stats.weights[i])
        for j in range(i + 1, len(tasks)):
            values[f"surgery/cosine/{a}-{tasks[j]}"] = float(stats.cosines[i, j])
    return values
