"""Run storage on an fsspec URL: the commit protocol on file:// URLs, then a run on S3 (moto on loopback).

The S3 run is test_engine_checkpoint's (2 Ray workers, ZeRO-1, a checkpoint every 2 steps, 12 steps) with
`train.output_dir=s3://…`, stopped after step 9: S3 holds what the stopped run left (the uninterrupted run's
checkpoints up to step 8, `latest` naming step 8, step 10 half uploaded), and `dist-minbert train --resume
latest` continues from S3 with an empty staging folder, as on another machine. It must end as the
uninterrupted run, with every file of the run on S3, and `evaluate`, `predict` and `export` read the run
from its URL. (One launch: a killed first launch would double the test's time for a commit protocol that
the file:// tests check.)
"""
from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
import yaml

from dist_minbert.config import config_from_dict
from dist_minbert.config_loader import ConfigError
from dist_minbert.engine import checkpointing
from dist_minbert.engine.checkpointing import BEST, CHECKPOINTS_DIR, LATEST, MODEL_STATES, step_tag
from dist_minbert.engine.run_storage import RunStorage, fetch_checkpoint, file_owner, find_tag_url, fsspec_env

# A checkpoint as 2 ranks write it at ZeRO 1: each its optimizer partition and RNG state, rank 0 the rest.
RANK_FILES = {0: ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt",
                  checkpointing.RUN_CONFIG],
              1: ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank1.pt"]}


def remote_storage(tmp_path: Path, rank: int = 0) -> RunStorage:
    return RunStorage(f"file://{tmp_path}/bucket/run", str(tmp_path / f"staging-{rank}"), rank)


def write_checkpoint(folder: Path, step: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for names in RANK_FILES.values():
        for name in names:
            (folder / name).write_text(f"{name} at step {step}")


def publish(storage: RunStorage, step: int, best: bool = False, ranks=(1, 0)) -> None:
    """What save_checkpoint does at a URL: each rank uploads its files, then rank 0 commits."""
    folder = storage.local / CHECKPOINTS_DIR / f".tmp-{step_tag(step)}"
    write_checkpoint(folder, step)
    for rank in ranks:
        storage.upload_checkpoint(folder, step_tag(step), rank)
    if set(ranks) == {0, 1}:
        storage.commit(step_tag(step), step_tag(step) if best else None, keep_last=2)


def remote_files(storage: RunStorage, relative: str) -> list[str]:
    storage.fs.invalidate_cache()
    root = f"{storage.root}/{relative}".rstrip("/")
    return sorted(p[len(root) + 1:] for p in storage.fs.find(root))


def test_a_remote_checkpoint_is_complete_only_once_latest_names_it(tmp_path):
    storage = remote_storage(tmp_path)
    folder = storage.local / CHECKPOINTS_DIR / ".tmp-step-00000002"
    write_checkpoint(folder, 2)
    storage.upload_checkpoint(folder, "step-00000002", rank=1)  # each rank uploads only what it wrote
    assert remote_files(storage, "checkpoints/step-00000002") == sorted(RANK_FILES[1])
    storage.upload_checkpoint(folder, "step-00000002", rank=0)
    assert remote_files(storage, "checkpoints/step-00000002") == sorted(RANK_FILES[0] + RANK_FILES[1])
    # Every file is there, but nothing names it: not a checkpoint yet (no newest-folder fallback at a URL).
    assert not storage.has_checkpoint()
    with pytest.raises(FileNotFoundError, match="checkpoint.resume='latest': no committed checkpoint at file://"):
        storage.resume_source(LATEST)
    storage.commit("step-00000002", "step-00000002", keep_last=2)
    assert storage.has_checkpoint() and storage.pointer(LATEST) == storage.pointer(BEST) == "step-00000002"
    assert storage.resume_source(LATEST) == f"{storage.url}/checkpoints/step-00000002"

    # Retention keeps the newest two and the best; a kill during step 10's upload leaves latest at step 8.
    for step in (4, 6, 8):
        publish(storage, step)
    publish(storage, 10, ranks=(1,))
    assert storage.step_tags() == ["step-00000002", "step-00000006", "step-00000008", "step-00000010"]
    assert storage.resume_source(LATEST) == f"{storage.url}/checkpoints/step-00000008"
    assert storage.resume_source(storage.url) == f"{storage.url}/checkpoints/step-00000008"  # a run's URL: latest
    # `evaluate`/`predict`/`export` on the run's URL read its best, downloaded whole.
    fetched = fetch_checkpoint(storage.url, tmp_path / "scratch")
    assert fetched.name == "step-00000002" and (fetched / MODEL_STATES).read_text() == \
        "mp_rank_00_model_states.pt at step 2"

    # The resumed run makes the URL one linear history: the partial step 10 goes, the pointers stay.
    storage.begin_history(8, "step-00000008", "step-00000002")
    assert storage.step_tags() == ["step-00000002", "step-00000006", "step-00000008"]
    assert storage.pointer(LATEST) == "step-00000008" and storage.pointer(BEST) == "step-00000002"
    # A fresh start over it replaces everything.
    storage.begin_history(0, None, None)
    assert storage.step_tags() == [] and storage.pointer(LATEST) is None and storage.pointer(BEST) is None
    assert find_tag_url(storage.url, (BEST, LATEST)) is None


def test_staging_a_resume_replaces_what_an_earlier_launch_left(tmp_path):
    writer = remote_storage(tmp_path)
    for step in (2, 4):
        publish(writer, step, best=step == 2)
    # Another machine (its own staging folder) with a stale checkpoint of an earlier launch in it.
    reader = remote_storage(tmp_path, rank=1)
    write_checkpoint(reader.local / CHECKPOINTS_DIR / "step-00000004", 99)
    write_checkpoint(reader.local / CHECKPOINTS_DIR / "step-00000006", 99)
    barriers = []
    tag_dir = reader.stage(reader.resume_source(LATEST), lambda: barriers.append("stage"))
    assert tag_dir == reader.local / CHECKPOINTS_DIR / "step-00000004" and barriers == ["stage"]
    assert sorted(p.name for p in (reader.local / CHECKPOINTS_DIR).iterdir()) == ["step-00000004"]
    assert (tag_dir / "rng_rank1.pt").read_text() == "rng_rank1.pt at step 4"
    best = reader.stage_own("step-00000002", lambda: barriers.append("best"))
    assert (best / MODEL_STATES).read_text() == "mp_rank_00_model_states.pt at step 2"
    # Another run's checkpoint, given by URL, is staged beside this run's, not in its checkpoints/.
    other = RunStorage(f"file://{tmp_path}/bucket/other", str(tmp_path / "other-staging"))
    assert other.stage(reader.resume_source(writer.url), lambda: None) == \
        other.local / "resumed" / "step-00000004"


def test_sync_uploads_the_run_files_that_changed(tmp_path):
    storage = remote_storage(tmp_path)
    (storage.local / "tensorboard").mkdir(parents=True)
    events = storage.local / "tensorboard" / "events.out.tfevents.1"
    events.write_bytes(b"step 1")
    (storage.local / "summary.json").write_text("{}")
    write_checkpoint(storage.local / CHECKPOINTS_DIR / "step-00000002", 2)  # published by commit, not by sync
    write_checkpoint(storage.local / "resumed" / "step-00000002", 2)  # another run's
    (storage.local / CHECKPOINTS_DIR / LATEST).write_text("step-00000002")  # the local pointer: commit's at a URL
    (storage.local / CHECKPOINTS_DIR / "zero_to_fp32.py").write_text("# DeepSpeed's script beside its checkpoints")
    remote_storage(tmp_path, rank=1).sync()  # only rank 0 uploads the run's files
    assert remote_files(storage, "") == []
    storage.sync()
    assert remote_files(storage, "") == ["checkpoints/zero_to_fp32.py", "summary.json",
                                         "tensorboard/events.out.tfevents.1"]
    storage.fs.rm(f"{storage.root}/summary.json")
    events.write_bytes(b"step 1, step 2")
    storage.sync()  # the appended events file again; summary.json did not change since it was uploaded
    assert remote_files(storage, "") == ["checkpoints/zero_to_fp32.py", "tensorboard/events.out.tfevents.1"]
    assert storage.fs.cat_file(f"{storage.root}/tensorboard/events.out.tfevents.1") == b"step 1, step 2"


def test_locations_are_urls_for_a_run_at_a_url_and_paths_otherwise(tmp_path):
    storage = remote_storage(tmp_path)
    checkpoints = storage.local / CHECKPOINTS_DIR
    write_checkpoint(checkpoints / "step-00000004", 4)
    checkpointing.point_best(checkpoints, checkpoints / "step-00000004")
    assert storage.location(storage.local / "summary.json") == f"file://{tmp_path}/bucket/run/summary.json"
    assert storage.location(checkpoints / BEST) == f"file://{tmp_path}/bucket/run/checkpoints/step-00000004"
    local = RunStorage(str(tmp_path / "run"))
    assert not local.remote and local.local == tmp_path / "run"
    assert local.location(tmp_path / "run" / "checkpoints" / BEST) == str(tmp_path / "run" / "checkpoints" / BEST)


def test_workers_receive_the_drivers_fsspec_settings(monkeypatch):
    settings = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    monkeypatch.setitem(fsspec.config.conf, "s3", settings)
    env = fsspec_env("s3://bucket/runs/x")
    received: dict = {}
    fsspec.config.set_conf_env(received, env)  # what fsspec does at import in a worker
    assert received == {"s3": settings}
    assert fsspec_env("/local/run") == {} and fsspec_env("gs://bucket/run") == {}


def test_output_dir_settings(tmp_path, monkeypatch):
    cfg = config_from_dict({"train": {"output_dir": "s3://bucket/runs/x", "local_dir": "staging"},
                            "checkpoint": {"resume": "s3://bucket/runs/old"}}, base_dir=tmp_path)
    assert cfg.train.output_dir == "s3://bucket/runs/x" and cfg.train.local_dir == str(tmp_path / "staging")
    with pytest.raises(ConfigError, match="train.local_dir: 's3://bucket/stage' is a URL; allowed: a local folder"):
        config_from_dict({"train": {"output_dir": "s3://bucket/runs/x", "local_dir": "s3://bucket/stage"}})


# -- a run on S3 ---------------------------------------------------------------------------------------------

RUN_URL = "s3://dist-minbert-test/runs/resumed"


@pytest.fixture(scope="module")
def s3_run(ray_session, s3, tmp_path_factory, tiny_checkpoint, shared_data):
    """(staging folder, summary) of the run resumed from S3 by `train --resume latest` on a machine whose
    staging folder is empty. S3 holds what the uninterrupted run had committed at step 8 (its checkpoints,
    `latest`, `best` = step 6, the only evaluation by then) and a step-10 folder that a kill left half
    uploaded (rank 1's files, no pointer naming it)."""
    from dist_minbert.cli import main
    from tests.test_engine_checkpoint import data_slices, reference_run, run_config

    reference = reference_run(tmp_path_factory, tiny_checkpoint, shared_data) / CHECKPOINTS_DIR
    bucket_path = RUN_URL.removeprefix("s3://")
    # Step 6 is still there when it stayed best to the end (retention keeps best); else it is gone at step 8 too.
    for tag in ("step-00000006", "step-00000008", "step-00000010"):
        for path in (reference / tag).glob("*"):
            if tag != "step-00000010" or file_owner(path.name) == 1:
                s3.put_file(str(path), f"{bucket_path}/{CHECKPOINTS_DIR}/{tag}/{path.name}")
    s3.pipe_file(f"{bucket_path}/{CHECKPOINTS_DIR}/{LATEST}", b"step-00000008")
    s3.pipe_file(f"{bucket_path}/{CHECKPOINTS_DIR}/{BEST}", b"step-00000006")
    staging = tmp_path_factory.mktemp("s3-staging")
    raw = run_config(tiny_checkpoint, data_slices(tmp_path_factory, shared_data), RUN_URL, 2)
    raw["train"]["local_dir"] = str(staging)
    config = tmp_path_factory.mktemp("s3-config") / "run.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["train", "--config", str(config), "--resume", "latest"]) == 0
    s3.invalidate_cache()
    return staging, json.loads(s3.cat_file(f"{RUN_URL}/summary.json"))


@pytest.mark.distributed
def test_a_run_on_s3_resumes_from_s3_and_matches_the_uninterrupted_run(s3_run, s3, tmp_path_factory, tiny_checkpoint,
                                                                     shared_data, tmp_path):
    from tests.test_engine_checkpoint import NUM_STEPS, RESUME_STEP, assert_continues, reference_run

    staging, summary = s3_run
    bucket_path = RUN_URL.removeprefix("s3://")
    remote = {p[len(bucket_path) + 1:]: s3.info(p)["size"] for p in s3.find(bucket_path)}
    for name in ("summary.json", "config.yaml", "rejects.tsv", "predictions/sst-dev-output.csv",
                 "checkpoints/latest", "checkpoints/best", "checkpoints/step-00000012/mp_rank_00_model_states.pt",
                 "checkpoints/step-00000010/mp_rank_00_model_states.pt",  # rewritten whole, not the half upload
                 "checkpoints/step-00000012/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                 "checkpoints/step-00000012/rng_rank1.pt"):
        assert name in remote, name
    assert len([n for n in remote if n.startswith("tensorboard/events.out.tfevents.")]) == 1
    # Nothing of the run is only in the staging folder (the summary gained the job's wall time at the URL).
    for path in staging.rglob("*"):
        relative = path.relative_to(staging).as_posix()
        if path.is_file() and not path.is_symlink() and "/.tmp-" not in relative and relative != "summary.json":
            assert remote.get(relative) == path.stat().st_size, relative
    assert summary["steps"] == NUM_STEPS and summary["paths"]["output_dir"] == RUN_URL
    assert summary["paths"]["checkpoint"].startswith(f"{RUN_URL}/checkpoints/step-")
    assert summary["paths"]["predictions"]["sst-dev"] == f"{RUN_URL}/predictions/sst-dev-output.csv"
    # Ray Train kept its pointers on S3 too, naming the checkpoints by URL.
    pointers = [json.loads(s3.cat_file(p))["path"] for p in s3.glob(f"{bucket_path}/ray_train-*/checkpoint_*/*.json")]
    assert f"{RUN_URL}/checkpoints/step-00000012" in pointers

    # Steps 9-12 logged as the uninterrupted run logged them, the same final state (same world size: exact),
    # and the same checkpoints kept, with the same `best`.
    downloaded = tmp_path / "run"
    s3.get(bucket_path, str(downloaded), recursive=True)
    reference = reference_run(tmp_path_factory, tiny_checkpoint, shared_data)
    assert_continues(downloaded, reference, first_step=RESUME_STEP + 1, tolerance=1e-6)
    storage = RunStorage(RUN_URL)
    assert storage.step_tags() == [f.name for f in checkpointing.step_folders(reference / CHECKPOINTS_DIR)]
    assert storage.pointer(BEST) == (reference / CHECKPOINTS_DIR / BEST).resolve().name
    ref_summary = json.loads((reference / "summary.json").read_text())
    assert summary["best_score"] == pytest.approx(ref_summary["best_score"], abs=1e-6)


@pytest.mark.distributed
def test_evaluate_predict_and_export_read_a_run_from_its_url(s3_run, tmp_path, capsys, tmp_path_factory,
                                                             shared_data):
    from safetensors.torch import load_file

    from dist_minbert.cli import main
    from dist_minbert.engine.checkpoint_io import load_module_state
    from dist_minbert.model.checkpoint import native_to_hf
    from tests.test_engine_checkpoint import NUM_DEV_ROWS, TASK_FILES, data_slices

    _, summary = s3_run
    capsys.readouterr()
    assert main(["evaluate", RUN_URL]) == 0  # the run's best checkpoint
    results = json.loads(capsys.readouterr().out)
    for task, metrics in summary["best_dev"].items():
        for name, value in metrics.items():
            assert results[task][name] == pytest.approx(value, abs=1e-9 if name == "accuracy" else 1e-3), (task, name)

    data_root = data_slices(tmp_path_factory, shared_data)
    dev = {task: data_root / files[1] for task, files in TASK_FILES.items()}
    assert main(["predict", RUN_URL, *(f"{t}={p}" for t, p in dev.items()), "--out", str(tmp_path / "pred")]) == 0
    for task, path in dev.items():
        assert len((tmp_path / "pred" / f"{task}-{path.stem}-output.csv").read_text().splitlines()) == 1 + NUM_DEV_ROWS

    tag_url = f"{RUN_URL}/checkpoints/step-00000012"  # a tag folder's URL
    assert main(["export", tag_url, str(tmp_path / "hf")]) == 0
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    expected = native_to_hf({k.removeprefix("encoder."): v for k, v in
                             load_module_state(fetch_checkpoint(tag_url, tmp_path / "scratch")).items()
                             if k.startswith("encoder.")})
    assert max(float((exported[k] - v).abs().max()) for k, v in expected.items()) == 0.0
    assert main(["evaluate", "s3://dist-minbert-test/runs/none"]) == 2  # a URL with no run: our one-line error
    assert "s3://dist-minbert-test/runs/none: no checkpoint here" in capsys.readouterr().err
