"""Checkpoint loading: HF key adapter, fsspec URLs, pytorch_model.bin, and errors that name the offending key."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import fsspec
import pytest
import safetensors.torch
import torch

from dist_minbert.model.bert import BertEncoder
from dist_minbert.model.checkpoint import CheckpointError, hf_to_native, load_encoder, native_to_hf, resolve_checkpoint

torch.set_num_threads(1)

EMBEDDED = Path(resolve_checkpoint("embedded"))


@pytest.fixture(scope="module")
def reference() -> BertEncoder:
    return load_encoder("embedded")


@pytest.fixture(scope="module")
def hf_state() -> dict[str, torch.Tensor]:
    """The embedded checkpoint's tensors under the names transformers saved them with."""
    return safetensors.torch.load_file(EMBEDDED / "model.safetensors")


def write_checkpoint(folder: Path, state: dict[str, torch.Tensor], config_overrides: dict | None = None) -> str:
    folder.mkdir(exist_ok=True)
    config = json.loads((EMBEDDED / "config.json").read_text()) | (config_overrides or {})
    (folder / "config.json").write_text(json.dumps(config))
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    return str(folder)


def assert_same_parameters(a: BertEncoder, b: BertEncoder) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_embedded_resolves_to_the_packaged_folder():
    assert (EMBEDDED / "config.json").is_file() and (EMBEDDED / "model.safetensors").is_file()
    assert resolve_checkpoint("s3://bucket/bert-base-uncased") == "s3://bucket/bert-base-uncased"


def test_loaded_parameters_equal_the_checkpoint_tensors(reference, hf_state):
    loaded = native_to_hf(reference.state_dict())
    assert loaded.keys() == hf_state.keys() - {"embeddings.position_ids"}
    assert all(torch.equal(loaded[k], hf_state[k].float()) for k in loaded)


def test_adapter_round_trips(hf_state, reference):
    native = hf_to_native(hf_state)
    assert native.keys() == reference.state_dict().keys()
    back = native_to_hf(native)
    assert back.keys() == hf_state.keys() - {"embeddings.position_ids"}
    assert all(torch.equal(back[k], hf_state[k]) for k in back)


def test_memory_url_loads_identical_parameters(reference):
    fs = fsspec.filesystem("memory")
    root = f"/ckpt-{uuid.uuid4().hex}"
    try:
        for name in ("config.json", "model.safetensors"):
            fs.pipe_file(f"{root}/{name}", (EMBEDDED / name).read_bytes())
        assert_same_parameters(load_encoder(f"memory://{root}"), reference)
    finally:
        fs.rm(root, recursive=True)


def test_pytorch_model_bin_with_prefix_legacy_names_and_heads(tmp_path, hf_state, reference):
    """bert-base-uncased's pytorch_model.bin layout: "bert." prefix, LayerNorm gamma/beta, MLM head; fp16 here."""
    legacy = {}
    for key, tensor in hf_state.items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        legacy[f"bert.{key}"] = tensor.half() if key.startswith("encoder.layer.5.") else tensor
    legacy["cls.predictions.bias"] = torch.zeros(30522)
    legacy["cls.seq_relationship.weight"] = torch.zeros(2, 384)
    shutil.copy(EMBEDDED / "config.json", tmp_path / "config.json")
    torch.save(legacy, tmp_path / "pytorch_model.bin")

    loaded = load_encoder(str(tmp_path))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    loaded_state, expected = loaded.state_dict(), reference.state_dict()
    for key, tensor in expected.items():  # layer 5 went through fp16, so it matches only to fp16 precision
        assert torch.allclose(loaded_state[key], tensor, atol=1e-3 if key.startswith("layers.5.") else 0.0), key


def test_safetensors_is_preferred_over_pytorch_model_bin(tmp_path, hf_state, reference):
    folder = write_checkpoint(tmp_path, hf_state)
    torch.save({"unrelated": torch.zeros(1)}, tmp_path / "pytorch_model.bin")  # would fail to load if chosen
    assert_same_parameters(load_encoder(folder), reference)


def test_missing_key_is_named_with_its_file(tmp_path, hf_state):
    state = dict(hf_state)
    del state["encoder.layer.3.attention.self.key.bias"]
    folder = write_checkpoint(tmp_path, state)
    expected = "model.safetensors: missing encoder keys: encoder.layer.3.attention.self.key.bias$"
    with pytest.raises(CheckpointError, match=expected):
        load_encoder(folder)


def test_unexpected_encoder_key_is_named(tmp_path, hf_state):
    state = dict(hf_state) | {"encoder.layer.0.attention.self.distance_embedding.weight": torch.zeros(3, 384)}
    folder = write_checkpoint(tmp_path, state)
    expected = "unexpected encoder keys: encoder.layer.0.attention.self.distance_embedding.weight$"
    with pytest.raises(CheckpointError, match=expected):
        load_encoder(folder)


def test_config_that_disagrees_with_the_weights_names_key_and_shapes(tmp_path, hf_state):
    folder = write_checkpoint(tmp_path, hf_state, {"vocab_size": 1000})
    expected = r"embeddings.word_embeddings.weight \(30522, 384\) \(config.json implies \(1000, 384\)\)"
    with pytest.raises(CheckpointError, match=expected):
        load_encoder(folder)


def test_unsupported_config_names_the_file(tmp_path, hf_state):
    folder = write_checkpoint(tmp_path, hf_state, {"hidden_act": "relu"})
    with pytest.raises(CheckpointError, match=r"config.json: hidden_act: 'relu'"):
        load_encoder(folder)


def test_folder_without_weights_is_an_error(tmp_path):
    shutil.copy(EMBEDDED / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no weights file; expected one of model.safetensors, pytorch_model.bin"):
        load_encoder(str(tmp_path))
