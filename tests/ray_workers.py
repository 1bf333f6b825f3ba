"""Run a test's worker function on N Ray Train CPU workers (gloo), and read back what rank 0 wrote.

Worker functions live in test modules, which Ray workers cannot import; they are pickled by value.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from ray import cloudpickle

from launch.config import WorkersConfig
from launch.ray_run import fit_on_workers


def run_on_workers(fn: Callable[[dict], None], config: dict, num_workers: int, out_dir: Path) -> dict:
    """`fn(config)` on `num_workers` ranks of one CPU each; `config["result_path"]` is where rank 0 writes its JSON."""
    cloudpickle.register_pickle_by_value(sys.modules[fn.__module__])
    result_path = out_dir / f"result-{num_workers}w.json"
    fit_on_workers(fn, {**config, "result_path": str(result_path)}, WorkersConfig(num_workers=num_workers),
                   str(out_dir / "ray"), name=f"{fn.__name__}-{num_workers}w")
    return json.loads(result_path.read_text())


def write_slice(source: Path, target: Path, num_rows: int) -> Path:
    """The header and first `num_rows` data lines of a CS224N file (no row there spans lines)."""
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    target.write_text("".join(lines[: num_rows + 1]), encoding="utf-8")
    return target
