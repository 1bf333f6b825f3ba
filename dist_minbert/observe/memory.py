"""Memory of every rank: host RSS (now and at its peak), and CUDA memory where the rank has a GPU."""
from __future__ import annotations

import os
import resource
import sys

import torch
import torch.distributed as dist


def peak_rss_mb() -> float:
    """This process image's own peak RSS (VmHWM), in MiB. Not ru_maxrss where /proc exists: across fork + exec
    ru_maxrss keeps the parent's RSS at spawn time, so a rank started from a large process would report the
    parent's size. Elsewhere ru_maxrss (bytes on macOS, KiB on other systems)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB
    except FileNotFoundError:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def rss_mb() -> float:
    """This process's resident memory now, in MiB: the baseline a measured peak (peak_rss_mb) is compared with."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def gather_per_rank(values: list[float], device: torch.device | str) -> torch.Tensor:
    """(world size, len(values)) float64 on CPU: row r is rank r's `values`. Collective (one all-gather, on
    `device`: NCCL gathers CUDA tensors only); every rank must pass as many values."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return mine.cpu()[None]
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)
    return torch.stack(rows).cpu()


def memory_scalars(device: torch.device | str) -> dict[str, float]:
    """`memory/peak_rss_mb/rank<r>` for every rank and `memory/peak_rss_mb/max`; with CUDA,
    `memory/gpu_peak_mb/rank<r>` (torch.cuda.max_memory_allocated). Collective: every rank's figures go
    to every rank in one small all-gather, at log steps only."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    mine = [peak_rss_mb()] + ([torch.cuda.max_memory_allocated(device) / 2**20] if on_gpu else [])
    per_rank = gather_per_rank(mine, device)
    values = {f"memory/peak_rss_mb/rank{r}": float(row[0]) for r, row in enumerate(per_rank)}
    values["memory/peak_rss_mb/max"] = float(per_rank[:, 0].max())
    if on_gpu:
        values.update({f"memory/gpu_peak_mb/rank{r}": float(row[1]) for r, row in enumerate(per_rank)})
    return values
