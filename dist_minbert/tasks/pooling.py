"""Encoder output → one vector per sequence; shared by the task heads and SimCSE."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor


def _cls(output: Any, attention_mask: Tensor) -> Tensor:
    return output.last_hidden_state[:, 0]  # (B, H)


def _pooler(output: Any, attention_mask: Tensor) -> Tensor:
    return output.pooler_output  # (B, H)


def _mean(output: Any, attention_mask: Tensor) -> Tensor:
    hidden = output.last_hidden_state  # (B, T, H)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1); padding must not count
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


# Name → fn(BertOutput, attention_mask) -> (B, H).
POOLINGS: dict[str, Callable[[Any, Tensor], Tensor]] = {"cls": _cls, "pooler": _pooler, "mean": _mean}
