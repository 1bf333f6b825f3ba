"""Configs the engine owns: DeepSpeed, optimiser, the training run and its checkpoints."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # ZeRO stage 0, 1 or 2
    # auto: bf16 on GPU, fp32 on CPU; bf16: DeepSpeed's (bf16 weights, for GPUs); autocast_bf16: fp32 weights,
    # gradients and optimizer state, the training forward under bf16 autocast (engine/autocast.py; CPU or GPU)
    precision: Literal["auto", "fp32", "bf16", "autocast_bf16"] = "auto"
    gradient_clipping: float = 1.0  # always passed explicitly (DeepSpeed 0.19.8 silently defaults to 1.0)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage: {self.zero_stage}; allowed: 0, 1, 2 (ZeRO-3 partitions the parameters that evaluation and gradient surgery read)")
        if self.gradient_clipping < 0:
            raise ValueError(f"gradient_clipping: {self.gradient_clipping} must be ≥ 0 (0 disables clipping)")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps: {self.gradient_accumulation_steps} must be ≥ 1")


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"  # sgd exists for equivalence tests (Adam hides a wrong gradient scale)
    lr: float = 5e-5
    head_lr: float | None = None  # learning rate of the task heads; None = lr
    weight_decay: float = 0.01
    betas: list[float] | None = None  # AdamW betas; None = (0.9, 0.999)
    warmup_fraction: float = 0.1  # of all optimizer steps; then linear decay to 0
    schedule: Literal["linear", "constant"] = "linear"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr: {self.lr} must be > 0")
        if self.head_lr is not None and self.head_lr <= 0:
            raise ValueError(f"head_lr: {self.head_lr} must be > 0 (or null for lr)")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction: {self.warmup_fraction}; allowed: 0 ≤ x < 1")
        if self.betas is not None and (len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas)):
            raise ValueError(f"betas: {self.betas}; allowed: two numbers in [0, 1)")


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"  # run folder: logs, checkpoints, predictions, summary.json; a path or fsspec URL
    local_dir: str = ""  # where a URL output_dir is staged on each node ("" = a temp folder named after the URL)
    epochs: int = 1
    seed: int = 0
    max_steps: int = 0  # stop after this many optimizer steps in total; 0 = no limit
    eval_every_epoch: bool = True  # dev evaluation after each epoch (best checkpoint by the overall score)
    # Dev evaluation every this many steps besides the epoch ends (0 = off), for schedules with long epochs;
    # SimCSE has its own, simcse.eval_every_steps.
    eval_every_steps: int = 0
    eval_batch_size: int = 128  # global rows per evaluation batch
    eval_max_rows: int = 0  # cap dev rows per task (quick runs); 0 = all
    predict_splits: list[str] | None = None  # splits to write predictions for at the end; None = dev and test
    max_nonfinite_steps: int = 3  # a NaN/inf loss or gradient skips the step on every rank; this many in a row stop the run

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs: {self.epochs} must be ≥ 1")
        if self.max_steps < 0 or self.eval_max_rows < 0:
            raise ValueError("max_steps / eval_max_rows must be ≥ 0 (0 = no limit)")
        if self.eval_every_steps < 0:
            raise ValueError(f"eval_every_steps: {self.eval_every_steps} must be ≥ 0 (0 = epoch ends only)")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps: {self.max_nonfinite_steps} must be ≥ 1")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size: {self.eval_batch_size} must be ≥ 1")
        if "://" in self.local_dir:
            raise ValueError(f"local_dir: {self.local_dir!r} is a URL; allowed: a local folder (DeepSpeed writes there "
                             f"before a URL output_dir receives the files), or '' for a temp folder")
        bad = [s for s in self.predict_splits or [] if s not in ("dev", "test")]
        if bad:
            raise ValueError(f"predict_splits: {bad[0]!r}; allowed: 'dev', 'test'")


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # optimizer steps between periodic checkpoints (0 = only at epoch ends)
    keep_last: int = 2  # newest step checkpoints kept; the best one is kept besides them
    resume: str = ""  # "" = fresh start; "latest" = newest checkpoint in train.output_dir; an absolute path or a URL
    kill_at_step: int = 0  # fault injection: one worker SIGKILLs itself after this optimizer step, once (0 = off)
    kill_rank: int = 0  # the rank that fault injection kills

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"every_steps: {self.every_steps} is negative; allowed: 0 (epoch ends only) or more")
        if self.keep_last < 1:
            raise ValueError(f"keep_last: {self.keep_last} would keep no checkpoint to resume from; allowed: >= 1")
        if self.resume not in ("", "latest") and not os.path.isabs(self.resume) and "://" not in self.resume:
            raise ValueError(f"resume: {self.resume!r} is a relative path (Ray workers run elsewhere); "
                             f"allowed: '', 'latest', an absolute path or an fsspec URL")
        if self.kill_at_step < 0 or self.kill_rank < 0:
            raise ValueError(f"kill_at_step / kill_rank: {self.kill_at_step} / {self.kill_rank}; allowed: >= 0")
