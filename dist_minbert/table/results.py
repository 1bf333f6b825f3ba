"""The table's results file: one record per finished run, committed with the code, so that a table started in a
fresh checkout (another session, another machine) skips what is recorded and runs only the rest.

A record is kept for a trial while its `fingerprint` (config, overrides, seed, pretraining; not the output
folder) matches the table's: change the budget or a row's overrides and the row runs again.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from dist_minbert.config_loader import ConfigError
from dist_minbert.table.config import Trial

VERSION = 1


@dataclass
class Results:
    path: Path
    records: dict[str, dict] = field(default_factory=dict)  # Trial.key → its record
    best: dict | None = None  # the analysed run: row, seed, run folder, analysis and prediction files, commands

    @classmethod
    def load(cls, path: str | os.PathLike) -> Results:
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc}); allowed: a results file the table wrote") from None
        if not isinstance(raw, dict) or raw.get("version") != VERSION or not isinstance(raw.get("records"), dict):
            raise ConfigError(f"{path}: not a results file of version {VERSION} (expected keys version, records)")
        return cls(path, raw["records"], raw.get("best"))

    def finished(self, trial: Trial) -> bool:
        record = self.records.get(trial.key)
        return record is not None and record.get("fingerprint") == trial.fingerprint

    def finished_records(self, trials: list[Trial]) -> list[dict]:
        """The records of those of `trials` that are finished as they stand (a stale record is left out)."""
        return [self.records[t.key] for t in trials if self.finished(t)]

    def record(self, record: dict) -> None:
        self.records[record["key"]] = record
        self.save()

    def set_best(self, best: dict) -> None:
        self.best = best
        self.save()

    def save(self) -> None:
        """Written whole to a temporary file, then renamed: a kill leaves the old file or the new one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        records = dict(sorted(self.records.items()))
        tmp.write_text(json.dumps({"version": VERSION, "records": records, "best": self.best}, indent=1) + "\n")
        os.replace(tmp, self.path)


def trial_record(trial: Trial, table_output: str) -> dict:
    """How a run is made: the part of its record known before it runs (a Tune trial carries it)."""
    record = {"key": trial.key, "row": trial.row, "seed": trial.seed, "kind": trial.kind,
              "fingerprint": trial.fingerprint, "spec": trial.spec, "command": trial.command(table_output),
              "run_dir": trial.output_dir(table_output)}
    if trial.pretrain is not None:
        record["pretrain"] = trial.pretrain.key
    return record


def finished_record(made: dict, summary: dict, machine: str, commit: str) -> dict:
    """The record of a finished run: how it was made (trial_record), what its summary.json says, where, from
    which commit (git_commit when the run started) and when."""
    return {**made, "steps": summary["steps"], "wall_s": summary.get("job_wall_s", summary["wall_s"]),
            "samples_per_s": summary["samples_per_s"], "initial_dev": summary.get("initial_dev"),
            "dev": summary.get("best_dev"), "score": summary.get("best_score"), "commit": commit,
            "machine": machine, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def git_commit() -> str:
    """HEAD of the checkout this code runs from, "+changes" when tracked files differ from it; "" outside git."""
    checkout = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=checkout).stdout.strip()

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine_description() -> str:
    """The machine a run ran on, in words: CPU model and count, GPUs."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return f"{os.cpu_count()} × {cpu}, " + (f"{len(gpus)} × {gpus[0]}" if gpus else "no GPU")
