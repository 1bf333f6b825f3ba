"""Where a run's outputs live: a local folder, or any fsspec URL (s3://, gs://, …) fed from a local staging folder.

A job writes every file into a local folder, as DeepSpeed must. For a local `train.output_dir` that folder
is the output dir and nothing here does anything. For a URL it is a staging folder (`train.local_dir`, else
one derived from the URL under the temp folder, the same path on every node), and the run's files reach
the URL at its durable points:

- a checkpoint: every rank uploads the files it wrote (its ZeRO optimizer partition and RNG state, which on
  several nodes only its own disk holds; rank 0 the rest) straight into `checkpoints/step-N/`, and only
  after all ranks have (a barrier) does rank 0 write `checkpoints/latest` naming it. That write is the
  commit: an object store has no rename, so a step folder that `latest` does not name is never read as
  complete. `best` is a pointer file there too (no symlinks); retention deletes remote folders as well.
- TensorBoard events, config.yaml, rejects.tsv, predictions, summary.json (rank 0): after each checkpoint
  and at the end.

Resume, and `evaluate`/`predict`/`export` given a URL, download the tag folder they read first.
Every process's fsspec needs the URL's settings (an endpoint, keys): fsspec reads them from its config
files or `FSSPEC_<PROTOCOL>` variables; the launcher forwards the driver's (`fsspec_env`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import fsspec

from dist_minbert.engine.checkpointing import (BEST, CHECKPOINTS_DIR, LATEST, MODEL_STATES, resolve_resume,
                                               tag_step)

RESUMED_DIR = "resumed"  # in the staging folder: tag folders of another run, downloaded to resume from
_PER_RANK = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)[_.]")  # DeepSpeed's optimizer partitions, our RNG files


def is_url(path: str) -> bool:
    return "://" in path


def file_owner(name: str) -> int:
    """The rank that writes a checkpoint file: ZeRO optimizer partitions and RNG states are per rank, the rest
    (model states, the run config) is rank 0's."""
    match = _PER_RANK.search(name)
    return int(match.group(1)) if match else 0


def default_local_dir(url: str) -> Path:
    """A staging folder named after the URL: the same on every node and every launch of the run."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", url.split("://", 1)[-1]).strip("-")[-60:]
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "dist-minbert-runs" / f"{readable}-{digest}"


def fsspec_env(url: str) -> dict[str, str]:
    """This process's fsspec settings for the URL's protocol as the `FSSPEC_<PROTOCOL>` variable, which fsspec
    reads at import: what Ray workers need to reach the same endpoint with the same keys."""
    if not is_url(url):
        return {}
    protocol = fsspec.utils.get_protocol(url)
    settings = fsspec.config.conf.get(protocol)
    if not settings:
        return {}
    try:
        return {f"FSSPEC_{protocol.upper()}": json.dumps(settings)}
    except TypeError:
        raise ValueError(f"fsspec.config.conf[{protocol!r}]: not JSON (an object in it?), so workers cannot receive "
                         f"it; allowed: plain values, or the same settings in fsspec's config files on every node") from None


def arrow_filesystem(url: str):
    """(path without the protocol, pyarrow filesystem over fsspec's): Ray Train's storage_path and
    storage_filesystem for a URL, so a custom endpoint in fsspec's config reaches Ray's own uploads too."""
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(url)
    return path.rstrip("/"), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def find_tag_url(url: str, pointers: tuple[str, ...]) -> str | None:
    """The checkpoint folder a URL means: itself if it holds one; else the folder the first of `pointers` (in it,
    then in its checkpoints/) names, if that folder is complete. No newest-folder fallback, unlike a local
    folder: remotely a step folder no pointer names may be a partial upload."""
    fs, path = fsspec.core.url_to_fs(url)
    path = path.rstrip("/")
    fs.invalidate_cache()  # other processes wrote it
    if fs.exists(f"{path}/{MODEL_STATES}"):
        return fs.unstrip_protocol(path)
    for name in pointers:
        for folder in (path, f"{path}/{CHECKPOINTS_DIR}"):
            try:
                tag = fs.cat_file(f"{folder}/{name}").decode().strip()
            except FileNotFoundError:
                continue
            if tag and fs.exists(f"{folder}/{tag}/{MODEL_STATES}"):
                return fs.unstrip_protocol(f"{folder}/{tag}")
    return None


def download_folder(url: str, dest: Path) -> None:
    """Every file under `url` into `dest`, which is replaced."""
    fs, path = fsspec.core.url_to_fs(url)
    path = path.rstrip("/")
    shutil.rmtree(dest, ignore_errors=True)
    for remote in fs.find(path):
        target = dest / remote[len(path) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(target))


def fetch_checkpoint(url: str, scratch: Path) -> Path:
    """`evaluate`/`predict`/`export` on a URL: the tag folder it means (itself, else best, else latest), downloaded
    into `scratch`."""
    found = find_tag_url(url, (BEST, LATEST))
    if found is None:
        raise FileNotFoundError(f"{url}: no checkpoint here (expected {MODEL_STATES} in it, or a `{BEST}`/`{LATEST}` "
                                f"pointer in it or in its {CHECKPOINTS_DIR}/ naming a complete step-* folder)")
    dest = scratch / found.rstrip("/").rsplit("/", 1)[-1]
    download_folder(found, dest)
    return dest


def _synced(relative: str) -> bool:
    """A run file `sync` uploads: not a checkpoint or its pointers (upload_checkpoint and commit publish those),
    nor another run's checkpoint; the script DeepSpeed puts beside its checkpoints (zero_to_fp32.py) is."""
    top, _, rest = relative.partition("/")
    if top == RESUMED_DIR:
        return False
    return top != CHECKPOINTS_DIR or ("/" not in rest and rest not in (LATEST, BEST) and not rest.startswith("."))


class RunStorage:
    """A run's output folder as the job sees it: `local`, where every file is written, and the URL it is
    mirrored to (None for a local output dir, where every method below is a no-op or reads `local`)."""

    def __init__(self, output_dir: str, local_dir: str = "", rank: int = 0, node_leader: bool = True) -> None:
        """`rank` 0 uploads the run's files; a `node_leader` (the first rank on its node) downloads what its
        node's ranks read."""
        self.url = output_dir.rstrip("/") if is_url(output_dir) else None
        self.local = Path(local_dir or default_local_dir(output_dir)) if self.url else Path(output_dir)
        self.rank, self.node_leader = rank, node_leader
        self._uploaded: dict[str, tuple[int, int]] = {}  # relative path → (size, mtime) when last uploaded
        if self.url:
            self.fs, root = fsspec.core.url_to_fs(self.url)
            self.root = root.rstrip("/")

    @classmethod
    def for_run(cls, output_dir: str, local_dir: str, rank: int) -> RunStorage:
        """The first rank on a node is the one with LOCAL_RANK 0 (Ray Train and torchrun set it); without it the
        group is taken to be one node."""
        return cls(output_dir, local_dir, rank, int(os.environ.get("LOCAL_RANK", rank)) == 0)

    @property
    def remote(self) -> bool:
        return self.url is not None

    def _path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def location(self, path: Path) -> str:
        """Where a local file of the run is for its user: the path itself, or its URL (`best` as the folder it
        names, since the URL's `best` is a pointer file)."""
        if not self.remote:
            return str(path)
        if path.is_symlink():
            path = path.parent / os.readlink(path)
        relative = os.path.relpath(path, self.local)
        if relative == ".":
            return self.url
        return str(path) if relative.startswith("..") else f"{self.url}/{Path(relative).as_posix()}"

    # -- the run's files ---------------------------------------------------------------------------
    def sync(self) -> None:
        """Rank 0: upload the run's files that changed since the last sync (all but the checkpoints, which
        `upload_checkpoint` and `commit` publish). Nothing is deleted remotely."""
        if not self.remote or self.rank != 0 or not self.local.is_dir():
            return
        for path in sorted(self.local.rglob("*")):
            relative = path.relative_to(self.local).as_posix()
            if not path.is_file() or not _synced(relative):
                continue
            stat = path.stat()
            if self._uploaded.get(relative) != (stat.st_size, stat.st_mtime_ns):
                self.fs.makedirs(self._path(relative).rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(path), self._path(relative))
                self._uploaded[relative] = (stat.st_size, stat.st_mtime_ns)

    def exists(self, relative: str) -> bool:
        if not self.remote:
            return (self.local / relative).exists()
        self.fs.invalidate_cache()
        return self.fs.exists(self._path(relative))

    def touch(self, relative: str) -> None:
        if not self.remote:
            (self.local / relative).parent.mkdir(parents=True, exist_ok=True)
            (self.local / relative).touch()
            return
        self.fs.makedirs(self._path(relative).rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(self._path(relative), b"")

    # -- checkpoints: writing ----------------------------------------------------------------------
    def upload_checkpoint(self, folder: Path, tag: str, rank: int) -> None:
        """This rank's files of the checkpoint in `folder` → `checkpoints/<tag>/` at the URL. Every rank calls it,
        then a barrier, before `commit`."""
        if not self.remote:
            return
        for path in sorted(folder.rglob("*")):
            if path.is_file() and file_owner(path.name) == rank:
                target = self._path(f"{CHECKPOINTS_DIR}/{tag}/{path.relative_to(folder).as_posix()}")
                self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(path), target)

    def commit(self, tag: str, best: str | None, keep_last: int) -> None:
        """Rank 0, once every rank has uploaded: `latest` names the tag (the commit), `best` follows, then
        retention (the newest `keep_last` and the best stay)."""
        if not self.remote:
            return
        self._point(LATEST, tag)
        if best:
            self._point(BEST, best)
        best = self.pointer(BEST)
        for old in self.step_tags()[:-keep_last]:
            if old != best:
                self.fs.rm(self._path(f"{CHECKPOINTS_DIR}/{old}"), recursive=True)

    def begin_history(self, start_step: int, resumed_tag: str | None, best_tag: str | None) -> None:
        """Rank 0, before training: the URL's checkpoints made one linear history from `start_step`, as
        checkpointing.begin_history does locally (later folders go; the pointers name what the run resumed from,
        when it resumed from this run's folder)."""
        if not self.remote:
            return
        for tag in self.step_tags():
            if tag_step(Path(tag)) > start_step:
                self.fs.rm(self._path(f"{CHECKPOINTS_DIR}/{tag}"), recursive=True)
        for name, tag in ((LATEST, resumed_tag), (BEST, best_tag)):
            if tag and self.fs.exists(self._path(f"{CHECKPOINTS_DIR}/{tag}/{MODEL_STATES}")):
                self._point(name, tag)
            elif self.fs.exists(self._path(f"{CHECKPOINTS_DIR}/{name}")):
                self.fs.rm(self._path(f"{CHECKPOINTS_DIR}/{name}"))

    def _point(self, name: str, tag: str) -> None:
        self.fs.pipe_file(self._path(f"{CHECKPOINTS_DIR}/{name}"), tag.encode())  # one PUT: old or new, never half

    def pointer(self, name: str) -> str | None:
        """The tag the URL's `latest` or `best` names, or None."""
        try:
            return self.fs.cat_file(self._path(f"{CHECKPOINTS_DIR}/{name}")).decode().strip() or None
        except FileNotFoundError:
            return None

    def step_tags(self) -> list[str]:
        """The URL's step folders, oldest first, complete or not."""
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(self._path(CHECKPOINTS_DIR), detail=True)
        except FileNotFoundError:
            return []
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"]
        return sorted((n for n in names if tag_step(Path(n)) is not None), key=lambda n: tag_step(Path(n)))

    # -- checkpoints: reading ----------------------------------------------------------------------
    def has_checkpoint(self) -> bool:
        """A committed checkpoint to continue from (`latest`)."""
        if not self.remote:
            from dist_minbert.engine.checkpointing import latest_checkpoint

            return latest_checkpoint(self.local / CHECKPOINTS_DIR) is not None
        return find_tag_url(f"{self.url}/{CHECKPOINTS_DIR}", (LATEST,)) is not None

    def resume_source(self, resume: str) -> Path | str | None:
        """What `checkpoint.resume` names, nothing downloaded: None (fresh), a local tag folder, or a tag folder's
        URL ("latest" of a URL run is its `latest` pointer's folder). Raises FileNotFoundError naming the key."""
        if not resume or (not is_url(resume) and (resume != LATEST or not self.remote)):
            return resolve_resume(resume, self.local / CHECKPOINTS_DIR)
        url = f"{self.url}/{CHECKPOINTS_DIR}" if resume == LATEST else resume
        found = find_tag_url(url, (LATEST,))
        if found is None:
            raise FileNotFoundError(f"checkpoint.resume={resume!r}: no committed checkpoint at {url} (expected "
                                    f"{MODEL_STATES} there, or a `{LATEST}` pointer naming a complete step-* folder)")
        return found

    def stage(self, source: str, barrier: Callable[[], None]) -> Path:
        """The tag folder at URL `source`, downloaded by each node's first rank (collective). This run's own
        goes to checkpoints/<tag>, replacing whatever an earlier launch left in the staging folder; another
        run's to resumed/<tag>."""
        tag = source.rstrip("/").rsplit("/", 1)[-1]
        own = self.remote and fsspec.core.url_to_fs(source)[1].rstrip("/") == self._path(f"{CHECKPOINTS_DIR}/{tag}")
        dest = self.local / (CHECKPOINTS_DIR if own else RESUMED_DIR) / tag
        if self.node_leader:
            if own:
                shutil.rmtree(self.local / CHECKPOINTS_DIR, ignore_errors=True)
            download_folder(source, dest)
        barrier()  # the folder is complete on every node before any rank reads it
        return dest

    def stage_own(self, tag: str, barrier: Callable[[], None]) -> Path:
        """This run's checkpoint `tag` in the staging folder, downloaded where a node lacks it (collective)."""
        dest = self.local / CHECKPOINTS_DIR / tag
        if self.remote and self.node_leader and not (dest / MODEL_STATES).is_file():
            download_folder(f"{self.url}/{CHECKPOINTS_DIR}/{tag}", dest)
        barrier()
        return dest
