"""Batch assembly from token-id lists stored without special tokens.

Specials, truncation and padding happen here, per batch, so shards stay independent
of the encoding a task's head picks and each batch pads only to its own longest row.
Cross-encoding truncation reproduces the Hugging Face `tokenizers` pair rule
(longest-first), so a pair is cut exactly as `BertTokenizerFast(a, b, truncation=True)`
would cut it.
"""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING, Callable, Literal, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import torch

if TYPE_CHECKING:
    from dist_minbert.model.tokenizer import WordPieceTokenizer

Encoding = Literal["single", "bi", "cross"]


class Collated(NamedTuple):
    """A model-ready batch and how many of its rows lost tokens to truncation (for logging)."""

    tensors: dict[str, torch.Tensor]
    num_truncated: int


def collate(
    rows: dict[str, list] | pa.Table,
    encoding: Encoding,
    max_length: int,
    cls_id: int,
    sep_id: int,
    pad_id: int,
) -> Collated:
    """Build the batch keys of `encoding` from `rows` ("a", "b" for pairs, "label" when labelled).

    `rows` is column -> list (what sources' take() returns) or an Arrow table (take_table(),
    the fast path: token columns are read through their offsets, no Python ints). single/bi: [CLS] x [SEP] per sentence (bi: keys prefixed a_ / b_); cross:
    [CLS] a [SEP] b [SEP] with token type 1 on b and its [SEP]. All int64 (B, T),
    padded to the longest row of the batch; "labels" float32 (B,) when rows hold "label".
    """
    if isinstance(rows, pa.Table):
        rows = {name: rows.column(name).combine_chunks() for name in rows.column_names}
    if encoding == "cross":
        if max_length < 3:
            raise ValueError(f"max_length: {max_length} leaves no room for [CLS] a [SEP] b [SEP]; allowed: >= 3")
        a_flat, a_len = _flatten(rows["a"])
        b_flat, b_len = _flatten(rows["b"])
        a_keep, b_keep = longest_first_keep(a_len, b_len, max_length - 3)
        tensors = _cross(a_flat, a_len, a_keep, b_flat, b_len, b_keep, cls_id, sep_id, pad_id)
        num_truncated = int(np.count_nonzero((a_keep < a_len) | (b_keep < b_len)))
    elif encoding in ("single", "bi"):
        if max_length < 2:
            raise ValueError(f"max_length: {max_length} leaves no room for [CLS] x [SEP]; allowed: >= 2")
        sides = {"": rows["a"]} if encoding == "single" else {"a_": rows["a"], "b_": rows["b"]}
        tensors = {}
        truncated = np.zeros(len(rows["a"]), dtype=bool)
        for prefix, seqs in sides.items():
            flat, lengths = _flatten(seqs)
            keep = np.minimum(lengths, max_length - 2)
            truncated |= keep < lengths
            for key, value in _single(flat, lengths, keep, cls_id, sep_id, pad_id).items():
                tensors[prefix + key] = value
        num_truncated = int(np.count_nonzero(truncated))
    else:
        raise ValueError(f"encoding: {encoding!r} is unknown; allowed: 'single', 'bi', 'cross'")
    if "label" in rows:
        labels = rows["label"]
        labels = labels.to_numpy(zero_copy_only=False) if isinstance(labels, pa.Array) else labels
        tensors["labels"] = torch.as_tensor(np.asarray(labels, dtype=np.float32))
    return Collated(tensors, num_truncated)


def collator(tokenizer: WordPieceTokenizer, encoding: Encoding, max_length: int) -> Callable[..., Collated]:
    """collate() bound to a tokenizer's special ids: what a task's train, eval or predict loop calls per batch."""
    return lambda rows: collate(rows, encoding, max_length, tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id)


def longest_first_keep(a_len: np.ndarray, b_len: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens kept of each side of each pair so that a + b fits `budget` (HF `tokenizers` LongestFirst).

    The shorter side is kept whole if the longer can take the rest; otherwise both are cut to
    budget // 2, the longer side (b on a tie) getting the odd token.
    """
    a_is_short = a_len <= b_len
    short = np.minimum(a_len, b_len)
    long_keep = np.where(short > budget, short, np.maximum(short, budget - short))
    both_cut = short + long_keep > budget
    short_keep = np.where(both_cut, budget // 2, short)
    long_keep = np.where(both_cut, budget // 2 + budget % 2, long_keep)
    fits = a_len + b_len <= budget
    a_keep = np.where(fits, a_len, np.where(a_is_short, short_keep, long_keep))
    b_keep = np.where(fits, b_len, np.where(a_is_short, long_keep, short_keep))
    return np.minimum(a_keep, a_len), np.minimum(b_keep, b_len)


def _flatten(seqs: Sequence[Sequence[int]] | pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """All tokens of the rows back to back, and each row's count."""
    if isinstance(seqs, pa.ListArray):
        offsets = seqs.offsets.to_numpy()
        return seqs.values.to_numpy()[offsets[0]:offsets[-1]], np.diff(offsets).astype(np.int64)
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def _scatter(out: np.ndarray, flat: np.ndarray, lengths: np.ndarray, keep: np.ndarray, first_col: np.ndarray) -> None:
    """Write the first keep[i] tokens of row i into out[i, first_col[i]:] without a Python loop per row.

    The target cells, read row-major, are the kept tokens in order: one masked assignment.
    """
    if (keep < lengths).any():
        pos_in_row = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        flat = flat[pos_in_row < np.repeat(keep, lengths)]
    cols = np.arange(out.shape[1])[None, :]
    out[(cols >= first_col[:, None]) & (cols < (first_col + keep)[:, None])] = flat


def _single(flat, lengths, keep, cls_id, sep_id, pad_id) -> dict[str, torch.Tensor]:
    batch = lengths.size
    total = keep + 2
    width = int(total.max(initial=2))
    ids = np.full((batch, width), pad_id, dtype=np.int64)
    ids[:, 0] = cls_id
    _scatter(ids, flat, lengths, keep, np.ones(batch, dtype=np.int64))
    ids[np.arange(batch), keep + 1] = sep_id
    cols = np.arange(width)[None, :]
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy((cols < total[:, None]).astype(np.int64)),
        "token_type_ids": torch.zeros((batch, width), dtype=torch.int64),
    }


def _cross(a_flat, a_len, a_keep, b_flat, b_len, b_keep, cls_id, sep_id, pad_id) -> dict[str, torch.Tensor]:
    batch = a_len.size
    b_start = a_keep + 2
    total = b_start + b_keep + 1
    width = int(total.max(initial=3))
    ids = np.full((batch, width), pad_id, dtype=np.int64)
    ids[:, 0] = cls_id
    _scatter(ids, a_flat, a_len, a_keep, np.ones(batch, dtype=np.int64))
    ids[np.arange(batch), a_keep + 1] = sep_id
    _scatter(ids, b_flat, b_len, b_keep, b_start)
    ids[np.arange(batch), total - 1] = sep_id
    cols = np.arange(width)[None, :]
    real = cols < total[:, None]
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(real.astype(np.int64)),
        "token_type_ids": torch.from_numpy((real & (cols >= b_start[:, None])).astype(np.int64)),
    }
