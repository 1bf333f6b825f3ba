"""model/dropout.py: the keep factors are Bernoulli(1 - p) times a value, reproducible from torch's seed and the
same on 1 thread or 2; dropout (alone or fused with the residual add) scales as torch's does, bit for bit."""
from __future__ import annotations

import math

import pytest
import torch

from dist_minbert.model.dropout import Dropout, keep_factors


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_factors_keep_one_minus_p(p):
    torch.manual_seed(0)
    n = 1_000_001  # odd: the last element takes half of a 64-bit draw
    factors = keep_factors(torch.Size([n]), p)
    assert factors.dtype == torch.float32 and factors.shape == (n,)
    assert set(factors.unique().tolist()) == {0.0, 1.0}
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(factors.mean().item() - (1 - p)) < 5 * sigma


def test_kept_elements_are_independent():
    """Neighbours (the two halves of one 64-bit draw among them) are kept together as often as chance says."""
    torch.manual_seed(1)
    kept = keep_factors(torch.Size([1_000_000]), 0.5)
    both = (kept[:-1] * kept[1:]).mean().item()
    assert abs(both - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 1_000_000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factors_hold_the_value_in_its_dtype(dtype):
    torch.manual_seed(2)
    factors = keep_factors(torch.Size([4096]), 0.1, 1 / 0.9, dtype)
    assert factors.dtype == dtype
    assert set(factors.unique().tolist()) == {0.0, torch.tensor(1 / 0.9, dtype=dtype).item()}


def test_factors_follow_torch_seed():
    """GradCache replays a chunk's dropout from the saved RNG state: the same state must give the same mask."""
    shape = torch.Size([64, 33])
    torch.manual_seed(7)
    first = keep_factors(shape, 0.1)
    second = keep_factors(shape, 0.1)
    torch.manual_seed(7)
    assert torch.equal(keep_factors(shape, 0.1), first)
    assert not torch.equal(first, second)


def test_factors_do_not_depend_on_the_thread_count():
    """Each half has its own generator state, drawn from torch's: the helper thread changes no bit."""
    shape = torch.Size([512, 1024])  # large enough for the helper thread
    before = torch.get_num_threads()
    try:
        drawn = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(4)
            drawn.append(keep_factors(shape, 0.1))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(*drawn)


def test_tiny_p_drops_next_to_nothing():
    torch.manual_seed(0)
    assert keep_factors(torch.Size([100_000]), 1e-15).all()


def test_dropout_applies_as_torch_dropout_does():
    """torch's dropout kernel on the same mask (native_dropout_backward is x · mask · scale) gives the same bits."""
    x = torch.randn(3, 4096)
    torch.manual_seed(5)
    ours = Dropout(0.1).train()(x)
    torch.manual_seed(5)
    kept = keep_factors(x.shape, 0.1).bool()
    assert torch.equal(ours, torch.ops.aten.native_dropout_backward(x, kept, 1 / 0.9))


def test_dropout_gradient_passes_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(10_000, requires_grad=True)
    y = Dropout(0.25).train()(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / 0.75)


def test_residual_form_is_the_residual_plus_the_dropout():
    x = torch.randn(64, 33, requires_grad=True)
    residual = torch.randn(64, 33, requires_grad=True)
    module = Dropout(0.1).train()
    torch.manual_seed(9)
    fused = module(x, residual=residual)
    torch.manual_seed(9)
    separate = residual + module(x)
    assert torch.allclose(fused, separate, rtol=0, atol=1e-6)
    grads = torch.autograd.grad(fused.square().sum(), (x, residual))
    expected = torch.autograd.grad(separate.square().sum(), (x, residual))
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(grads, expected))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module(x.bfloat16(), residual=residual).dtype == torch.float32  # as autocast's own residual add


def test_dropout_module_is_an_nn_dropout_with_its_p():
    module = Dropout(0.3)
    assert isinstance(module, torch.nn.Dropout) and module.p == 0.3
    x, residual = torch.ones(1000), torch.zeros(1000)
    assert module.eval()(x) is x and torch.equal(module(x, residual=residual), x)
    assert Dropout(0.0).train()(x) is x
    torch.manual_seed(0)
    values = module.train()(x).unique()
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(1 / 0.7)
