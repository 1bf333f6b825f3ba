"""Export a (fine-tuned) encoder as a Hugging Face BertModel folder, loadable by AutoModel/AutoTokenizer."""

from __future__ import annotations

import json

import safetensors.torch

from dist_minbert.model.bert import BertEncoder
from dist_minbert.model.checkpoint import native_to_hf
from dist_minbert.model.folder import Folder
from dist_minbert.model.tokenizer import WordPieceTokenizer


def export_hf(encoder: BertEncoder, tokenizer_source: str, out_dir: str) -> None:
    """Writes config.json, model.safetensors (HF names) and the tokenizer files of `tokenizer_source` to out_dir."""
    folder = Folder(out_dir)
    config = {**encoder.config.to_hf_dict(), "architectures": ["BertModel"]}
    folder.write_text("config.json", json.dumps(config, indent=2))
    # clone(): safetensors refuses tensors that share storage, as the q/k/v views of one fused qkv do.
    tensors = {k: v.detach().cpu().clone() for k, v in native_to_hf(encoder.state_dict()).items()}
    folder.write_bytes("model.safetensors", safetensors.torch.save(tensors, metadata={"format": "pt"}))
    WordPieceTokenizer.from_checkpoint(tokenizer_source).save(out_dir)
