"""The driver of `dist-minbert bench pcgrad`: launches the 1- and 2-worker groups and builds the report.

What the workers measure, and how the report reads it, is in dist_minbert/bench/pcgrad.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from dist_minbert.bench.common import scratch_folder
from dist_minbert.bench.pcgrad import PCGradBenchConfig, bench_worker, report, task_data_root
from launch.config import WorkersConfig
from launch.ray_run import connect, fit_on_workers


def run_pcgrad_benchmark(config: PCGradBenchConfig | None = None) -> dict:
    """Runs the 1- and 2-worker groups on Ray Train and returns the report (JSON-serialisable).

    Joins the running Ray instance if there is one (RAY_ADDRESS, or ray.init() already called), else
    starts a local one. Everything Ray, DeepSpeed and the workers print goes to stderr, so a caller
    can print the report alone on stdout (the workers write theirs to stderr).
    """
    config = config or PCGradBenchConfig()
    start = time.perf_counter()
    load_before = os.getloadavg()
    with contextlib.redirect_stdout(sys.stderr), scratch_folder(config.output_dir, "bench-pcgrad-") as scratch:
        data_root = task_data_root(config, scratch / "data")
        groups = {num_workers: run_group(config, data_root, scratch, num_workers) for num_workers in (1, 2)}
    return report(config, groups, wall_s=time.perf_counter() - start,
                  load_average=[round(x, 2) for x in (*load_before, *os.getloadavg())])


def run_group(config: PCGradBenchConfig, data_root: str, scratch: Path, num_workers: int,
              worker_fn=bench_worker, name: str = "bench-pcgrad") -> dict:
    """`worker_fn` (bench_worker, or another benchmark's worker on the same runs) on num_workers Ray Train workers;
    the JSON its rank 0 wrote."""
    threads = config.threads_per_worker
    connect("", num_cpus=2 * threads)  # a new local instance: room for the 2-worker group, nothing more
    result_path = scratch / f"{name}-result-{num_workers}w.json"
    loop_config = {"bench": asdict(config), "data_root": data_root, "scratch": str(scratch),
                   "num_workers": num_workers, "result_path": str(result_path)}
    workers = WorkersConfig(num_workers=num_workers, cpus_per_worker=threads, threads_per_worker=threads)
    fit_on_workers(worker_fn, loop_config, workers, str(scratch / "ray"), name=f"{name}-{num_workers}w")
    return json.loads(result_path.read_text())
