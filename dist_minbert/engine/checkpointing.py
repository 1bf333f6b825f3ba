"""Crash-safe training checkpoints: atomic tag folders, `latest` and `best` pointers, retention, resume
(also on another number of workers) and the fault injection that tests recovery.

The run's `checkpoints/` folder holds one linear history:

    step-00000012/          a complete checkpoint: DeepSpeed's files (model, optimizer, scheduler and the
                            client state: global step, stream positions, dev history), one rng_rank<r>.pt per
                            rank, the resolved run_config.yaml
    latest                  the newest complete tag, one line (DeepSpeed's own pointer format)
    best -> step-00000008   a symlink to the checkpoint with the best dev score
    .tmp-step-00000014/     a checkpoint being written: never read, removed by the next save

A checkpoint is written under its temporary name and renamed into place by rank 0 once every rank has
written its part, then `latest` is replaced atomically: a kill at any moment leaves the previous
checkpoint complete and `latest` naming it.

Only rank 0 writes the pointers and deletes folders; the collectives around it say why they are there.
The folder is local to the job: one filesystem every worker sees (local disk on one node, NFS, a mounted
bucket), or, when train.output_dir is a URL, each node's staging folder, which `run_storage.RunStorage`
publishes to the URL (every rank uploads its files, then rank 0 commits with the remote `latest`).
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import yaml

from dist_minbert.engine.config import CheckpointConfig

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"  # in train.output_dir
RUN_CONFIG = "run_config.yaml"  # the resolved config, in every checkpoint folder
LATEST = "latest"
BEST = "best"
TEMP_PREFIX = ".tmp-"
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's file that marks a tag folder
STATE_VERSION = 1
_STEP_TAG = re.compile(r"step-(\d+)")


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def tag_step(folder: Path) -> int | None:
    match = _STEP_TAG.fullmatch(folder.name)
    return int(match.group(1)) if match else None


# -- where checkpoints are ---------------------------------------------------------------------------
def step_folders(checkpoint_dir: Path) -> list[Path]:
    """The complete step checkpoints, oldest first (temporary folders never match)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if p.is_dir() and not p.is_symlink() and tag_step(p) is not None]
    return sorted(found, key=tag_step)


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The folder `latest` names; the newest step folder if a kill left the pointer stale or missing."""
    pointer = checkpoint_dir / LATEST
    if pointer.is_file():
        target = checkpoint_dir / pointer.read_text().strip()
        if (target / MODEL_STATES).is_file():
            return target
    folders = step_folders(checkpoint_dir)
    return folders[-1] if folders else None


def resolve_resume(resume: str, checkpoint_dir: Path) -> Path | None:
    """The tag folder `checkpoint.resume` means: None (fresh), the run's latest, or a given folder.

    A given path may be a tag folder, a run's `checkpoints/` folder or a run folder (then its latest).
    """
    if not resume:
        return None
    path = checkpoint_dir if resume == LATEST else Path(resume)
    if (path / MODEL_STATES).is_file():
        return path
    for folder in (path, path / CHECKPOINTS_DIR):
        found = latest_checkpoint(folder)
        if found is not None:
            return found
    raise FileNotFoundError(f"checkpoint.resume={resume!r}: no complete checkpoint in {path} "
                            f"(expected {MODEL_STATES} there, or a `{LATEST}` pointer / step-* folder)")


# -- writing -----------------------------------------------------------------------------------------
def save_checkpoint(engine, checkpoint_dir: Path, step: int, client_state: dict[str, Any], rank: int,
                    write_run_files: Callable[[Path], None], keep_last: int, is_best: bool, storage=None) -> Path:
    """Write `step-<step>` atomically on every rank; returns its final folder. Collective: all ranks call it.

    `write_run_files(folder)` runs on rank 0 before the folder is published (the resolved config);
    `is_best` points `best` at the new checkpoint. A remote `storage` (run_storage.RunStorage) publishes it
    to the run's URL as well.
    """
    tag = step_tag(step)
    final, temp = checkpoint_dir / tag, checkpoint_dir / (TEMP_PREFIX + tag)
    remote = storage is not None and storage.remote
    if rank == 0 or (remote and storage.node_leader):  # a URL's staging folder is per node
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        remove_temp_folders(checkpoint_dir)
    dist.barrier()  # no rank writes into the temporary folder before rank 0 has cleared leftovers
    engine.save_checkpoint(str(checkpoint_dir), tag=temp.name, client_state=client_state, save_latest=False)
    torch.save(capture_rng(), temp / rng_file(rank))
    dist.barrier()  # every rank's shards and RNG state are on disk
    if rank == 0:
        write_run_files(temp)
    if remote:
        storage.upload_checkpoint(temp, tag, rank)
        dist.barrier()  # every rank's files are at the URL before `latest` names them there
    if rank == 0:
        _fsync_tree(temp)
        os.rename(temp, final)  # the commit: the folder appears complete or not at all
        _write_atomic(checkpoint_dir / LATEST, tag)
        if is_best:
            point_best(checkpoint_dir, final)
        prune(checkpoint_dir, keep_last)
        if remote:
            storage.commit(tag, tag if is_best else None, keep_last)
    dist.barrier()  # the checkpoint is in place before any rank reports it or reads the pointers
    if remote and temp.is_dir():  # another node's staging copy, which rank 0's rename never reached: uploaded
        shutil.rmtree(temp, ignore_errors=True)
    return final


def point_best(checkpoint_dir: Path, target: Path) -> None:
    """Replace the `best` symlink atomically (a relative link, so the run folder can move)."""
    link = checkpoint_dir / BEST
    temp = checkpoint_dir / (TEMP_PREFIX + BEST)
    temp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, checkpoint_dir), temp)
    os.replace(temp, link)


def prune(checkpoint_dir: Path, keep_last: int) -> list[Path]:
    """Delete step checkpoints older than the newest `keep_last`, except the one `best` points to."""
    best = (checkpoint_dir / BEST).resolve() if (checkpoint_dir / BEST).is_symlink() else None
    folders = step_folders(checkpoint_dir)
    removed = [f for f in folders[:-keep_last] if f.resolve() != best]
    for folder in removed:
        shutil.rmtree(folder)
    return removed


def remove_temp_folders(checkpoint_dir: Path) -> None:
    """Leftovers of writes a kill interrupted (checkpoints or universal conversions)."""
    for path in checkpoint_dir.glob(TEMP_PREFIX + "*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def begin_history(checkpoint_dir: Path, start_step: int, resumed_from: Path | None, best: Path | None) -> None:
    """Make the folder one linear history starting at `start_step` (rank 0, before training).

    Checkpoints after the start belong to an abandoned continuation (a fresh start over an old run, or a
    resume from an older checkpoint); they are removed, and the pointers name what the run resumed from.
    """
    if not checkpoint_dir.is_dir():
        return
    remove_temp_folders(checkpoint_dir)
    later = [f for f in step_folders(checkpoint_dir) if tag_step(f) > start_step]
    if later:
        log.warning("%s: removing %d checkpoint(s) after step %d, which this run replaces: %s", checkpoint_dir,
                    len(later), start_step, ", ".join(f.name for f in later))
    for folder in later:
        shutil.rmtree(folder)
    if resumed_from is not None and resumed_from.parent.resolve() == checkpoint_dir.resolve():
        _write_atomic(checkpoint_dir / LATEST, resumed_from.name)
    else:
        (checkpoint_dir / LATEST).unlink(missing_ok=True)
    if best is not None and (best / MODEL_STATES).is_file():
        point_best(checkpoint_dir, best)
        return
    if best is not None:
        log.warning("%s: the best checkpoint so far is gone; `best` will name the next best one", best)
    (checkpoint_dir / BEST).unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    temp = path.with_name(TEMP_PREFIX + path.name)
    with open(temp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def _fsync_tree(folder: Path) -> None:
    """Data on disk before the rename publishes it (a rename can reach the disk before the data does)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# -- reading -----------------------------------------------------------------------------------------
def check_resumable(tag_dir: Path, zero_stage: int, tasks: list[str]) -> None:
    """Refuse the resumes DeepSpeed would load without a complaint, and wrongly."""
    saved = yaml.safe_load((tag_dir / RUN_CONFIG).read_text())
    saved_stage = saved["deepspeed"]["zero_stage"]
    if saved_stage != zero_stage:  # a ZeRO-0 engine skips ZeRO-1/2 optimizer partitions, and the reverse
        raise ValueError(f"deepspeed.zero_stage: {tag_dir} was written at ZeRO {saved_stage}, this run uses "
                         f"{zero_stage}; allowed: the stage the checkpoint was written at")
    # The heads' parameters, hence the optimizer state's layout, follow this order (a SimCSE run has no tasks).
    if list(saved.get("tasks", {})) != tasks:
        raise ValueError(f"tasks: {tag_dir} was trained on {list(saved.get('tasks', {}))}, this run lists {tasks}; "
                         f"allowed: the same tasks in the same order")


def load_checkpoint(engine, tag_dir: Path, rank: int, world_size: int, scratch_dir: Path) -> dict[str, Any]:
    """Load model, optimizer and scheduler into `engine`; returns the client state. Collective.

    ZeRO >= 1 partitions the optimizer state per rank, so a checkpoint written by another number of
    workers is converted (rank 0, into `scratch_dir`) to DeepSpeed's universal checkpoint, which every
    rank reads its new partition from. At ZeRO 0 the full optimizer state is in mp_rank_00 and loads as is.
    """
    num_partitions = len(list(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")))
    if num_partitions in (0, world_size):
        return _load(engine, tag_dir)
    universal = scratch_dir / f"{TEMP_PREFIX}universal-{tag_dir.name}"
    if rank == 0:
        log.info("%s: %d optimizer partitions for %d workers; converting to a universal checkpoint", tag_dir,
                 num_partitions, world_size)
        scratch_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(universal, ignore_errors=True)
        to_universal(tag_dir, universal)
    dist.barrier()  # the universal checkpoint is complete before any rank reads it
    with _universal_loading(engine):
        client_state = _load(engine, universal)
    dist.barrier()  # every rank has read it before rank 0 deletes it
    if rank == 0:
        shutil.rmtree(universal)
    return client_state


def to_universal(tag_dir: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal, in process (1 worker: it forks no pool)."""
    from types import SimpleNamespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    # inject_missing_state: a plain nn.Module records no universal_checkpoint_info; its parameters need none.
    ds_to_universal(SimpleNamespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=1,
                                    num_merge_workers=1, keep_temp_folder=False, strict=True,
                                    inject_missing_state=True))
    (out.parent / "latest_universal").unlink(missing_ok=True)  # its pointer for tag=None loads; we name the tag


@contextmanager
def _universal_loading(engine) -> Iterator[None]:
    """DeepSpeed reads `checkpoint.load_universal` from its config at load time and offers no setter; it is
    switched on for this one load only, since a later load of a plain checkpoint (the best weights at the
    end of a run) must not take the universal path."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


def _load(engine, tag_dir: Path) -> dict[str, Any]:
    load_path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if load_path is None:
        raise FileNotFoundError(f"{tag_dir}: DeepSpeed found no checkpoint to load")
    if client_state.get("version") != STATE_VERSION:
        raise ValueError(f"{tag_dir}: client state version {client_state.get('version')!r} cannot be read; "
                         f"allowed: {STATE_VERSION}")
    return client_state


# -- random number generators ------------------------------------------------------------------------
def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def restore_or_reseed_rng(tag_dir: Path, rank: int, same_world: bool, seed: int, step: int) -> None:
    """This rank's saved generators; on another number of workers ranks have no saved state to take over,
    so every rank reseeds from (seed, rank, step) — dropout masks differ from the old run from here on."""
    path = tag_dir / rng_file(rank)
    if same_world and path.is_file():
        restore_rng(torch.load(path, map_location="cpu", weights_only=False))
        return
    reseed = (seed * 1_000_003 + rank * 7_919 + step) % 2**31
    torch.manual_seed(reseed)
    np.random.seed(reseed)
    random.seed(reseed)


# -- fault injection ---------------------------------------------------------------------------------
def fault_marker(run_dir: Path, step: int) -> Path:
    return run_dir / f"fault-injected-step-{step}"


def inject_fault(cfg: CheckpointConfig, step: int, rank: int, run_dir: Path) -> None:
    """SIGKILL this worker, as a crashed node would die, right after optimizer step `kill_at_step`.

    Once per run: the marker written first makes the restarted run (which replays this step from the
    last checkpoint) pass it by.
    """
    if not cfg.kill_at_step or step != cfg.kill_at_step or rank != cfg.kill_rank:
        return
    marker = fault_marker(run_dir, step)
    if marker.exists():
        return
    _write_atomic(marker, f"rank {rank} killed itself after step {step} (checkpoint.kill_at_step)\n")
    log.warning("fault injection: rank %d kills itself after step %d", rank, step)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)
