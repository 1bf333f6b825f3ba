"""The surgery hook on 2 gloo ranks (torch.multiprocessing, no Ray) against single-process references.

One spawn runs every scenario on both ranks and saves what each rank returned; the tests compare
those results with references computed here in one process on the union batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_minbert.surgery.comm import CommCounter
from dist_minbert.surgery.config import SurgeryConfig
from dist_minbert.surgery.distributed import combine_task_gradients, resolve_plan, sample_scales
from dist_minbert.surgery.pcgrad import WEIGHTINGS, gram_matrix, pcgrad, step_generator

WORLD_SIZE = 2
SEED = 5
NUM_FEATURES, NUM_HIDDEN = 6, 5
NUM_PARAMS = NUM_HIDDEN * NUM_FEATURES + NUM_HIDDEN + NUM_HIDDEN + 1  # 41: odd, so the sharded plan pads
# Per-rank sample counts of the 3 tasks in one step (rank 0 takes the first rows of the union batch).
CASES: dict[str, list[list[int]]] = {
    "equal": [[4, 4, 4], [4, 4, 4]],
    "unequal": [[5, 2, 4], [3, 6, 0]],  # a short batch, and task 2 absent on rank 1
    "task_absent": [[3, 0, 5], [4, 0, 1]],  # task 1 absent from the whole step
    "single_task": [[3, 0, 0], [5, 0, 0]],  # nothing to resolve
}
# (mode, plan, weighting)
SETTINGS = [("pcgrad", "allreduce", "pcgrad"), ("pcgrad", "sharded", "pcgrad"), ("pcgrad", "sharded", "mgda"),
            ("pcgrad_local", "auto", "pcgrad"), ("sum", "auto", "pcgrad")]
HAND_COUNTS = [[1, 2], [3, 0]]
HAND_GRADS = [[[4.0, 0.0, 0.0], [-1.0, 0.0, 1.0]],  # rank 0: task 0 (1 sample), task 1 (2 samples)
              [[0.0, 4.0 / 3.0, 0.0], [0.0, 0.0, 0.0]]]  # rank 1: task 0 (3 samples), task 1 absent


def shared_params() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(NUM_HIDDEN, NUM_FEATURES), (NUM_HIDDEN,), (1, NUM_HIDDEN), (1,)]
    return [(0.5 * torch.randn(shape, generator=generator)).requires_grad_() for shape in shapes]


def task_rows(task: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [start, stop) of task `task`; tasks 0 and 1 have opposite targets, so their gradients conflict."""
    x = torch.randn(16, NUM_FEATURES, generator=torch.Generator().manual_seed(10 + task))
    y = [x.sum(dim=1), -x.sum(dim=1) + x[:, 1], 2.0 * x[:, 0] - x.sum(dim=1)][task]
    return x[start:stop], y[start:stop]


def task_gradient(task: int, start: int, stop: int) -> torch.Tensor:
    """Flat gradient of the task's mean squared error over rows [start, stop); zeros when empty."""
    params = shared_params()
    if stop == start:
        return torch.zeros(NUM_PARAMS)
    x, y = task_rows(task, start, stop)
    w1, b1, w2, b2 = params
    prediction = (torch.tanh(x @ w1.T + b1) @ w2.T + b2).squeeze(1)
    loss = ((prediction - y) ** 2).mean()
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def rank_gradients(counts: list[list[int]], rank: int) -> torch.Tensor:
    rows = []
    for task, num_local in enumerate(counts[rank]):
        start = sum(counts[r][task] for r in range(rank))
        rows.append(task_gradient(task, start, start + num_local))
    return torch.stack(rows)


def union_gradients(counts: list[list[int]]) -> torch.Tensor:
    """ḡ_t: the gradient of task t's mean loss over the union batch of all ranks."""
    return torch.stack([task_gradient(t, 0, sum(c[t] for c in counts)) for t in range(len(counts[0]))])


def num_conflicts(grads: torch.Tensor) -> int:
    return int(torch.triu(gram_matrix(grads) < 0, diagonal=1).sum())


def _run(comm: CommCounter, grads: torch.Tensor, counts: list[int], settings: tuple[str, str, str], step: int) -> dict:
    mode, plan, weighting = settings
    config = SurgeryConfig(mode=mode, plan=plan, weighting=weighting)
    result = combine_task_gradients(grads, torch.tensor(counts), config, step_generator(SEED, step), comm)
    return {"gradient": result.gradient, "global_counts": result.global_counts, "units": comm.units,
            "num_calls": comm.num_calls, "weights": None if result.stats is None else result.stats.weights,
            "gram": None if result.stats is None else result.stats.gram,
            "num_conflicting_pairs": None if result.stats is None else result.stats.num_conflicting_pairs}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    results: dict = {}
    for step, (case, counts) in enumerate(CASES.items()):
        for settings in SETTINGS:
            comm = CommCounter(num_params=NUM_PARAMS)
            results[case, settings] = _run(comm, rank_gradients(counts, rank), counts[rank], settings, step)
    for settings in SETTINGS:
        comm = CommCounter(num_params=3)
        results["hand", settings] = _run(comm, torch.tensor(HAND_GRADS[rank]), HAND_COUNTS[rank], settings, 0)
    comm = CommCounter(num_params=4)
    gathered = torch.empty(4)
    comm.all_gather(gathered, torch.tensor([2.0 * rank, 2.0 * rank + 1]))
    results["all_gather"] = {"output": gathered, "units": comm.units}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("surgery_ranks")
    mp.spawn(_worker, args=(str(out_dir / "init"), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def mean_over_ranks(ranks: list[dict], key: tuple) -> torch.Tensor:
    """What DeepSpeed's averaging of the ranks' gradients hands to the optimizer."""
    return torch.stack([r[key]["gradient"] for r in ranks]).mean(dim=0)


def assert_close_relative(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert (got - expected).norm() <= 1e-4 * expected.norm(), (got, expected)


@pytest.mark.parametrize("case", ["equal", "unequal", "task_absent"])
@pytest.mark.parametrize("settings", [s for s in SETTINGS if s[0] == "pcgrad"])
def test_exact_mode_equals_single_process_weighting_of_the_union_batch(ranks, case, settings) -> None:
    step = list(CASES).index(case)
    union = union_gradients(CASES[case])
    assert num_conflicts(union) >= 1  # so surgery differs from the sum
    weights = WEIGHTINGS[settings[2]](gram_matrix(union), step_generator(SEED, step))
    expected = weights.to(union.dtype) @ union
    if settings[2] == "pcgrad":
        assert torch.allclose(expected, pcgrad(union, step_generator(SEED, step)))
    assert not torch.allclose(expected, union.sum(dim=0), rtol=1e-2)
    assert_close_relative(mean_over_ranks(ranks, (case, settings)), expected)
    # Weights are computed on every rank and must agree bit for bit.
    assert torch.equal(ranks[0][case, settings]["weights"], ranks[1][case, settings]["weights"])
    assert torch.allclose(ranks[0][case, settings]["weights"], weights, rtol=1e-5)
    assert torch.allclose(ranks[0][case, settings]["gram"], gram_matrix(union), rtol=1e-5)


@pytest.mark.parametrize("case", ["equal", "unequal", "task_absent"])
def test_both_plans_give_the_same_update(ranks, case) -> None:
    allreduce, sharded = ("pcgrad", "allreduce", "pcgrad"), ("pcgrad", "sharded", "pcgrad")
    assert_close_relative(mean_over_ranks(ranks, (case, sharded)), mean_over_ranks(ranks, (case, allreduce)))
    # allreduce hands every rank the global update; sharded hands each its local share of it.
    assert torch.equal(ranks[0][case, allreduce]["gradient"], ranks[1][case, allreduce]["gradient"])
    assert not torch.allclose(ranks[0][case, sharded]["gradient"], ranks[1][case, sharded]["gradient"])


@pytest.mark.parametrize("case", list(CASES))
def test_local_mode_equals_per_rank_pcgrad_then_mean(ranks, case) -> None:
    counts = CASES[case]
    step = list(CASES).index(case)
    totals = [sum(c[t] for c in counts) for t in range(3)]
    per_rank = []
    for r in range(WORLD_SIZE):
        # Each rank's task-t gradient scaled by N·n_t^r / n_t (0 for a task absent from the step).
        scales = torch.tensor([WORLD_SIZE * counts[r][t] / totals[t] if totals[t] else 0.0 for t in range(3)])
        scaled = rank_gradients(counts, r) * scales[:, None]
        per_rank.append(pcgrad(scaled, step_generator(SEED, step)) if case != "single_task" else scaled.sum(0))
        assert torch.allclose(ranks[r][case, ("pcgrad_local", "auto", "pcgrad")]["gradient"], per_rank[r], atol=1e-6)
    assert_close_relative(mean_over_ranks(ranks, (case, ("pcgrad_local", "auto", "pcgrad"))),
                          torch.stack(per_rank).mean(dim=0))


@pytest.mark.parametrize("case", list(CASES))
def test_sum_mode_is_the_sum_of_union_batch_task_gradients(ranks, case) -> None:
    assert_close_relative(mean_over_ranks(ranks, (case, ("sum", "auto", "pcgrad"))),
                          union_gradients(CASES[case]).sum(dim=0))


def test_a_single_task_step_acts_as_sum(ranks) -> None:
    union = union_gradients(CASES["single_task"])
    for settings in SETTINGS:
        assert ranks[0]["single_task", settings]["weights"] is None
        assert_close_relative(mean_over_ranks(ranks, ("single_task", settings)), union[0])


def test_global_counts_are_all_reduced(ranks) -> None:
    for r in range(WORLD_SIZE):
        assert ranks[r]["unequal", SETTINGS[0]]["global_counts"].tolist() == [8, 8, 4]


# The hand-worked case, T = 2, P = 3, N = 2, counts rank 0 [1, 2], rank 1 [3, 0], so n = [4, 2]:
#   ḡ_0 = (1·[4,0,0] + 3·[0,4/3,0]) / 4 = [1,1,0];  ḡ_1 = [-1,0,1] (rank 0 alone);  ḡ_0·ḡ_1 = -1 < 0.
#   PCGrad: g_0' = ḡ_0 + ½ḡ_1 = [½,1,½], g_1' = ḡ_1 + ½ḡ_0 = [-½,½,1]; update [0,1.5,1.5], w = [1.5,1.5].
#   Scales s = N·n_t^r/n_t: rank 0 [½, 2], rank 1 [3/2, 0]; scaled rank 0 rows [2,0,0], [-2,0,2];
#   rank 1 rows [0,2,0], [0,0,0].
#   sharded hands back Σ w_t s_t g_t: rank 0 1.5·[2,0,0] + 1.5·[-2,0,2] = [0,0,3], rank 1 [0,3,0];
#   their mean is the update. allreduce hands both ranks the update itself.
#   local: rank 0's rows conflict (dot -4): [2,0,0] + ½[-2,0,2] = [1,0,1] and [-2,0,2] + 1·[2,0,0] =
#   [0,0,2], sum [1,0,3]; rank 1 has one task: [0,2,0].   sum: rank 0 [0,0,2], rank 1 [0,2,0].
HAND_EXPECTED = {
    ("pcgrad", "allreduce", "pcgrad"): ([0.0, 1.5, 1.5], [0.0, 1.5, 1.5]),
    ("pcgrad", "sharded", "pcgrad"): ([0.0, 0.0, 3.0], [0.0, 3.0, 0.0]),
    ("pcgrad_local", "auto", "pcgrad"): ([1.0, 0.0, 3.0], [0.0, 2.0, 0.0]),
    ("sum", "auto", "pcgrad"): ([0.0, 0.0, 2.0], [0.0, 2.0, 0.0]),
}
# Units for P = 3: counts all-reduce 2/3; allreduce plan + T×P all-reduce 6/3; sharded plan + two
# reduce-scatters of the padded row (4 elements, ½ each: 2·½·4/3) + the Gram all-reduce 4/3.
HAND_UNITS = {("pcgrad", "allreduce", "pcgrad"): 2 / 3 + 2, ("pcgrad", "sharded", "pcgrad"): 2 / 3 + 4 / 3 + 4 / 3,
              ("pcgrad_local", "auto", "pcgrad"): 2 / 3, ("sum", "auto", "pcgrad"): 2 / 3}


@pytest.mark.parametrize("settings", list(HAND_EXPECTED))
def test_hand_worked_case(ranks, settings) -> None:
    for r in range(WORLD_SIZE):
        result = ranks[r]["hand", settings]
        assert torch.allclose(result["gradient"], torch.tensor(HAND_EXPECTED[settings][r]), atol=1e-6)
        assert result["units"] == pytest.approx(HAND_UNITS[settings])
    if settings[0] == "pcgrad":
        assert ranks[0]["hand", settings]["weights"].tolist() == pytest.approx([1.5, 1.5])
        assert ranks[0]["hand", settings]["num_conflicting_pairs"] == 1


@pytest.mark.parametrize("case, num_present", [("unequal", 3), ("task_absent", 2)])
def test_communication_units_of_the_plans(ranks, case, num_present) -> None:
    # P = 41, T = 3: counts all-reduce 3/P; allreduce: one all-reduce of the present rows (k units);
    # sharded: k reduce-scatters of the padded row (42 elements, ½ each) + the Gram all-reduce 9/P.
    p = NUM_PARAMS
    expected = {("pcgrad", "allreduce", "pcgrad"): (3 / p + num_present, 2),
                ("pcgrad", "sharded", "pcgrad"): (3 / p + num_present * 0.5 * 42 / p + 9 / p, num_present + 2)}
    for settings, (units, num_calls) in expected.items():
        assert ranks[0][case, settings]["units"] == pytest.approx(units)
        assert ranks[0][case, settings]["num_calls"] == num_calls


def test_all_gather_is_counted_as_half_a_unit(ranks) -> None:
    for r in range(WORLD_SIZE):
        assert ranks[r]["all_gather"]["output"].tolist() == [0.0, 1.0, 2.0, 3.0]
        assert ranks[r]["all_gather"]["units"] == pytest.approx(0.5)


def test_sample_scales() -> None:
    scales = sample_scales(torch.tensor([1, 2, 0]), torch.tensor([4, 2, 0]), world_size=2)
    assert scales.tolist() == [0.5, 2.0, 0.0]


@pytest.mark.parametrize("plan, backend, expected", [
    ("auto", "gloo", "allreduce"), ("auto", "nccl", "sharded"), ("sharded", "gloo", "sharded"),
    ("allreduce", "nccl", "allreduce")])
def test_resolve_plan(plan, backend, expected) -> None:
    assert resolve_plan(plan, backend) == expected
