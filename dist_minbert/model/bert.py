"""MinBERT: the BERT encoder of Devlin et al. (2019) in plain PyTorch, top to bottom.

Parameter names are our own (one fused qkv projection per layer); Hugging Face names
exist only in checkpoint.py's adapter. No distributed code lives here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dist_minbert.model.dropout import Dropout, keep_factors

INIT_STD = 0.02  # BERT's initializer_range; only matters for encoders not loaded from a checkpoint


@dataclass(frozen=True)
class BertConfig:
    """Architecture hyper-parameters under Hugging Face's config.json names; defaults are HF's (bert-base)."""

    vocab_size: int = 30522  # WordPiece vocabulary size
    hidden_size: int = 768  # width H of every token vector
    num_hidden_layers: int = 12  # transformer blocks
    num_attention_heads: int = 12  # heads per block; must divide hidden_size
    intermediate_size: int = 3072  # inner width of each block's MLP
    max_position_embeddings: int = 512  # longest sequence the position table covers
    type_vocab_size: int = 2  # token types (segment A / segment B)
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon
    hidden_dropout_prob: float = 0.1  # dropout on the embeddings and on each sublayer's output
    attention_probs_dropout_prob: float = 0.1  # dropout on the attention weights
    hidden_act: Literal["gelu"] = "gelu"  # MLP activation: exact (erf) GELU, HF's "gelu"
    pad_token_id: int = 0  # id of [PAD]; its embedding row gets no gradient

    def __post_init__(self) -> None:
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act: {self.hidden_act!r} is not supported; allowed: gelu")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads: {self.num_attention_heads} does not divide hidden_size {self.hidden_size}; "
                "allowed: a divisor of hidden_size"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: {getattr(self, name)} is outside [0, 1); allowed: 0 <= p < 1")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> BertConfig:
        """Reads an HF config.json dict; keys we do not model are ignored unless they change the architecture."""
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"model_type: {d['model_type']!r} is not a BERT checkpoint; allowed: bert")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type: {d['position_embedding_type']!r} is not supported; allowed: absolute"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_hf_dict(self) -> dict[str, Any]:
        return {"model_type": "bert", **dataclasses.asdict(self)}


class BertOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, T, H); 0 at padding in a training step (never computed)
    pooler_output: torch.Tensor  # (B, H): tanh(dense(first token))


class TokenLayout(NamedTuple):
    """Which positions of the (B, T) grid the per-token layers compute: all, or only the real tokens.

    Everything but attention is per token, so padding (~45% of a CS224N batch at max_length 64)
    need not be computed; attention alone needs the grid, where padding keys are masked out.
    """

    batch: int
    length: int
    index: torch.Tensor | None  # (N,) flat positions b * T + t of the computed tokens; None = all B * T

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (B, T, C), zeros where no token was computed."""
        if self.index is None:
            return x.view(self.batch, self.length, -1)
        grid = x.new_zeros(self.batch * self.length, x.size(-1)).index_copy(0, self.index, x)
        return grid.view(self.batch, self.length, -1)

    def from_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)."""
        flat = x.reshape(self.batch * self.length, *x.shape[2:])
        return flat if self.index is None else flat.index_select(0, self.index)


class Embeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token vectors of any index shape (...,) -> (..., H)."""
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(positions)
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)  # query, key, value in one matmul
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, layout: TokenLayout) -> torch.Tensor:
        """x: (N, H) computed tokens -> (N, H)."""
        B, T, H = layout.batch, layout.length, x.size(-1)
        heads = layout.to_grid(self.qkv(x)).view(B, T, 3, self.num_heads, H // self.num_heads)
        q, k, v = heads.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs), views
        # softmax(q k^T / sqrt(hs)) v over real keys only; padding keys get weight exactly 0.
        scale = 1.0  # of the heads' outputs, applied in the projection's matmul
        if self.training and self.dropout_p > 0 and x.device.type == "cpu":
            y = _attention_with_dropout(q, k, v, key_mask, self.dropout_p)
            scale = 1.0 / (1.0 - self.dropout_p)
        else:  # CPU: the flash kernel; CUDA: its kernels, with their own dropout
            p = self.dropout_p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)  # (B, nh, T, hs)
        y = layout.from_grid(y.transpose(1, 2).reshape(B, T, H))  # (N, H): heads side by side
        return torch.addmm(self.proj.bias, y, self.proj.weight.t(), alpha=scale)  # self.proj(y · scale)


def _attention_with_dropout(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, p: float
) -> torch.Tensor:
    """SDPA's math path (which CPU SDPA takes too when dropout_p > 0) with dropout.py's masks, less the dropout's
    1/(1 - p): the caller scales the result. The weights are zeroed by one product each way, and no pass checks
    for rows with every key masked, which a BERT batch never has ([CLS] is real)."""
    B, nh, T, hs = q.shape
    q, k, v = (t.reshape(B * nh, T, hs) for t in (q, k, v))
    if key_mask is None:
        scores = torch.baddbmm(q.new_empty(()), q, k.transpose(1, 2), beta=0.0, alpha=hs**-0.5)
    else:
        bias = torch.zeros(B, 1, T, dtype=q.dtype, device=q.device).masked_fill_(~key_mask.view(B, 1, T), -torch.inf)
        scores = torch.baddbmm(bias.repeat_interleave(nh, 0), q, k.transpose(1, 2), alpha=hs**-0.5)
    weights = torch.softmax(scores, dim=-1)  # (B * nh, T, T)
    weights = weights * keep_factors(weights.shape, p, dtype=weights.dtype)  # kept: 1 (exact in any dtype)
    return torch.bmm(weights, v).view(B, nh, T, hs)


class MLP(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))  # exact erf GELU, as HF "gelu"


class Block(nn.Module):
    """Post-norm transformer layer, as in BERT: x = LN(x + Dropout(Sublayer(x)))."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(config)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, layout: TokenLayout) -> torch.Tensor:
        x = self.attn_norm(self.dropout(self.attn(x, key_mask, layout), residual=x))  # (N, H)
        return self.mlp_norm(self.dropout(self.mlp(x), residual=x))  # (N, H)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.apply(_init_weights)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) int64
        attention_mask: torch.Tensor,  # (B, T): 1 for real tokens, 0 for padding
        token_type_ids: torch.Tensor | None = None,  # (B, T); all segment A when None
    ) -> BertOutput:
        if input_ids.size(1) > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids: length {input_ids.size(1)} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}; allowed: at most that many tokens"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        B, T = input_ids.shape
        real = attention_mask.bool()  # (B, T)
        every_token_real = bool(real.all())  # a CPU-GPU sync point (nonzero() below another, when it runs)
        key_mask = None if every_token_real else real[:, None, None, :]  # (B, 1, 1, T): True where the key is real
        # A training step (train mode, autograd recording) skips padding: ~2x faster on CS224N batches, and
        # nothing reads those outputs. Otherwise every position is computed, exactly as BertModel does.
        skip_padding = self.training and torch.is_grad_enabled() and not every_token_real
        index = real.reshape(-1).nonzero().squeeze(1) if skip_padding else None  # (N,)
        layout = TokenLayout(B, T, index)
        positions = torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T)
        x = self.embeddings(*map(layout.from_grid, (input_ids, token_type_ids, positions)))  # (N, H)
        for layer in self.layers:
            x = layer(x, key_mask, layout)  # (N, H)
        hidden = layout.to_grid(x)  # (B, T, H)
        pooled = torch.tanh(self.pooler(hidden[:, 0]))  # (B, H): from the [CLS] position
        return BertOutput(hidden, pooled)


def _init_weights(module: nn.Module) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, zero [PAD] embedding, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=INIT_STD)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=INIT_STD)
        if module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])
