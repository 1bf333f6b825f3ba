"""The run's typed config tree, composed from the component configs that sit beside their owners.

`load_config(path, overrides)` reads YAML (with an optional `extends:` parent), applies dotted
`key=value` overrides, fills builtin task defaults and validates everything before anything starts.
`load_simcse_config` does the same for the SimCSE job's tree, which shares every section but the tasks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dist_minbert.config_loader import (ConfigError, apply_override, build, deep_merge, parse_override, read_yaml,
                                        to_plain)
from dist_minbert.contrastive.config import SimCSEConfig
from dist_minbert.data.config import DataConfig, ScheduleConfig
from dist_minbert.engine.config import CheckpointConfig, DeepSpeedConfig, OptimConfig, TrainConfig
from dist_minbert.model.config import ModelConfig
from dist_minbert.observe.config import ObserveConfig
from dist_minbert.surgery.config import SurgeryConfig
from dist_minbert.tasks.config import TaskConfig
from dist_minbert.tasks.registry import BUILTIN_TASKS
from launch.config import WorkersConfig

__all__ = ["ConfigError", "RunConfig", "SimCSERunConfig", "load_config", "load_simcse_config", "config_from_dict",
           "simcse_config_from_dict", "save_config"]


def _builtin_tasks() -> dict[str, TaskConfig]:
    return {name: TaskConfig(**raw) for name, raw in BUILTIN_TASKS.items()}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: dict[str, TaskConfig] = field(default_factory=_builtin_tasks)  # builtin names get their defaults merged
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    surgery: SurgeryConfig = field(default_factory=SurgeryConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    observe: ObserveConfig = field(default_factory=ObserveConfig)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: at least one task is required")
        n, accumulation = self.workers.num_workers, self.deepspeed.gradient_accumulation_steps
        for name, task in self.tasks.items():
            if task.batch_size % (n * accumulation):
                raise ValueError(
                    f"tasks.{name}.batch_size: {task.batch_size} is global per step and must divide by "
                    f"workers.num_workers × deepspeed.gradient_accumulation_steps = {n} × {accumulation} "
                    f"(each rank takes batch_size / num_workers, in equal micro-batches)")
        if self.train.eval_batch_size % n:
            raise ValueError(f"train.eval_batch_size: {self.train.eval_batch_size} must divide by workers.num_workers={n}")
        if self.surgery.mode != "sum" and self.deepspeed.zero_stage > 2:
            raise ValueError(f"surgery.mode: {self.surgery.mode!r} works with deepspeed.zero_stage 0, 1 or 2, "
                             f"not {self.deepspeed.zero_stage} (ZeRO-3 partitions the parameters the surgery reads)")


@dataclass
class SimCSERunConfig:
    """Unsupervised SimCSE on a streamed corpus; defaults are the SimCSE paper's (lr 3e-5, max length 32, one
    epoch, no warmup, linear decay)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(max_length=32))
    data: DataConfig = field(default_factory=DataConfig)  # data.root holds the STS dev file of the evaluation
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-5, warmup_fraction=0.0, weight_decay=0.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/simcse"))
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    observe: ObserveConfig = field(default_factory=ObserveConfig)
    simcse: SimCSEConfig = field(default_factory=SimCSEConfig)

    def __post_init__(self) -> None:
        if not self.simcse.corpus:  # checked here, so that a missing `simcse:` section names the key too
            raise ValueError("simcse.corpus: no corpus shards given; allowed: the --out folder of "
                             "`dist-minbert prepare --corpus FILE --out FOLDER` (local path or fsspec URL)")
        if self.deepspeed.gradient_accumulation_steps != 1:
            raise ValueError("deepspeed.gradient_accumulation_steps: a contrastive batch does not split into "
                             "micro-batches whose gradients add up; allowed: 1 (use simcse.chunk_size, GradCache)")


def _with_task_defaults(raw: dict) -> dict:
    tasks = raw.get("tasks")
    if tasks is None:
        return raw
    if not isinstance(tasks, dict):
        raise ConfigError(f"tasks: expected a mapping of task name → settings, got {tasks!r}")
    filled = {}
    for name, settings in tasks.items():
        settings = settings or {}
        if not isinstance(settings, dict):
            raise ConfigError(f"tasks.{name}: expected a mapping of settings, got {settings!r}")
        filled[name] = deep_merge(BUILTIN_TASKS.get(name, {}), settings)
    return {**raw, "tasks": filled}


def _is_local(path: str) -> bool:
    return bool(path) and "://" not in path


def _resolve_paths(cfg: RunConfig | SimCSERunConfig, base: Path) -> None:
    """Local relative paths → absolute, so Ray workers (whose cwd differs) read the same files."""
    if isinstance(cfg, SimCSERunConfig) and _is_local(cfg.simcse.corpus):
        cfg.simcse.corpus = str((base / cfg.simcse.corpus).resolve())
    for task in getattr(cfg, "tasks", {}).values():
        if _is_local(task.corpus):
            task.corpus = str((base / task.corpus).resolve())
    if _is_local(cfg.data.root):
        cfg.data.root = str((base / cfg.data.root).resolve())
    if _is_local(cfg.data.shards):
        cfg.data.shards = str((base / cfg.data.shards).resolve())
    if _is_local(cfg.train.output_dir):
        cfg.train.output_dir = str((base / cfg.train.output_dir).resolve())
    if _is_local(cfg.train.local_dir):
        cfg.train.local_dir = str((base / cfg.train.local_dir).resolve())
    if _is_local(cfg.model.checkpoint) and cfg.model.checkpoint != "embedded":
        cfg.model.checkpoint = str((base / cfg.model.checkpoint).resolve())


def config_from_dict(raw: dict, base_dir: str | os.PathLike | None = None) -> RunConfig:
    """Typed config from plain data (a YAML tree, or the dict Ray hands a worker)."""
    cfg = build(RunConfig, _with_task_defaults(raw))
    if base_dir is not None:
        _resolve_paths(cfg, Path(base_dir))
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), resolve_paths: bool = True) -> RunConfig:
    """resolve_paths: local relative paths made absolute against the working directory (False: as written)."""
    raw = read_yaml(Path(path).resolve()) if path else {}
    raw.setdefault("tasks", {name: {} for name in BUILTIN_TASKS})  # so `tasks.sts.head=…` keeps sst and qqp
    for text in overrides:
        apply_override(raw, *parse_override(text))
    return config_from_dict(raw, base_dir=Path.cwd() if resolve_paths else None)


def simcse_config_from_dict(raw: dict, base_dir: str | os.PathLike | None = None) -> SimCSERunConfig:
    cfg = build(SimCSERunConfig, raw)
    if base_dir is not None:
        _resolve_paths(cfg, Path(base_dir))
    return cfg


def load_simcse_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> SimCSERunConfig:
    raw = read_yaml(Path(path).resolve()) if path else {}
    for text in overrides:
        apply_override(raw, *parse_override(text))
    return simcse_config_from_dict(raw, base_dir=Path.cwd())


def load_job_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig | SimCSERunConfig:
    """The config of either job: a file with a `simcse:` section is a SimCSE run (`prepare` serves both)."""
    is_simcse = bool(path) and "simcse" in read_yaml(Path(path).resolve())
    return load_simcse_config(path, overrides) if is_simcse else load_config(path, overrides)


def save_config(cfg: RunConfig | SimCSERunConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_plain(cfg), sort_keys=False))
