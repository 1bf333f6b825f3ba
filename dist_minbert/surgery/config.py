"""How the per-task gradients of the shared encoder are combined into one update."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SurgeryMode = Literal["sum", "pcgrad_local", "pcgrad"]
WeightingName = Literal["pcgrad", "upgrad", "mgda"]
PlanName = Literal["auto", "allreduce", "sharded"]


@dataclass
class SurgeryConfig:
    # sum: no surgery (baseline); pcgrad_local: weighting of each rank's own task gradients, then the normal
    # reduction (cheap approximation); pcgrad: weighting of the global task gradients (exact under data parallelism).
    mode: SurgeryMode = "sum"
    # Gramian weighting used by the pcgrad modes: pcgrad (Yu et al. 2020), or torchjd's upgrad / mgda.
    weighting: WeightingName = "pcgrad"
    # Collectives of exact mode: allreduce (T×P all-reduce), sharded (reduce-scatter + T² Gram all-reduce),
    # auto = allreduce on gloo (its reduce-scatter is slow), sharded on other backends.
    plan: PlanName = "auto"

    def __post_init__(self) -> None:
        # The loader has checked the names against the Literals; this runs the weighting once, so a missing
        # torchjd or QP solver stops the run when the config loads, not at the first step on every worker.
        if self.mode != "sum":
            from dist_minbert.surgery.pcgrad import check_weighting  # imports torch: only for the pcgrad modes

            try:
                check_weighting(self.weighting)
            except ImportError as error:
                raise ValueError(f"weighting: {self.weighting!r} cannot run here: {error}") from error
