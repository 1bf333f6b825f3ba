"""export_hf: the exported folder loads in transformers (AutoModel, AutoTokenizer) and reproduces our encoder."""

from __future__ import annotations

import json
import uuid

import fsspec
import pytest
import torch
import transformers

from dist_minbert.model.bert import BertEncoder
from dist_minbert.model.checkpoint import load_encoder
from dist_minbert.model.export import export_hf
from dist_minbert.model.tokenizer import WordPieceTokenizer

torch.set_num_threads(1)

PAIRS = [
    ("A very funny movie.", "Two dogs are running through a field of tall grass."),
    ("Why do people ask questions on Quora that could be easily answered by Google?", "No."),
]


@pytest.fixture(scope="module")
def fine_tuned() -> BertEncoder:
    """The embedded encoder with every parameter moved, standing in for a fine-tuned one."""
    encoder = load_encoder("embedded", dropout=0.2).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    return encoder


def test_automodel_reproduces_the_exported_encoder(tmp_path, fine_tuned):
    export_hf(fine_tuned, "embedded", str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertModel"]
    assert config["hidden_dropout_prob"] == config["attention_probs_dropout_prob"] == 0.2

    model = transformers.AutoModel.from_pretrained(tmp_path).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(model, transformers.BertModel)
    a, b = zip(*PAIRS)
    batch = dict(hf_tokenizer(list(a), list(b), padding=True, return_tensors="pt"))
    with torch.no_grad():
        expected = model(**batch)
        ours = fine_tuned(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert (ours.last_hidden_state - expected.last_hidden_state).abs().max() < 1e-5
    assert (ours.pooler_output - expected.pooler_output).abs().max() < 1e-5


def test_autotokenizer_adds_specials_around_our_ids(tmp_path):
    ours = WordPieceTokenizer.from_checkpoint("embedded")
    export_hf(load_encoder("embedded"), "embedded", str(tmp_path))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    a, b = PAIRS[1]
    ids_a, ids_b = ours.encode([a, b])
    encoded = hf_tokenizer(a, b)
    assert encoded["input_ids"] == [ours.cls_id, *ids_a, ours.sep_id, *ids_b, ours.sep_id]
    assert encoded["token_type_ids"] == [0] * (len(ids_a) + 2) + [1] * (len(ids_b) + 1)


def test_export_to_fsspec_url_round_trips(fine_tuned):
    fs = fsspec.filesystem("memory")
    root = f"/export-{uuid.uuid4().hex}"
    try:
        export_hf(fine_tuned, "embedded", f"memory://{root}")
        assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= {
            path.rsplit("/", 1)[1] for path in fs.ls(root, detail=False)
        }
        loaded = load_encoder(f"memory://{root}")
        assert loaded.config == fine_tuned.config
        expected = fine_tuned.state_dict()
        assert all(torch.equal(t, expected[k]) for k, t in loaded.state_dict().items())
        assert WordPieceTokenizer.from_checkpoint(f"memory://{root}").fingerprint == (
            WordPieceTokenizer.from_checkpoint("embedded").fingerprint
        )
    finally:
        fs.rm(root, recursive=True)
