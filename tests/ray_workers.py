"""Run a test's worker function on N Ray Train CPU workers (gloo), and read back what rank 0 wrote.

Worker functions live in test modules, which Ray workers cannot import; they are pickled by value.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from ray import cloudpickle


def run_on_workers(fn: Callable[[dict], None], config: dict, num_workers: int, out_dir: Path) -> dict:
    """`fn(config)` on `num_workers` ranks; `config["result_path"]` is where rank 0 writes its JSON."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[fn.__module__])
    result_path = out_dir / f"result-{num_workers}w.json"
    trainer = TorchTrainer(
        fn,
        train_loop_config={**config, "result_path": str(result_path)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"{fn.__name__}-{num_workers}w", storage_path=str(out_dir / "ray"),
                             worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}),
    )
    trainer.fit()
    return json.loads(result_path.read_text())


def write_slice(source: Path, target: Path, num_rows: int) -> Path:
    """The header and first `num_rows` data lines of a CS224N file (no row there spans lines)."""
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    target.write_text("".join(lines[: num_rows + 1]), encoding="utf-8")
    return target
