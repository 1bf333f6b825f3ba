"""Our sentence embedding: each text encoded alone as [CLS] text [SEP] and pooled, the vector the bi-encoder
heads compare, SimCSE trains and `export --format sentence-transformers` reproduces.

Embeddings are not normalised: the heads and the STS evaluation take cosines, which ignore length.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from dist_minbert.data.collate import collate
from dist_minbert.model.bert import BertEncoder
from dist_minbert.model.tokenizer import WordPieceTokenizer
from dist_minbert.tasks.pooling import POOLINGS


@torch.no_grad()
def embed_sentences(encoder: BertEncoder, tokenizer: WordPieceTokenizer, texts: Sequence[str], pooling: str,
                    max_length: int, batch_size: int = 64) -> Tensor:
    """(N, H) float32 on the CPU, row i the embedding of texts[i]; the encoder runs where its parameters are.

    A text keeps its first max_length - 2 WordPiece tokens. Batches are formed shortest first, so each pads
    only to rows of its own length; padding changes no real token's output (attention masks it out),
    only the summation order, below 1e-6. The encoder runs in eval mode (no dropout) and is put back.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: {pooling!r} is not a pooling; allowed: {', '.join(POOLINGS)}")
    device = next(encoder.parameters()).device
    ids = tokenizer.encode(list(texts))
    by_length = np.argsort([len(row) for row in ids], kind="stable")
    out = torch.zeros(len(ids), encoder.config.hidden_size)
    was_training = encoder.training
    encoder.eval()
    try:
        for start in range(0, len(ids), batch_size):
            chosen = by_length[start:start + batch_size]
            batch = collate({"a": [ids[i] for i in chosen]}, "single", max_length,
                            tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id).tensors
            batch = {key: value.to(device) for key, value in batch.items()}
            output = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            out[torch.from_numpy(chosen)] = POOLINGS[pooling](output, batch["attention_mask"]).float().cpu()
    finally:
        encoder.train(was_training)
    return out
