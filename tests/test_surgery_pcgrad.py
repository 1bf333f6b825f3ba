"""PCGrad from the Gram matrix against Algorithm 1 of Yu et al. (2020) on the T×P matrix, and against torchjd."""

from __future__ import annotations

import sys

import pytest
import torch

from dist_minbert.surgery.pcgrad import (
    WEIGHTINGS,
    check_weighting,
    gram_matrix,
    pcgrad,
    pcgrad_weights_from_gram,
    step_generator,
)

torch.set_num_threads(1)


def algorithm1(grads: torch.Tensor, seed: int) -> torch.Tensor:
    """Algorithm 1 of Yu et al. on the gradients themselves, with the orders documented in pcgrad.py:
    one torch.randperm(T) per task i = 0..T−1 from one generator; zero gradients (absent tasks) skipped."""
    generator = torch.Generator().manual_seed(seed)
    g = grads.to(torch.float64)
    num_tasks = g.shape[0]
    update = torch.zeros(g.shape[1], dtype=torch.float64)
    for i in range(num_tasks):
        order = torch.randperm(num_tasks, generator=generator).tolist()
        if not g[i].any():
            continue
        projected = g[i].clone()
        for j in order:
            if j == i or not g[j].any():
                continue
            dot = projected @ g[j]
            if dot < 0:
                projected -= dot / (g[j] @ g[j]) * g[j]
        update += projected
    return update


def conflicting_grads(num_tasks: int, num_params: int, seed: int) -> torch.Tensor:
    """Random task gradients where every odd task mostly opposes the one before it."""
    generator = torch.Generator().manual_seed(seed)
    grads = torch.randn(num_tasks, num_params, generator=generator, dtype=torch.float64)
    for t in range(1, num_tasks, 2):
        grads[t] = -0.7 * grads[t - 1] + 0.5 * grads[t]
    return grads


def num_conflicts(grads: torch.Tensor) -> int:
    gram = grads @ grads.T
    return int(torch.triu(gram < 0, diagonal=1).sum())


@pytest.mark.parametrize("num_tasks", [2, 3, 4, 5])
@pytest.mark.parametrize("seed", range(5))
def test_pcgrad_equals_algorithm1(num_tasks: int, seed: int) -> None:
    grads = conflicting_grads(num_tasks, 40, seed)
    assert num_conflicts(grads) >= 1  # the case exercises projection
    expected = algorithm1(grads, seed)
    got = pcgrad(grads, torch.Generator().manual_seed(seed))
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, grads.sum(dim=0), atol=1e-3)  # surgery changed the update


@pytest.mark.parametrize("num_tasks", [2, 3, 4, 5])
@pytest.mark.parametrize("seed", range(5))
def test_pcgrad_equals_torchjd_with_its_global_generator_seeded_alike(num_tasks: int, seed: int) -> None:
    # torchjd's PCGradWeighting draws torch.randperm(T) from the global generator once per task i.
    aggregation = pytest.importorskip("torchjd.aggregation")
    grads = conflicting_grads(num_tasks, 40, 100 + seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        expected = aggregation.PCGrad()(grads)
    got = pcgrad(grads, torch.Generator().manual_seed(seed))
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("absent", [0, 1, 2])
def test_zero_gradient_task_drops_out(absent: int) -> None:
    grads = conflicting_grads(3, 30, seed=7)
    grads[absent] = 0.0
    gram = gram_matrix(grads)
    weights = pcgrad_weights_from_gram(gram, torch.Generator().manual_seed(3))
    assert weights[absent] == 0.0 and torch.isfinite(weights).all()
    # Two tasks remain, where the order does not matter: PCGrad of the two rows alone.
    rest = [t for t in range(3) if t != absent]
    expected = pcgrad(grads[rest], torch.Generator().manual_seed(0))
    assert torch.allclose(weights.to(grads.dtype) @ grads, expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(weights @ grads, algorithm1(grads, 3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_absent_task_keeps_the_orders_of_the_others(seed: int) -> None:
    # A permutation is drawn for every i, absent ones included, so with 4 present tasks of 5 the
    # orders are those of Algorithm 1 on all 5 rows.
    grads = conflicting_grads(5, 30, seed)
    grads[seed % 5] = 0.0
    got = pcgrad(grads, torch.Generator().manual_seed(seed))
    assert torch.allclose(got, algorithm1(grads, seed), rtol=1e-10, atol=1e-10)


def test_all_tasks_absent_gives_zero_weights() -> None:
    weights = pcgrad_weights_from_gram(torch.zeros(3, 3, dtype=torch.float64), torch.Generator().manual_seed(0))
    assert torch.equal(weights, torch.zeros(3, dtype=torch.float64))


def test_same_seed_same_weights_and_the_seed_matters() -> None:
    grads = conflicting_grads(5, 20, seed=11)
    gram = gram_matrix(grads)
    runs = [pcgrad_weights_from_gram(gram, step_generator(seed=1, step=s)) for s in range(10)]
    again = [pcgrad_weights_from_gram(gram, step_generator(seed=1, step=s)) for s in range(10)]
    assert all(torch.equal(a, b) for a, b in zip(runs, again))
    # With 5 tasks and several conflicts the random orders change the weights for some steps.
    assert any(not torch.allclose(runs[0], w) for w in runs[1:])


def test_step_generator_is_a_function_of_seed_and_step() -> None:
    def draw(seed: int, step: int) -> list[int]:
        return torch.randperm(50, generator=step_generator(seed, step)).tolist()

    assert draw(3, 7) == draw(3, 7)
    assert draw(3, 7) != draw(3, 8)
    assert draw(3, 7) != draw(4, 7)


def test_gram_matrix_is_float64_and_chunking_does_not_change_it() -> None:
    grads = torch.randn(3, 1001, generator=torch.Generator().manual_seed(0))
    expected = grads.double() @ grads.double().T
    for chunk_columns in (1, 7, 1000, 1 << 20):
        gram = gram_matrix(grads, chunk_columns=chunk_columns)
        assert gram.dtype == torch.float64
        assert torch.allclose(gram, expected, rtol=1e-12)


def test_sum_weighting_is_one_per_present_task() -> None:
    grads = conflicting_grads(3, 10, seed=0)
    grads[1] = 0.0
    weights = WEIGHTINGS["sum"](gram_matrix(grads), torch.Generator())
    assert weights.tolist() == [1.0, 0.0, 1.0]


def test_mgda_weighting_equals_torchjd_and_drops_absent_tasks() -> None:
    aggregation = pytest.importorskip("torchjd.aggregation")
    grads = conflicting_grads(4, 25, seed=5)
    gram = gram_matrix(grads)
    assert torch.allclose(WEIGHTINGS["mgda"](gram, torch.Generator()), aggregation.MGDAWeighting()(gram))
    grads[2] = 0.0
    weights = WEIGHTINGS["mgda"](gram_matrix(grads), torch.Generator())
    expected = aggregation.MGDAWeighting()(gram_matrix(grads[[0, 1, 3]]))
    assert weights[2] == 0.0
    assert torch.allclose(weights[[0, 1, 3]], expected)


def test_upgrad_weighting_equals_torchjd() -> None:
    aggregation = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("quadprog")
    pytest.importorskip("qpsolvers")
    grads = conflicting_grads(3, 25, seed=9)
    weights = WEIGHTINGS["upgrad"](gram_matrix(grads), torch.Generator())
    assert torch.allclose(weights @ grads, aggregation.UPGrad()(grads), rtol=1e-6, atol=1e-8)


def test_missing_torchjd_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchjd", None)  # makes `import torchjd` raise ImportError
    with pytest.raises(ImportError, match=r"MGDAWeighting.*pip install torchjd"):
        check_weighting("mgda")


def test_check_weighting_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"weighting: 'gradnorm' is unknown; allowed: sum, pcgrad, upgrad, mgda"):
        check_weighting("gradnorm")


def test_upgrad_without_its_solver_is_named() -> None:
    pytest.importorskip("torchjd.aggregation")
    try:
        import qpsolvers, quadprog  # noqa: F401, E401
    except ImportError:
        with pytest.raises(ImportError, match=r"UPGradWeighting.*quadprog"):
            check_weighting("upgrad")
    else:
        pytest.skip("quadprog and qpsolvers are installed")
