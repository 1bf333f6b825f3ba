"""A task's config, and the two facts the rest of the system derives from it: encoding and objective."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

TaskKind = Literal["classification", "pair_classification", "pair_regression", "contrastive"]
HeadName = Literal["linear", "bi_mlp", "bi_cosine", "cross", "none"]
Encoding = Literal["single", "bi", "cross"]
Objective = Literal["ce", "bce", "mse", "simcse"]

_NUM_TEXT_COLUMNS = {"classification": 1, "pair_classification": 2, "pair_regression": 2, "contrastive": 1}
_HEADS_FOR_KIND = {
    "classification": ("linear",),
    "pair_classification": ("bi_mlp", "bi_cosine", "cross"),
    "pair_regression": ("bi_mlp", "bi_cosine", "cross"),
    "contrastive": ("none",),
}
_METRIC_FOR_KIND = {"classification": "accuracy", "pair_classification": "accuracy", "pair_regression": "pearson"}


@dataclass
class TaskConfig:
    # What the task predicts: one text's class, a pair's class, or a pair's score; or `contrastive`: SimCSE's
    # loss (3) on a corpus's sentences, no head, no labels, no dev or test split.
    kind: TaskKind = "classification"
    # Training file (path or fsspec URL; relative paths resolve against data.root); "" = none.
    train: str = ""
    # Dev file, scored each epoch; "" = none.
    dev: str = ""
    # Unlabelled test file that predictions are written for; "" = none.
    test: str = ""
    # Header names of the input texts: 1 for classification, 2 for the pair kinds.
    text_columns: list[str] = field(default_factory=lambda: ["sentence"])
    # Header name of the label (class index, or score for regression).
    label_column: str = "label"
    # Header name of the row id carried into the predictions file.
    id_column: str = "id"
    # Number of classes for the classification kinds (2 = one logit + BCE, more = CE); null for regression.
    num_classes: int | None = None
    # [lo, hi] of the regression score (predictions are clipped to it); null for the classification kinds.
    label_range: list[float] | None = None
    # Head on the pooled encoding: linear (single text), bi_mlp / bi_cosine (bi-encoder) or cross (cross-encoder).
    head: HeadName = "linear"
    # Dev metric: accuracy for the classification kinds, pearson for regression.
    metric: Literal["accuracy", "pearson"] = "accuracy"
    # Header of the prediction column in the CS224N predictions file.
    prediction_column: str = "Predicted_Label"
    # Weight of this task's loss in the multitask objective.
    weight: float = 1.0
    # Global batch size per step (each of N ranks takes batch_size / N).
    batch_size: int = 64
    # contrastive: shards folder (fsspec URL) of a corpus from `prepare --corpus`, instead of train/dev/test files.
    corpus: str = ""
    # contrastive: the size the schedule counts for the corpus (0 = its rows). A 1M-sentence corpus beside
    # 8k-row tasks would take nearly every draw of size-proportional or annealed sampling (p ∝ N^α).
    size_cap: int = 0
    # contrastive: τ of the loss; negatives are every worker's views of the step.
    temperature: float = 0.05

    def __post_init__(self) -> None:
        if self.kind == "contrastive":
            self._check_contrastive_fields()
            return
        if self.corpus or self.size_cap:
            raise ValueError(f"corpus / size_cap: set with kind {self.kind}; allowed: with kind contrastive only")
        expected = _NUM_TEXT_COLUMNS[self.kind]
        if len(self.text_columns) != expected or not all(self.text_columns):
            raise ValueError(f"text_columns: {self.text_columns!r} does not fit kind {self.kind}; "
                             f"allowed: {expected} non-empty column name(s)")
        for name in ("label_column", "id_column", "prediction_column"):
            if not getattr(self, name):
                raise ValueError(f"{name}: empty; allowed: a non-empty column name")
        columns = [*self.text_columns, self.label_column, self.id_column]
        if len(set(columns)) != len(columns):
            raise ValueError(f"text_columns: {self.text_columns!r}, label_column {self.label_column!r} and "
                             f"id_column {self.id_column!r} overlap; allowed: distinct column names")
        if self.kind == "pair_regression":
            self._check_regression_fields()
        else:
            self._check_classification_fields()
        if self.head not in _HEADS_FOR_KIND[self.kind]:
            raise ValueError(f"head: {self.head!r} does not fit kind {self.kind}; "
                             f"allowed: {', '.join(_HEADS_FOR_KIND[self.kind])}")
        if self.head == "bi_cosine" and self.kind == "pair_classification" and self.num_classes != 2:
            raise ValueError(f"head: 'bi_cosine' gives one logit, not {self.num_classes} classes; "
                             "allowed: bi_cosine with num_classes 2, or bi_mlp / cross")
        if self.metric != _METRIC_FOR_KIND[self.kind]:
            raise ValueError(f"metric: {self.metric!r} does not fit kind {self.kind}; "
                             f"allowed: {_METRIC_FOR_KIND[self.kind]}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"weight: {self.weight} is not a loss weight; allowed: a finite float >= 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: {self.batch_size} is too small; allowed: an integer >= 1")

    def _check_contrastive_fields(self) -> None:
        if not self.corpus:
            raise ValueError("corpus: empty with kind contrastive; allowed: the --out folder of "
                             "`dist-minbert prepare --corpus FILE --out FOLDER`")
        if self.train or self.dev or self.test:
            raise ValueError(f"train / dev / test: {self.train!r} / {self.dev!r} / {self.test!r} with kind "
                             "contrastive; allowed: '' (its sentences come from `corpus`, it has no dev metric)")
        if self.head != "none":
            raise ValueError(f"head: {self.head!r} with kind contrastive; allowed: 'none'")
        if self.num_classes is not None or self.label_range is not None:
            raise ValueError("num_classes / label_range: set with kind contrastive; allowed: null")
        if self.size_cap < 0 or self.temperature <= 0 or self.batch_size < 2:
            raise ValueError(f"size_cap / temperature / batch_size: {self.size_cap} / {self.temperature} / "
                             f"{self.batch_size}; allowed: >= 0 / > 0 / >= 2")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"weight: {self.weight} is not a loss weight; allowed: a finite float >= 0")

    def _check_classification_fields(self) -> None:
        if self.num_classes is None or self.num_classes < 2:
            raise ValueError(f"num_classes: {self.num_classes} with kind {self.kind}; allowed: an integer >= 2")
        if self.label_range is not None:
            raise ValueError(f"label_range: {self.label_range} with kind {self.kind}; "
                             "allowed: null (a range is for pair_regression)")

    def _check_regression_fields(self) -> None:
        if self.num_classes is not None:
            raise ValueError(f"num_classes: {self.num_classes} with kind pair_regression; "
                             "allowed: null (classes are for the classification kinds)")
        lo_hi = self.label_range
        if lo_hi is None or len(lo_hi) != 2 or not all(map(math.isfinite, lo_hi)) or not lo_hi[0] < lo_hi[1]:
            raise ValueError(f"label_range: {lo_hi} with kind pair_regression; allowed: [lo, hi], finite, lo < hi")


def encoding_for(task: TaskConfig) -> Encoding:
    """How the inputs are encoded: the head decides (the study's bi-encoder vs cross-encoder choice)."""
    if task.kind in ("classification", "contrastive"):
        return "single"
    return "cross" if task.head == "cross" else "bi"


def objective_for(task: TaskConfig) -> Objective:
    """The loss family: binary tasks get one logit with BCE, multi-class CE, regression MSE, a corpus SimCSE's."""
    if task.kind == "contrastive":
        return "simcse"
    if task.kind == "pair_regression":
        return "mse"
    return "bce" if task.num_classes == 2 else "ce"
