"""Diagnostics read off the Gram matrix: norms, cosines, conflicting pairs, with an absent task."""

from __future__ import annotations

import math

import torch

from dist_minbert.surgery.pcgrad import gram_matrix
from dist_minbert.surgery.stats import surgery_stats


def test_stats_of_a_hand_made_case() -> None:
    # g0 = (3, 4): norm 5; g1 = (-3, 0): norm 3, g0·g1 = -9 → cos -0.6 (a conflict);
    # g2 absent; g3 = (0, 2): g0·g3 = 8 → cos 0.8, g1·g3 = 0 → cos 0 (orthogonal, no conflict).
    grads = torch.tensor([[3.0, 4.0], [-3.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    weights = torch.tensor([1.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    stats = surgery_stats(gram_matrix(grads), weights)
    assert stats.norms.tolist() == [5.0, 3.0, 0.0, 2.0]
    assert math.isclose(stats.cosines[0, 1], -0.6) and math.isclose(stats.cosines[1, 0], -0.6)
    assert math.isclose(stats.cosines[0, 3], 0.8)
    assert stats.cosines[1, 3] == 0.0
    assert stats.cosines[2].tolist() == [0.0] * 4 and stats.cosines[:, 2].tolist() == [0.0] * 4
    assert math.isclose(stats.cosines[0, 0], 1.0)
    assert stats.num_conflicting_pairs == 1
    assert torch.equal(stats.weights, weights)
