"""`dist-minbert train` on 2 workers for what is otherwise tested only as functions: the sampled schedules,
a task defined in YAML alone, and the UPGrad and MGDA weightings through the DeepSpeed trainer.

Five short jobs (each trained once per module, ~40 s on 2 cores, mostly Ray Train's start-up), each through
the CLI's `main(["train", "--config", ...])` on the session's Ray instance, on 2 workers, with
`observe.log_every=1` so that every optimizer step writes its scalars:

    annealed, 2 of 3 tasks a step, a YAML-only task beside two builtins, UPGrad
    temperature, 2 of 3 tasks a step, MGDA
    staggered: QQP alone for one epoch, then all three
    proportional batches: every task every step, batch_i = ceil(ceil(N_i / K) / 8) * 8
    a corpus as a contrastive task beside two builtins, annealed (its size capped), exact PCGrad, the training
    forward under bf16 autocast (deepspeed.precision=autocast_bf16: its losses finite, every step trained)

Each test reads back what a job logged (TensorBoard event files, through tensorboard's own reader) and checks
it against the pure function that should have decided it: `tasks_for_step` for the tasks and batch sizes of
every step, torchjd's weighting of the logged Gram matrix for the surgery weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from dist_minbert.cli import main
from dist_minbert.config import RunConfig, load_config
from dist_minbert.data.schedule import steps_in_epoch, tasks_for_step
from tests.ray_workers import write_slice
from tests.test_observe_tensorboard import check_complete_run, logged_scalars

pytestmark = pytest.mark.distributed

# Train rows per task: distinct sizes, so size-driven schedules (annealed, temperature, proportional) differ
# from uniform ones. Batch sizes are global, 8 per task (4 per rank).
TRAIN_ROWS = {"sst": 48, "qqp": 16, "sts": 32, "nli": 40, "corpus": 40}  # the corpus's: its size_cap
NUM_CORPUS_LINES = 120  # more than its cap: the schedule must count the cap
NUM_DEV_ROWS, NUM_TEST_ROWS = 12, 10
BATCH_SIZE = 8
BUILTIN_FILES = {  # split → file name in the shared data (and in each job's data.root)
    "sst": {"train": "ids-sst-train.csv", "dev": "ids-sst-dev.csv", "test": "ids-sst-test-student.csv"},
    "qqp": {"train": "quora-train.csv", "dev": "quora-dev.csv"},  # the shared data has no QQP test
    "sts": {"train": "sts-train.csv", "dev": "sts-dev.csv", "test": "sts-test-student.csv"},
}
# The demo's bi-encoder heads: the tiny random model's cross-encoder STS head predicts one clipped constant on
# the dev rows, whose Pearson is NaN, and a NaN score is never best.
BUILTIN_HEADS = {"sst": {"head": "linear"}, "qqp": {"head": "bi_mlp"}, "sts": {"head": "bi_cosine"}}

# A task that exists only in the run's YAML: three-way entailment over sentence pairs, its own column names.
NLI_TASK = {
    "kind": "pair_classification", "train": "nli-train.tsv", "dev": "nli-dev.tsv", "test": "nli-test.tsv",
    "text_columns": ["premise", "hypothesis"], "label_column": "entailment", "id_column": "pair_id",
    "num_classes": 3, "head": "cross", "metric": "accuracy", "prediction_column": "Predicted_Entailment",
    "batch_size": BATCH_SIZE,
}
NLI_ROWS = {"train": TRAIN_ROWS["nli"], "dev": NUM_DEV_ROWS, "test": NUM_TEST_ROWS - 1}
# A corpus in the mixture: SimCSE's loss on its sentences, no head, no dev or test split.
CORPUS_TASK = {"kind": "contrastive", "head": "none", "batch_size": BATCH_SIZE, "size_cap": TRAIN_ROWS["corpus"]}


@dataclass(frozen=True)
class Job:
    tasks: tuple[str, ...]
    overrides: tuple[str, ...]
    weighting: str | None = None  # the surgery weighting, for the jobs that run one


JOBS = {
    "annealed_k2_nli_upgrad": Job(("sst", "sts", "nli"), (
        "schedule.name=annealed", "schedule.tasks_per_step=2", "schedule.steps_per_epoch=3", "train.epochs=2",
        "surgery.mode=pcgrad", "surgery.weighting=upgrad"), weighting="upgrad"),
    "temperature_k2_mgda": Job(("sst", "qqp", "sts"), (
        "schedule.name=temperature", "schedule.tasks_per_step=2", "schedule.temperature=3",
        "schedule.steps_per_epoch=4", "surgery.mode=pcgrad", "surgery.weighting=mgda"), weighting="mgda"),
    # Epoch 0: one pass over QQP alone (16 rows / 8 = 2 steps); epoch 1: capped round-robin over all, 2 steps.
    "staggered": Job(("sst", "qqp", "sts"), (
        "schedule.name=staggered", "schedule.stagger_tasks=[qqp]", "schedule.stagger_epochs=1",
        "schedule.steps_per_epoch=2", "train.epochs=2")),
    # K = 3 steps: batches ceil(48/3)=16 → 16, ceil(16/3)=6 → 8, ceil(32/3)=11 → 16 (multiples of 8); dev
    # evaluated at step 2 besides the epoch's end.
    "proportional": Job(("sst", "qqp", "sts"), ("schedule.name=proportional_batch", "schedule.steps_per_epoch=3",
                                                "train.eval_every_steps=2")),
    "corpus_annealed_pcgrad": Job(("sst", "sts", "corpus"), (
        "schedule.name=annealed", "schedule.tasks_per_step=2", "schedule.steps_per_epoch=3", "train.epochs=2",
        "surgery.mode=pcgrad", "deepspeed.precision=autocast_bf16"), weighting="pcgrad"),
}


WEIGHTING_JOBS = [name for name, job in JOBS.items() if job.weighting]
YAML_TASK_JOB = "annealed_k2_nli_upgrad"
CORPUS_JOB = "corpus_annealed_pcgrad"
every_job = pytest.mark.parametrize("name", list(JOBS))


@dataclass
class Run:
    job: Job
    cfg: RunConfig
    summary: dict
    out: Path
    data_root: Path
    scalars: dict[str, dict[int, float]]  # TensorBoard tag → step → value


def nli_frame(split: str, num_rows: int) -> pd.DataFrame:
    """Pairs built from a few words, label = (premise + hypothesis) word count mod 3, so it is learnable at all."""
    rng = np.random.default_rng({"train": 0, "dev": 1, "test": 2}[split])
    words = ["a", "dog", "cat", "runs", "sleeps", "on", "the", "mat", "in", "park", "quickly", '"big"']
    premises = [" ".join(rng.choice(words, size=rng.integers(3, 8))) for _ in range(num_rows)]
    hypotheses = [" ".join(rng.choice(words, size=rng.integers(2, 6))) for _ in range(num_rows)]
    frame = pd.DataFrame({"pair_id": [f"{split}-{i:03d}" for i in range(num_rows)],
                          "premise": premises, "hypothesis": hypotheses})
    if split != "test":  # the test file is unlabelled, as CS224N's are
        frame["entailment"] = [(len(p.split()) + len(h.split())) % 3 for p, h in zip(premises, hypotheses)]
    return frame


def write_data(shared_data: Path, root: Path, tasks: tuple[str, ...], checkpoint: str) -> None:
    """Slices of the shared CS224N files under their own names, the YAML task's own TSV files (pandas
    CS224N style: tab-separated, header line, leading index column, pandas quoting), and the corpus's shards
    (SST test sentences, which no other task of a job trains on)."""
    root.mkdir()
    for task in tasks:
        if task == "corpus":
            lines = write_slice(shared_data / "ids-sst-test-student.csv", root / "corpus.csv", NUM_CORPUS_LINES)
            text = "".join(row.split("\t")[2] + "\n" for row in lines.read_text().splitlines()[1:])
            (root / "corpus.txt").write_text(text)
            assert main(["prepare", "--config", str(write_config(root / "prepare.yaml", ("sst",), checkpoint, root,
                                                                   root)),
                         "--corpus", str(root / "corpus.txt"), "--out", str(root / "corpus")]) == 0
            continue
        if task == "nli":
            for split, num_rows in NLI_ROWS.items():
                nli_frame(split, num_rows).to_csv(root / NLI_TASK[split], sep="\t")
            continue
        for split, name in BUILTIN_FILES[task].items():
            num_rows = {"train": TRAIN_ROWS[task], "dev": NUM_DEV_ROWS, "test": NUM_TEST_ROWS}[split]
            write_slice(shared_data / name, root / name, num_rows)


def task_config(task: str, data_root: Path) -> dict:
    if task == "nli":
        return NLI_TASK
    if task == "corpus":
        return {**CORPUS_TASK, "corpus": str(data_root / "corpus")}
    return {**BUILTIN_HEADS[task], "batch_size": BATCH_SIZE}


def write_config(path: Path, tasks: tuple[str, ...], checkpoint: str, data_root: Path, out: Path) -> Path:
    config = {
        "model": {"checkpoint": checkpoint, "max_length": 32, "dropout": 0.0},
        "tasks": {t: task_config(t, data_root) for t in tasks},
        "data": {"root": str(data_root)},
        "train": {"output_dir": str(out), "seed": 7},
        "observe": {"log_every": 1, "progress": False},
        "workers": {"num_workers": 2, "cpus_per_worker": 1},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train_job(name: str, checkpoint: str, shared_data: Path, folder: Path) -> Run:
    """`dist-minbert train --config job.yaml <overrides>` on the job's own data slices."""
    job = JOBS[name]
    data_root, out = folder / "data", folder / "run"
    write_data(shared_data, data_root, job.tasks, checkpoint)
    config = write_config(folder / "job.yaml", job.tasks, checkpoint, data_root, out)
    assert main(["train", "--config", str(config), *job.overrides]) == 0
    summary = json.loads((out / "summary.json").read_text())
    return Run(job, load_config(config, list(job.overrides)), summary, out, data_root,
               logged_scalars(summary["paths"]["tensorboard"]))


@pytest.fixture(scope="module")
def runs(ray_session, tiny_checkpoint, shared_data, tmp_path_factory) -> Callable[[str], Run]:
    """`runs(name)`: the job's run, trained once per module when a test first asks (a failed job is not retried)."""
    done: dict[str, Run | None] = {}

    def run(name: str) -> Run:
        if name not in done:
            done[name] = None
            done[name] = train_job(name, tiny_checkpoint, shared_data, tmp_path_factory.mktemp(name))
        if done[name] is None:
            pytest.fail(f"job {name} failed in an earlier test")
        return done[name]

    return run


# -- what was expected, and what was logged ------------------------------------------------------------------------

def expected_plan(cfg: RunConfig) -> dict[int, dict[str, int]]:
    """Global step (1-based) → task → global batch size, from the schedule's pure function."""
    sizes = {t: TRAIN_ROWS[t] for t in cfg.tasks}
    batch_sizes = {t: task.batch_size for t, task in cfg.tasks.items()}
    plan, step = {}, 0
    for epoch in range(cfg.train.epochs):
        for step_in_epoch in range(steps_in_epoch(cfg.schedule, epoch, sizes, batch_sizes, cfg.train.epochs)):
            step += 1
            plan[step] = tasks_for_step(cfg.schedule, cfg.train.seed, epoch, step_in_epoch, sizes, batch_sizes,
                                        cfg.train.epochs)
    return plan


# -- the schedule, as logged ---------------------------------------------------------------------------------------

@every_job
def test_the_run_trains_every_step_of_the_schedule(runs, name):
    run = runs(name)
    plan = expected_plan(run.cfg)
    assert json.loads((run.out / "summary.json").read_text()) == run.summary
    assert run.summary["num_workers"] == 2 and run.summary["steps"] == len(plan)
    assert run.summary["samples"] == sum(sum(p.values()) for p in plan.values())
    assert Path(run.summary["paths"]["rejects"]).read_text().splitlines() == ["path\tline\treason\traw"], \
        "the slices are clean, so the task sizes the schedule saw are the rows written"
    assert set(run.summary["best_dev"]) == {t for t, task in run.cfg.tasks.items() if task.dev}


@every_job
def test_each_step_logs_the_loss_of_exactly_the_tasks_it_drew(runs, name):
    run = runs(name)
    plan = expected_plan(run.cfg)
    drawn = {step: sorted(t for t in run.cfg.tasks if step in run.scalars.get(f"loss/{t}", {})) for step in plan}
    assert drawn == {step: sorted(p) for step, p in plan.items()}
    logged_steps = set().union(*(run.scalars.get(f"loss/{t}", {}).keys() for t in run.cfg.tasks))
    assert logged_steps == set(plan)  # and no loss at any other step
    if run.cfg.schedule.name in ("annealed", "temperature"):
        assert {len(p) for p in plan.values()} == {2}  # 2 of the 3 tasks: neither one task nor round-robin
        assert len({tuple(sorted(p)) for p in plan.values()}) > 1, "the draws vary over the run"
    if run.cfg.schedule.name == "staggered":
        assert [sorted(p) for p in plan.values()] == [["qqp"], ["qqp"], *[sorted(run.cfg.tasks)] * 2]


@every_job
def test_each_step_consumes_the_batch_sizes_of_its_plan(runs, name):
    """samples_seen/<task> counts the global rows a task's stream has handed out: its step-to-step difference
    is the global batch the step drew (0 for a task it did not draw)."""
    run = runs(name)
    plan = expected_plan(run.cfg)
    for task in run.cfg.tasks:
        seen = run.scalars[f"samples_seen/{task}"]
        consumed = {step: seen[step] - seen.get(step - 1, 0.0) for step in plan}
        assert consumed == {step: float(p.get(task, 0)) for step, p in plan.items()}, task
    if run.cfg.schedule.name == "proportional_batch":
        assert plan[1] == {"sst": 16, "qqp": 8, "sts": 16}  # worked out by hand in JOBS


@every_job
def test_dev_is_evaluated_at_epoch_ends_and_every_eval_every_steps(runs, name):
    """Before the first step, at each epoch's last step, and every train.eval_every_steps steps where set."""
    run = runs(name)
    plan, epoch = expected_plan(run.cfg), run.scalars["epoch"]
    last = max(plan)
    epoch_ends = {s for s in plan if s == last or epoch[s + 1] != epoch[s]}
    every = run.cfg.train.eval_every_steps
    periodic = set(range(every, last + 1, every)) if every else set()
    assert set(run.scalars["dev/score"]) == {0} | epoch_ends | periodic


@every_job
def test_sampling_probabilities_follow_the_schedule(runs, name):
    """The logged per-task probability of each step's epoch, against p_i ∝ N_i^α (annealed), N_i^(1/T)
    (temperature), QQP alone (staggered, epoch 0) or uniform."""
    run = runs(name)
    schedule, plan = run.cfg.schedule.name, expected_plan(run.cfg)
    sizes = np.array([TRAIN_ROWS[t] for t in run.cfg.tasks], dtype=float)
    epoch_of = {step: int(run.scalars["epoch"][step]) for step in plan}
    for step, epoch in epoch_of.items():
        logged = np.array([run.scalars[f"sampling/{t}_p"][step] for t in run.cfg.tasks])
        if schedule == "annealed":  # alpha = 1 - 0.8 * e / (E - 1): 1 in epoch 0, 0.2 in epoch 1 of 2
            expected = sizes ** (1.0 - 0.8 * epoch / (run.cfg.train.epochs - 1))
        elif schedule == "temperature":
            expected = sizes ** (1.0 / run.cfg.schedule.temperature)
        elif schedule == "staggered" and epoch == 0:
            expected = np.array([float(t == "qqp") for t in run.cfg.tasks])
        else:
            expected = np.ones(len(sizes))
        np.testing.assert_allclose(logged, expected / expected.sum(), rtol=1e-6, err_msg=f"step {step}")
    assert sorted(set(epoch_of.values())) == list(range(run.cfg.train.epochs))


# -- the task defined in YAML alone --------------------------------------------------------------------------------

def read_predictions(path: Path) -> tuple[str, list[str], list[str]]:
    """(header, ids, predictions) of a CS224N predictions file: `id \\t Col \\n` then `{id} , {pred} \\n` rows."""
    header, *rows = path.read_text().split("\n")
    assert rows[-1] == "", "the file ends with a newline"
    pairs = [row.split(" , ") for row in rows[:-1]]
    assert all(len(p) == 2 for p in pairs), "rows are `{id} , {pred} `"
    return header, [p[0] for p in pairs], [p[1].strip() for p in pairs]


def test_the_yaml_task_trains_beside_builtins_and_predicts_one_row_per_input_row(runs):
    run = runs(YAML_TASK_JOB)
    assert "nli" in run.cfg.tasks and {"sst", "sts"} <= set(run.cfg.tasks)
    assert run.cfg.tasks["nli"].kind == "pair_classification" and run.cfg.tasks["nli"].num_classes == 3
    assert 0 < len(run.scalars["loss/nli"]) < run.summary["steps"]  # drawn at some steps, not at all
    predictions = run.summary["paths"]["predictions"]
    for split in ("dev", "test"):
        path = Path(predictions[f"nli-{split}"])
        assert path == run.out / "predictions" / f"nli-{split}-output.csv"
        header, ids, preds = read_predictions(path)
        inputs = pd.read_csv(run.data_root / NLI_TASK[split], sep="\t", index_col=0)
        assert len(inputs) == NLI_ROWS[split]
        assert header == "id \t Predicted_Entailment "
        assert ids == list(inputs["pair_id"])  # one row per input row, in the input's order
        assert all(int(p) in (0, 1, 2) for p in preds)
    assert set(run.summary["dev"]["nli"]) == {"accuracy"}
    assert (run.summary["dev"]["nli"]["accuracy"] * NUM_DEV_ROWS).is_integer()


# -- the surgery weighting, through the DeepSpeed trainer ----------------------------------------------------------

def torchjd_weights(weighting: str, gram: np.ndarray) -> np.ndarray:
    from torchjd import aggregation

    weights = {"upgrad": aggregation.UPGradWeighting, "mgda": aggregation.MGDAWeighting,
               "pcgrad": aggregation.PCGradWeighting}[weighting]()
    return weights(torch.from_numpy(gram)).numpy()


@pytest.mark.parametrize("name", WEIGHTING_JOBS)
def test_surgery_weights_are_the_weighting_of_the_logged_gram_matrix(runs, name):
    """At every step the tasks not drawn get weight 0, and the drawn ones torchjd's weights of their Gram matrix
    G_ij = |g_i| |g_j| cos_ij, rebuilt from the logged norms and cosines (float32 in the event file)."""
    run = runs(name)
    assert run.cfg.surgery.mode == "pcgrad" and run.cfg.surgery.weighting == run.job.weighting
    tasks, plan = list(run.cfg.tasks), expected_plan(run.cfg)
    for step, drawn in plan.items():
        weights = np.array([run.scalars[f"surgery/weight/{t}"][step] for t in tasks])
        absent = [i for i, t in enumerate(tasks) if t not in drawn]
        assert weights[absent].tolist() == [0.0] * len(absent), f"step {step}"
        present = [i for i, t in enumerate(tasks) if t in drawn]
        norms = np.array([run.scalars[f"surgery/grad_norm/{tasks[i]}"][step] for i in present], dtype=np.float64)
        cosines = np.eye(len(present))
        for a in range(len(present)):
            for b in range(a + 1, len(present)):
                tag = f"surgery/cosine/{tasks[present[a]]}-{tasks[present[b]]}"
                cosines[a, b] = cosines[b, a] = run.scalars[tag][step]
        gram = np.outer(norms, norms) * cosines
        np.testing.assert_allclose(weights[present], torchjd_weights(run.job.weighting, gram), rtol=1e-3,
                                   atol=1e-4, err_msg=f"step {step}")


@pytest.mark.parametrize("name", [name for name in JOBS if name not in WEIGHTING_JOBS])
def test_summed_runs_compute_no_gram_matrix(runs, name):
    run = runs(name)
    assert run.cfg.surgery.mode == "sum"
    assert [tag for tag in run.scalars if tag.startswith("surgery/")] == []


# -- a corpus in the mixture ---------------------------------------------------------------------------------------

def test_a_contrastive_corpus_is_drawn_beside_tasks_and_its_gradient_joins_the_gram_matrix(runs):
    """Its capped size is what annealing weighs (sampling/<task>_p above: N = size_cap, not its 120 lines); when
    drawn, it has a loss, a gradient norm and cosines with the other drawn task, like any task."""
    run = runs(CORPUS_JOB)
    corpus = run.cfg.tasks["corpus"]
    assert corpus.kind == "contrastive" and corpus.size_cap == TRAIN_ROWS["corpus"] < NUM_CORPUS_LINES
    plan = expected_plan(run.cfg)
    with_corpus = [step for step, p in plan.items() if "corpus" in p]
    assert 0 < len(with_corpus) < len(plan)
    assert all(np.isfinite(v) for t in run.cfg.tasks for v in run.scalars[f"loss/{t}"].values())  # bf16 autocast
    for step in with_corpus:
        assert run.scalars["surgery/grad_norm/corpus"][step] > 0
        assert run.scalars["loss/corpus"][step] > 0
    assert "corpus" not in run.summary["best_dev"] and not any("corpus" in key for key in run.summary["paths"]["predictions"])


# -- TensorBoard, complete (the checks are tests/test_observe_tensorboard.py's) ------------------------------------

def test_tensorboard_is_complete_under_exact_pcgrad(runs, tmp_path):
    """The exact-PCGrad job's event files hold every tag a user compares runs by, with plausible values, and its
    HParams row. Tokens by hand: with log_every=1 a window is one step, so tokens/s × time/step_s is the step's
    non-pad tokens over both ranks; the union of the ranks' batches is the one-rank batch of the same position, so
    counting it again on one rank (the same data, read in this process) gives the same number."""
    from dist_minbert.engine.dist_context import DistContext
    from dist_minbert.engine.multitask_data import MultitaskData
    from dist_minbert.observe.loss_window import num_tokens

    run = runs(CORPUS_JOB)
    cfg = run.cfg
    assert cfg.surgery.mode == "pcgrad" and cfg.model.max_length == 32
    check_complete_run(run.scalars, run.summary, run.summary["paths"]["tensorboard"], num_workers=2,
                       max_tokens_per_sample=2 * cfg.model.max_length,  # an STS pair is two sentences
                       hparams={"surgery.mode": "pcgrad", "surgery.weighting": "pcgrad", "schedule.name": "annealed",
                                "workers.num_workers": 2.0, "deepspeed.zero_stage": 0.0,
                                "deepspeed.precision": "autocast_bf16", "train.seed": 7.0,
                                "steps": float(run.summary["steps"]), "tasks": "sst,sts,corpus",
                                "tasks.sst.batch_size": 8.0, "model.pooling": cfg.model.pooling})
    for step in run.scalars["time/step_s"]:  # 2 tasks each step: a Gram matrix, and its gradients exchanged
        assert run.scalars["time/surgery_s"][step] > 0 and run.scalars["time/communication_s"][step] > 0
    data = MultitaskData(cfg, DistContext.single(), tmp_path)
    read = data.reader()
    for step, position in enumerate(data.positions(), start=1):
        logged = run.scalars["throughput/tokens_per_s"][step] * run.scalars["time/step_s"][step]
        assert logged == pytest.approx(num_tokens(read(position).micro_batches), rel=1e-5), step
