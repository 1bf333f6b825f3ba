"""FLOPs of a BERT encoder's forward pass: the count behind the benches' FLOP/s, MFU and projections."""
from __future__ import annotations


def forward_flops_per_token(bert: dict, length: float) -> float:
    """FLOPs of one token through every layer (2 per multiply-add), in a sequence of `length` tokens.

    Per layer: 2·(4H² + 2HI) in the projections and the MLP, 4·T·H in attention (scores and weighted sum over
    T keys); embeddings, norms, the pooler and losses are left out (< 1%). A training step costs 3× the
    forward (the backward computes two products per forward one).
    """
    hidden, inner, layers = bert["hidden_size"], bert["intermediate_size"], bert["num_hidden_layers"]
    return layers * (2 * (4 * hidden**2 + 2 * hidden * inner) + 4 * length * hidden)
