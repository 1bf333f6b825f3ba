"""GradCache on one process: cached ≡ uncached, with dropout on, on the tiny random BERT.

With dropout on, equal gradients need equal masks. Each chunk draws its own, so the reference for a
chunked run is the uncached computation over the same chunks from the same seed (`chunked_reference`),
and one chunk holding the whole batch must equal the API's uncached path itself. Mutations that drop the
RNG restore, or take pass 1 under no_grad, must break the equality (they are run here, so the test
shows it can fail).
"""

from __future__ import annotations

import pytest
import torch

import dist_minbert.contrastive.grad_cache as grad_cache
from dist_minbert.contrastive.grad_cache import Batch, Embed, embedding_gradients, simcse_gradients
from dist_minbert.contrastive.loss import simcse_loss
from dist_minbert.model.bert import BertEncoder
from dist_minbert.model.checkpoint import load_encoder
from dist_minbert.tasks.pooling import POOLINGS

NUM_SENTENCES = 6  # per rank; the doubled batch has 12 rows
MAX_LENGTH = 12


def sentences(num: int, seed: int) -> Batch:
    """Random WordPiece ids, [CLS] first, padded to the longest: lengths differ, so padding is skipped."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, MAX_LENGTH + 1, (num,), generator=generator)
    lengths[0] = MAX_LENGTH
    mask = (torch.arange(MAX_LENGTH)[None, :] < lengths[:, None]).long()  # (B, T)
    ids = torch.randint(1000, 30000, (num, MAX_LENGTH), generator=generator) * mask  # (B, T), 0 = [PAD]
    ids[:, 0] = 101
    return {"input_ids": ids, "attention_mask": mask}


def rows(batch: Batch, start: int, stop: int) -> Batch:
    return {key: value[start:stop] for key, value in batch.items()}


def tiny_encoder(checkpoint: str, dropout: float) -> BertEncoder:
    return load_encoder(checkpoint, dropout=dropout).train()


def mean_pooled(encoder: BertEncoder) -> Embed:
    def embed(batch: Batch) -> torch.Tensor:
        return POOLINGS["mean"](encoder(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])

    return embed


def flat(grads: list[torch.Tensor | None], parameters: list[torch.Tensor]) -> torch.Tensor:
    """One vector of all gradients, zeros where a parameter got none (the pooler under mean pooling)."""
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, parameters)])


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def chunked_reference(embed: Embed, batch: Batch, parameters: list[torch.Tensor], chunk_size: int,
                      negatives: str = "global") -> tuple[float, torch.Tensor]:
    """Uncached: the doubled batch embedded chunk by chunk with one graph (so the same RNG draws as GradCache's
    pass 1), loss (3), one autograd.grad."""
    views = {key: torch.cat([value, value]) for key, value in batch.items()}
    z = torch.cat([embed(rows(views, start, start + chunk_size)) for start in range(0, 2 * len(batch["input_ids"]),
                                                                                        chunk_size)])
    loss = simcse_loss(*z.chunk(2), negatives=negatives)
    return loss.item(), flat(torch.autograd.grad(loss, parameters, allow_unused=True), parameters)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: more threads only wait on each other (on a shared 2-core box, 100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dropout_run(tiny_checkpoint: str):
    encoder = tiny_encoder(tiny_checkpoint, dropout=0.1)
    return mean_pooled(encoder), list(encoder.parameters()), sentences(NUM_SENTENCES, seed=0)


def test_one_chunk_equals_the_uncached_path_with_dropout_on(dropout_run) -> None:
    embed, parameters, batch = dropout_run
    torch.manual_seed(7)
    uncached = simcse_gradients(embed, batch, parameters)
    torch.manual_seed(7)
    cached = simcse_gradients(embed, batch, parameters, chunk_size=2 * NUM_SENTENCES)
    assert cached.loss.item() == pytest.approx(uncached.loss.item(), rel=1e-6)
    assert relative_error(flat(cached.grads, parameters), flat(uncached.grads, parameters)) < 1e-5
    assert [g is None for g in cached.grads] == [g is None for g in uncached.grads]


@pytest.mark.parametrize("chunk_size", [1, 5])
def test_chunks_equal_the_uncached_loss_over_the_same_draws(dropout_run, chunk_size: int) -> None:
    embed, parameters, batch = dropout_run
    torch.manual_seed(11)
    loss, expected = chunked_reference(embed, batch, parameters, chunk_size)
    after_reference = torch.get_rng_state()
    torch.manual_seed(11)
    cached = simcse_gradients(embed, batch, parameters, chunk_size=chunk_size)
    assert cached.loss.item() == pytest.approx(loss, rel=1e-6)
    assert relative_error(flat(cached.grads, parameters), expected) < 1e-5
    # Pass 2 replays the draws inside a fork: the RNG goes on from where pass 1 left it.
    assert torch.equal(torch.get_rng_state(), after_reference)


@pytest.mark.parametrize("mutation", ["no_rng_restore", "no_grad_first_pass"])
def test_the_equality_catches_a_broken_replay(dropout_run, monkeypatch, mutation: str) -> None:
    embed, parameters, batch = dropout_run
    torch.manual_seed(11)
    _, expected = chunked_reference(embed, batch, parameters, chunk_size=5)
    if mutation == "no_rng_restore":
        monkeypatch.setattr(grad_cache._RngState, "restore", lambda self: None)
    else:  # the encoder computes padding under no_grad: other dropout shapes, other masks
        monkeypatch.setattr(grad_cache, "_recording_nothing", torch.no_grad)
    torch.manual_seed(11)
    cached = simcse_gradients(embed, batch, parameters, chunk_size=5)
    assert relative_error(flat(cached.grads, parameters), expected) > 1e-2


def test_without_dropout_chunking_changes_nothing(tiny_checkpoint: str) -> None:
    encoder = tiny_encoder(tiny_checkpoint, dropout=0.0)
    embed, parameters, batch = mean_pooled(encoder), list(encoder.parameters()), sentences(NUM_SENTENCES, seed=1)
    uncached = simcse_gradients(embed, batch, parameters)
    for chunk_size in (1, 4, 100):
        cached = simcse_gradients(embed, batch, parameters, chunk_size=chunk_size)
        assert cached.loss.item() == pytest.approx(uncached.loss.item(), rel=1e-6)
        assert relative_error(flat(cached.grads, parameters), flat(uncached.grads, parameters)) < 1e-5


def test_any_embedding_loss_and_module() -> None:
    # A loss that couples rows (the squared norm of the mean embedding), on a plain linear encoder:
    # z = x Wᵀ, L = ‖mean_i z_i‖², dL/dW = 2 m x̄ᵀ with m = W x̄.
    linear = torch.nn.Linear(3, 2, bias=False, dtype=torch.float64)
    x = torch.randn(7, 3, dtype=torch.float64)
    result = embedding_gradients(lambda b: linear(b["x"]), {"x": x}, lambda z: z.mean(0).square().sum(),
                                 [linear.weight], chunk_size=3)
    mean_x = x.mean(0)
    assert torch.allclose(result.grads[0], 2 * torch.outer(linear.weight.detach() @ mean_x, mean_x))
    assert result.loss.item() == pytest.approx(float((linear.weight.detach() @ mean_x).square().sum()))


def test_low_precision_parameters_get_their_own_dtype_back() -> None:
    linear = torch.nn.Linear(4, 4, dtype=torch.bfloat16)
    result = embedding_gradients(lambda b: linear(b["x"]), {"x": torch.randn(6, 4, dtype=torch.bfloat16)},
                                 lambda z: z.float().square().mean(), list(linear.parameters()), chunk_size=2)
    assert [g.dtype for g in result.grads] == [torch.bfloat16, torch.bfloat16]


def test_a_chunk_size_below_one_is_refused() -> None:
    linear = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="chunk_size: 0"):
        embedding_gradients(lambda b: linear(b["x"]), {"x": torch.ones(2, 2)}, lambda z: z.sum(),
                            list(linear.parameters()), chunk_size=0)
