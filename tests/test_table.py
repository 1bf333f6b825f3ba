"""`dist-minbert table` and `dist-minbert analyse` on the tiny random BERT: two rows (summed losses, exact PCGrad),
one seed each, 2 steps a run, on the shared data's slices.

The distributed tests share one table (`finished_table`), made the way a user meets it:
1. `dist-minbert table` in a subprocess of its own, interrupted (SIGINT, as Ctrl-C) once the results file holds
   the first row; the second row's run is cut short.
2. The same command again (in this process, on the session's Ray): Tune's experiment is restored, the finished
   row is not run again (its summary.json keeps its mtime), the second row runs, the best run of `best_of` is
   analysed and predicts the test sets.
Then a fresh output folder with the same results file and one more seed of the first row runs that seed alone.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from dist_minbert.cli import main
from dist_minbert.config_loader import parse_override
from dist_minbert.table.config import dotted_overrides, load_table_config, trials
from dist_minbert.table.report import write_report
from dist_minbert.table.results import Results
from tests.test_cli_end_to_end import NUM_DEV_ROWS, write_config, write_data
from tests.test_observe_tensorboard import logged_scalars

REPO = Path(__file__).resolve().parents[1]
TASKS = ("sst", "qqp", "sts")


@dataclass
class TableFiles:
    root: Path
    row_config: Path

    def table(self, folder: Path, **changes) -> Path:
        """A table YAML in `folder` (its outputs there too), with top-level keys replaced by `changes`."""
        folder.mkdir(parents=True, exist_ok=True)
        table = {
            "rows": {
                "plain": {"config": str(self.row_config), "label": "Sum of losses",
                          "study": {"sst": 0.486, "qqp": 0.773, "sts": 0.31, "source": "Table 1"}},
                "pcgrad": {"config": str(self.row_config), "overrides": {"surgery": {"mode": "pcgrad"}}},
            },
            # One worker of 2 CPUs: one trial at a time on the 2-CPU Ray, and half the start-up of two workers.
            "shared": {"train": {"max_steps": 2}, "workers": {"num_workers": 1, "cpus_per_worker": 2}},
            "output_dir": str(folder / "runs"), "results": str(folder / "results" / "table.json"),
            "report": str(folder / "RESULTS.md"), "analysis_dir": str(folder / "results"),
            "best_of": ["pcgrad"], "targets": {"row": "pcgrad", "sst": 0.5, "qqp": 0.8, "sts": 0.8},
            "ordering": ["plain", "pcgrad"], **changes,
        }
        path = folder / "table.yaml"
        path.write_text(yaml.safe_dump(table, sort_keys=False))
        return path


@pytest.fixture(scope="module")
def files(tiny_checkpoint, shared_data, tmp_path_factory) -> TableFiles:
    root = tmp_path_factory.mktemp("table")
    write_data(shared_data, root / "data", TASKS, tiny_checkpoint)
    return TableFiles(root, write_config(root / "row.yaml", TASKS, tiny_checkpoint, root / "data", root / "unused"))


# -- the config, the results file and the report, without Ray ----------------------------------------------------

@pytest.mark.parametrize("change,overrides,message", [
    ({}, ["rows.plain.seedz=2"], "unknown key rows.plain.seedz"),
    ({}, ["rows.pcgrad.overrides.surgery.mode=pcgrd"], "rows.pcgrad"),
    ({}, ["rows.pcgrad.overrides.surgery.mode=pcgrd"], "surgery.mode: 'pcgrd' is not allowed"),
    ({}, ["rows.plain.pretrain=simcse"], "rows.plain.pretrain: 'simcse' is not in pretrains"),
    ({}, ["rows.plain.seeds=0"], "rows.plain.seeds: 0 must be ≥ 1"),
    ({"best_of": ["b2"]}, [], "best_of: 'b2' is not a row"),
    ({"rows": {"tune": {"config": "x.yaml"}}}, [], "rows.tune: the name is a folder of the table's own"),
    ({}, ["shared.train.epochz=3"], "unknown key train.epochz"),
    ({}, ["rows.plain.config=/nonexistent/row.yaml"], "rows.plain (/nonexistent/row.yaml): config file not found"),
])
def test_bad_table_config_names_the_key(files, tmp_path, capsys, change, overrides, message):
    table = files.table(tmp_path, **change)
    assert main(["table", "--config", str(table), *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_unknown_row_on_the_command_line(files, tmp_path, capsys):
    assert main(["table", "--config", str(files.table(tmp_path)), "--rows", "plain,b9"]) == 2
    assert "--rows: 'b9' is not a row of the table; allowed: plain, pcgrad" in capsys.readouterr().err


def test_pretraining_without_its_corpus_stops_before_ray(files, tiny_checkpoint, tmp_path, capsys):
    simcse = tmp_path / "simcse.yaml"
    simcse.write_text(yaml.safe_dump({"model": {"checkpoint": tiny_checkpoint},
                                      "simcse": {"corpus": str(tmp_path / "no-corpus")}}))
    table = files.table(tmp_path, pretrains={"simcse": {"config": str(simcse)}})
    assert main(["table", "--config", str(table), "rows.pcgrad.pretrain=simcse", "--rows", "pcgrad"]) == 2
    err = capsys.readouterr().err
    assert f"pretrains.simcse: simcse.corpus {tmp_path / 'no-corpus'} holds no prepared shards" in err
    assert "dist-minbert prepare --config" in err and not (tmp_path / "runs" / "tune").exists()


@pytest.mark.parametrize("tree", [
    {"schedule": {"stagger_tasks": ["qqp", "sst"], "name": "staggered"}},
    {"optim": {"lr": 5.0e-5, "head_lr": None}, "model": {"checkpoint": "/a path/with: colon"}},
    {"train": {"eval_every_epoch": False, "output_dir": "runs/x y"}},
])
def test_dotted_overrides_read_back_as_the_tree(tree):
    rebuilt = {}
    for text in dotted_overrides(tree, "shared"):
        path, value = parse_override(text)
        node = rebuilt
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    assert rebuilt == tree


def test_report_shows_unrun_and_stale_rows_as_pending(files, tmp_path):
    table_path = files.table(tmp_path, rows={
        "plain": {"config": str(files.row_config), "seeds": 2},
        "pcgrad": {"config": str(files.row_config), "overrides": {"surgery": {"mode": "pcgrad"}}}})
    table = load_table_config(table_path, ["title=Two rows tuned"])
    plain0, plain1, pcgrad = trials(table)
    dev = {"sst": {"accuracy": 0.5}, "qqp": {"accuracy": 0.8}, "sts": {"pearson": 0.6, "spearman": 0.6}}
    results = Results(tmp_path / "results.json")
    for trial, sst in ((plain0, 0.5), (plain1, 0.7)):
        results.records[trial.key] = {"key": trial.key, "row": "plain", "seed": trial.seed, "kind": "train",
                                      "fingerprint": trial.fingerprint, "dev": {**dev, "sst": {"accuracy": sst}},
                                      "score": (sst + 0.8 + 0.8) / 3, "wall_s": 60.0 * (1 + trial.seed), "steps": 40,
                                      "machine": "m", "commit": "c"}
    # Recorded under another budget: not this table's run.
    results.records[pcgrad.key] = {**results.records[plain0.key], "key": pcgrad.key, "row": "pcgrad",
                                   "fingerprint": "0" * 16}
    text = write_report(table, results, "table.yaml", tmp_path / "RESULTS.md")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| p")}
    assert text.startswith("# Two rows tuned\n")
    # SST 0.5 and 0.7: mean 0.6, sample standard deviation 0.1414; scores 0.7 and 0.7667.
    assert ("| 2 of 2 | 0.600 ± 0.141 | 0.800 ± 0.000 | 0.600 ± 0.000 | 0.733 ± 0.047 | 1.5 min, 40 steps |"
            in rows["plain"])
    assert "| 0 of 1 | pending | pending | pending | pending |" in rows["pcgrad"]
    assert "| SST acc | 0.500 | pending | |" in text
    assert f"train.output_dir={tmp_path / 'runs' / 'pcgrad' / 'seed-0'}   # pending" in text
    assert f"train.output_dir={tmp_path / 'runs' / 'plain' / 'seed-1'}   # m, commit c" in text


def test_report_names_a_better_run_whose_folder_was_not_here(files, tmp_path):
    table = load_table_config(files.table(tmp_path, rows={"pcgrad": {"config": str(files.row_config), "seeds": 2}},
                                          ordering=[]), [])
    seed0, seed1 = trials(table)
    dev = {"sst": {"accuracy": 0.5}, "qqp": {"accuracy": 0.8}, "sts": {"pearson": 0.6, "spearman": 0.6}}
    results = Results(tmp_path / "results.json")
    for trial, score in ((seed0, 0.70), (seed1, 0.75)):
        results.records[trial.key] = {"key": trial.key, "row": "pcgrad", "seed": trial.seed, "kind": "train",
                                      "fingerprint": trial.fingerprint, "dev": dev, "score": score, "wall_s": 60.0,
                                      "steps": 40, "machine": "m", "commit": "c", "run_dir": f"runs/{trial.seed}"}
    results.set_best({"key": seed0.key, "row": "pcgrad", "seed": 0, "score": 0.70, "run_dir": "runs/0",
                      "analysis": {}, "predictions": {}, "commands": []})
    text = write_report(table, results, "table.yaml", tmp_path / "RESULTS.md")
    assert ("The best recorded run of `pcgrad` is `pcgrad/seed-1` (score 0.7500, 0.0500 above), but its run folder "
            "`runs/1` was not on the machine that analysed, so the analysis below is of `pcgrad/seed-0`") in text
    # Once the better run is the analysed one, the report says only that.
    results.set_best({**results.best, "key": seed1.key, "seed": 1, "score": 0.75, "run_dir": "runs/1"})
    text = write_report(table, results, "table.yaml", tmp_path / "RESULTS.md")
    assert "From the best analysed run of `pcgrad` (seed 1, score 0.7500, `runs/1`):" in text
    assert "was not on the machine" not in text


def test_an_edited_row_config_is_another_run(files, tmp_path):
    row_config = tmp_path / "row.yaml"
    row_config.write_text(files.row_config.read_text())
    table_path = files.table(tmp_path, rows={"plain": {"config": str(row_config)}}, best_of=[], targets=None,
                             ordering=[])
    before = trials(load_table_config(table_path))[0]
    results = Results(tmp_path / "results.json", {before.key: {"fingerprint": before.fingerprint}})
    assert results.finished(before)
    row_config.write_text(row_config.read_text().replace("seed: 7", "seed: 8"))
    after = trials(load_table_config(table_path))[0]
    assert after.key == before.key and not results.finished(after)


# -- real tables on Ray Tune ----------------------------------------------------------------------------------

@dataclass
class FinishedTable:
    folder: Path
    config: Path
    interrupted_rc: int
    interrupted_log: str
    records_when_interrupted: list[str]
    experiment_before: dict
    summary_mtime_before: int


def _wait_for_records(path: Path, num: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and len(json.loads(path.read_text())["records"]) >= num:
            return
        time.sleep(0.2)
    pytest.fail(f"{path}: {num} records did not appear (table exited with {proc.poll()})")


@pytest.fixture(scope="module")
def finished_table(ray_session, files, tmp_path_factory) -> FinishedTable:
    folder = tmp_path_factory.mktemp("interrupted")
    config = files.table(folder)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's shell
    log_path = folder / "interrupted.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dist_minbert", "table", "--config", str(config)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for_records(folder / "results" / "table.json", 1, proc, timeout_s=300)
            proc.send_signal(signal.SIGINT)  # Ctrl-C while the second row runs
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    records = sorted(Results.load(folder / "results" / "table.json").records)
    experiment = json.loads((folder / "runs" / "tune" / "experiment.json").read_text())
    mtime = (folder / "runs" / "plain" / "seed-0" / "summary.json").stat().st_mtime_ns
    assert main(["table", "--config", str(config)]) == 0
    return FinishedTable(folder, config, rc, log_path.read_text(), records, experiment, mtime)


@pytest.mark.distributed
def test_stopped_table_resumes_without_rerunning_the_finished_row(finished_table):
    t = finished_table
    assert t.records_when_interrupted == ["plain/seed-0"]
    assert t.interrupted_rc == 1 and "unfinished   pcgrad/seed-0" in t.interrupted_log, t.interrupted_log[-3000:]
    # Resumed: the same Tune experiment, restored; the finished row's run untouched.
    assert json.loads((t.folder / "runs" / "tune" / "experiment.json").read_text()) == t.experiment_before
    assert sorted(p.name for p in (t.folder / "runs" / "tune").iterdir()) == ["experiment.json",
                                                                            t.experiment_before["name"]]
    assert (t.folder / "runs" / "plain" / "seed-0" / "summary.json").stat().st_mtime_ns == t.summary_mtime_before
    results = Results.load(t.folder / "results" / "table.json")
    assert sorted(results.records) == ["pcgrad/seed-0", "plain/seed-0"]
    for key, record in results.records.items():
        summary = json.loads((Path(record["run_dir"]) / "summary.json").read_text())
        assert record["dev"] == summary["best_dev"] and record["score"] == summary["best_score"]
        assert record["steps"] == 2 and record["wall_s"] == summary["job_wall_s"]
        assert record["command"].startswith(f"dist-minbert train --config {record['spec']['config']} "
                                            f"train.max_steps=2 ")
    report = (t.folder / "RESULTS.md").read_text()
    assert "pending" not in report.split("## Dev results")[1].split("##")[0]
    assert f"{results.records['pcgrad/seed-0']['score']:.3f}" in report


@pytest.mark.distributed
def test_best_run_is_analysed_and_predicts_the_test_sets(finished_table, shared_data):
    import matplotlib.image

    from dist_minbert.analysis.dev_errors import confusion_matrix, dev_outputs
    from dist_minbert.engine.checkpoint_io import load_trained_model

    results = Results.load(finished_table.folder / "results" / "table.json")
    best = results.best
    assert best["key"] == "pcgrad/seed-0"
    analysis = finished_table.folder / "results"
    assert matplotlib.image.imread(analysis / "sst_confusion.png").ndim == 3
    assert matplotlib.image.imread(analysis / "conflicts.png").ndim == 3
    report = (finished_table.folder / "RESULTS.md").read_text()
    for path in [*best["analysis"].values(), *best["predictions"].values()]:
        assert os.path.relpath(path, finished_table.folder) in report
    # Test predictions in the CS224N format: a header, then one line per test row.
    sst_test = (analysis / "predictions" / "sst-ids-sst-test-student-output.csv").read_text().splitlines()
    assert sst_test[0] == "id \t Predicted_Sentiment " and len(sst_test) == 1 + 10  # the slice's 10 test rows
    # The analysis's pass agrees with the run's own dev predictions (the same best checkpoint), for the
    # multi-class, the binary and the regression head.
    cfg, model = load_trained_model(best["run_dir"])
    outputs = {task: dev_outputs(model, cfg, task) for task in TASKS}
    for task in TASKS:
        written = [float(line.split(" , ")[1]) for line in
                   (Path(best["run_dir"]) / "predictions" / f"{task}-dev-output.csv").read_text().splitlines()[1:]]
        assert outputs[task].preds == pytest.approx(written, abs=1e-6), task
    assert outputs["qqp"].true_prob.min() >= 0 and outputs["sts"].true_prob is None
    outputs = outputs["sst"]
    counts = confusion_matrix(outputs.labels, outputs.preds, 5)
    assert counts.sum() == NUM_DEV_ROWS and np.trace(counts) / NUM_DEV_ROWS == pytest.approx(
        results.records["pcgrad/seed-0"]["dev"]["sst"]["accuracy"])
    # Conflict fractions: the logged cosines below zero, per pair (every step logged, every task in every step).
    scalars = logged_scalars(str(Path(best["run_dir"]) / "tensorboard"))
    fractions = json.loads((analysis / "conflicts.json").read_text())
    for pair, stats in fractions.items():
        cosines = list(scalars[f"surgery/cosine/{pair}"].values())
        assert stats["logged_steps"] == len(cosines) == 2
        assert stats["fraction"] == pytest.approx(sum(c < 0 for c in cosines) / len(cosines))


@pytest.mark.distributed
def test_fresh_output_folder_runs_only_what_the_results_file_lacks(finished_table, tmp_path):
    fresh = tmp_path / "fresh"
    assert main(["table", "--config", str(finished_table.config), f"output_dir={fresh}", "rows.plain.seeds=2"]) == 0
    assert sorted(str(p.relative_to(fresh)) for p in fresh.glob("*/seed-*")) == ["plain/seed-1"]
    results = Results.load(finished_table.folder / "results" / "table.json")
    assert sorted(results.records) == ["pcgrad/seed-0", "plain/seed-0", "plain/seed-1"]
    assert results.records["plain/seed-1"]["run_dir"] == str(fresh / "plain" / "seed-1")
    assert "| Sum of losses | 2 of 2 |" in (finished_table.folder / "RESULTS.md").read_text()


@pytest.mark.distributed
def test_a_trial_resumes_only_a_run_of_its_own_fingerprint(finished_table, tmp_path, monkeypatch):
    """A finished row's folder (real checkpoints), as a trial meets it again: unfinished under its own fingerprint
    it is resumed; under another (the row's budget changed) it is moved aside and the run starts afresh."""
    import shutil

    import launch.ray_run
    from dist_minbert.config import load_config
    from launch.table import FINISHED_FILE, STARTED_FILE, _run_once

    out = tmp_path / "seed-0"
    shutil.copytree(finished_table.folder / "runs" / "plain" / "seed-0", out)
    fingerprint = json.loads((out / FINISHED_FILE).read_text())["fingerprint"]
    (out / FINISHED_FILE).unlink()  # as if the trial had been interrupted after its last checkpoint
    started = []

    def run_training(cfg):
        started.append((cfg.checkpoint.resume, json.loads((out / STARTED_FILE).read_text())["fingerprint"],
                        (out / "checkpoints").is_dir()))
        (out / "summary.json").write_text("{}")
        return {}

    monkeypatch.setattr(launch.ray_run, "run_training", run_training)
    cfg = lambda: load_config(out / "config.yaml", [f"train.output_dir={out}"])  # noqa: E731
    _run_once(cfg(), "train", fingerprint)
    assert started == [("latest", fingerprint, True)]
    (out / FINISHED_FILE).unlink()
    _run_once(cfg(), "train", "another")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("superseded-seed-0-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints").is_dir()
    assert started[1] == ("", "another", False)
    assert json.loads((out / FINISHED_FILE).read_text())["fingerprint"] == "another"
