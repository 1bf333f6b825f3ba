"""How the per-task gradients of the shared encoder are combined into one update."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

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
        for name, allowed in (("mode", SurgeryMode), ("weighting", WeightingName), ("plan", PlanName)):
            value = getattr(self, name)
            if value not in get_args(allowed):
                raise ValueError(f"{name}: {value!r} is unknown; allowed: {', '.join(get_args(allowed))}")
