"""Our sentence embedding, and `export --format sentence-transformers` checked with the real library.

Two oracles: the embedded all-MiniLM-L6-v2 package is itself a sentence-transformers folder (mean pooling,
then Normalize), so the library's own encode() of it checks embed_sentences; then each pooling's export of a
moved encoder must encode as embed_sentences does. Nothing is trained; nothing may reach the network.
"""

from __future__ import annotations

import json

import pytest
import torch

from dist_minbert.model.bert import BertEncoder
from dist_minbert.model.checkpoint import load_encoder, resolve_checkpoint
from dist_minbert.model.export_sentence_transformers import export_sentence_transformers
from dist_minbert.model.tokenizer import WordPieceTokenizer
from dist_minbert.tasks.sentence_embedding import embed_sentences

torch.set_num_threads(1)

TEXTS = [
    "A very funny movie.",
    "Why do people ask questions on Quora that could be easily answered by Google?",
    "No.",
    "Two dogs are running through a field of tall grass.",
    "Ünïcödé ☃ works",
    "x " * 200,  # 200 tokens: cut to max_length by both
]
MAX_LENGTH = 32


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for the library, also where huggingface_hub was imported (and read it) before this test."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tokenizer() -> WordPieceTokenizer:
    return WordPieceTokenizer.from_checkpoint("embedded")


@pytest.fixture(scope="module")
def moved() -> BertEncoder:
    """The embedded encoder with every parameter moved (the pooler too), standing in for a fine-tuned one."""
    encoder = load_encoder("embedded", dropout=0.1).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    return encoder


def sentence_transformer(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu", local_files_only=True)


def test_embed_sentences_is_what_the_shipped_all_minilm_encodes(tokenizer):
    shipped = sentence_transformer(resolve_checkpoint("embedded"))  # Transformer(max 256), Pooling(mean), Normalize
    texts = TEXTS[:-1]  # under its max_seq_length of 256
    expected = shipped.encode(texts, convert_to_tensor=True, batch_size=4)
    ours = embed_sentences(load_encoder("embedded"), tokenizer, texts, "mean", max_length=256, batch_size=3)
    assert (torch.nn.functional.normalize(ours, dim=-1) - expected).abs().max() < 1e-5
    assert not torch.allclose(ours.norm(dim=-1), torch.ones(len(texts)))  # ours is not normalised


def test_embed_sentences_does_not_depend_on_batching_and_keeps_train_mode(moved, tokenizer):
    moved.train()
    together = embed_sentences(moved, tokenizer, TEXTS, "mean", MAX_LENGTH, batch_size=64)
    assert moved.training  # put back
    moved.eval()
    alone = torch.cat([embed_sentences(moved, tokenizer, [text], "mean", MAX_LENGTH) for text in TEXTS])
    assert together.shape == (len(TEXTS), moved.config.hidden_size)
    assert (together - alone).abs().max() < 1e-5  # shortest-first batches are put back in input order
    with pytest.raises(ValueError, match="allowed: cls, pooler, mean"):
        embed_sentences(moved, tokenizer, TEXTS, "max", MAX_LENGTH)


@pytest.mark.parametrize("pooling, modules", [
    ("cls", ["Transformer", "Pooling"]),
    ("mean", ["Transformer", "Pooling"]),
    ("pooler", ["Transformer", "Pooling", "Dense"]),  # tanh(W h_[CLS] + b) as a Dense on the [CLS] pooling
])
def test_sentence_transformer_encodes_our_embedding(moved, tokenizer, tmp_path, pooling, modules):
    export_sentence_transformers(moved, "embedded", str(tmp_path), pooling, MAX_LENGTH)
    written = json.loads((tmp_path / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in written] == modules  # no Normalize: ours is not normalised
    assert written[0]["path"] == ""  # the Transformer in the root, as sentence-transformers saves it

    model = sentence_transformer(tmp_path)
    assert model.max_seq_length == MAX_LENGTH
    expected = embed_sentences(moved, tokenizer, TEXTS, pooling, MAX_LENGTH, batch_size=4)
    encoded = model.encode(TEXTS, convert_to_tensor=True, batch_size=3)
    assert (encoded - expected).abs().max() < 1e-5
    others = {other: embed_sentences(moved, tokenizer, TEXTS, other, MAX_LENGTH) for other in ("cls", "mean", "pooler")}
    assert all((encoded - vectors).abs().max() > 1e-3 for other, vectors in others.items() if other != pooling)


def test_the_folder_is_also_a_hugging_face_bert_checkpoint(moved, tmp_path):
    export_sentence_transformers(moved, "embedded", str(tmp_path), "mean", MAX_LENGTH)
    loaded = load_encoder(str(tmp_path))  # what model.checkpoint reads
    expected = moved.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in loaded.state_dict().items())


def test_bad_pooling_or_length_is_refused_before_writing(moved, tmp_path):
    with pytest.raises(ValueError, match="allowed: cls, mean, pooler"):
        export_sentence_transformers(moved, "embedded", str(tmp_path / "a"), "max", MAX_LENGTH)
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        export_sentence_transformers(moved, "embedded", str(tmp_path / "b"), "cls", 513)
    assert list(tmp_path.iterdir()) == []
