"""The model section of a run config: which checkpoint to fine-tune and how texts become vectors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Pooling = Literal["cls", "pooler", "mean"]


@dataclass
class ModelConfig:
    """Encoder settings; the architecture itself comes from the checkpoint's config.json."""

    checkpoint: str = "embedded"  # HF BERT folder: local path or fsspec URL; "embedded" = bundled all-MiniLM-L6-v2
    dropout: float = 0.1  # hidden and attention dropout probability; overrides the checkpoint's
    max_length: int = 128  # tokens per encoded input, [CLS]/[SEP] included
    pooling: Pooling = "cls"  # sentence vector: [CLS] state, pooler output (tanh dense on it), or mean of real tokens

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError('checkpoint: is empty; allowed: a folder path, an fsspec URL, or "embedded"')
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: {self.dropout} is outside [0, 1); allowed: 0 <= dropout < 1")
        if self.max_length < 3:
            raise ValueError(
                f"max_length: {self.max_length} leaves no room for [CLS] a [SEP] b [SEP]; allowed: an integer >= 3"
            )
