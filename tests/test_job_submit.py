"""`python -m launch.submit` against a real head: `ray start --head` with its job server and token authentication
on, and Ray's own `ray job submit` / `status` / `logs` CLIs, run from the repository root as the README says.

The config is the shipped demo with relative data.root and train.output_dir overrides: Ray runs the job in its
copy of the working directory, where those relative paths name nothing, so the run only finds its data and
writes where the test looks because launch.submit resolved them here.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dist_minbert.config import load_config
from tests.ray_cluster import ray_cluster
from tests.ray_workers import write_slice

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
NUM_ROWS = 16  # of every data file
PREDICTIONS = {"sst-dev", "qqp-dev", "sts-dev", "sst-test", "sts-test"}  # the shared data has no QQP test file
SMALL = ["train.max_steps=2", "model.max_length=32", "tasks.sst.batch_size=4", "tasks.qqp.batch_size=4",
         "tasks.sts.batch_size=4", "train.eval_batch_size=8", "workers.threads_per_worker=1", "observe.progress=false"]


@pytest.fixture(scope="module")
def head():
    with ray_cluster(head_cpus=2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, shared_data) -> Path:
    folder = tmp_path_factory.mktemp("job_data")
    for path in shared_data.iterdir():
        write_slice(path, folder / path.name, NUM_ROWS)
    return folder


def submit(head, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The helper as a user runs it from the repository root; stdout and stderr together, in order."""
    return subprocess.run([sys.executable, "-m", "launch.submit", "--address", head.dashboard_url, *argv], cwd=REPO,
                          env=env or head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)


def job_id(output: str) -> str:
    match = re.search(r"Job '(raysubmit_\w+)' submitted successfully", output)
    assert match, output
    return match.group(1)


def job_status_and_logs(head, job: str) -> tuple[str, str]:
    """(`ray job status`'s verdict: succeeded, failed, …; `ray job logs`)."""
    status = head.ray("job", "status", "--address", head.dashboard_url, job)
    match = re.search(rf"Job '{job}' (\w+)", status.stdout + status.stderr)
    assert match, status.stdout + status.stderr
    return match.group(1), head.ray("job", "logs", "--address", head.dashboard_url, job).stdout


def test_a_job_with_relative_paths_succeeds_and_leaves_its_run_where_they_point(head, data_root, tiny_checkpoint,
                                                                                  tmp_path):
    out = tmp_path / "run"
    result = submit(head, "--config", "configs/demo.yaml", f"model.checkpoint={tiny_checkpoint}",
                    f"data.root={os.path.relpath(data_root, REPO)}", f"train.output_dir={os.path.relpath(out, REPO)}",
                    *SMALL)
    assert result.returncode == 0, result.stdout
    status, logs = job_status_and_logs(head, job_id(result.stdout))
    assert status == "succeeded"
    assert f"data.root={data_root} train.output_dir={out}" in logs  # the entrypoint: resolved here, absolute there
    assert "Traceback" not in logs

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["num_workers"] == 2
    paths = summary["paths"]
    assert Path(paths["output_dir"]) == out
    assert load_config(paths["config"]).data.root == str(data_root)
    assert any(Path(paths["tensorboard"]).glob("events.out.tfevents.*"))
    assert (Path(paths["checkpoint"]) / "run_config.yaml").is_file()
    assert set(paths["predictions"]) == PREDICTIONS
    for key, path in paths["predictions"].items():
        assert Path(path) == out / "predictions" / f"{key}-output.csv"
        assert len(Path(path).read_text().splitlines()) == 1 + NUM_ROWS, key  # header + one row per input row


def test_a_job_that_fails_in_the_job_ends_failed_with_our_one_line_cause(head, tmp_path):
    """A model checkpoint that is not there is a valid config (on a cluster it lives on the nodes' storage, which
    the submitting machine need not mount), so only the job can find it missing."""
    missing = tmp_path / "no-checkpoint"
    result = submit(head, "--config", "configs/demo.yaml", f"model.checkpoint={missing}", *SMALL)
    assert result.returncode != 0
    status, logs = job_status_and_logs(head, job_id(result.stdout))
    assert status == "failed"
    cause = (f"dist-minbert train: error: model.checkpoint: {missing} is not a checkpoint folder (no config.json "
             f"there); allowed: a Hugging Face BERT folder, an fsspec URL, or 'embedded'")
    assert cause in logs.splitlines()
    assert "Traceback" not in logs


def test_the_head_requires_the_token_and_submit_says_how_to_get_it(head, tmp_path):
    no_token = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    # Authentication is really on: Ray's own client gets in with the token and is turned away without it.
    assert head.ray("job", "list", "--address", head.dashboard_url).returncode == 0
    refused = head.ray("job", "list", "--address", head.dashboard_url, env=no_token, check=False)
    assert refused.returncode != 0 and "Missing authentication token" in refused.stdout + refused.stderr

    result = submit(head, "--config", "configs/demo.yaml", env=no_token)
    assert result.returncode == 2
    assert result.stdout.strip() == (
        f"launch.submit: error: --address {head.dashboard_url}: the head requires an authentication token and none "
        "was found here (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); run `ray get-auth-token` on the "
        "head, then `export RAY_AUTH_TOKEN=<that token>` here (or save it as ~/.ray/auth_token)")
    result = submit(head, "--config", "configs/demo.yaml", env={**no_token, "RAY_AUTH_TOKEN": "not-the-token"})
    assert result.returncode == 2
    assert "the head refuses the token from RAY_AUTH_TOKEN (HTTP 403)" in result.stdout
