"""`dist-minbert bench pcgrad`: what exact PCGrad costs against the summed baseline, measured side by side.

The real Trainer runs on Ray Train workers (DeepSpeed; gloo on CPU): first 1 worker, then 2. In each
group the baseline `sum` and `pcgrad` (default plan) are built side by side and alternate step by step
(the order flips every pair), so load from other processes on a shared machine falls on both alike;
then every other plan and mode runs a few steps. During each step every collective any code issues,
DeepSpeed's own included, is counted (surgery.comm.record_collectives) in units of one ideal ring
all-reduce of P, the shared encoder's parameter count. The time ratios are medians over the pairs of
the two modes' wall-clock step times after warm-up; CPU seconds per step (the worker process, all
threads) stand beside them because they hardly move with load from other processes. Peak gradient
memory is the most bytes of gradient buffers a rank held at once (.grad, per-task rows, shards).

This module is what the workers run, the files they read and the report; the driver that launches the
groups is launch/bench_pcgrad.py, since nothing in dist_minbert starts Ray.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dist_minbert.surgery.config import SurgeryConfig

# The timed pair, then the runs that only add communication counts (and their own step times).
TIMED_MODES = ("sum", "pcgrad")
PLAN_RUNS = {"pcgrad_allreduce": ("pcgrad", "allreduce"), "pcgrad_sharded": ("pcgrad", "sharded"),
             "pcgrad_local": ("pcgrad_local", "auto")}
TASK_FILES = {"sst": "ids-sst-train.csv", "qqp": "quora-train.csv", "sts": "sts-train.csv"}
TARGET_TIME_RATIO_1W = 1.05  # separate per-task backward passes cost the FLOPs of one summed backward
TARGET_TIME_RATIO_2W = 1.10  # on gloo
# The plans' collectives of P-independent size (T counts, T² Gram entries, the heads, a finite flag) add
# ~1e-4 units to the (T+1)/2 of the sharded plan for the embedded checkpoint; this much is allowed for them.
SMALL_COLLECTIVES_UNITS = 1e-3


@dataclass
class PCGradBenchConfig:
    checkpoint: str = "embedded"  # encoder: HF BERT folder or fsspec URL; "embedded" = all-MiniLM-L6-v2 (P = 22.7M)
    data_root: str = "../shared/data/cs224n"  # folder of the CS224N training files (sst, qqp, sts)
    max_rows: int = 0  # rows read per task file (a prefix); 0 = all
    batch_size: int = 32  # global rows per task per step; each of N workers takes batch_size / N
    max_length: int = 64  # tokens per encoded input
    dropout: float = 0.1  # encoder dropout, as in training
    warmup_steps: int = 2  # untimed steps of each timed mode first (allocator, DeepSpeed and gloo warm-up)
    timed_steps: int = 8  # timed steps of each timed mode; medians are reported
    plan_steps: int = 2  # measured steps of each other plan or mode, after one warm-up step
    zero_stage: int = 0  # DeepSpeed ZeRO stage of every run: 0, 1 or 2
    # torch threads (and Ray CPUs) of each worker, in both groups: with 1, the OpenMP barriers of a
    # multi-threaded worker cannot turn another process's load into spinning (on a shared 2-core machine
    # that inflated a 1-worker, 2-thread step's CPU time 4×, and more for the many smaller per-task ops).
    threads_per_worker: int = 1
    output_dir: str = ""  # scratch folder for the runs; "" = a temporary folder, removed afterwards

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_length", "timed_steps", "plan_steps", "threads_per_worker"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} must be ≥ 1; allowed: a positive integer")
        for name in ("max_rows", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: {getattr(self, name)} is negative; allowed: an integer ≥ 0")
        if self.batch_size % 2:
            raise ValueError(f"batch_size: {self.batch_size} must divide by 2 (the 2-worker runs); allowed: even")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage: {self.zero_stage}; allowed: 0, 1, 2")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: {self.dropout}; allowed: 0 <= dropout < 1")


def quick_config(**overrides) -> PCGradBenchConfig:
    """Seconds instead of minutes: small batches and files, few steps (tests, smoke runs); same keys out."""
    quick = dict(max_rows=64, batch_size=8, max_length=32, warmup_steps=1, timed_steps=2, plan_steps=1)
    return PCGradBenchConfig(**{**quick, **overrides})


def task_data_root(config: PCGradBenchConfig, folder: Path) -> str:
    """The data root the runs read: the shared files, or their first max_rows rows (no CS224N row spans lines)."""
    if not config.max_rows:
        return str(Path(config.data_root).resolve())
    folder.mkdir(parents=True, exist_ok=True)
    for name in TASK_FILES.values():
        source = Path(config.data_root) / name
        if not source.is_file():
            raise FileNotFoundError(f"data_root: {source} not found; "
                                    f"allowed: a folder with {', '.join(TASK_FILES.values())}")
        with source.open(encoding="utf-8") as lines:
            head = [line for _, line in zip(range(config.max_rows + 1), lines)]
        (folder / name).write_text("".join(head), encoding="utf-8")
    return str(folder)


def report(config: PCGradBenchConfig, groups: dict[int, dict], wall_s: float, load_average: list[float]) -> dict:
    """The JSON object: per-group measurements, the headline figures, the targets and whether they pass."""
    one, two = groups[1], groups[2]
    num_tasks, num_params = two["num_tasks"], two["num_params"]
    time_ratio_1w, time_ratio_2w = (_paired_ratio(group, "step_s_all") for group in (one, two))
    units = {name: two["runs"][name]["comm_units"] for name in ("sum", *PLAN_RUNS)}
    sharded_target = (num_tasks + 1) / 2
    passed = {"time_ratio_1w": time_ratio_1w <= TARGET_TIME_RATIO_1W,
              "time_ratio_2w": time_ratio_2w <= TARGET_TIME_RATIO_2W,
              "comm_units_pcgrad_sharded": units["pcgrad_sharded"] <= sharded_target + SMALL_COLLECTIVES_UNITS}
    return {
        "time_ratio_1w": time_ratio_1w,
        "time_ratio_2w": time_ratio_2w,
        "cpu_ratio_1w": _paired_ratio(one, "cpu_s_all"),
        "cpu_ratio_2w": _paired_ratio(two, "cpu_s_all"),
        "comm_units_sum": units["sum"],
        "comm_units_pcgrad_allreduce": units["pcgrad_allreduce"],
        "comm_units_pcgrad_sharded": units["pcgrad_sharded"],
        "comm_units_pcgrad_local": units["pcgrad_local"],
        "comm_seconds_2w": {name: run["comm_s"] for name, run in two["runs"].items()},
        "peak_gradient_bytes_2w": {name: run["peak_gradient_bytes"] for name, run in two["runs"].items()},
        "peak_gradient_in_P_2w": {name: run["peak_gradient_bytes"] / (4 * num_params)
                                  for name, run in two["runs"].items()},
        "targets": {"time_ratio_1w": TARGET_TIME_RATIO_1W, "time_ratio_2w": TARGET_TIME_RATIO_2W,
                    "comm_units_pcgrad_sharded": sharded_target,
                    "small_collectives_allowance_units": SMALL_COLLECTIVES_UNITS},
        "passed": passed,
        "all_passed": all(passed.values()),
        "default_plan": two["default_plan"],
        "num_params": num_params,
        "num_tasks": num_tasks,
        "num_head_params": two["num_head_params"],
        "workers": {f"{n}w": group for n, group in groups.items()},
        "config": asdict(config),
        "load_average_before_after": load_average,
        "wall_s": wall_s,
    }


def _paired_ratio(group: dict, key: str) -> float:
    """Median over the timed pairs of pcgrad's step time over sum's: the two steps of a pair ran back to back,
    under the same load from other processes, so each ratio cancels most of it."""
    runs = group["runs"]
    return statistics.median(p / s for p, s in zip(runs["pcgrad"][key], runs["sum"][key]))


# -- worker side ------------------------------------------------------------------------------------------------
def bench_worker(loop_config: dict) -> None:
    """On each Ray Train worker: the timed pair side by side, then the other plans (2 workers); rank 0 writes."""
    import torch.distributed as dist

    from dist_minbert.surgery.distributed import resolve_plan

    # Ray forwards a worker's stdout to the driver's, where the report must stand alone, at its own pace
    # (after the driver's redirection may have ended): the worker's fd 1 goes to its stderr instead.
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    config = PCGradBenchConfig(**loop_config["bench"])
    num_workers = loop_config["num_workers"]
    build = trainer_builder(config, loop_config, num_workers)
    runs, sizes = _timed_pair(build, config)
    default_plan = resolve_plan("auto", dist.get_backend())
    if num_workers > 1:
        for name, (mode, plan) in PLAN_RUNS.items():
            if mode == "pcgrad" and plan == default_plan:
                runs[name] = runs["pcgrad"]  # the timed pcgrad run is this plan
            else:
                runs[name] = _plan_run(build(mode, plan, name), config)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, runs)
    if dist.get_rank() == 0:
        for name, run in runs.items():  # memory is per rank: report the largest
            run["peak_gradient_bytes"] = max(rank_runs[name]["peak_gradient_bytes"] for rank_runs in gathered)
        Path(loop_config["result_path"]).write_text(json.dumps(
            {**sizes, "num_tasks": len(TASK_FILES), "num_workers": num_workers,
             "threads_per_worker": config.threads_per_worker, "default_plan": default_plan, "runs": runs}))


def run_config(config: PCGradBenchConfig, data_root: str, output_dir: str, num_workers: int, mode: str,
               plan: str) -> dict:
    """The training run a benchmark worker builds (bench scaling's too): the demo's tasks and heads, only the
    train splits."""
    heads = {"sst": "linear", "qqp": "cross", "sts": "cross"}
    num_steps = max(config.warmup_steps + config.timed_steps, 1 + config.plan_steps)
    return {
        "model": {"checkpoint": config.checkpoint, "dropout": config.dropout, "max_length": config.max_length},
        "tasks": {task: {"train": file, "dev": "", "test": "", "batch_size": config.batch_size, "head": heads[task]}
                  for task, file in TASK_FILES.items()},
        "data": {"root": data_root},
        "schedule": {"name": "round_robin"},
        "surgery": asdict(SurgeryConfig(mode=mode, plan=plan)),
        "deepspeed": {"zero_stage": config.zero_stage},
        # Enough epochs for the longest run whatever max_rows; the learning-rate schedule spans those steps.
        "train": {"output_dir": output_dir, "epochs": num_steps, "max_steps": num_steps},
        "workers": {"num_workers": num_workers},
        "observe": {"tensorboard": False, "progress": False},
    }


def trainer_builder(config: PCGradBenchConfig, loop_config: dict, num_workers: int):
    """`build(mode, plan, name)` → a Trainer on run_config, in its own folder (bench scaling's ours side too)."""
    from dist_minbert.config import config_from_dict
    from dist_minbert.engine.dist_context import DistContext
    from dist_minbert.engine.trainer import Trainer

    def build(mode: str, plan: str, name: str) -> Trainer:
        out = Path(loop_config["scratch"]) / f"{num_workers}w-{name}"
        raw = run_config(config, loop_config["data_root"], str(out), num_workers, mode, plan)
        return Trainer(config_from_dict(raw), DistContext.current(use_gpu=False))

    return build


def _timed_pair(build, config: PCGradBenchConfig) -> tuple[dict, dict[str, int]]:
    """sum and pcgrad (default plan) alternating step by step, the order flipped every pair; also returns the
    parameter counts of the encoder (P) and of the heads."""
    trainers = {mode: build(mode, "auto", mode) for mode in TIMED_MODES}
    meters = {mode: _StepMeter(trainer) for mode, trainer in trainers.items()}
    model = trainers["sum"].model
    sizes = {"num_params": meters["sum"].num_params,
             "num_head_params": sum(p.numel() for task in model.tasks for p in model.task_parameters(task))}
    positions = {mode: iter(trainer.positions()) for mode, trainer in trainers.items()}
    for step in range(config.warmup_steps + config.timed_steps):
        order = TIMED_MODES if step % 2 == 0 else TIMED_MODES[::-1]
        for mode in order:
            meters[mode].step(next(positions[mode]), timed=step >= config.warmup_steps)
    runs = {mode: meter.summary() for mode, meter in meters.items()}
    del trainers, meters, positions
    gc.collect()
    return runs, sizes


def _plan_run(trainer, config: PCGradBenchConfig) -> dict:
    meter = _StepMeter(trainer)
    positions = iter(trainer.positions())
    for step in range(1 + config.plan_steps):
        meter.step(next(positions), timed=step >= 1)
    summary = meter.summary()
    del trainer, meter, positions
    gc.collect()
    return summary


class _StepMeter:
    """Times a trainer's steps and counts every collective they issue; tracks peak gradient memory."""

    def __init__(self, trainer) -> None:
        from dist_minbert.engine.step_gradients import SurgeryGradients

        self.trainer = trainer
        self.surgery = trainer.gradients if isinstance(trainer.gradients, SurgeryGradients) else None
        self.num_params = sum(p.numel() for p in trainer.model.shared_parameters())
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.units: list[float] = []
        self.calls: list[int] = []
        self.comm_s: list[float] = []
        self.peak_sum_bytes = 0
        if self.surgery is None:
            self._watch_summed_gradients(trainer.engine)

    def _watch_summed_gradients(self, engine) -> None:
        """The baseline's gradient buffers are the .grad tensors DeepSpeed steps on: measured at engine.step."""
        from dist_minbert.engine.step_gradients import gradient_bytes

        original = engine.step

        def step(*args, **kwargs):
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            self.peak_sum_bytes = max(self.peak_sum_bytes, gradient_bytes(grads))
            return original(*args, **kwargs)

        engine.step = step

    def step(self, position: tuple[int, int], timed: bool) -> None:
        from dist_minbert.surgery.comm import CommCounter, record_collectives

        counter = CommCounter(self.num_params)
        wall, cpu = time.perf_counter(), time.process_time()
        with record_collectives(counter):
            self.trainer.train_step(self.trainer.read_step(position))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if timed:
            self.wall.append(wall)
            self.cpu.append(cpu)
            self.units.append(counter.units)
            self.calls.append(counter.num_calls)
            self.comm_s.append(counter.seconds)

    def summary(self) -> dict:
        peak = self.surgery.peak_gradient_bytes if self.surgery is not None else self.peak_sum_bytes
        return {"step_s": statistics.median(self.wall), "cpu_s": statistics.median(self.cpu),
                "step_s_all": self.wall, "cpu_s_all": self.cpu, "comm_units": statistics.median(self.units),
                "comm_calls": statistics.median(self.calls), "comm_s": statistics.median(self.comm_s),
                "peak_gradient_bytes": peak}
