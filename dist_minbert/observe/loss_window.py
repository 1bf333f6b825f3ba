"""Per-task losses and throughput between two log writes, combined over ranks when drained."""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist


def num_tokens(micro_batches: list[dict]) -> int:
    """The real (non-pad) tokens of a step's batches on this rank: the sum of every attention mask, so a
    bi-encoder pair counts both its sentences (`a_attention_mask`, `b_attention_mask`)."""
    return sum(int(tensor.sum()) for batches in micro_batches for collated in batches.values()
               for key, tensor in collated.tensors.items() if key.endswith("attention_mask"))


class LossWindow:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        """device: where the drain's all-reduce buffer lives (this rank's device: NCCL reduces CUDA tensors only)."""
        self.device = device
        self.run_tokens = 0  # this rank's tokens over the run (summary.json's tokens_per_s)
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.samples, self.tokens, self.seconds = 0, 0, 0.0

    def add(self, losses: dict[str, float], samples: int, tokens: int, seconds: float) -> None:
        """One step: its per-task losses on this rank, its global samples, this rank's non-pad tokens and its
        seconds (data wait included)."""
        for task, loss in losses.items():
            self.sums[task] += loss
            self.counts[task] += 1
        self.samples += samples
        self.tokens += tokens
        self.run_tokens += tokens
        self.seconds += seconds

    def drain(self) -> dict[str, float]:
        """`loss/<task>` (mean over steps and ranks), `throughput/samples_per_s` and `throughput/tokens_per_s`
        (every rank's tokens over this rank's seconds); empties the window.

        Collective: one small all-reduce, of the losses (ranks see disjoint samples, so their mean is the step's
        loss) and of the token count (each rank counts only its own batches), in one buffer.
        """
        tasks = sorted(self.sums)
        values = torch.tensor([self.sums[t] / self.counts[t] for t in tasks] + [self.tokens], dtype=torch.float64,
                              device=self.device)
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        if world_size > 1:
            dist.all_reduce(values)
        values = values.cpu()
        out = {f"loss/{t}": float(v) / world_size for t, v in zip(tasks, values)}
        out["throughput/samples_per_s"] = self.samples / self.seconds if self.seconds else 0.0
        out["throughput/tokens_per_s"] = float(values[-1]) / self.seconds if self.seconds else 0.0
        self._reset()
        return out
