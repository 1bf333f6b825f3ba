"""SimCSE on 2 gloo ranks (torch.multiprocessing, no Ray) against single-process computations.

One spawn runs every scenario on both ranks and saves what each returned; the tests compare those with
references computed here in one process. Rank r takes sentences [r·B, (r+1)·B) of a union batch of 2B.
What DeepSpeed would apply is the mean over ranks of their gradients (it averages), so that mean is what
must equal the union batch's gradient.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_minbert.contrastive.gather import _AllGather, all_gather_with_grad
from dist_minbert.contrastive.grad_cache import simcse_gradients
from tests.test_contrastive_grad_cache import (NUM_SENTENCES, chunked_reference, flat, mean_pooled, relative_error,
                                               rows, sentences, tiny_encoder)

WORLD_SIZE = 2
UNION_SEED = 3
CHUNK_SIZE = 5  # rows of each rank's doubled batch (12) per forward: chunks of 5, 5, 2


def _local_slice_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    """The mutation: this rank's slice of its own loss's gradient only, dropping the other ranks' terms."""
    rows_per_rank = grad.size(0) // dist.get_world_size()
    start = dist.get_rank() * rows_per_rank
    return grad[start:start + rows_per_rank], None


def _worker(rank: int, checkpoint: str, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    results: dict = {}

    x = (torch.arange(6.0).view(2, 3) + 6 * rank).requires_grad_()  # (2, 3): rows 2r, 2r + 1 of arange(12)
    gathered = all_gather_with_grad(x)  # (4, 3)
    (torch.arange(12.0).view(4, 3) * (rank + 1) * gathered).sum().backward()
    results["gather"] = {"forward": gathered.detach(), "grad": x.grad}

    mine = rows(sentences(WORLD_SIZE * NUM_SENTENCES, UNION_SEED), rank * NUM_SENTENCES, (rank + 1) * NUM_SENTENCES)
    encoder = tiny_encoder(checkpoint, dropout=0.0)
    embed, parameters = mean_pooled(encoder), list(encoder.parameters())
    for negatives in ("global", "local"):
        for chunk_size in (None, CHUNK_SIZE):
            result = simcse_gradients(embed, mine, parameters, negatives=negatives, chunk_size=chunk_size)
            results[negatives, chunk_size] = (result.loss.item(), flat(result.grads, parameters))
    exact_backward = _AllGather.__dict__["backward"]
    _AllGather.backward = staticmethod(_local_slice_backward)
    result = simcse_gradients(embed, mine, parameters)
    results["local_slice"] = (result.loss.item(), flat(result.grads, parameters))
    _AllGather.backward = exact_backward

    encoder = tiny_encoder(checkpoint, dropout=0.1)
    embed, parameters = mean_pooled(encoder), list(encoder.parameters())
    torch.manual_seed(100 + rank)
    uncached = simcse_gradients(embed, mine, parameters)
    torch.manual_seed(100 + rank)
    one_chunk = simcse_gradients(embed, mine, parameters, chunk_size=2 * NUM_SENTENCES)
    torch.manual_seed(200 + rank)
    reference = chunked_reference(embed, mine, parameters, CHUNK_SIZE)  # the gather, with its backward, inside
    torch.manual_seed(200 + rank)
    chunked = simcse_gradients(embed, mine, parameters, chunk_size=CHUNK_SIZE)
    results["dropout"] = {"uncached": (uncached.loss.item(), flat(uncached.grads, parameters)),
                          "one_chunk": (one_chunk.loss.item(), flat(one_chunk.grads, parameters)),
                          "reference": reference,
                          "chunked": (chunked.loss.item(), flat(chunked.grads, parameters))}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tiny_checkpoint: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("contrastive_ranks")
    mp.spawn(_worker, args=(tiny_checkpoint, str(out_dir / "init"), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def single_process(tiny_checkpoint: str) -> dict:
    """Without a process group: the union batch, and each rank's rows alone (negatives from those rows only)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    encoder = tiny_encoder(tiny_checkpoint, dropout=0.0)
    embed, parameters = mean_pooled(encoder), list(encoder.parameters())
    union = sentences(WORLD_SIZE * NUM_SENTENCES, UNION_SEED)
    out = {}
    for name, batch in [("union", union)] + [(r, rows(union, r * NUM_SENTENCES, (r + 1) * NUM_SENTENCES))
                                              for r in range(WORLD_SIZE)]:
        result = simcse_gradients(embed, batch, parameters)
        out[name] = (result.loss.item(), flat(result.grads, parameters))
    torch.set_num_threads(before)
    return out


def mean_over_ranks(ranks: list[dict], key) -> tuple[float, torch.Tensor]:
    """The mean loss, and what DeepSpeed's averaging of the ranks' gradients hands to the optimizer."""
    return (sum(r[key][0] for r in ranks) / len(ranks), torch.stack([r[key][1] for r in ranks]).mean(dim=0))


def test_gather_concatenates_and_its_backward_sums_every_ranks_terms(ranks) -> None:
    # Rank r's loss is Σ (r + 1)·W ⊙ gathered with W = arange(12) as (4, 3), so it sends every row of
    # gathered the gradient (r + 1)·W. Rank s's rows are W[2s:2s + 2]; summed over r = 0, 1 they get
    # (1 + 2)·W[2s:2s + 2]. Keeping only the local slice would give (s + 1)·W[2s:2s + 2].
    weights = torch.arange(12.0).view(4, 3)
    for s, rank in enumerate(ranks):
        assert torch.equal(rank["gather"]["forward"], torch.arange(12.0).view(4, 3))
        assert torch.equal(rank["gather"]["grad"], 3 * weights[2 * s:2 * s + 2])


@pytest.mark.parametrize("chunk_size", [None, CHUNK_SIZE])
def test_global_negatives_equal_the_union_batch(ranks, single_process, chunk_size) -> None:
    loss, grad = mean_over_ranks(ranks, ("global", chunk_size))
    expected_loss, expected_grad = single_process["union"]
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert relative_error(grad, expected_grad) < 1e-5
    # Each rank alone is not the union: every rank's gradient carries its own samples' share.
    assert relative_error(ranks[0]["global", chunk_size][1], expected_grad) > 1e-2


@pytest.mark.parametrize("chunk_size", [None, CHUNK_SIZE])
def test_local_negatives_equal_the_mean_of_per_rank_losses(ranks, single_process, chunk_size) -> None:
    for r in range(WORLD_SIZE):
        assert ranks[r]["local", chunk_size][0] == pytest.approx(single_process[r][0], rel=1e-5)
        assert relative_error(ranks[r]["local", chunk_size][1], single_process[r][1]) < 1e-5
    loss, grad = mean_over_ranks(ranks, ("local", chunk_size))
    assert loss == pytest.approx((single_process[0][0] + single_process[1][0]) / 2, rel=1e-5)
    assert relative_error(grad, (single_process[0][1] + single_process[1][1]) / 2) < 1e-5
    # Fewer negatives, an easier task: below the global loss.
    assert loss < mean_over_ranks(ranks, ("global", chunk_size))[0]


def test_a_local_slice_backward_fails_the_union_check(ranks, single_process) -> None:
    """The mutation the union test exists for: the loss is unchanged, the gradient is not."""
    loss, grad = mean_over_ranks(ranks, "local_slice")
    expected_loss, expected_grad = single_process["union"]
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert relative_error(grad, expected_grad) > 1e-2


def test_cached_equals_uncached_with_dropout_on_two_ranks(ranks) -> None:
    for rank in ranks:
        runs = rank["dropout"]
        assert runs["one_chunk"][0] == pytest.approx(runs["uncached"][0], rel=1e-6)
        assert relative_error(runs["one_chunk"][1], runs["uncached"][1]) < 1e-5
        assert runs["chunked"][0] == pytest.approx(runs["reference"][0], rel=1e-6)
        assert relative_error(runs["chunked"][1], runs["reference"][1]) < 1e-5
