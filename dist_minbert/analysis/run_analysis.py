"""The analysis of one finished run, written into a folder: what `dist-minbert analyse` and the table's best run
produce. The model is the run's best checkpoint (as `evaluate` and `predict` load it); the conflicts come from
the run's own TensorBoard events."""
from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

from dist_minbert.analysis.conflicts import conflict_fractions, conflict_series, plot_conflicts
from dist_minbert.analysis.dev_errors import confusion_matrix, dev_outputs, plot_confusion, worst_examples
from dist_minbert.bench.scale_report import read_scalars
from dist_minbert.observe.progress import progress_bar
from dist_minbert.tasks.config import objective_for

log = logging.getLogger(__name__)

NUM_WORST = 10  # examples per task


def analyse_run(run_dir: str | Path, out: str | Path, num_worst: int = NUM_WORST) -> dict[str, str]:
    """Writes `<task>_confusion.png` (multi-class tasks), `worst_examples.md`, and, for a run with gradient
    surgery, `conflicts.png` and `conflicts.json` into `out`; returns what → path."""
    from dist_minbert.engine.checkpoint_io import load_trained_model

    run_dir, out = Path(run_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's import-time notices
        cfg, model = load_trained_model(run_dir)
    if not hasattr(cfg, "tasks"):
        raise ValueError(f"{run_dir}: a SimCSE run has no task heads to analyse; allowed: a `train` run's folder")
    tasks = [t for t, spec in cfg.tasks.items() if spec.dev and objective_for(spec) != "simcse"]
    written, sections = {}, ["# The dev examples the model gets most wrong", "", f"Run `{run_dir}`, its best "
                             f"checkpoint; {num_worst} per task.", ""]
    bar = progress_bar(len(tasks), "dev sets", stream=sys.stderr)
    for task in tasks:
        outputs = dev_outputs(model, cfg, task)
        spec = cfg.tasks[task]
        if objective_for(spec) == "ce":
            path = out / f"{task}_confusion.png"
            plot_confusion(confusion_matrix(outputs.labels, outputs.preds, spec.num_classes), task, path)
            written[f"{task.upper()} dev confusion matrix"] = str(path)
        sections += worst_examples(outputs, spec, num_worst)
        bar.update()
    bar.close()
    (out / "worst_examples.md").write_text("\n".join(sections))
    written["dev examples the model gets most wrong"] = str(out / "worst_examples.md")
    series = conflict_series(read_scalars(run_dir / "tensorboard"), tasks)
    if not any(points["steps"] for points in series.values()):
        log.info("%s: no logged step holds two tasks' gradients (no surgery, or one task a step): no conflict "
                 "statistics", run_dir)
        return written
    plot_conflicts(series, out / "conflicts.png")
    (out / "conflicts.json").write_text(json.dumps(conflict_fractions(series, cfg.observe.log_every), indent=1))
    written["conflicting task gradients over training"] = str(out / "conflicts.png")
    written["conflict fraction per task pair"] = str(out / "conflicts.json")
    return written
