from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dist_minbert.tasks.config import TaskConfig
from dist_minbert.tasks.metrics import compute_metrics, overall_score
from dist_minbert.tasks.registry import BUILTIN_TASKS

SST = TaskConfig(**BUILTIN_TASKS["sst"])
STS = TaskConfig(**BUILTIN_TASKS["sts"])


def test_accuracy_counts_exact_matches():
    preds = np.array([0, 1, 4, 4, 2])
    labels = np.array([0.0, 1.0, 3.0, 4.0, 1.0])
    assert compute_metrics(SST, preds, labels) == {"accuracy": pytest.approx(3 / 5)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pearson_and_spearman_match_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 26, size=200) / 5.0  # the STS grid: many ties
    preds = np.round(labels + rng.normal(0, 1.5, size=200), 1)
    metrics = compute_metrics(STS, preds, labels)
    assert metrics["pearson"] == pytest.approx(stats.pearsonr(preds, labels)[0], abs=1e-12)
    assert metrics["spearman"] == pytest.approx(stats.spearmanr(preds, labels)[0], abs=1e-12)


def test_constant_predictions_have_no_correlation():
    metrics = compute_metrics(STS, np.full(4, 2.5), np.array([0.0, 1.0, 2.0, 3.0]))
    assert math.isnan(metrics["pearson"])


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        compute_metrics(SST, np.zeros(3), np.zeros(2))


def test_overall_score_is_the_studys_mean():
    # The study's BERT-base dev numbers: (0.516 + 0.905 + (0.877 + 1) / 2) / 3.
    dev = {"sst": {"accuracy": 0.516}, "qqp": {"accuracy": 0.905}, "sts": {"pearson": 0.877, "spearman": 0.87}}
    assert overall_score(dev) == pytest.approx((0.516 + 0.905 + 0.9385) / 3)


def test_overall_score_needs_a_score_per_task():
    with pytest.raises(ValueError, match="dev.sts"):
        overall_score({"sst": {"accuracy": 0.5}, "sts": {"spearman": 0.3}})
