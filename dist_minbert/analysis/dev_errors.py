"""Where a trained model goes wrong on the dev sets: the confusion matrix of a multi-class task (the study's
Figure 5 for SST) and the examples it gets most wrong.

"Most wrong": for a classification task, the rows whose true class gets the lowest probability from the
model (confidently wrong); for a regression task, the largest absolute error of the score.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_minbert.engine.inference import evaluate_file
from dist_minbert.tasks.config import TaskConfig, objective_for
from dist_minbert.tasks.multitask import MultitaskModel
from dist_minbert.tasks.readers import TaskRows


@dataclass
class DevOutputs:
    task: str
    rows: TaskRows
    labels: np.ndarray  # (N,) class index or score
    preds: np.ndarray  # (N,) label-space prediction, as `predict` writes it
    true_prob: np.ndarray | None  # (N,) probability the model gives the true class; None for regression

    @property
    def wrongness(self) -> np.ndarray:
        """Larger is more wrong: 1 − p(true class), or |score − label|."""
        return 1.0 - self.true_prob if self.true_prob is not None else np.abs(self.preds - self.labels)


def dev_outputs(model: MultitaskModel, cfg, task: str) -> DevOutputs:
    """One pass over the task's dev file: class probabilities from the head's logits (whose argmax is
    `model.predict`), or the clipped score."""
    spec = cfg.tasks[task]
    objective = objective_for(spec)

    def head_values(name: str, outputs: torch.Tensor) -> torch.Tensor:
        if objective == "ce":
            return outputs.softmax(dim=-1)  # (B, C)
        if objective == "bce":
            return torch.sigmoid(outputs)  # (B,) p(class 1)
        return model.predict(name, outputs)  # (B,) the score in the label range

    rows, values, _ = evaluate_file(model, cfg, task, cfg.data.resolve(spec.dev), labelled=True, values=head_values)
    labels = np.asarray(rows.labels, dtype=np.float64)
    if objective == "ce":
        index = labels.astype(np.int64)
        return DevOutputs(task, rows, labels, values.argmax(axis=1).astype(np.float64),
                          values[np.arange(len(index)), index])
    if objective == "bce":
        return DevOutputs(task, rows, labels, (values > 0.5).astype(np.float64),
                          np.where(labels == 1, values, 1.0 - values))
    return DevOutputs(task, rows, labels, values, None)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels.astype(np.int64), preds.astype(np.int64)), 1)
    return counts


def plot_confusion(counts: np.ndarray, task: str, path: str | Path) -> None:
    """Counts in each cell, colour by the share of the true class's rows (so rare classes read too)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file
    import matplotlib.pyplot as plt

    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(counts):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if shares[i, j] > 0.5 else "black")
    classes = range(counts.shape[0])
    ax.set(xticks=list(classes), yticks=list(classes), xlabel="predicted class", ylabel="true class",
           title=f"{task.upper()} dev: accuracy {np.trace(counts) / max(counts.sum(), 1):.3f}")
    fig.colorbar(image, ax=ax, label="share of the true class's rows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def worst_examples(outputs: DevOutputs, spec: TaskConfig, num: int) -> list[str]:
    """A markdown section: the `num` rows the model gets most wrong (wrong predictions only, for a classifier)."""
    order = np.argsort(-outputs.wrongness, kind="stable")
    if outputs.true_prob is not None:
        order = order[outputs.preds[order] != outputs.labels[order]]
        header = "| id | text | true | predicted | p(true) |"
    else:
        header = "| id | text | true | predicted | abs error |"
    lines = [f"### {outputs.task.upper()} ({spec.dev})", "", header, "|---|---|---|---|---|"]
    rows = outputs.rows
    for i in order[:num]:
        text = rows.a[i] if rows.b is None else f"{rows.a[i]} ‖ {rows.b[i]}"
        text = text.replace("|", "\\|")
        if outputs.true_prob is not None:
            figures = f"{int(outputs.labels[i])} | {int(outputs.preds[i])} | {outputs.true_prob[i]:.3f}"
        else:
            figures = f"{outputs.labels[i]:.2f} | {outputs.preds[i]:.2f} | {outputs.wrongness[i]:.2f}"
        lines.append(f"| {rows.ids[i]} | {text} | {figures} |")
    return [*lines, ""]
