"""The driver of `dist-minbert bench scaling`: ours on Ray Train and the DDP loop in a gloo group, 1 then 2 workers.

What each side runs, and how the report reads it, is in dist_minbert/bench/scaling.py; the Ray Train groups and
the task files are bench pcgrad's (launch/bench_pcgrad.py, dist_minbert/bench/pcgrad.py), the DDP processes the
group that bench simcse also spawns (dist_minbert/bench/common.py: fresh processes from a forkserver, a file-store
gloo group).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from dist_minbert.bench.common import scratch_folder, spawn_group
from dist_minbert.bench.pcgrad import PCGradBenchConfig, task_data_root
from dist_minbert.bench.scaling import ddp_worker, ours_worker, report
from launch.bench_pcgrad import run_group

GROUP_SIZES = (1, 2)


def run_scaling_benchmark(config: PCGradBenchConfig | None = None) -> dict:
    """Both sides at each group size, ours first then the DDP loop's (each in its own processes, so neither holds
    memory or threads while the other runs); returns the report. Joins the running Ray instance if there is one,
    else starts a local one; everything but the report goes to stderr."""
    config = config or PCGradBenchConfig()
    start = time.perf_counter()
    load_before = os.getloadavg()
    with contextlib.redirect_stdout(sys.stderr), scratch_folder(config.output_dir, "bench-scaling-") as scratch:
        data_root = task_data_root(config, scratch / "data")
        ours, ddp = {}, {}
        for num_workers in GROUP_SIZES:
            ours[num_workers] = run_group(config, data_root, scratch, num_workers, ours_worker, "bench-scaling")
            ddp[num_workers] = ddp_group(config, data_root, scratch, num_workers)
    return report(config, ours, ddp, wall_s=time.perf_counter() - start,
                  load_average=[round(x, 2) for x in (*load_before, *os.getloadavg())])


def ddp_group(config: PCGradBenchConfig, data_root: str, scratch: Path, num_workers: int,
              gradient_path: str = "") -> dict:
    """The DDP loop on num_workers processes: rank 0's timings; or, with gradient_path, only its first step's
    gradient saved there (torch.save of the flat shared + head gradient)."""
    job = {"scratch": str(scratch), "data_root": data_root, "gradient_path": gradient_path}
    return spawn_group(config, ddp_worker, num_workers, scratch / f"ddp-{num_workers}w", job)[0]
