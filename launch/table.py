"""The driver of `dist-minbert table`: each (row, seed) is a Ray Tune trial that runs one full `dist-minbert train`
job through the same launcher (SimCSE first for a row that names a pretraining), so a cluster runs as many rows
at once as its CPUs (or GPUs) hold groups of workers.

A stopped table resumes two ways:
- Within a machine, Tune's experiment under `<output_dir>/tune/` is restored (`Tuner.restore`) when it holds the
  runs still wanted: its finished trials stay finished, an interrupted one starts again, and its train run
  continues from the run's latest checkpoint (a folder holding another version of the run is moved aside).
- Anywhere, the results file (committed) records every finished run with its fingerprint; a table started in a
  fresh checkout or output folder runs only what is not recorded.
The results file and RESULTS.md are written by a Tune callback in this process after each finished trial, so a
kill loses only the runs in flight. At the end, the best run of `best_of` is analysed and predicts the test sets.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from ray.tune import Callback

from dist_minbert.config_loader import to_plain
from dist_minbert.table.config import TableConfig, Trial, load_table_config, trial_config, trials
from dist_minbert.table.report import best_of_runs, write_report
from dist_minbert.table.results import Results, finished_record, git_commit, machine_description, trial_record
from launch import output

log = logging.getLogger(__name__)

EXPERIMENT_FILE = "experiment.json"  # in <output_dir>/tune: the Tune experiment's name and its trials' fingerprints
FINISHED_FILE = "table_trial.json"  # in a run folder the table finished: the trial's fingerprint
STARTED_FILE = "table_trial_started.json"  # in a run folder a table trial started: its fingerprint
# A trial only waits on its Train workers, which hold the CPUs: a CPU of its own would leave a 2-CPU machine one
# short of a 2-worker group. Tune refuses an empty request, hence one byte of memory.
TRIAL_RESOURCES = {"CPU": 0, "memory": 1}


def run_table(config_path: str, overrides: list[str], rows: list[str] | None = None,
              seeds: int | None = None, report_only: bool = False) -> dict:
    """Runs what the results file lacks (nothing if `report_only`), analyses the best run, rewrites RESULTS.md;
    returns counts and paths."""
    table = load_table_config(config_path, overrides)
    results = Results.load(table.results)
    selected = trials(table, rows, seeds)
    pending = [] if report_only else [t for t in selected if not results.finished(t)]
    log.info("table %s: %d runs selected, %d recorded in %s, %d to run", config_path, len(selected),
             sum(results.finished(t) for t in selected), table.results, len(pending))
    errors = _run_trials(table, pending, _Recorder(config_path, overrides)) if pending else {}
    results = Results.load(table.results)
    unfinished = [t.key for t in selected if not results.finished(t)]
    best = _analyse_best(table, results)
    write_report(table, results, config_path, table.report)
    return {"selected": len(selected), "ran": sum(results.finished(t) for t in pending), "unfinished": unfinished,
            "errors": errors, "best": best, "results": table.results, "report": table.report}


class _Recorder(Callback):
    """Tune callback (in the driver): a finished trial's record into the results file, RESULTS.md rewritten.

    It holds only what locates the table: Tune pickles it into the experiment and `Tuner.restore` brings back
    that copy, so everything else is read anew at each trial.
    """

    def __init__(self, config_path: str, overrides: list[str]) -> None:
        self.config_path, self.overrides = config_path, list(overrides)

    def on_trial_result(self, trial, result, **info) -> None:  # Tune passes keywords
        table = load_table_config(self.config_path, self.overrides)
        results = Results.load(table.results)
        payload = trial.config["trial"]
        made_by = (result["machine"], result["commit"])
        if result.get("pretrain_summary"):
            results.record(finished_record(payload["pretrain"]["record"], json.loads(result["pretrain_summary"]),
                                           *made_by))
        record = finished_record(payload["record"], json.loads(result["summary"]), *made_by)
        results.record(record)
        write_report(table, results, self.config_path, table.report)
        score, every_run = record["score"], trials(table)
        log.info("table: %s finished, score %s, %.1f min; %d of the table's %d runs recorded", record["key"],
                 "n/a" if score is None else f"{score:.4f}", record["wall_s"] / 60,
                 len(results.finished_records(every_run)), len(every_run))


def run_trial(config: dict) -> None:
    """One Tune trial: the row's pretraining if its encoder is not there yet, then the row's train run; reports
    the runs' summaries (the driver's callback records them)."""
    from ray import tune

    from dist_minbert.config import config_from_dict

    payload = config["trial"]
    commit = git_commit()  # the code as the trial's runs start (a working tree can change while they run)
    pretrain_summary = _pretrain_once(payload["pretrain"]) if payload["pretrain"] else None
    summary = _run_once(config_from_dict(payload["config"]), "train", payload["record"]["fingerprint"])
    tune.report({"score": summary.get("best_score") or math.nan, "summary": json.dumps(summary),
                 "pretrain_summary": json.dumps(pretrain_summary) if pretrain_summary else "",
                 "machine": machine_description(), "commit": commit})


def _pretrain_once(pretrain: dict) -> dict | None:
    """The SimCSE run unless it is finished; rows at the same seed share it (a lock file keeps two trials from
    running it at once). Returns its summary when this trial ran it."""
    import fcntl

    from dist_minbert.config import simcse_config_from_dict

    cfg = simcse_config_from_dict(pretrain["config"])
    out, fingerprint = Path(cfg.train.output_dir), pretrain["record"]["fingerprint"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return None if _finished_summary(out, fingerprint) else _run_once(cfg, "simcse", fingerprint)


def _run_once(cfg, kind: str, fingerprint: str) -> dict:
    """The job through the launcher, unless its run folder holds it finished (a restored Tune experiment can
    start a trial again whose end its saved state had not caught). A run an interrupted trial of the same
    fingerprint left behind continues from its latest checkpoint; a folder holding any other run (the row's
    config or the table's budget changed since) is moved aside, not resumed. The finished run is marked with
    the trial's fingerprint."""
    from dist_minbert.engine.run_storage import RunStorage
    from launch.ray_run import run_simcse, run_training

    out = Path(cfg.train.output_dir)
    summary = _finished_summary(out, fingerprint)
    if summary is not None:
        log.info("%s: finished before, not run again", out)
        return summary
    if out.exists() and _marked(out, STARTED_FILE) != fingerprint:
        aside = out.with_name(f"superseded-{out.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(aside)
        log.warning("%s: held a run of another version of this trial; moved to %s, starting afresh", out, aside)
    elif RunStorage(cfg.train.output_dir, cfg.train.local_dir).has_checkpoint():
        cfg.checkpoint.resume = "latest"
        log.warning("%s: resuming from the run's latest checkpoint", out)
    _mark(out, STARTED_FILE, fingerprint)
    summary = (run_simcse if kind == "simcse" else run_training)(cfg)
    _mark(out, FINISHED_FILE, fingerprint)
    return summary


def _mark(out: Path, marker: str, fingerprint: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / marker).write_text(json.dumps({"fingerprint": fingerprint}))


def _marked(out: Path, marker: str) -> str | None:
    """The fingerprint a table marker file in the run folder names, if any."""
    try:
        return json.loads((out / marker).read_text())["fingerprint"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


def _finished_summary(out: Path, fingerprint: str) -> dict | None:
    """summary.json of the run folder if a table trial of this fingerprint finished it there."""
    if _marked(out, FINISHED_FILE) != fingerprint:
        return None
    try:
        return json.loads((out / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _check_corpora(pending: list[Trial], table_output: str) -> None:
    """A pretraining still to run needs its corpus shards: said here, not as every worker's error."""
    from dist_minbert.config_loader import ConfigError
    from dist_minbert.data.shards import MANIFEST

    for trial in {t.pretrain for t in pending if t.pretrain is not None}:
        if _finished_summary(Path(trial.output_dir(table_output)), trial.fingerprint):
            continue
        corpus = trial_config(trial, table_output).simcse.corpus
        if "://" not in corpus and not (Path(corpus) / MANIFEST).exists():
            raise ConfigError(
                f"pretrains.{trial.row}: simcse.corpus {corpus} holds no prepared shards (no {MANIFEST}); first: "
                f"dist-minbert corpus --out runs/corpus/sentences.txt && dist-minbert prepare --config "
                f"{trial.config} --corpus runs/corpus/sentences.txt --out {os.path.relpath(corpus)}")


def _payload(trial: Trial, table_output: str) -> dict:
    """What a trial carries: the resolved run configs (the trial's working folder is Tune's, not ours) and the
    records' known part."""
    payload = {"key": trial.key, "config": to_plain(trial_config(trial, table_output)),
               "record": trial_record(trial, table_output), "pretrain": None}
    if trial.pretrain is not None:
        payload["pretrain"] = {"config": to_plain(trial_config(trial.pretrain, table_output)),
                               "record": trial_record(trial.pretrain, table_output)}
    return payload


def _trial_name(trial) -> str:
    return trial.config["trial"]["key"].replace("/", "-")


def _run_trials(table: TableConfig, pending: list[Trial], recorder: _Recorder) -> dict[str, str]:
    """The pending trials on Ray Tune (restoring this machine's experiment when it holds them); returns the
    errors of failed trials, by key."""
    from ray import tune

    from launch.ray_run import connect

    _check_corpora(pending, table.output_dir)
    configs = [trial_config(t, table.output_dir) for t in pending]
    connect(configs[0].workers.address)
    storage = Path(table.output_dir).resolve() / "tune"
    wanted = {t.key: t.fingerprint for t in pending}
    trainable = tune.with_resources(run_trial, TRIAL_RESOURCES)
    name = _restorable(storage, wanted, Results.load(table.results))
    if name:
        log.info("table: restoring the Tune experiment %s", storage / name)
        tuner = tune.Tuner.restore(str(storage / name), trainable, resume_errored=True)
    else:
        name = f"table-{time.strftime('%Y%m%d-%H%M%S')}"
        storage.mkdir(parents=True, exist_ok=True)
        (storage / EXPERIMENT_FILE).write_text(json.dumps({"name": name, "trials": wanted}, indent=1))
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([_payload(t, table.output_dir) for t in pending])},
            tune_config=tune.TuneConfig(max_concurrent_trials=_max_concurrent(configs),
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), callbacks=[recorder],
                                      verbose=1 if output.is_verbose() else 0))
    grid = tuner.fit()
    # The error's last line is its exception and message (the lines before are Ray's traceback).
    return {result.config["trial"]["key"]: str(result.error).strip().splitlines()[-1] for result in grid if result.error}


def _restorable(storage: Path, wanted: dict[str, str], results: Results) -> str:
    """The name of this machine's Tune experiment if it holds every wanted trial as it stands and nothing else
    unfinished (a changed table starts a new one); "" otherwise."""
    from ray import tune

    try:
        stored = json.loads((storage / EXPERIMENT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return ""
    if not tune.Tuner.can_restore(str(storage / stored["name"])):
        return ""
    held = stored["trials"]
    extra = {key for key in held if key not in wanted and not (key in results.records and
                                                                 results.records[key]["fingerprint"] == held[key])}
    covered = all(held.get(key) == fingerprint for key, fingerprint in wanted.items())
    return stored["name"] if covered and not extra else ""


def _max_concurrent(configs) -> int:
    """Trials at once: as many worker groups as the cluster's CPUs (and GPUs) hold, at least one."""
    import ray

    resources = ray.cluster_resources()
    fits = []
    for cfg in configs:
        workers = cfg.workers
        fits.append(int(resources.get("CPU", 0) // (workers.num_workers * workers.cpus_per_worker)))
        if workers.use_gpu:
            fits.append(int(resources.get("GPU", 0) // workers.num_workers))
    return max(1, min(fits))


def _analyse_best(table: TableConfig, results: Results) -> dict | None:
    """The best finished run of `best_of` whose folder is here: its analysis and test-set predictions into
    `analysis_dir`, recorded as the results file's `best` (kept as it is when nothing better is here)."""
    from dist_minbert.analysis.run_analysis import analyse_run

    records = [r for r in best_of_runs(table, results) if (Path(r["run_dir"]) / "checkpoints").is_dir()]
    if not records:
        return results.best
    best = max(records, key=lambda r: r["score"])
    done = results.best
    if done and (done["key"], done["fingerprint"]) == (best["key"], best["fingerprint"]) \
            and all(Path(p).exists() for p in [*done["analysis"].values(), *done["predictions"].values()]):
        return done
    out = Path(table.analysis_dir)
    log.info("table: analysing the best run of %s, %s (score %.4f)", ", ".join(table.best_of), best["key"],
             best["score"])
    analysis = analyse_run(best["run_dir"], out)
    predictions, files = _predict_tests(best["run_dir"], table.predict_tasks, out / "predictions")
    commands = [f"dist-minbert analyse --run {best['run_dir']} --out {out}"]
    if files:
        commands.append(f"dist-minbert predict {best['run_dir']} "
                        f"{' '.join(f'{t}={os.path.relpath(p)}' for t, p in files)} --out {out / 'predictions'}")
    results.set_best({"key": best["key"], "fingerprint": best["fingerprint"], "row": best["row"],
                      "seed": best["seed"], "score": best["score"], "run_dir": best["run_dir"],
                      "analysis": analysis, "predictions": predictions, "commands": commands})
    return results.best


def _predict_tests(run_dir: str, tasks: list[str], out: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """`dist-minbert predict` on the run's test files of `tasks`: (task → written file, the (task, test file)s)."""
    import contextlib
    import sys

    from dist_minbert.engine.checkpoint_io import load_trained_model
    from dist_minbert.engine.inference import predict_files

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's import-time notices
        cfg, model = load_trained_model(run_dir)
    files = [(t, cfg.data.resolve(cfg.tasks[t].test)) for t in tasks if t in cfg.tasks and cfg.tasks[t].test]
    return dict(predict_files(model, cfg, files, out)), files
