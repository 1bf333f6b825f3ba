"""The driver of `dist-minbert scale`: the same config at each worker count, then the CSV, plot and TensorBoard runs.

Every size trains the config as given except for the workers (n of 1 CPU and 1 torch thread each), the step
count, and what a throughput run needs (scalars every step, no progress bar, evaluation capped to a few rows:
evaluation is not what is measured). Task batch sizes are global (docs/ARCHITECTURE.md, "Batch sizes are
global"), so every size takes the same optimisation steps. What is read from each run and written about them
all is in dist_minbert/bench/scale_report.py; the projection's model in dist_minbert/bench/scaling_model.py.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dist_minbert.bench import scale_report
from dist_minbert.bench.scaling_model import Network, encoder_size, flops_ratio, plan_collectives, plan_units, project
from dist_minbert.config import RunConfig, load_config
from launch.ray_run import connect, run_training

EVAL_MAX_ROWS = 64  # dev rows per task of each run's evaluations (they are not timed)


@dataclass
class Projection:
    """`--project`: n workers like the measured ones on a network (scaling_model's parameters)."""

    worker_counts: list[int] = field(default_factory=lambda: [8, 16, 32])
    model_size: str = ""  # a NAMED_SIZES name or a checkpoint; "" = the config's model.checkpoint
    network: Network = field(default_factory=Network)
    backend: str = "nccl"  # resolves surgery.plan "auto" as on a GPU cluster
    # One projected worker's compute throughput over a measured one's (e.g. a GPU over a CPU thread: bench simcse's
    # 2000 for an A100 against one thread here); 1 = workers like the measured ones.
    compute_speedup: float = 1.0

    def __post_init__(self) -> None:
        if not self.compute_speedup > 0:
            raise ValueError(f"--compute-speedup: {self.compute_speedup}; allowed: > 0")


def run_scale(config_path: str, overrides: list[str], worker_counts: list[int], output_dir: str, steps: int = 20,
              warmup_steps: int = 1, projection: Projection | None = None) -> dict:
    """Trains at each worker count into output_dir/workers-<n>; writes scaling.csv, scaling.png, scaling.json
    and tensorboard/ under output_dir; returns what scaling.json holds."""
    if not worker_counts or min(worker_counts) < 1 or len(set(worker_counts)) != len(worker_counts):
        raise ValueError(f"--workers: {worker_counts}; allowed: distinct counts ≥ 1, e.g. 1,2,4")
    if steps <= warmup_steps:
        raise ValueError(f"--steps {steps} must exceed --warmup-steps {warmup_steps} (some steps must be timed)")
    out = Path(output_dir).resolve()
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out: {out} is not empty (a run's event files would mix with this one's); "
                         f"allowed: a new or empty folder")
    configs = {n: _size_config(config_path, overrides, n, steps, out / f"workers-{n}") for n in sorted(worker_counts)}
    _check_cpus(configs)
    started = time.perf_counter()
    rows = []
    for n, cfg in configs.items():
        run_training(cfg)
        rows.append(scale_report.measured_row(cfg.train.output_dir, n, warmup_steps))
    rows = scale_report.add_efficiency(rows)
    label, projected = "", None
    if projection is not None:
        projected = _project(rows, next(iter(configs.values())), projection)
        rows += projected["rows"]
        label = (f"{projected['model']}, {projection.network.bandwidth_gb_s:g} GB/s, "
                 f"{projection.network.latency_us:g} µs, compute ×{projection.compute_speedup:g}")
    result = {"rows": rows, "projection": projected, "steps": steps, "warmup_steps": warmup_steps,
              "measured_s": time.perf_counter() - started,
              "paths": {"csv": str(out / "scaling.csv"), "plot": str(out / "scaling.png"),
                        "tensorboard": str(out / "tensorboard"),
                        "runs": [str(c.train.output_dir) for c in configs.values()]}}
    scale_report.write_csv(rows, out / "scaling.csv")
    scale_report.plot(rows, out / "scaling.png", label)
    scale_report.write_tensorboard(rows, out / "tensorboard")
    (out / "scaling.json").write_text(json.dumps(result, indent=2))
    return result


def _size_config(config_path: str, overrides: list[str], num_workers: int, steps: int, out: Path) -> RunConfig:
    cfg = load_config(config_path, [
        *overrides, f"workers.num_workers={num_workers}", "workers.cpus_per_worker=1",
        "workers.threads_per_worker=1", f"train.output_dir={json.dumps(str(out))}", f"train.max_steps={steps}",
        "checkpoint.resume=''", "observe.log_every=1", "observe.tensorboard=true", "observe.progress=false"])
    if not 0 < cfg.train.eval_max_rows <= EVAL_MAX_ROWS:
        cfg.train.eval_max_rows = EVAL_MAX_ROWS
    return cfg


def _check_cpus(configs: dict[int, RunConfig]) -> None:
    """Ray would wait forever for a group larger than its CPUs: refuse it first."""
    import ray

    connect(next(iter(configs.values())).workers.address)
    num_cpus = ray.cluster_resources().get("CPU", 0)
    too_large = [n for n in configs if n > num_cpus]
    if too_large:
        raise ValueError(f"--workers: {too_large} need more CPUs than Ray has ({num_cpus:g}; each worker takes 1); "
                         f"allowed: at most {num_cpus:g} workers here, or --project for more")


def _project(rows: list[dict], cfg: RunConfig, projection: Projection) -> dict:
    """The projection from the measured compute per sample at the fewest workers."""
    base = min(rows, key=lambda row: row["workers"])
    measured_arch, measured_params = encoder_size(cfg.model.checkpoint)
    model = projection.model_size or cfg.model.checkpoint
    target_arch, target_params = encoder_size(model)
    tokens = (base["tokens_per_s"] / base["samples_per_s"]) if base["tokens_per_s"] else float(cfg.model.max_length)
    ratio = flops_ratio(target_arch, measured_arch, tokens)
    compute = scale_report.compute_s_per_sample(base) * ratio / projection.compute_speedup
    num_tasks = len(cfg.tasks) if cfg.schedule.name in ("round_robin", "proportional_batch") \
        else cfg.schedule.tasks_per_step
    collectives = plan_collectives(cfg.surgery.mode, cfg.surgery.plan, num_tasks, projection.backend)
    worker_counts = sorted({1, *projection.worker_counts})
    rows = [{**row, "global_batch": base["global_batch"]}
            for row in project(worker_counts, base["global_batch"], compute, target_params, collectives,
                               projection.network)]
    return {"label": "projection", "model": model, "num_params": target_params,
            "measured_num_params": measured_params, "flops_ratio": ratio, "tokens_per_sample": tokens,
            "compute_s_per_sample": compute, "compute_speedup": projection.compute_speedup,
            "surgery": {"mode": cfg.surgery.mode, "plan": cfg.surgery.plan, "backend": projection.backend,
                        "tasks_per_step": num_tasks},
            "collectives": collectives, "comm_units": plan_units(collectives), "network": asdict(projection.network),
            "overlap": False, "rows": rows}
