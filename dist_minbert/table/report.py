"""docs/RESULTS.md, written from the results file and the table config alone: every figure in it is a recorded
run's, and a row without one says pending."""
from __future__ import annotations

import os
import statistics
from pathlib import Path

from dist_minbert.table.config import TableConfig, dotted_overrides, trials
from dist_minbert.table.results import Results
from dist_minbert.tasks.metrics import overall_score

METRICS = (("sst", "accuracy", "SST acc"), ("qqp", "accuracy", "QQP acc"), ("sts", "pearson", "STS Pearson"))
QQP_NOTE = ("The embedded checkpoint (all-MiniLM-L6-v2) was trained on Quora duplicate question pairs among its "
            "contrastive data (its model card says so), so its QQP figures may be optimistic against a model "
            "that never saw them. QQP here is a fixed split of the 20,214 labelled pairs the course shipped, "
            "not the study's 283k-pair training set, and the task sizes differ by 2.4×, not 47× as in the study, "
            "so the sampling strategies matter less here than they did there.")


def write_report(table: TableConfig, results: Results, config_path: str, path: str | os.PathLike) -> str:
    """RESULTS.md at `path`; returns its text. Links are relative to its folder."""
    path = Path(path)
    text = "\n".join(_sections(table, results, config_path, path.parent)) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def _row_figures(runs: list[dict]) -> dict[str, list[float]]:
    """metric → its value in each recorded run (best dev evaluation), "score" included; a run without the
    figure (no evaluation, or a Pearson of constant predictions, written as null) is left out of it."""
    figures = {name: [r["dev"][task][metric] for r in runs
                      if (r["dev"] or {}).get(task, {}).get(metric) is not None]
               for task, metric, name in METRICS}
    figures["score"] = [r["score"] for r in runs if r["score"] is not None]
    return figures


def _runs(table: TableConfig, results: Results, row: str) -> list[dict]:
    return results.finished_records(trials(table, [row]))


def _mean_spread(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _study_score(study) -> float:
    return overall_score({"sst": {"accuracy": study.sst}, "qqp": {"accuracy": study.qqp},
                          "sts": {"pearson": study.sts}})


def _sections(table: TableConfig, results: Results, config_path: str, base: Path) -> list[str]:
    lines = [
        f"# {table.title}",
        "",
        f"Written by `dist-minbert table --config {config_path}` from [`{_rel(results.path, base)}`]"
        f"({_rel(results.path, base)}) (the finished runs, committed): edit the table config's `notes`, not this "
        f"file. A row without a finished run shows as pending; a partly run row says how many of its seeds are "
        f"in. Figures are the best dev evaluation of each run (the checkpoint `predict` and `evaluate` use), "
        f"mean ± standard deviation over seeds; the score is the study's, (SST acc + QQP acc + (STS Pearson + 1) "
        f"/ 2) / 3.",
        "",
        "## The budget",
        "",
        "Every row is its config file with these overrides first (the one training budget), then the row's own:",
        "",
        "```",
        *(dotted_overrides(table.shared, "shared") or ["(none)"]),
        "```",
        "",
        _machines(results),
        "",
        "## Dev results",
        "",
        "| row | seeds | SST acc | QQP acc | STS Pearson | score | wall time and steps per run "
        "| the study (SST / QQP / STS / score) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.rows.items():
        runs = _runs(table, results, name)
        study = (f"{row.study.sst:.3f} / {row.study.qqp:.3f} / {row.study.sts:.3f} / {_study_score(row.study):.3f}"
                 + (f" ({row.study.source})" if row.study.source else "")) if row.study else ""
        label = row.label or name
        if not runs:
            lines.append(f"| {label} | 0 of {row.seeds} | pending | pending | pending | pending | | {study} |")
            continue
        figures = _row_figures(runs)
        steps = sorted({r["steps"] for r in runs})
        wall = f"{statistics.mean(r['wall_s'] for r in runs) / 60:.1f} min, {'/'.join(map(str, steps))} steps"
        pretrains = [results.records[r["pretrain"]]["wall_s"] for r in runs if r.get("pretrain") in results.records]
        if pretrains:
            wall += f" (after SimCSE: {statistics.mean(pretrains) / 60:.1f} min, once per seed)"
        cells = [_mean_spread(figures[n]) for _, _, n in METRICS] + [_mean_spread(figures["score"])]
        lines.append(f"| {label} | {len(runs)} of {row.seeds} | {' | '.join(cells)} | {wall} | {study} |")
    lines += ["", QQP_NOTE, ""]
    lines += _targets(table, results) + _ordering(table, results)
    if table.notes.strip():
        lines += ["## Notes", "", table.notes.strip(), ""]
    lines += _best(table, results, base)
    lines += _commands(table, results)
    return lines


def _machines(results: Results) -> str:
    machines = sorted({r["machine"] for r in results.records.values()})
    commits = sorted({r["commit"] for r in results.records.values() if r["commit"]})
    if not machines:
        return "No run has finished yet."
    code = (f" Code at commit{'s' if len(commits) > 1 else ''} {', '.join(f'`{c}`' for c in commits)} "
            f"(\"+changes\": the working tree differed from it)." if commits else "")
    return f"Runs recorded on: {'; '.join(machines)}.{code}"


def _targets(table: TableConfig, results: Results) -> list[str]:
    target = table.targets
    if target is None:
        return []
    label = table.rows[target.row].label or target.row
    figures = _row_figures(_runs(table, results, target.row))
    lines = [f"## Targets for {label}", "", "| | target | ours (mean) | |", "|---|---|---|---|"]
    for task, _, name in METRICS:
        goal = getattr(target, task)
        if not figures[name]:
            lines.append(f"| {name} | {goal:.3f} | pending | |")
            continue
        ours = statistics.mean(figures[name])
        verdict = f"met by {ours - goal:+.3f}" if ours >= goal else f"short by {goal - ours:.3f}"
        lines.append(f"| {name} | {goal:.3f} | {ours:.3f} | {verdict} |")
    return [*lines, ""]


def _ordering(table: TableConfig, results: Results) -> list[str]:
    """Each neighbouring pair of `ordering`: is the later row's mean score higher, and by more than the two
    rows' standard deviations added (needs 2 seeds each)?"""
    if len(table.ordering) < 2:
        return []
    labels = [table.rows[n].label or n for n in table.ordering]
    lines = [f"## Ordering: {' < '.join(labels)}", "", "| pair | score difference | |", "|---|---|---|"]
    for lower, higher in zip(table.ordering, table.ordering[1:]):
        a, b = (_row_figures(_runs(table, results, n))["score"] for n in (lower, higher))
        pair = f"{table.rows[lower].label or lower} → {table.rows[higher].label or higher}"
        if not a or not b:
            lines.append(f"| {pair} | pending | |")
            continue
        diff = statistics.mean(b) - statistics.mean(a)
        spread = (statistics.stdev(a) + statistics.stdev(b)) if len(a) > 1 and len(b) > 1 else None
        if diff <= 0:
            verdict = "reversed" if diff < 0 else "equal"
        elif spread is None:
            verdict = "holds (spread unknown: fewer than 2 seeds)"
        else:
            verdict = "holds beyond the seed spread" if diff > spread else "holds within the seed spread"
        lines.append(f"| {pair} | {diff:+.4f} | {verdict} |")
    return [*lines, ""]


def _best(table: TableConfig, results: Results, base: Path) -> list[str]:
    best = results.best
    if not best:
        return ["## Analysis and test-set predictions", "", "pending: no run of the analysed rows has finished.", ""]
    top = max(best_of_runs(table, results), key=lambda r: r["score"], default=None)
    if top is not None and top["score"] > best["score"]:
        source = (f"The best recorded run of {', '.join(f'`{n}`' for n in table.best_of)} is `{top['key']}` "
                  f"(score {top['score']:.4f}, {top['score'] - best['score']:.4f} above), but its run folder "
                  f"`{top['run_dir']}` was not on the machine that analysed, so the analysis below is of "
                  f"`{best['key']}` (score {best['score']:.4f}, `{best['run_dir']}`):")
    else:
        source = (f"From the best analysed run of `{best['row']}` (seed {best['seed']}, score {best['score']:.4f}, "
                  f"`{best['run_dir']}`):")
    lines = ["## Analysis and test-set predictions", "", source, ""]
    for name, path in best["analysis"].items():
        link = _rel(path, base)
        lines.append(f"- {name}:\n\n  ![{name}]({link})" if link.endswith(".png") else f"- {name}: [`{link}`]({link})")
    for task, path in best["predictions"].items():
        lines.append(f"- {task} test-set predictions (CS224N format): [`{_rel(path, base)}`]({_rel(path, base)})")
    lines += ["", "```bash", *best["commands"], "```", ""]
    return lines


def best_of_runs(table: TableConfig, results: Results) -> list[dict]:
    """The recorded runs of `best_of` that have a score: those the analysis picks its run from."""
    return [r for r in results.finished_records(trials(table, table.best_of) if table.best_of else [])
            if r["score"] is not None]


def _commands(table: TableConfig, results: Results) -> list[str]:
    lines = ["## Commands", "", "Each run alone, as the table ran it (`dist-minbert table` runs the same code path), "
             "with the machine and commit of its recorded run:", "", "```bash"]
    seen_pretrains = set()
    for trial in trials(table):
        if trial.pretrain is not None and trial.pretrain.key not in seen_pretrains:
            seen_pretrains.add(trial.pretrain.key)
            lines.append(trial.pretrain.command(table.output_dir) + _where(results, trial.pretrain))
        lines.append(trial.command(table.output_dir) + _where(results, trial))
    return [*lines, "```"]


def _where(results: Results, trial) -> str:
    """A command's comment: where and at which commit its recorded run ran, or pending."""
    if not results.finished(trial):
        return "   # pending"
    record = results.records[trial.key]
    return f"   # {record['machine']}" + (f", commit {record['commit']}" if record["commit"] else "")


def _rel(path: str | os.PathLike, base: Path) -> str:
    return os.path.relpath(Path(path).resolve(), base.resolve())
