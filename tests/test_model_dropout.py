"""model/dropout.py: the keep mask is Bernoulli(1 - p), reproducible from torch's seed, and dropout scales as torch's."""
from __future__ import annotations

import math

import pytest
import torch

from dist_minbert.model.dropout import Dropout, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_p(p):
    torch.manual_seed(0)
    n = 1_000_001  # odd: the last element takes half of an int64 draw
    kept = keep_mask(torch.Size([n]), p, torch.device("cpu"))
    assert kept.dtype == torch.bool and kept.shape == (n,)
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma


def test_keep_mask_elements_are_independent():
    """Neighbours (the two halves of one 64-bit draw among them) are kept together as often as chance says."""
    torch.manual_seed(1)
    kept = keep_mask(torch.Size([1_000_000]), 0.5, torch.device("cpu")).float()
    both = (kept[:-1] * kept[1:]).mean().item()
    assert abs(both - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 1_000_000)


def test_masks_follow_torch_seed():
    """GradCache replays a chunk's dropout from the saved RNG state: the same state must give the same mask."""
    shape = torch.Size([64, 33])
    torch.manual_seed(7)
    first = keep_mask(shape, 0.1, torch.device("cpu"))
    second = keep_mask(shape, 0.1, torch.device("cpu"))
    torch.manual_seed(7)
    assert torch.equal(keep_mask(shape, 0.1, torch.device("cpu")), first)
    assert not torch.equal(first, second)


def test_tiny_p_drops_next_to_nothing():
    torch.manual_seed(0)
    assert keep_mask(torch.Size([100_000]), 1e-15, torch.device("cpu")).all()


def test_dropout_zeroes_or_scales_as_torch_does():
    torch.manual_seed(0)
    x = torch.randn(10_000, requires_grad=True)
    y = dropout(x, 0.25, training=True)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / 0.75)  # the gradient passes the same mask, scaled alike
    assert dropout(x, 0.25, training=False) is x and dropout(x, 0.0, training=True) is x


def test_dropout_module_is_an_nn_dropout_with_its_p():
    module = Dropout(0.3)
    assert isinstance(module, torch.nn.Dropout) and module.p == 0.3
    x = torch.ones(1000)
    assert module.eval()(x) is x
    torch.manual_seed(0)
    out = module.train()(x)
    values = out.unique()
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(1 / 0.7)
