"""`dist-minbert corpus`: a one-sentence-per-line corpus for SimCSE, from the task files or generated.

The study pretrained on the SimCSE release's 1M Wikipedia sentences (wiki1m_for_simcse.txt). No such
file is on these machines, so two stand-ins are built here, and `prepare --corpus` shards any of them:

- the task sentences: every text of the SST, QQP and STS train files, de-duplicated exactly after
  whitespace normalisation (runs of whitespace become one space, ends stripped; case and punctuation
  are kept, so "A dog." and "a dog." are two sentences), with every sentence that any dev or test file
  of those tasks holds (normalised the same way) left out, so nothing trained on is evaluation text.
  Lines come in file order (SST, QQP, STS; both texts of a pair row, first then second), first
  occurrence kept: the same files give the same corpus byte for byte;
- N generated lines for scale runs: joins of two or three of those sentences (so they carry no
  evaluation text either), distinct by check, in a fixed order.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import fsspec

from dist_minbert.data.config import DataConfig
from dist_minbert.tasks.config import TaskConfig
from dist_minbert.tasks.readers import read_task_file
from dist_minbert.tasks.registry import BUILTIN_TASKS

EVAL_SPLITS = ("dev", "test")


def normalise_whitespace(text: str) -> str:
    """The key sentences are compared by: str.split()'s whitespace (newlines included) → one space."""
    return " ".join(text.split())


@dataclass
class TaskCorpus:
    """The corpus sentences and what happened to the rest."""

    sentences: list[str]  # distinct, normalised, none of them eval text; in file order
    num_read: int  # texts read from the train files (two per pair row)
    num_duplicates: int  # dropped: a normalised repeat of an earlier train text
    num_held_out: int  # dropped: distinct train sentences that a dev or test file also holds
    num_eval_sentences: int  # distinct normalised texts of the dev and test files
    num_rejected_rows: int  # malformed rows the readers skipped (train, dev and test files together)
    train_files: list[str]
    eval_files: list[str]

    def summary(self) -> str:
        """Where the sentences came from and what was dropped, for the command to print."""
        return (f"{self.num_read} read from {len(self.train_files)} train files, "
                f"{self.num_duplicates} duplicates dropped, {self.num_held_out} held out as eval text "
                f"({self.num_eval_sentences} distinct sentences in {len(self.eval_files)} dev/test files), "
                f"{self.num_rejected_rows} malformed rows skipped")


def builtin_tasks(tasks: dict[str, TaskConfig] | None = None) -> dict[str, TaskConfig]:
    """SST, QQP and STS as `tasks` (a run config's) sets them, else with their builtin files.

    Always all three: a corpus built for a config without STS must still leave out STS dev text,
    which a later run may evaluate on. Other tasks of the config are not read.
    """
    tasks = tasks or {}
    return {name: tasks.get(name) or TaskConfig(**raw) for name, raw in BUILTIN_TASKS.items()}


def task_corpus(data: DataConfig, tasks: dict[str, TaskConfig] | None = None) -> TaskCorpus:
    """The train sentences of `builtin_tasks(tasks)` under data.root, de-duplicated, eval text left out.

    Labels are not read, so a row with a bad label still gives its texts; other malformed rows are
    skipped under data.on_bad_row="reject" (counted) and stop the build under "error" (file and line named).
    """
    tasks = builtin_tasks(tasks)
    train: list[str] = []
    eval_texts: set[str] = set()
    train_files, eval_files, num_rejected = [], [], 0
    for task in tasks.values():
        for split in ("train", *EVAL_SPLITS):
            if not getattr(task, split):
                continue  # e.g. the shared data has no QQP test file
            path = data.resolve(getattr(task, split))
            texts, rejected = _texts(path, task, data.on_bad_row)
            num_rejected += rejected
            if split == "train":
                train.extend(texts)
                train_files.append(path)
            else:
                eval_texts.update(map(normalise_whitespace, texts))
                eval_files.append(path)
    distinct = list(dict.fromkeys(map(normalise_whitespace, train)))  # first occurrence, in file order
    sentences = [s for s in distinct if s not in eval_texts]
    return TaskCorpus(sentences, len(train), len(train) - len(distinct), len(distinct) - len(sentences),
                      len(eval_texts), num_rejected, train_files, eval_files)


def _texts(path: str, task: TaskConfig, on_bad_row: str) -> tuple[list[str], int]:
    """Every text of a task file, row by row (a pair row's first text, then its second), and the rows rejected."""
    rows = read_task_file(path, task, labelled=False, on_bad_row=on_bad_row)
    columns = [rows.a] if rows.b is None else [rows.a, rows.b]
    return [text for row in zip(*columns) for text in row], len(rows.rejects)


def generated_lines(sentences: list[str], num_lines: int) -> Iterator[str]:
    """`num_lines` distinct lines, each two or three of `sentences` joined by a space, in a fixed order.

    Candidate k joins sentence k mod n and sentence (k mod n + 1 + k div n) mod n, and for every third
    candidate one more, (7k + 3) mod n: the first n candidates pair neighbours, each later pass pairs
    sentences one step further apart, so distinct sentences give distinct pairs for k < n(n - 1).
    Distinct pairs can still join into the same text ("a b" + "c" = "a" + "b c"), so a candidate whose
    8-byte BLAKE2 digest was seen before is skipped: equal lines always share a digest, and the rare
    distinct line that shares one with another is dropped, harmlessly. The digests cost ~70 bytes a line.
    """
    n = len(sentences)
    if num_lines < 0:
        raise ValueError(f"num_lines: {num_lines} is negative; allowed: an integer >= 0")
    seen: set[int] = set()
    k = 0
    while len(seen) < num_lines:
        if k >= n * (n - 1):
            raise ValueError(f"num_lines: {num_lines} exceeds the {len(seen)} distinct lines that "
                             f"{n} sentences give here")
        first, second = k % n, (k % n + 1 + k // n) % n
        line = f"{sentences[first]} {sentences[second]}"
        if k % 3 == 0:
            line = f"{line} {sentences[(7 * k + 3) % n]}"
        k += 1
        digest = int.from_bytes(hashlib.blake2b(line.encode("utf-8"), digest_size=8).digest(), "little")
        if digest not in seen:
            seen.add(digest)
            yield line


def write_lines(url: str, lines: Iterable[str], header: str = "") -> int:
    """Writes one line per item (a newline added where missing) to a path or fsspec URL; returns the count.

    The file appears complete or not at all: it is written under a temporary name beside `url` and then
    moved (an atomic rename on local disk; a copy on object stores, where a half-written object is never
    visible anyway). A name ending in .gz, .bz2, .xz or .zst is compressed accordingly.
    """
    fs, path = fsspec.core.url_to_fs(url)
    parent = os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    root, ext = os.path.splitext(path)
    temporary = f"{root}.tmp-{uuid.uuid4().hex[:8]}{ext}"  # same extension: compression is inferred from it
    count = 0
    try:
        with fsspec.open(fs.unstrip_protocol(temporary), "wt", encoding="utf-8", compression="infer") as out:
            out.write(header)
            for line in lines:
                out.write(line if line.endswith("\n") else f"{line}\n")
                count += 1
        fs.mv(temporary, path)
    finally:
        if fs.exists(temporary):
            fs.rm(temporary)
    return count

