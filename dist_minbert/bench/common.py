"""What several benchmarks share: their scratch folder, groups of fresh measured processes, an encoder's size."""
from __future__ import annotations

import contextlib
import os
import queue
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

PROCESS_TIMEOUT_S = 1800  # a group that has not reported by then has hung (a collective waiting for a dead rank)


@contextlib.contextmanager
def scratch_folder(output_dir: str, prefix: str) -> Iterator[Path]:
    """The runs' folder: `output_dir` kept (absolute, since workers may run in another folder), or a temporary
    folder removed afterwards."""
    if output_dir:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        yield Path(output_dir).resolve()
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as folder:
            yield Path(folder)


def spawn_group(config, target, num_processes: int, folder: Path, job) -> list[dict]:
    """`target(rank, num_processes, store, asdict(config), job, results)` in fresh processes; their results by rank.

    A process that dies without reporting fails the run (and the others are ended: they would wait for it in a
    collective), as does one that reports an error.
    """
    folder.mkdir(parents=True, exist_ok=True)
    store = folder / "process-group-store"
    store.unlink(missing_ok=True)  # a FileStore file must be new for each group
    # Forked from a server that has imported the target's module (torch with it), and what the first model build
    # (torch._dynamo, ~1.6 s) and the first Arrow take (pandas) import lazily, and has done nothing else: a
    # process starts in ~0.2 s instead of ~4 s spawned, still with a fresh heap (the server never ran a step or
    # an OpenMP region) and the same baseline RSS in every run.
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload([target.__module__, "torch._dynamo", "pandas"])
    bench = f"bench {target.__module__.rsplit('.', 1)[-1]} {folder.name}"
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, num_processes, str(store), asdict(config), job, results))
             for rank in range(num_processes)]
    for proc in procs:
        proc.start()
    out: list[dict] = []
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    try:
        while len(out) < num_processes:
            try:
                out.append(results.get(timeout=1.0))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"{bench}: a process "
                                       f"{'exited with ' + str(dead[0].exitcode) if dead else 'hung'} "
                                       f"without reporting") from None
                continue
            if "error" in out[-1]:
                raise RuntimeError(f"{bench} rank {out[-1]['rank']} failed: {out[-1]['error']}")
        for proc in procs:
            proc.join()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join()
    return sorted(out, key=lambda r: r["rank"])


def start_process(config: dict) -> None:
    """Every spawned process: stdout to stderr (the report stands alone on stdout), its torch threads."""
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    os.environ["OMP_NUM_THREADS"] = str(config["threads_per_worker"])  # before torch's OpenMP starts
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import torch

    torch.set_num_threads(config["threads_per_worker"])


def encoder_num_params(config) -> int:
    """Parameters of a BertEncoder of this BertConfig, counted on the meta device: no weights allocated."""
    import torch

    from dist_minbert.model.bert import BertEncoder

    with torch.device("meta"):
        return sum(p.numel() for p in BertEncoder(config).parameters())
