"""GradCache (Gao et al. 2021): a contrastive batch as large as wanted, in the memory of one chunk.

A contrastive loss couples every row of the batch, so it cannot be split into micro-batches whose
gradients add up. GradCache splits the encoder instead, in two passes over chunks of rows:
  1. embed every chunk keeping no activations; the loss of all the embeddings together and its gradient
     with respect to them, dL/dz (M, H), are cheap (the cross-rank gather's backward runs here);
  2. re-embed each chunk with a graph and the same dropout masks, and backpropagate dL/dz of its rows:
     by the chain rule Σ_chunks (dz_c/dθ)ᵀ dL/dz_c = dL/dθ, exactly.
The masks are the same because each chunk's RNG state (CPU, and CUDA on GPU) is saved before pass 1
and restored before pass 2. The cost is a second forward.

Both paths return parameter gradients from torch.autograd.grad, never .grad, so DeepSpeed's hooks fire
nowhere; the caller hands them over through a linear surrogate (engine/step_gradients.py::_HandOver),
which is how GradCache enters DeepSpeed at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from dist_minbert.contrastive.loss import TEMPERATURE, Negatives, simcse_loss

Batch = dict[str, Tensor]  # every value has the batch's rows on dim 0 (input_ids, attention_mask, ...)
Embed = Callable[[Batch], Tensor]  # B rows -> (B, H), the encoder in train mode (dropout on)
EmbeddingLoss = Callable[[Tensor], Tensor]  # (M, H) all of this rank's embeddings -> this rank's loss ()


class LossAndGradients(NamedTuple):
    loss: Tensor  # (), detached: this rank's loss
    grads: list[Tensor | None]  # d loss / d p for each parameter, in its dtype; None where the loss never reaches p


def simcse_gradients(embed: Embed, batch: Batch, parameters: list[Tensor], *, temperature: float = TEMPERATURE,
                     negatives: Negatives = "global", chunk_size: int | None = None,
                     group: dist.ProcessGroup | None = None) -> LossAndGradients:
    """SimCSE's loss (3) on this rank's B sentences and its parameter gradients.

    Each sentence is encoded twice in one forward over the doubled batch (rows i and B + i), so the two
    views get independent dropout masks. `chunk_size` (rows of the doubled batch per forward) turns
    GradCache on; None is one forward and one backward. See loss.py for the loss's scale across ranks.
    """
    views = {key: torch.cat([value, value]) for key, value in batch.items()}  # 2B rows: the batch, twice

    def loss_of(z: Tensor) -> Tensor:
        first, second = z.chunk(2)  # (B, H) each: z_i and z'_i
        return simcse_loss(first, second, temperature, negatives, group)

    return embedding_gradients(embed, views, loss_of, parameters, chunk_size)


def embedding_gradients(embed: Embed, batch: Batch, loss_of: EmbeddingLoss, parameters: list[Tensor],
                        chunk_size: int | None = None) -> LossAndGradients:
    """loss_of(embed(batch)) and its gradient w.r.t. `parameters`; with `chunk_size`, through GradCache.

    On N ranks every rank calls it at the same time (loss_of may hold collectives). With dropout on, each
    chunk draws its own masks, so two chunk sizes give two different (equally valid) draws; one chunk
    holding the whole batch draws exactly the uncached path's masks from the same RNG state.
    """
    if chunk_size is None:
        z = embed(batch)  # (M, H)
        loss = loss_of(z)
        return LossAndGradients(loss.detach(), list(torch.autograd.grad(loss, parameters, allow_unused=True)))
    if chunk_size < 1:
        raise ValueError(f"chunk_size: {chunk_size} is not positive; allowed: a positive number of rows, or None")
    num_rows = len(next(iter(batch.values())))
    chunks = [{key: value[start:start + chunk_size] for key, value in batch.items()}
              for start in range(0, num_rows, chunk_size)]
    devices = sorted({p.get_device() for p in parameters if p.is_cuda})

    # Pass 1: embeddings without activations; the RNG state before each chunk is kept for pass 2.
    states, pieces = [], []
    for chunk in chunks:
        states.append(_RngState.capture(devices))
        with _recording_nothing():
            pieces.append(embed(chunk).detach())  # (C, H)
    z = torch.cat(pieces).requires_grad_()  # (M, H), a leaf: the loss's graph stops here
    del pieces
    loss = loss_of(z)
    (z_grad,) = torch.autograd.grad(loss, z)  # (M, H): dL/dz, every rank's loss terms included

    # Pass 2: each chunk again, with a graph and the masks of pass 1, backpropagating its rows of dL/dz.
    # Sums in fp32 under bf16/fp16 parameters: a sum over many chunks would round at every addition.
    summed: list[Tensor | None] = [None] * len(parameters)
    start = 0
    with torch.random.fork_rng(devices=devices):  # the RNG continues from where pass 1 left it
        for chunk, state in zip(chunks, states):
            state.restore()
            piece = embed(chunk)  # (C, H), as in pass 1
            grads = torch.autograd.grad(piece, parameters, grad_outputs=z_grad[start:start + len(piece)],
                                        allow_unused=True)
            start += len(piece)
            for i, grad in enumerate(grads):
                if grad is not None:
                    grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
                    summed[i] = grad if summed[i] is None else summed[i].add_(grad)
            del piece, grads
    return LossAndGradients(loss.detach(), [None if g is None else g.to(p.dtype) for g, p in zip(summed, parameters)])


class _RngState(NamedTuple):
    """What dropout draws from: the CPU generator and, on GPU, each device's generator."""

    cpu: Tensor
    cuda: list[Tensor]
    devices: list[int]

    @classmethod
    def capture(cls, devices: list[int]) -> _RngState:
        return cls(torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices], devices)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in zip(self.devices, self.cuda):
            torch.cuda.set_rng_state(state, device)


@contextmanager
def _recording_nothing() -> Iterator[None]:
    """Autograd records, but saves no tensor for backward, so no activation outlives its use.

    Not no_grad itself: the encoder skips padding only while autograd records (model/bert.py), and its
    dropout masks are drawn over the computed tokens, so a no_grad pass 1 would draw other masks than
    pass 2 (a test shows the gradient then goes wrong). Under this, pass 1 takes pass 2's path. Measured
    on MiniLM, chunks of 64×32 on CPU: a chunk's peak is ~0.3× that of a forward keeping its graph (~2.5× a
    no_grad one's, the padding-skipping path's copies), so pass 2 on the same chunk sets the peak, not this.
    """
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: None, _unreachable):
        yield


def _unreachable(packed: None) -> Tensor:
    raise RuntimeError("GradCache's first pass keeps no activations; nothing may backpropagate through it")
