"""SimCSE's loss (3) against a term-by-term NumPy transcription and sentence-transformers' MNRL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dist_minbert.contrastive.loss import info_nce, simcse_loss


def equation_3(z: np.ndarray, z_pos: np.ndarray, temperature: float) -> float:
    """ℓ_i = −log(e^{sim(z_i, z'_i)/τ} / Σ_j e^{sim(z_i, z'_j)/τ}), mean over i; written out term by term."""

    def sim(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    losses = []
    for i in range(len(z)):
        numerator = math.exp(sim(z[i], z_pos[i]) / temperature)
        denominator = sum(math.exp(sim(z[i], z_pos[j]) / temperature) for j in range(len(z)))
        losses.append(-math.log(numerator / denominator))
    return sum(losses) / len(losses)


def views(batch: int, hidden: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views that agree more with each other than with other rows, as two dropout masks would make them."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, hidden, generator=generator, dtype=torch.float64)
    return z, z + 0.5 * torch.randn(batch, hidden, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [0.05, 0.1, 1.0])
@pytest.mark.parametrize("batch", [1, 2, 7])
def test_loss_is_equation_3(batch: int, temperature: float) -> None:
    z, z_pos = views(batch, 5, seed=batch)
    expected = equation_3(z.numpy(), z_pos.numpy(), temperature)
    assert simcse_loss(z, z_pos, temperature).item() == pytest.approx(expected, rel=1e-6)
    if batch == 1:
        assert expected == 0.0  # a lone sentence has no negative


def test_loss_is_multiple_negatives_ranking_with_scale_one_over_tau() -> None:
    losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    z, z_pos = views(6, 8, seed=3)
    mnrl = losses.MultipleNegativesRankingLoss(model=None, scale=1 / 0.05)
    expected = mnrl.compute_loss_from_embeddings([z, z_pos], labels=None)
    assert simcse_loss(z, z_pos, 0.05).item() == pytest.approx(expected.item(), rel=1e-9)


def test_gradient_pulls_positives_together() -> None:
    z, z_pos = (t.requires_grad_() for t in views(4, 3, seed=0))
    simcse_loss(z, z_pos).backward()
    # Descending moves z'_i toward z_i: the step raises sim(z_i, z'_i) for every i.
    moved = z_pos - 1e-3 * z_pos.grad
    before = torch.cosine_similarity(z, z_pos, dim=1)
    assert (torch.cosine_similarity(z, moved, dim=1) > before).all()


def test_without_a_process_group_global_and_local_negatives_agree() -> None:
    z, z_pos = views(5, 4, seed=1)
    assert torch.equal(simcse_loss(z, z_pos, negatives="global"), simcse_loss(z, z_pos, negatives="local"))


def test_low_precision_embeddings_are_scored_in_fp32() -> None:
    z, z_pos = views(8, 16, seed=2)
    loss = simcse_loss(z.bfloat16(), z_pos.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(simcse_loss(z, z_pos).item(), rel=2e-2)


def test_other_ranks_candidates_only_add_to_the_denominator() -> None:
    # Candidates from elsewhere before this rank's (offset 2): row i's positive is column 2 + i.
    z, z_pos = views(3, 4, seed=4)
    others = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with_others = info_nce(z, torch.cat([others, z_pos]), torch.arange(2, 5), 0.05)
    by_hand = -torch.log_softmax(torch.cosine_similarity(z[:, None], torch.cat([others, z_pos])[None], dim=2) / 0.05,
                                 dim=1)[torch.arange(3), torch.arange(2, 5)].mean()
    assert with_others.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert with_others > simcse_loss(z, z_pos, 0.05)


def test_unknown_negatives_are_refused() -> None:
    z, z_pos = views(2, 3, seed=0)
    with pytest.raises(ValueError, match="allowed: global, local"):
        simcse_loss(z, z_pos, negatives="all")
