"""Each task's train/dev/test splits, read, checked and tokenized once per worker."""
from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field

from dist_minbert.data.config import DataConfig
from dist_minbert.data.source import RowSource, TableSource, tokenize_rows
from dist_minbert.model.tokenizer import WordPieceTokenizer
from dist_minbert.tasks.config import TaskConfig
from dist_minbert.tasks.readers import Reject, read_task_file

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")


@dataclass
class TaskSplits:
    sources: dict[str, RowSource] = field(default_factory=dict)  # split → rows (absent when the task has no file)
    rejects: list[Reject] = field(default_factory=list)


def split_path(root: str, relative: str) -> str:
    if "://" in relative or relative.startswith("/"):
        return relative
    return posixpath.join(root, relative) if "://" in root else f"{root.rstrip('/')}/{relative}"


def load_task_splits(tasks: dict[str, TaskConfig], data: DataConfig, tokenizer: WordPieceTokenizer,
                     max_length: int, splits: tuple[str, ...] = SPLITS) -> dict[str, TaskSplits]:
    """Read every task file named in the config; rejected rows are kept for the rejects file, never dropped."""
    loaded = {}
    for name, task in tasks.items():
        out = TaskSplits()
        for split in splits:
            relative = getattr(task, split)
            if not relative:
                continue
            rows = read_task_file(split_path(data.root, relative), task, labelled=split != "test",
                                  on_bad_row=data.on_bad_row)
            out.rejects.extend(rows.rejects)
            if not rows.ids:
                raise ValueError(f"tasks.{name}.{split}: {relative} holds no usable rows "
                                 f"({len(rows.rejects)} rejected)")
            # Keep one token past the budget so collate() still sees and counts every truncated row.
            out.sources[split] = TableSource(tokenize_rows(rows, tokenizer, max_tokens=max_length - 1))
        if "train" not in out.sources:
            raise ValueError(f"tasks.{name}.train: no training file given")
        loaded[name] = out
    return loaded
