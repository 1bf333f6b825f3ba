"""The encoder SimCSE trains: a BERT encoder, a pooling, and (unsupervised SimCSE's setting) an MLP over
[CLS] used only in training — evaluation and export take the [CLS] state without it."""
from __future__ import annotations

from torch import Tensor, nn

from dist_minbert.model.bert import BertEncoder
from dist_minbert.tasks.pooling import POOLINGS


class SentenceEncoder(nn.Module):
    def __init__(self, encoder: BertEncoder, pooling: str) -> None:
        """`pooling`: cls_mlp (the MLP in training), cls or mean (see contrastive/config.py)."""
        super().__init__()
        self.encoder = encoder
        self.pooling = "mean" if pooling == "mean" else "cls"
        hidden = encoder.config.hidden_size
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()) if pooling == "cls_mlp" else None

    def shared_parameters(self) -> list[nn.Parameter]:
        """The encoder's (optim.lr); the training MLP is a head (optim.head_lr), as in MultitaskModel."""
        return list(self.encoder.parameters())

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, H) training embeddings of single-sentence rows ([CLS] text [SEP])."""
        mask = batch["attention_mask"]
        pooled = POOLINGS[self.pooling](self.encoder(batch["input_ids"], mask, batch.get("token_type_ids")), mask)
        return self.mlp(pooled) if self.mlp is not None else pooled
