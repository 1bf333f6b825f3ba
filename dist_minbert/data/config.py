"""Configs of the data service and of the task schedule."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Literal

ScheduleName = Literal["round_robin", "proportional_batch", "annealed", "temperature", "staggered"]


@dataclass
class DataConfig:
    # Folder (or fsspec URL) that relative task file paths are resolved against.
    root: str = "../shared/data/cs224n"
    # What a malformed input row does: "error" stops with its file and line, "reject" logs it to a rejects file.
    on_bad_row: Literal["error", "reject"] = "reject"
    # Batches prepared ahead of the training thread, per task stream (0 = read on the training thread).
    prefetch: int = 2
    # Rows per shuffle block: an epoch's order permutes blocks, then rows inside each block (= shard record batch).
    shuffle_block_rows: int = 4096
    # Sort windows of this many consecutive positions by length so batches pad less (0 = off).
    length_group_rows: int = 0
    # Folder (fsspec URL) of prepared shards, {shards}/{task}/{split}; "" = <output_dir>/shards.
    shards: str = ""
    # Rows per shard file written by prepare (a multiple of shuffle_block_rows).
    shard_rows: int = 65536
    # prepare fails when more than this fraction of an input's rows is rejected.
    max_reject_fraction: float = 0.01
    # Corpus lines longer than this many bytes are rejected (the csv module's field limit for task files).
    max_line_bytes: int = 131072
    # Where prepare tokenizes corpora: "local" (a process pool), "ray" (Ray Data on the connected cluster),
    # "auto" (Ray when a cluster is given: workers.address or RAY_ADDRESS). Both write the same shards.
    prepare_engine: Literal["auto", "local", "ray"] = "auto"
    # Tokenizer processes (local) or Ray actors (ray) used by prepare (0 = one per CPU core of the machine
    # or cluster; 1 = in the calling process, locally).
    prepare_workers: int = 0

    def __post_init__(self) -> None:
        if self.prefetch < 0:
            raise ValueError(f"prefetch: {self.prefetch} is negative; allowed: an integer >= 0")
        if self.shuffle_block_rows < 1:
            raise ValueError(f"shuffle_block_rows: {self.shuffle_block_rows} is too small; allowed: an integer >= 1")
        if not 0 <= self.length_group_rows <= self.shuffle_block_rows:
            raise ValueError(
                f"length_group_rows: {self.length_group_rows} is out of range; "
                f"allowed: 0 (off) up to shuffle_block_rows ({self.shuffle_block_rows})"
            )
        if self.shard_rows < 1 or self.shard_rows % self.shuffle_block_rows:
            raise ValueError(
                f"shard_rows: {self.shard_rows} is not a multiple of shuffle_block_rows ({self.shuffle_block_rows}); "
                f"allowed: a positive multiple of it"
            )
        if not 0 <= self.max_reject_fraction <= 1:
            raise ValueError(f"max_reject_fraction: {self.max_reject_fraction} is out of range; allowed: 0 <= x <= 1")
        if self.max_line_bytes < 1:
            raise ValueError(f"max_line_bytes: {self.max_line_bytes} is too small; allowed: an integer >= 1")
        if self.prepare_workers < 0:
            raise ValueError(f"prepare_workers: {self.prepare_workers} is negative; allowed: 0 (one per core) or more")

    def resolve(self, path: str) -> str:
        """A data file's location: URLs and absolute paths as given, relative paths under `root`."""
        if "://" in path or path.startswith("/"):
            return path
        return posixpath.join(self.root, path)


@dataclass
class ScheduleConfig:
    # Strategy that decides which tasks each optimizer step draws (see data/schedule.py).
    name: ScheduleName = "round_robin"
    # Steps per epoch; None = the largest task's full epoch (round_robin) or steps_per_epoch_fraction.
    steps_per_epoch: int | None = None
    # Steps per epoch as a fraction of the largest task's epoch at its batch size (the study: 500 steps = 0.11 of QQP).
    steps_per_epoch_fraction: float | None = None
    # Distinct tasks drawn per step by annealed and temperature sampling (PCGrad needs >= 2).
    tasks_per_step: int = 1
    # Decay of the annealing exponent: alpha = 1 - anneal_decay * e / (E - 1) for 0-based epoch e of E.
    anneal_decay: float = 0.8
    # Temperature T of temperature sampling: p_i proportional to N_i ** (1 / T).
    temperature: float = 2.0
    # Tasks that staggered sampling passes over alone before switching to capped round-robin.
    stagger_tasks: list[str] = field(default_factory=lambda: ["qqp"])
    # Epochs of the staggered phase (each a full pass over the stagger tasks).
    stagger_epochs: int = 2
    # proportional_batch rounds each batch size up to a multiple of this, so worker counts dividing it work.
    batch_multiple: int = 8

    def __post_init__(self) -> None:
        if self.steps_per_epoch is not None and self.steps_per_epoch_fraction is not None:
            raise ValueError(
                "steps_per_epoch: set together with steps_per_epoch_fraction; allowed: at most one of the two"
            )
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch: {self.steps_per_epoch} is too small; allowed: an integer >= 1 or null")
        if self.steps_per_epoch_fraction is not None and not self.steps_per_epoch_fraction > 0:
            raise ValueError(
                f"steps_per_epoch_fraction: {self.steps_per_epoch_fraction} is not positive; allowed: a float > 0 or null"
            )
        if self.tasks_per_step < 1:
            raise ValueError(f"tasks_per_step: {self.tasks_per_step} is too small; allowed: an integer >= 1")
        if not 0 <= self.anneal_decay <= 1:
            raise ValueError(f"anneal_decay: {self.anneal_decay} is out of range; allowed: 0 <= anneal_decay <= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature: {self.temperature} is not positive; allowed: a float > 0")
        if self.name == "staggered" and not self.stagger_tasks:
            raise ValueError("stagger_tasks: empty with the staggered schedule; allowed: one or more task names")
        if self.stagger_epochs < 0:
            raise ValueError(f"stagger_epochs: {self.stagger_epochs} is negative; allowed: an integer >= 0")
        if self.batch_multiple < 1:
            raise ValueError(f"batch_multiple: {self.batch_multiple} is too small; allowed: an integer >= 1")
