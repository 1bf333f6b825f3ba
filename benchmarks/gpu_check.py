"""`make gpu-check`: bf16 training on CUDA with NCCL at ZeRO 0, 1 and 2, and bf16 autocast, against fp32, under
exact PCGrad.

For a machine with GPUs (the CPU suite never runs it; without CUDA it says so and exits 2). Each run is the
production path — `dist-minbert train`'s launcher: Ray Train workers, one GPU each, NCCL, DeepSpeed — on the
given config for --steps optimizer steps with exact PCGrad (surgery.mode=pcgrad), logging every step:

    fp32, ZeRO 0   the reference curve
    bf16, ZeRO 0 / 1 / 2
    autocast_bf16, ZeRO 0   fp32 weights, the training forward under bf16 autocast

Checks, each named in the JSON's `checks`:
- every run logged a finite loss at every step (a non-finite bf16 step is skipped and logs none), and PCGrad's
  weights, finite, at every step: exact PCGrad ran under bf16;
- each bf16 and autocast run's loss curve within tolerance of fp32's: |bf16 − fp32| ≤ atol + rtol·|fp32| at every step
  and task (the same data, seeds and dropout masks; bf16 rounding alone moves them);
- ZeRO 1 and 2 within the same tolerance of bf16 ZeRO 0 (partitioning changes no maths).
Printed as one JSON object: per run samples/s, tokens/s, peak GPU memory per rank (torch.cuda.max_memory_allocated)
and peak host RSS, the curves, the checks. Exit 0 when every check passes, 1 otherwise.

    .venv/bin/python benchmarks/gpu_check.py [--config configs/demo.yaml] [--steps 20] [--gpus N]
        [--rtol 0.05] [--atol 0.05] [--out runs/gpu-check] [overrides ...]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

RUNS = {  # name → (precision, ZeRO stage)
    "fp32_zero0": ("fp32", 0),
    "bf16_zero0": ("bf16", 0),
    "bf16_zero1": ("bf16", 1),
    "bf16_zero2": ("bf16", 2),
    "autocast_bf16_zero0": ("autocast_bf16", 0),
}
REFERENCE, BF16_REFERENCE = "fp32_zero0", "bf16_zero0"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="the run config (default configs/demo.yaml)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of each run (default 20)")
    parser.add_argument("--gpus", type=int, default=0, help="workers, one GPU each (default: every visible GPU)")
    parser.add_argument("--rtol", type=float, default=0.05, help="loss tolerance, relative to fp32 (default 0.05)")
    parser.add_argument("--atol", type=float, default=0.05, help="loss tolerance, absolute (default 0.05)")
    parser.add_argument("--out", default="runs/gpu-check", help="folder of the runs (default runs/gpu-check)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the config")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: at least 2 (a curve)")
    if args.gpus < 0 or args.rtol < 0 or args.atol < 0:
        parser.error("--gpus, --rtol and --atol must be ≥ 0")
    return args


def compare_curves(reference: dict[str, dict[int, float]], candidate: dict[str, dict[int, float]], rtol: float,
                   atol: float) -> dict:
    """Per-step losses (task → step → loss) of a candidate against a reference: the largest excess over the
    tolerance atol + rtol·|reference| (≤ 0 passes), the largest absolute difference, and the steps either lacks."""
    worst, largest, missing = -math.inf, 0.0, []
    for task, steps in reference.items():
        for step, ref in steps.items():
            got = candidate.get(task, {}).get(step)
            if got is None or not math.isfinite(got):
                missing.append(f"{task}@{step}")
                continue
            difference = abs(got - ref)
            largest = max(largest, difference)
            worst = max(worst, difference - (atol + rtol * abs(ref)))
    return {"max_abs_difference": largest, "max_excess_over_tolerance": worst, "missing": missing,
            "passed": not missing and worst <= 0}


def trained_every_step(losses: dict[str, dict[int, float]], steps: int) -> dict:
    """A finite loss logged at every one of `steps` steps (a skipped, non-finite step logs none)."""
    missing = [s for s in range(1, steps + 1)
               if not any(math.isfinite(by_step.get(s, math.nan)) for by_step in losses.values())]
    return {"steps_without_loss": missing, "passed": not missing}


def pcgrad_ran(scalars: dict[str, dict[int, float]], steps: int) -> dict:
    """Exact PCGrad's weights were logged, finite, at every one of `steps` steps."""
    weights = {tag: by_step for tag, by_step in scalars.items() if tag.startswith("surgery/weight/")}
    missing = [f"{tag}@{s}" for tag, by_step in weights.items() for s in range(1, steps + 1)
               if not math.isfinite(by_step.get(s, math.nan))]
    return {"weight_tags": sorted(weights), "missing_or_non_finite": missing,
            "passed": bool(weights) and not missing}


def run_figures(run_dir: Path) -> dict:
    """What one finished run reports: summary.json's rates and host memory, TensorBoard's per-step losses,
    PCGrad weights and per-rank peak GPU memory."""
    from dist_minbert.bench.scale_report import read_scalars

    summary = json.loads((run_dir / "summary.json").read_text())
    scalars = {tag: dict(values) for tag, values in read_scalars(run_dir / "tensorboard").items()}
    gpu = {tag.rsplit("/", 1)[1]: max(by_step.values()) for tag, by_step in scalars.items()
           if tag.startswith("memory/gpu_peak_mb/")}
    return {"steps": summary["steps"], "samples_per_s": summary["samples_per_s"],
            "tokens_per_s": summary.get("tokens_per_s"), "peak_gpu_mb": gpu, "peak_rss_mb": summary.get("peak_rss_mb"),
            "losses": {tag.split("/", 1)[1]: by_step for tag, by_step in scalars.items() if tag.startswith("loss/")},
            "scalars": scalars}


def checks(runs: dict[str, dict], steps: int, rtol: float, atol: float) -> dict:
    out = {}
    for name, run in runs.items():
        out[f"{name}_trained_every_step"] = trained_every_step(run["losses"], steps)
        out[f"{name}_pcgrad"] = pcgrad_ran(run["scalars"], steps)
        if name != REFERENCE:
            out[f"{name}_vs_{REFERENCE}"] = compare_curves(runs[REFERENCE]["losses"], run["losses"], rtol, atol)
        if name.startswith("bf16_") and name != BF16_REFERENCE:  # ZeRO 1 and 2
            out[f"{name}_vs_{BF16_REFERENCE}"] = compare_curves(runs[BF16_REFERENCE]["losses"], run["losses"], rtol,
                                                                atol)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device here (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}); run it on a machine with a GPU and torch's CUDA build", file=sys.stderr)
        return 2
    from dist_minbert.config import load_config
    from launch.ray_run import run_training

    num_gpus = args.gpus or torch.cuda.device_count()
    out = Path(args.out).resolve()
    runs = {}
    with contextlib.redirect_stdout(sys.stderr):  # the JSON alone on stdout
        for name, (precision, stage) in RUNS.items():
            cfg = load_config(args.config, [
                *args.overrides, "workers.use_gpu=true", f"workers.num_workers={num_gpus}",
                f"deepspeed.precision={precision}", f"deepspeed.zero_stage={stage}", "surgery.mode=pcgrad",
                f"train.max_steps={args.steps}", f"train.output_dir={json.dumps(str(out / name))}",
                "checkpoint.resume=''", "observe.log_every=1", "observe.tensorboard=true", "observe.progress=false"])
            run_training(cfg)
            runs[name] = run_figures(out / name)
    verdicts = checks(runs, args.steps, args.rtol, args.atol)
    report = {"device": torch.cuda.get_device_name(0), "num_gpus": num_gpus, "steps": args.steps,
              "tolerance": {"rtol": args.rtol, "atol": args.atol},
              "runs": {name: {k: v for k, v in run.items() if k != "scalars"} for name, run in runs.items()},
              "checks": verdicts, "all_passed": all(v["passed"] for v in verdicts.values())}
    print(json.dumps(report, indent=2))
    return 0 if report["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
