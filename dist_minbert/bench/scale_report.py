"""What `dist-minbert scale` reads from each run and writes about all of them: the CSV, the plot, TensorBoard.

A measured row comes from one run's own TensorBoard events (logged every step): the median over the steps
after warm-up of samples/s, tokens/s and each `time/*_s` part of the step, so the first steps (DeepSpeed's and
gloo's set-up, allocator growth) do not weigh on a short run as they do on summary.json's run-long mean.
Projected rows (bench/scaling_model.py) carry kind "projection" and are drawn and tagged apart.
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

STEP_PARTS = ("data", "forward_backward", "surgery", "communication", "optimizer", "step")
COLUMNS = ("kind", "workers", "num_params", "global_batch", "samples_per_s", "tokens_per_s", "efficiency",
           *(f"{part}_s" for part in STEP_PARTS), "compute_s", "peak_rss_mb")
# TensorBoard tags of a row's figures, by prefix: measured rows under scale/, projected ones under projection/.
ROW_SCALARS = ("samples_per_s", "tokens_per_s", "efficiency", *(f"{part}_s" for part in STEP_PARTS), "compute_s")


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """tag → [(step, value)] of every scalar in the event files of one run folder (tensorboard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def measured_row(run_dir: str | Path, num_workers: int, warmup_steps: int) -> dict:
    """One run's row: medians over its logged steps after `warmup_steps` (all steps if none is left)."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    scalars = read_scalars(run_dir / "tensorboard")
    if "throughput/samples_per_s" not in scalars:
        raise ValueError(f"{run_dir / 'tensorboard'}: no throughput/samples_per_s scalars; allowed: a run logged "
                         f"with observe.tensorboard=true")

    def median(tag: str) -> float | None:
        values = [v for step, v in scalars.get(tag, []) if step > warmup_steps] or [v for _, v in scalars.get(tag, [])]
        return statistics.median(values) if values else None

    row = {"kind": "measured", "workers": num_workers, "global_batch": summary["samples"] / summary["steps"],
           "samples_per_s": median("throughput/samples_per_s"), "tokens_per_s": median("throughput/tokens_per_s"),
           "peak_rss_mb": summary.get("peak_rss_mb")}
    row.update({f"{part}_s": median(f"time/{part}_s") for part in STEP_PARTS})
    # The work of one worker in a step: the step less its data wait and its communication.
    row["compute_s"] = row["step_s"] - (row["data_s"] or 0.0) - (row["communication_s"] or 0.0)
    return row


def add_efficiency(rows: list[dict]) -> list[dict]:
    """Each measured row's efficiency against the fewest workers measured, m: (rate_n / n) / (rate_m / m)
    (with m = 1, rate_n / (n · rate_1))."""
    base = min(rows, key=lambda row: row["workers"])
    per_worker = base["samples_per_s"] / base["workers"]
    return [{**row, "efficiency": row["samples_per_s"] / row["workers"] / per_worker} for row in rows]


def compute_s_per_sample(row: dict) -> float:
    """One worker's compute seconds per sample, from a measured row: its compute time per step over its share of
    the global batch."""
    return row["compute_s"] * row["workers"] / row["global_batch"]


def write_csv(rows: list[dict], path: str | Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})


def plot(rows: list[dict], path: str | Path, projection_label: str = "") -> None:
    """Samples/s and efficiency against workers: measured points joined by solid lines, projected ones hollow and
    dashed, each labelled in the legend."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file
    import matplotlib.pyplot as plt

    fig, (rate_ax, eff_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"measured": dict(linestyle="-", marker="o", label="measured"),
              "projection": dict(linestyle="--", marker="s", markerfacecolor="none",
                                 label=f"projection{f' ({projection_label})' if projection_label else ''}")}
    for kind, style in styles.items():
        points = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["workers"])
        if not points:
            continue
        workers = [r["workers"] for r in points]
        rate_ax.plot(workers, [r["samples_per_s"] for r in points], **style)
        eff_ax.plot(workers, [r["efficiency"] for r in points], **style)
    rate_ax.set(xlabel="workers", ylabel="samples/s (global batch fixed)", title="throughput", xscale="log",
                yscale="log")
    eff_ax.set(xlabel="workers", ylabel="rate_n / (n · rate_1)", title="scaling efficiency", xscale="log",
               ylim=(0, 1.1))
    for ax in (rate_ax, eff_ax):
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # only the worker counts are labelled
        ax.set_xticks(sorted({r["workers"] for r in rows}))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tensorboard(rows: list[dict], log_dir: str | Path) -> None:
    """One TensorBoard run per measured size (`workers-<n>`) and a `summary` run, all with x = workers:
    measured figures under scale/, projected ones under projection/."""
    from dist_minbert.observe.metrics_logger import MetricsLogger

    def scalars(row: dict) -> dict[str, float]:
        prefix = "scale" if row["kind"] == "measured" else "projection"
        return {f"{prefix}/{key}": row[key] for key in ROW_SCALARS if row.get(key) is not None}

    summary = MetricsLogger(str(Path(log_dir) / "summary"))
    for row in rows:
        if row["kind"] == "measured":
            size = MetricsLogger(str(Path(log_dir) / f"workers-{row['workers']}"))
            size.scalars(row["workers"], scalars(row))
            size.close()
        summary.scalars(row["workers"], scalars(row))
    summary.close()
