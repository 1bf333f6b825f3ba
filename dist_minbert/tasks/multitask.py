"""One shared encoder, one head per task; losses and predictions follow each task's objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_minbert.contrastive.loss import simcse_loss
from dist_minbert.model.bert import BertEncoder
from dist_minbert.tasks.config import TaskConfig, encoding_for, objective_for
from dist_minbert.tasks.heads import HEADS
from dist_minbert.tasks.pooling import POOLINGS

_LOSSES = {
    "ce": lambda outputs, labels: F.cross_entropy(outputs, labels.long()),
    "bce": F.binary_cross_entropy_with_logits,
    "mse": F.mse_loss,
}


class MultitaskModel(nn.Module):
    def __init__(self, encoder: BertEncoder, tasks: dict[str, TaskConfig], pooling: str) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: {pooling!r} is not a pooling; allowed: {', '.join(POOLINGS)}")
        self.encoder = encoder
        self.tasks = dict(tasks)
        self.pooling = pooling
        hidden, dropout = encoder.config.hidden_size, encoder.config.hidden_dropout_prob
        self.heads = nn.ModuleDict({name: HEADS[task.head](task, hidden, dropout) for name, task in self.tasks.items()})

    def _pooled(self, batch: dict[str, Tensor], prefix: str = "") -> Tensor:
        mask = batch[f"{prefix}attention_mask"]
        output = self.encoder(batch[f"{prefix}input_ids"], mask, batch.get(f"{prefix}token_type_ids"))
        return POOLINGS[self.pooling](output, mask)  # (B, H)

    def forward(self, task: str, batch: dict[str, Tensor]) -> Tensor:
        """Raw outputs: (B, C) logits for CE, (B,) for a BCE logit or a regression score; for a contrastive task
        (2B, H), the embeddings of the batch encoded twice in one pass (independent dropout masks: two views)."""
        head = self.heads[task]
        if self.tasks[task].kind == "contrastive":
            return head(self._pooled({key: torch.cat([value, value]) for key, value in batch.items()}))
        if encoding_for(self.tasks[task]) == "bi":
            # Two encoder passes: each text is padded only to its own longest row.
            return head(self._pooled(batch, "a_"), self._pooled(batch, "b_"))
        return head(self._pooled(batch))

    def loss(self, task: str, outputs: Tensor, labels: Tensor | None) -> Tensor:
        """Mean loss over the batch, unweighted: the caller applies TaskConfig.weight. A contrastive task's is
        SimCSE's loss (3) against every rank's views (a collective: every rank computes it in the same step)."""
        config = self.tasks[task]
        if config.kind == "contrastive":
            first, second = outputs.chunk(2)  # (B, H) each: the two views
            return simcse_loss(first, second, config.temperature)
        return _LOSSES[objective_for(config)](outputs, labels)

    def predict(self, task: str, outputs: Tensor) -> Tensor:
        """Outputs → label space: class index (int64), or the score clipped to label_range."""
        config = self.tasks[task]
        objective = objective_for(config)
        if objective == "ce":
            return outputs.argmax(dim=-1)
        if objective == "bce":
            return (outputs > 0).long()  # sigmoid(x) > 0.5 without computing it
        lo, hi = config.label_range
        return outputs.clamp(lo, hi)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The encoder's parameters, which every task's gradient touches (what gradient surgery combines)."""
        return list(self.encoder.parameters())

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Parameters of one task's head (possibly none: bi_cosine regression has no weights)."""
        return list(self.heads[task].parameters())
