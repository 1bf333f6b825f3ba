"""The user's commands end to end: real 2-worker runs on Ray + DeepSpeed, then evaluate / predict / export on them.

One short run per ZeRO stage (module-scoped, ~30 s each on 2 cores); every test below checks that run's files.
One more run goes through the console entry, for what a job prints. The command-line error paths and the
`ray job submit` helper need no Ray.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dist_minbert.cli import main
from dist_minbert.config import RunConfig, load_config
from launch import submit
from launch.output import VERBOSE_ENV

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
NUM_DEV_ROWS = 32
DEV_FILES = {"sst": "ids-sst-dev.csv", "qqp": "quora-dev.csv", "sts": "sts-dev.csv"}
TEST_FILES = {"sst": "ids-sst-test-student.csv", "sts": "sts-test-student.csv"}  # the shared data has no QQP test
METRICS = {"sst": {"accuracy"}, "qqp": {"accuracy"}, "sts": {"pearson", "spearman"}}


@dataclass
class Run:
    stage: int
    cfg: RunConfig
    summary: dict
    out: Path

    @property
    def checkpoint(self) -> str:
        return self.summary["paths"]["checkpoint"]


def read_cs224n(path: Path | str) -> pd.DataFrame:
    """A CS224N file as pandas wrote it: tab-separated, header line, leading index column."""
    return pd.read_csv(path, sep="\t", index_col=0, dtype={"id": str})


def read_predictions(path: Path | str) -> tuple[str, list[str], list[str]]:
    """(header, ids, predictions) of a CS224N predictions file: `id \\t Col \\n` then `{id} , {pred} \\n` rows."""
    header, *rows = Path(path).read_text().split("\n")
    assert rows[-1] == "", "the file ends with a newline"
    pairs = [row.split(" , ") for row in rows[:-1]]
    assert all(len(p) == 2 and p[1].endswith(" ") for p in pairs), "rows are `{id} , {pred} `"
    return header, [p[0] for p in pairs], [p[1].strip() for p in pairs]


def stdout_json(out: str) -> dict:
    """The JSON document `evaluate` prints; DeepSpeed's import prints an accelerator warning to stdout before it."""
    lines = out.splitlines()
    return json.loads("\n".join(lines[lines.index("{"):]))


def short_run(checkpoint: str, data_root: Path, out: Path) -> list[str]:
    """Overrides of the demo config for a 2-step run on 2 workers, with small batches and dev sets."""
    return [f"model.checkpoint={checkpoint}", f"data.root={data_root}", f"train.output_dir={out}",
            "train.max_steps=2", f"train.eval_max_rows={NUM_DEV_ROWS}", "model.max_length=32",
            "tasks.sst.batch_size=8", "tasks.qqp.batch_size=8", "tasks.sts.batch_size=8", "workers.num_workers=2"]


@pytest.fixture(scope="module", params=[0, 1, 2], ids=lambda stage: f"zero{stage}")
def run(request, ray_session, tiny_checkpoint, shared_data, tmp_path_factory) -> Run:
    from launch.ray_run import run_training

    out = tmp_path_factory.mktemp(f"run_zero{request.param}")
    cfg = load_config(DEMO, [*short_run(tiny_checkpoint, shared_data, out), f"deepspeed.zero_stage={request.param}",
                             "observe.progress=false"])
    return Run(request.param, cfg, run_training(cfg), out)


@pytest.fixture(scope="module")
def dev_heads(shared_data, tmp_path_factory) -> dict[str, Path]:
    """The first 32 rows of each dev file, written back in the CS224N format (the rows the runs evaluate on)."""
    folder = tmp_path_factory.mktemp("dev_heads")
    paths = {}
    for task, name in DEV_FILES.items():
        paths[task] = folder / f"head-{name}"
        read_cs224n(shared_data / name).head(NUM_DEV_ROWS).to_csv(paths[task], sep="\t")
    return paths


# -- what a run leaves behind -----------------------------------------------------------------------------------

def test_summary_has_the_issue_keys_with_the_right_shapes(run):
    summary = run.summary
    assert json.loads((run.out / "summary.json").read_text()) == summary
    assert summary["num_workers"] == 2 and summary["steps"] == 2
    assert summary["samples"] == 2 * 3 * 8  # 2 steps of one global batch of 8 per task (round-robin)
    assert summary["samples_per_s"] > 0 and summary["wall_s"] > 0
    for label in ("initial_dev", "dev", "best_dev"):
        metrics = summary[label]
        assert set(metrics) == {"sst", "qqp", "sts"}, label
        for task, values in metrics.items():
            assert set(values) == METRICS[task], (label, task)
            assert all(isinstance(v, float) and math.isfinite(v) for v in values.values())
        for task in ("sst", "qqp"):  # accuracies over exactly 32 dev rows
            assert (metrics[task]["accuracy"] * NUM_DEV_ROWS).is_integer()
    # One evaluation at the end of the (truncated) epoch: it is both the last and the best.
    assert summary["best_dev"] == summary["dev"]
    dev = summary["dev"]  # the study's overall score, worked out by hand
    expected = (dev["sst"]["accuracy"] + dev["qqp"]["accuracy"] + (dev["sts"]["pearson"] + 1) / 2) / 3
    assert summary["score"] == pytest.approx(expected, abs=1e-12)


def test_train_prints_the_dev_metrics_and_where_the_files_are(run, capsys):
    from dist_minbert.cli import print_summary

    print_summary(run.summary)
    out = capsys.readouterr().out
    assert "workers 2, steps 2" in out
    assert f"sst accuracy {run.summary['best_dev']['sst']['accuracy']:.3f}" in out
    assert f"sts pearson {run.summary['best_dev']['sts']['pearson']:.3f}" in out
    for path in (run.checkpoint, run.summary["paths"]["tensorboard"], *run.summary["paths"]["predictions"].values()):
        assert path in out


def test_run_folder_holds_config_checkpoint_logs_and_rejects(run):
    paths = run.summary["paths"]
    assert Path(paths["output_dir"]) == run.out
    assert load_config(paths["config"]) == run.cfg
    assert (Path(paths["checkpoint"]) / "run_config.yaml").is_file()
    assert any(Path(paths["tensorboard"]).glob("events.out.tfevents.*"))
    rejects = Path(paths["rejects"]).read_text().splitlines()
    assert rejects[0] == "path\tline\treason\traw"
    assert all(line.split("\t")[0].startswith(str(run.cfg.data.root)) for line in rejects[1:])


def test_predictions_are_cs224n_files_with_one_row_per_input_row(run, shared_data):
    predictions = run.summary["paths"]["predictions"]
    expected = {f"{t}-dev": (f, NUM_DEV_ROWS) for t, f in DEV_FILES.items()}
    expected |= {f"{t}-test": (f, None) for t, f in TEST_FILES.items()}
    assert set(predictions) == set(expected)
    for key, (name, num_rows) in expected.items():
        task = key.split("-")[0]
        path = Path(predictions[key])
        assert path == run.out / "predictions" / f"{key}-output.csv"
        header, ids, preds = read_predictions(path)
        assert header == f"id \t {run.cfg.tasks[task].prediction_column} "
        assert ids == list(read_cs224n(shared_data / name)["id"])[:num_rows]
        if task == "sts":
            assert all(0.0 <= float(p) <= 5.0 for p in preds)
        else:
            assert all(int(p) in range(run.cfg.tasks[task].num_classes) for p in preds)


# -- evaluate / predict / export on the run's checkpoint --------------------------------------------------------

def test_evaluate_reproduces_the_runs_best_dev_metrics(run, dev_heads, capsys):
    capsys.readouterr()
    assert main(["evaluate", run.checkpoint, *(f"{t}={p}" for t, p in dev_heads.items())]) == 0
    measured = stdout_json(capsys.readouterr().out)
    best = run.summary["best_dev"]
    assert set(measured) == set(best)
    for task, metrics in best.items():
        assert set(measured[task]) == set(metrics)
        for name, value in metrics.items():  # 2-rank DeepSpeed inference vs the consolidated model in one process
            assert measured[task][name] == pytest.approx(value, abs=1e-5), (task, name)


@pytest.mark.parametrize("where", ["run folder", "checkpoints folder"])
def test_evaluate_finds_the_best_tag_from_a_run_folder(run, dev_heads, capsys, where):
    folder = run.out if where == "run folder" else run.out / "checkpoints"
    capsys.readouterr()
    assert main(["evaluate", str(folder), f"qqp={dev_heads['qqp']}"]) == 0
    assert stdout_json(capsys.readouterr().out) == {"qqp": pytest.approx(run.summary["best_dev"]["qqp"], abs=1e-5)}


def test_predict_on_the_dev_rows_matches_the_runs_predictions(run, dev_heads, tmp_path):
    assert main(["predict", run.checkpoint, *(f"{t}={p}" for t, p in dev_heads.items()), "--out", str(tmp_path)]) == 0
    for task, path in dev_heads.items():
        _, ids, preds = read_predictions(tmp_path / f"{task}-{path.stem}-output.csv")
        _, run_ids, run_preds = read_predictions(run.summary["paths"]["predictions"][f"{task}-dev"])
        assert ids == run_ids
        np.testing.assert_allclose(np.array(preds, float), np.array(run_preds, float), atol=1e-5)


def test_predict_writes_one_prediction_per_row_of_a_new_file(run, tmp_path):
    sentences = pd.DataFrame({
        "id": ["s-1", "s-2", "s-3", "s-4"],
        "sentence": ['A "quoted"\tword , and a tab', "plain", "Ünïcödé ☃ works", "x " * 200]})  # 200 tokens: truncated
    pairs = pd.DataFrame({
        "id": ["p-1", "p-2", "p-3"],
        "sentence1": ["Two dogs run.", "Is it raining?", "same"],
        "sentence2": ["Dogs are running.", 'She said "no"', "same"]})
    sentences.to_csv(tmp_path / "mine-sst.tsv", sep="\t")
    pairs.to_csv(tmp_path / "mine-pairs.tsv", sep="\t")
    out = tmp_path / "out"
    argv = ["predict", run.checkpoint, f"sst={tmp_path / 'mine-sst.tsv'}", f"sts={tmp_path / 'mine-pairs.tsv'}",
            f"qqp={tmp_path / 'mine-pairs.tsv'}", "--out", str(out)]
    assert main(argv) == 0
    for task, frame, stem in (("sst", sentences, "mine-sst"), ("sts", pairs, "mine-pairs"), ("qqp", pairs, "mine-pairs")):
        header, ids, preds = read_predictions(out / f"{task}-{stem}-output.csv")
        assert header == f"id \t {run.cfg.tasks[task].prediction_column} "
        assert ids == list(frame["id"])
        assert len(preds) == len(frame)


def test_export_loads_in_transformers_and_matches_our_encoder(run, tiny_checkpoint, tmp_path):
    import transformers

    from dist_minbert.engine.checkpoint_io import load_trained_model
    from dist_minbert.model.checkpoint import load_encoder

    assert main(["export", run.checkpoint, str(tmp_path / "hf")]) == 0
    hf_model = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    batch = dict(tokenizer(["A very funny movie.", "Why?"], ["Two dogs run.", "No."], padding=True,
                           return_tensors="pt"))
    _, model = load_trained_model(run.checkpoint)
    with torch.no_grad():
        expected = hf_model(**batch).last_hidden_state
        ours = model.encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).last_hidden_state
        untrained = load_encoder(tiny_checkpoint, dropout=0.0).eval()(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).last_hidden_state
    assert (ours - expected).abs().max() < 1e-5
    assert (untrained - expected).abs().max() > 1e-4  # the export holds the trained weights, not the starting ones


def test_export_as_sentence_transformers_encodes_the_runs_embedding(run, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants
    from sentence_transformers import SentenceTransformer

    from dist_minbert.engine.checkpoint_io import load_trained_model
    from dist_minbert.model.tokenizer import WordPieceTokenizer
    from dist_minbert.tasks.sentence_embedding import embed_sentences

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may try the network, also if huggingface_hub read it already
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "st"
    assert main(["export", run.checkpoint, str(out), "--format", "sentence-transformers"]) == 0
    assert f"({run.cfg.model.pooling} pooling, max_seq_length {run.cfg.model.max_length})" in capsys.readouterr().out
    texts = ["A very funny movie.", "Why do people ask questions on Quora?", "No.", "x " * 200]
    encoded = SentenceTransformer(str(out), device="cpu", local_files_only=True).encode(texts, convert_to_tensor=True)
    cfg, model = load_trained_model(run.checkpoint)
    ours = embed_sentences(model.encoder, WordPieceTokenizer.from_checkpoint(cfg.model.checkpoint), texts,
                           cfg.model.pooling, cfg.model.max_length)
    assert (encoded - ours).abs().max() < 1e-5


# -- what a job prints --------------------------------------------------------------------------------------------

# Lines of Ray and DeepSpeed that the issue found in every demo, and where they came from.
NOISE = {
    "Failed to query Ray Train Controller": "the placement-group cleaner, every second without a dashboard",
    "TrainingReport(": "Ray Train's dump of each report",
    "Checkpoint successfully created": "Ray Train, at each report",
    "Requesting resources": "the Train controller",
    "Started training worker group": "the Train controller",
    "Setting up process group": "Ray Train's torch setup",
    "core_worker": "a core worker's C++ note on the preemption watcher",
    "Setting accelerator to CPU": "DeepSpeed's accelerator guess",
    "Token authentication is enabled": "ray.init on the driver",
    "(RayTrainWorker pid=": "the prefix Ray puts before every forwarded line",
    "built successfully": "DeepSpeed's op builder, a print on each worker",
}


@pytest.mark.distributed
def test_train_prints_our_lines_and_none_of_rays(tiny_checkpoint, shared_data, tmp_path):
    """`dist-minbert train` as a user runs it: a Ray instance of its own, whose workers' lines reach this process."""
    env = {k: v for k, v in os.environ.items() if k not in (VERBOSE_ENV, "RAY_ADDRESS")}
    done = subprocess.run([sys.executable, "-m", "dist_minbert", "train", "--config", str(DEMO),
                           *short_run(tiny_checkpoint, shared_data, tmp_path), "observe.log_every=1"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    printed = done.stdout + done.stderr
    ours = ["malformed rows rejected", "dev at step 0:", "step 1/2 epoch 0", "step 2/2 epoch 0", "train: 100%",
            "== dist-minbert run summary ==", "workers 2, steps 2"]  # a warning, rank 0's lines, the bar, the summary
    assert [line for line in ours if line not in printed] == [], printed
    assert {line: source for line, source in NOISE.items() if line in printed} == {}, printed
    # Forwarded line by line, a bar redrawn with carriage returns would glue the next log line to itself.
    assert [line for line in printed.splitlines() if "train:" in line and "step " in line] == [], printed


# -- error paths -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("train.epochz=3", "unknown key train.epochz; allowed in train: "),
    ("deepspeed.zero_stage=3", "deepspeed.zero_stage: 3; allowed: 0, 1, 2"),
    ("train.epochs", "override 'train.epochs': expected dotted key=value"),
])
def test_bad_override_prints_the_key_and_returns_2(override, message, capsys):
    assert main(["train", "--config", str(DEMO), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dist-minbert train: error: ") and message in err


def test_console_entry_exits_2_on_a_bad_override():
    done = subprocess.run([sys.executable, "-m", "dist_minbert", "train", "--config", str(DEMO), "optim.lr=fast"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert "optim.lr: expected a number, got 'fast'" in done.stderr


@pytest.mark.parametrize("argv,message", [
    (["evaluate", "/nonexistent/run"], "/nonexistent/run: no checkpoint here"),
    (["predict", "/nonexistent/run", "sst=x.csv", "--out", "/tmp/x"], "/nonexistent/run: no checkpoint here"),
])
def test_missing_checkpoint_returns_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["model.checkpoint=/nonexistent/bert"], "model.checkpoint: /nonexistent/bert is not a checkpoint folder"),
    (["--resume", "/nonexistent/run"], "checkpoint.resume='/nonexistent/run': no complete checkpoint"),
    (["--resume", "latest"], "checkpoint.resume='latest': no complete checkpoint"),  # a new run has none yet
])
def test_train_from_missing_files_returns_2_before_ray_starts(argv, message, capsys, monkeypatch, tmp_path):
    import ray
    import ray.train.torch

    def start(*args, **kwargs):
        raise AssertionError("Ray started: the workers would be the first to find the file missing")

    monkeypatch.setattr(ray, "init", start)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", start)  # this session may already be connected
    assert main(["train", "--config", str(DEMO), f"train.output_dir={tmp_path}", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dist-minbert train: error: ") and message in err


def test_task_missing_from_the_checkpoint_returns_2(run, dev_heads, capsys):
    assert main(["evaluate", run.checkpoint, f"paws={dev_heads['qqp']}"]) == 2
    assert "task 'paws' is not in this checkpoint; allowed: sst, qqp, sts" in capsys.readouterr().err


# -- `ray job submit` helper -------------------------------------------------------------------------------------

def submit_dry_run(argv: list[str], capsys) -> list[str]:
    capsys.readouterr()
    assert submit.main([*argv, "--dry-run"]) == 0
    return shlex.split(capsys.readouterr().out.strip())


def test_submit_builds_the_ray_job_command(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = submit_dry_run(["--address", "http://head:8265", "--config", "configs/demo.yaml",
                           "--env", "NCCL_DEBUG=INFO", "workers.num_workers=4", "tasks.sst.batch_size=32"], capsys)
    separator = argv.index("--")
    ray, options, entrypoint = argv[0], argv[1:separator], argv[separator + 1:]
    assert Path(ray).name == "ray"
    assert options[:2] == ["job", "submit"]
    flags = dict(zip(options[2::2], options[3::2]))
    assert flags.keys() == {"--address", "--working-dir", "--runtime-env-json"}
    assert flags["--address"] == "http://head:8265" and flags["--working-dir"] == "."
    env = json.loads(flags["--runtime-env-json"])
    assert env["env_vars"] == {"TOKENIZERS_PARALLELISM": "false", "NCCL_DEBUG": "INFO"}
    assert ".venv" in env["excludes"] and "runs" in env["excludes"]
    # demo.yaml's output_dir and the default data.root are relative: the job gets them absolute, as resolved here.
    assert entrypoint == ["dist-minbert", "train", "--config", "configs/demo.yaml",
                          "workers.num_workers=4", "tasks.sst.batch_size=32",
                          f"data.root={REPO.parent / 'shared' / 'data' / 'cs224n'}",
                          f"train.output_dir={REPO / 'runs' / 'demo'}"]


def test_submit_takes_the_address_from_ray_address_and_the_flag_wins(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RAY_ADDRESS", "http://from-env:8265")
    argv = submit_dry_run(["--config", str(DEMO), "--no-wait"], capsys)
    assert argv[argv.index("--address") + 1] == "http://from-env:8265"
    assert "--no-wait" in argv[:argv.index("--")]
    assert argv[argv.index("--config") + 1] == "configs/demo.yaml"  # relative to the uploaded working dir
    argv = submit_dry_run(["--address", "http://flag:8265", "--config", str(DEMO)], capsys)
    assert argv[argv.index("--address") + 1] == "http://flag:8265"


def test_submit_passes_relative_paths_absolute_and_warns_when_the_head_is_elsewhere(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    argv = ["--config", "configs/demo.yaml", "data.root=../data", f"model.checkpoint={tmp_path}",
            "train.output_dir=runs/x", "data.shards=s3://bucket/shards"]
    capsys.readouterr()
    assert submit.main(["--address", "http://127.0.0.1:8265", *argv, "--dry-run"]) == 0
    local = capsys.readouterr()
    assert local.err == ""  # the head is this machine: no warning
    # A relative override is replaced by its absolute value; absolute paths and URLs are left as given.
    command = shlex.split(local.out)
    assert command[command.index("--config") + 2:] == [
        f"model.checkpoint={tmp_path}", "data.shards=s3://bucket/shards", f"data.root={REPO.parent / 'data'}",
        f"train.output_dir={REPO / 'runs' / 'x'}"]
    assert submit.main(["--address", "http://head.example:8265", *argv, "--dry-run"]) == 0
    assert capsys.readouterr().err == (
        "launch.submit: warning: the head http://head.example:8265 is not this machine; the job uses these paths on "
        f"its nodes, so they must be on storage every node mounts at the same path: data.root={REPO.parent / 'data'} "
        f"train.output_dir={REPO / 'runs' / 'x'}\n")


@pytest.mark.parametrize("argv,message", [
    (["--config", "configs/demo.yaml"], "--address: not given and RAY_ADDRESS is unset"),
    (["--address", "http://h:8265", "--config", "configs/demo.yaml", "train.epochz=1"], "unknown key train.epochz"),
    (["--address", "http://h:8265", "--config", "configs/nope.yaml"], "config file not found"),
    (["--address", "http://h:8265", "--config", "configs/demo.yaml", "--working-dir", "launch"],
     "outside --working-dir launch"),
    (["--address", "http://h:8265", "--config", "configs/demo.yaml", "--env", "NOVALUE"], "--env 'NOVALUE'"),
])
def test_submit_rejects_bad_input_before_submitting(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert submit.main([*argv, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err
