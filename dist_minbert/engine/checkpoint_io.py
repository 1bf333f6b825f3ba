"""Reading a run's DeepSpeed checkpoint back into a plain model, whatever ZeRO stage wrote it, from a local
folder or an fsspec URL (downloaded to a temporary folder first)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import yaml

from dist_minbert.config import RunConfig, SimCSERunConfig, config_from_dict, simcse_config_from_dict
from dist_minbert.contrastive.model import SentenceEncoder
from dist_minbert.engine.checkpointing import BEST, CHECKPOINTS_DIR, RUN_CONFIG, latest_checkpoint
from dist_minbert.engine.run_storage import fetch_checkpoint, is_url
from dist_minbert.model.checkpoint import load_encoder
from dist_minbert.tasks.multitask import MultitaskModel


def _checkpoint_folder(path: str | Path) -> Path:
    """A tag folder (…/checkpoints/step-00000040, …/checkpoints/best), or a run folder / checkpoints folder:
    its best checkpoint, else its latest (a run stopped before its first evaluation has no best)."""
    path = Path(path)
    candidates = [path, path / BEST, path / CHECKPOINTS_DIR / BEST, latest_checkpoint(path),
                  latest_checkpoint(path / CHECKPOINTS_DIR)]
    for candidate in candidates:
        if candidate is not None and (candidate / RUN_CONFIG).exists():
            return candidate
    raise FileNotFoundError(f"{path}: no checkpoint here (expected {RUN_CONFIG} in it, in best/ or checkpoints/best/, "
                            f"or a step-* checkpoint in it or in checkpoints/)")


def load_module_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights: ZeRO ≥ 1 shards are consolidated by DeepSpeed's own zero_to_fp32."""
    if any(tag_dir.glob("zero_pp_rank_*_optim_states.pt")) or any(tag_dir.glob("bf16_zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


def load_trained_model(path: str | Path) -> tuple[RunConfig | SimCSERunConfig, MultitaskModel | SentenceEncoder]:
    """The run's config and its model (multitask, or SimCSE's sentence encoder) with the checkpoint's weights,
    in eval mode. Both hold the trained BERT as `.encoder`. `path` as for a local folder, or its URL."""
    if is_url(str(path)):
        with tempfile.TemporaryDirectory(prefix="dist-minbert-checkpoint-") as scratch:
            return _load_trained_model(fetch_checkpoint(str(path), Path(scratch)))
    return _load_trained_model(_checkpoint_folder(path))


def _load_trained_model(tag_dir: Path) -> tuple[RunConfig | SimCSERunConfig, MultitaskModel | SentenceEncoder]:
    raw = yaml.safe_load((tag_dir / RUN_CONFIG).read_text())
    if "simcse" in raw:
        cfg = simcse_config_from_dict(raw)
        model = SentenceEncoder(load_encoder(cfg.model.checkpoint, dropout=0.0), cfg.simcse.pooling)
    else:
        cfg = config_from_dict(raw)
        model = MultitaskModel(load_encoder(cfg.model.checkpoint, dropout=0.0), cfg.tasks, cfg.model.pooling)
    try:
        model.load_state_dict(load_module_state(tag_dir))
    except RuntimeError as exc:  # parameter names or shapes differ from what this version of the model builds
        raise ValueError(f"{tag_dir}: the checkpoint does not fit the model its run config describes: {exc}") from None
    return cfg, model.eval()
