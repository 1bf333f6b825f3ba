"""Conflicting task gradients over a run, from its TensorBoard scalars (observe/surgery_scalars.py): a pair of
tasks conflicts at a step when both are in the step (gradient norm > 0) and the cosine of their gradients is
negative, what PCGrad projects away. Only the logged steps are seen (every `observe.log_every`-th)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def conflict_series(scalars: dict[str, list[tuple[int, float]]], tasks: list[str]) -> dict[str, dict]:
    """pair "a-b" → {"steps", "cosines"} over the logged steps where both tasks were in the step."""
    norms = {t: dict(scalars.get(f"surgery/grad_norm/{t}", [])) for t in tasks}
    series = {}
    for i, a in enumerate(tasks):
        for b in tasks[i + 1:]:
            points = [(step, cosine) for step, cosine in scalars.get(f"surgery/cosine/{a}-{b}", [])
                      if norms[a].get(step, 0.0) > 0 and norms[b].get(step, 0.0) > 0]
            series[f"{a}-{b}"] = {"steps": [s for s, _ in points], "cosines": [c for _, c in points]}
    return series


def conflict_fractions(series: dict[str, dict], log_every: int) -> dict[str, dict]:
    """pair → logged steps with both tasks, those with a conflict, the fraction, the mean cosine."""
    out = {}
    for pair, points in series.items():
        cosines = np.asarray(points["cosines"])
        num = len(cosines)
        out[pair] = {"logged_steps": num, "conflicts": int((cosines < 0).sum()),
                     "fraction": float((cosines < 0).mean()) if num else None,
                     "mean_cosine": float(cosines.mean()) if num else None, "log_every": log_every}
    return out


def plot_conflicts(series: dict[str, dict], path: str | Path, window: int = 20) -> None:
    """Left: each pair's gradient cosine per logged step. Right: the share of the last `window` logged steps
    with a conflict."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file
    import matplotlib.pyplot as plt

    fig, (cos_ax, frac_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for pair, points in series.items():
        steps, cosines = np.asarray(points["steps"]), np.asarray(points["cosines"])
        if not len(steps):
            continue
        share = float((cosines < 0).mean())
        cos_ax.plot(steps, cosines, linewidth=0.8, label=f"{pair} ({share:.0%} of steps conflict)")
        conflicts = (cosines < 0).astype(np.float64)
        running = np.convolve(conflicts, np.ones(window), "full")[: len(conflicts)] / np.minimum(
            np.arange(1, len(conflicts) + 1), window)
        frac_ax.plot(steps, running, label=pair)
    cos_ax.axhline(0.0, color="grey", linewidth=0.6)
    cos_ax.set(xlabel="optimizer step", ylabel="cosine of the task gradients", title="task-gradient cosines")
    frac_ax.set(xlabel="optimizer step", ylabel=f"share of the last {window} logged steps", ylim=(-0.02, 1.02),
                title="steps with a conflict (cosine < 0)")
    for ax in (cos_ax, frac_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
