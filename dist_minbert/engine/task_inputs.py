"""Each task's train/dev/test splits, served by the data service's shards.

Rank 0 prepares the shards (a no-op when the manifest already matches the inputs and the
tokenizer), the other ranks wait, then every rank opens the same shards and streams its share.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import posixpath
from dataclasses import dataclass, field
from typing import Callable

import fsspec

from dist_minbert.data.config import DataConfig
from dist_minbert.data.prepare import prepare_tasks, task_shards_url
from dist_minbert.data.shards import REJECTS, open_source
from dist_minbert.data.source import RowSource
from dist_minbert.model.tokenizer import WordPieceTokenizer
from dist_minbert.tasks.config import TaskConfig

SPLITS = ("train", "dev", "test")


@dataclass
class TaskSplits:
    sources: dict[str, RowSource] = field(default_factory=dict)  # split → rows (absent when the task has no file)
    rejects_files: list[str] = field(default_factory=list)  # prepare's rejects.tsv of each split


def shards_root(data: DataConfig, output_dir: str) -> str:
    """Where the task shards live: data.shards, or the run folder's shards/ when none is configured."""
    return data.shards or posixpath.join(output_dir, "shards")


def load_task_splits(tasks: dict[str, TaskConfig], data: DataConfig, tokenizer: WordPieceTokenizer,
                     max_length: int, output_dir: str, is_main: bool, barrier: Callable[[], None],
                     splits: tuple[str, ...] = SPLITS) -> dict[str, TaskSplits]:
    """Prepare (rank 0) and open (every rank) every split file the tasks name; a task needs a train file.
    A contrastive task's train split is its corpus's shards, prepared beforehand (`prepare --corpus`)."""
    for name, task in tasks.items():
        if not task.train and task.kind != "contrastive":
            raise ValueError(f"tasks.{name}.train: no training file given")
    root = shards_root(data, output_dir)
    if is_main:
        prepare_tasks(tasks, dataclasses.replace(data, shards=root), tokenizer, max_length, splits)
    barrier()  # shards complete before any rank opens them
    loaded = {}
    for name, task in tasks.items():
        out = TaskSplits()
        if task.kind == "contrastive":
            out.sources["train"] = open_source(task.corpus)
        for split in splits:
            if getattr(task, split):
                url = task_shards_url(root, name, split)
                out.sources[split] = open_source(url)
                out.rejects_files.append(posixpath.join(url, REJECTS))
        loaded[name] = out
    return loaded


def merge_rejects(files: list[str], target: str) -> int:
    """All splits' rejects in one TSV (one header); returns the number of rejected rows."""
    header, bodies = None, []
    for url in files:
        with fsspec.open(url, "r", encoding="utf-8", newline="") as f:
            first, rest = f.readline(), f.read()
        header = header or first
        bodies.append(rest)
    with open(target, "w", encoding="utf-8", newline="") as out:
        out.write(header or "path\tline\treason\traw\n")
        out.write("".join(bodies))
    return sum(len(list(csv.reader(io.StringIO(body), delimiter="\t"))) for body in bodies)
