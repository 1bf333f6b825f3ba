"""Export an encoder as a sentence-transformers folder: `SentenceTransformer(DIR).encode` gives our embedding.

The layout is the one sentence-transformers itself saves (and the embedded all-MiniLM-L6-v2 ships in):
the Transformer module in the folder's root, so the folder is at the same time the Hugging Face BERT folder
`export_hf` writes (AutoModel, and our own `model.checkpoint`, read it), then a Pooling module, then for
`pooler` a Dense one. Only plain JSON and safetensors are written; sentence-transformers is not needed to
export, only to load. Each `model.pooling` maps to modules that compute exactly our vector
(dist_minbert/tasks/sentence_embedding.py):

- `cls`    → Pooling(cls): the [CLS] token's last hidden state;
- `mean`   → Pooling(mean): the mean of the real tokens' states (padding masked out);
- `pooler` → Pooling(cls), then Dense(H → H, tanh) holding the encoder's pooler weights: BERT's pooler
  output is tanh(W h_[CLS] + b), which is what that Dense computes on the [CLS] state.

No Normalize module: our embeddings are not normalised (the heads and the STS evaluation take cosines).
The Transformer's max_seq_length is the run's model.max_length, so a long text is cut as our collate cuts it.
"""

from __future__ import annotations

import json

import safetensors.torch

from dist_minbert.model.bert import BertEncoder
from dist_minbert.model.export import export_hf
from dist_minbert.model.folder import Folder

# model.pooling → the sentence-transformers pooling mode, and whether the pooler's Dense(tanh) follows it.
POOLING_MODES: dict[str, tuple[str, bool]] = {"cls": ("cls", False), "mean": ("mean", False), "pooler": ("cls", True)}
# Legacy per-mode flags: what every sentence-transformers version since 2.0 reads (6.x converts them).
_MODE_FLAGS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
               "max": "pooling_mode_max_tokens", "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens"}
_TANH = "torch.nn.modules.activation.Tanh"  # a torch class: loads without trust_remote_code


def export_sentence_transformers(encoder: BertEncoder, tokenizer_source: str, out_dir: str, pooling: str,
                                 max_length: int) -> list[dict]:
    """Writes the folder to out_dir (a path or fsspec URL); returns its modules.json entries."""
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling: {pooling!r} has no sentence-transformers equivalent here; "
                         f"allowed: {', '.join(POOLING_MODES)}")
    if not 2 <= max_length <= encoder.config.max_position_embeddings:
        raise ValueError(f"max_length: {max_length} is outside [2, max_position_embeddings="
                         f"{encoder.config.max_position_embeddings}]")
    mode, with_pooler = POOLING_MODES[pooling]
    hidden = encoder.config.hidden_size
    root = Folder(out_dir)

    export_hf(encoder, tokenizer_source, out_dir)  # config.json, model.safetensors, tokenizer files
    # The tokenizer already lower-cases as the checkpoint's does; do_lower_case here would do it a second time.
    _write_json(root, "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False})
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]

    pooling_config = {"word_embedding_dimension": hidden, **{flag: name == mode for name, flag in _MODE_FLAGS.items()}}
    _write_json(Folder(root.path("1_Pooling")), "config.json", pooling_config)
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})

    if with_pooler:
        dense = Folder(root.path("2_Dense"))
        _write_json(dense, "config.json",
                    {"in_features": hidden, "out_features": hidden, "bias": True, "activation_function": _TANH})
        # clone(): the weights leave the live module as tensors of their own, contiguous, on the CPU.
        weights = {"linear.weight": encoder.pooler.weight, "linear.bias": encoder.pooler.bias}
        weights = {name: tensor.detach().float().cpu().clone() for name, tensor in weights.items()}
        dense.write_bytes("model.safetensors", safetensors.torch.save(weights, metadata={"format": "pt"}))
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})

    _write_json(root, "modules.json", modules)
    _write_json(root, "config_sentence_transformers.json",
                {"model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None,
                 "similarity_fn_name": "cosine"})
    return modules


def _write_json(folder: Folder, name: str, value) -> None:
    folder.write_text(name, json.dumps(value, indent=2) + "\n")
