"""WordPieceTokenizer: ids equal to HF `tokenizers` without specials, vocab.txt fallback, fsspec, fingerprint."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import fsspec
import pytest
from tokenizers import Tokenizer

from dist_minbert.model.checkpoint import resolve_checkpoint
from dist_minbert.model.tokenizer import WordPieceTokenizer

EMBEDDED = Path(resolve_checkpoint("embedded"))
LONG = " ".join(["The film's unflinching portrait of grief is, frankly, extraordinary."] * 20)
TEXTS = [
    "It's a lovely film with lovely performances by Buy and Accorsi.",
    "What is the best way to learn Python?",
    "Naïve café RÉSUMÉ — Ünïcödé façade",  # accents: stripped because the vocab is uncased
    "東京タワー is tall 😀",  # CJK characters split one by one; emoji -> [UNK]
    "He said [SEP] twice [SEP]",  # a literal special token in the text
    "  multiple   spaces\tand\ttabs\n",
    "",
    LONG,  # longer than the 128 tokens tokenizer.json would truncate to
]


@pytest.fixture(scope="module")
def tokenizer() -> WordPieceTokenizer:
    return WordPieceTokenizer.from_checkpoint("embedded")


def copy_files(folder: Path, *names: str) -> str:
    folder.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(EMBEDDED / name, folder / name)
    return str(folder)


def test_encode_equals_hf_tokenizers_without_special_tokens(tokenizer):
    reference = Tokenizer.from_file(str(EMBEDDED / "tokenizer.json"))
    reference.no_truncation()
    reference.no_padding()
    expected = [e.ids for e in reference.encode_batch(TEXTS, add_special_tokens=False)]
    ids = tokenizer.encode(TEXTS)
    assert ids == expected
    assert len(ids[-1]) > 128 and ids[TEXTS.index("")] == []
    assert all(tokenizer.cls_id not in row for row in ids)


def test_special_ids_and_vocab_size(tokenizer):
    assert (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.vocab_size) == (101, 102, 0, 30522)


def test_vocab_txt_alone_gives_the_same_tokenizer(tmp_path, tokenizer):
    from_vocab = WordPieceTokenizer.from_checkpoint(copy_files(tmp_path, "vocab.txt"))
    assert from_vocab.encode(TEXTS) == tokenizer.encode(TEXTS)
    assert from_vocab.fingerprint == tokenizer.fingerprint
    assert (from_vocab.cls_id, from_vocab.sep_id, from_vocab.pad_id) == (101, 102, 0)


def test_memory_url(tokenizer):
    fs = fsspec.filesystem("memory")
    root = f"/tok-{uuid.uuid4().hex}"
    try:
        fs.pipe_file(f"{root}/tokenizer.json", (EMBEDDED / "tokenizer.json").read_bytes())
        loaded = WordPieceTokenizer.from_checkpoint(f"memory://{root}")
        assert loaded.encode(TEXTS) == tokenizer.encode(TEXTS)
    finally:
        fs.rm(root, recursive=True)


def test_fingerprint_is_stable_and_tracks_vocab_and_casing(tmp_path, tokenizer):
    assert len(tokenizer.fingerprint) == 64
    assert WordPieceTokenizer.from_checkpoint("embedded").fingerprint == tokenizer.fingerprint

    swapped = tmp_path / "swapped"
    swapped.mkdir()
    lines = (EMBEDDED / "vocab.txt").read_text(encoding="utf-8").split("\n")
    lines[2000], lines[2001] = lines[2001], lines[2000]  # two ordinary words trade ids
    (swapped / "vocab.txt").write_text("\n".join(lines), encoding="utf-8")
    assert WordPieceTokenizer.from_checkpoint(str(swapped)).fingerprint != tokenizer.fingerprint

    cased = copy_files(tmp_path / "cased", "vocab.txt")
    (tmp_path / "cased" / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    cased_tokenizer = WordPieceTokenizer.from_checkpoint(cased)
    assert cased_tokenizer.fingerprint != tokenizer.fingerprint
    assert cased_tokenizer.encode(["Hello"]) != tokenizer.encode(["Hello"])


def test_save_writes_a_loadable_equivalent(tmp_path, tokenizer):
    tokenizer.save(str(tmp_path / "out"))
    saved = WordPieceTokenizer.from_checkpoint(str(tmp_path / "out"))
    assert saved.fingerprint == tokenizer.fingerprint
    assert saved.encode(TEXTS) == tokenizer.encode(TEXTS)
    # vocab.txt alone (without tokenizer.json) must rebuild the same ids too
    (tmp_path / "out" / "tokenizer.json").unlink()
    assert WordPieceTokenizer.from_checkpoint(str(tmp_path / "out")).fingerprint == tokenizer.fingerprint


def test_folder_without_tokenizer_files_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt"):
        WordPieceTokenizer.from_checkpoint(str(tmp_path))
