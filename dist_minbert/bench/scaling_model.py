"""The multi-node projection of `dist-minbert scale --project`: a pure cost model, labelled a projection wherever
it is shown (CSV, plot, TensorBoard), never mixed with measurements.

For n workers like the measured ones, joined by a network of bandwidth β (bytes/s per rank, a ring's bus
bandwidth) and per-hop latency α, at a fixed global batch B (each worker B/n):

    step_s(n)  = compute_s_per_sample × B/n + comm_s(n)        communication NOT overlapped with compute
    comm_s(n)  = Σ over the plan's collectives of its ring time, + the step's small collectives (α only)
    ring all-reduce of S bytes = 2(n−1)/n · S/β + 2(n−1)·α;  a reduce-scatter or all-gather: half of it
    samples_per_s(n) = B / step_s(n);  efficiency(n) = samples_per_s(n) / (n · samples_per_s(1))

Not overlapping makes step_s an upper bound on the model's own terms (the engine starts each task's reduction
as its backward ends, so part of it hides behind the next task's). The collectives are the configured plan's,
in surgery.comm's units (one unit = a ring all-reduce of the P shared parameters): the summed gradient one
all-reduce (1 unit); exact PCGrad on the allreduce plan one all-reduce of each task's gradient (T units), on the
sharded plan a reduce-scatter of each and an all-gather of the update ((T+1)/2 units) — the T×T Gram matrix
is one of the small collectives. A model of another size scales the measured compute by its training FLOPs
per sample at the measured tokens per sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from dist_minbert.bench.simcse import ring_all_reduce_s, train_flops_per_sentence
from dist_minbert.surgery.comm import UNITS_PER_PARAMETER_COUNT, Collective
from dist_minbert.surgery.distributed import resolve_plan

# Per step besides the plan's: the sample counts, the all-reduced finite flag and DeepSpeed's clipping norm
# (a handful of numbers each, so latency only); exact PCGrad on the sharded plan adds the Gram matrix (T² numbers).
SMALL_COLLECTIVES = 3
# Named model sizes (BERT configs, Hugging Face key names) for --model-size; a checkpoint folder also works.
NAMED_SIZES: dict[str, dict] = {
    "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "bert-large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "intermediate_size": 4096},
}


@dataclass(frozen=True)
class Network:
    """The interconnect of the projection (parameters, not measurements)."""

    bandwidth_gb_s: float = 20.0  # ring bus bandwidth per rank, GB/s (one 200 Gb/s NIC per worker at ~80%)
    latency_us: float = 15.0  # per ring hop
    gradient_bytes: int = 4  # bytes per gradient element reduced (fp32; DeepSpeed's bf16 mode reduces fp32 too)

    def __post_init__(self) -> None:
        if not self.bandwidth_gb_s > 0:
            raise ValueError(f"bandwidth_gb_s: {self.bandwidth_gb_s}; allowed: > 0")
        if not self.latency_us >= 0:
            raise ValueError(f"latency_us: {self.latency_us}; allowed: ≥ 0")
        if self.gradient_bytes not in (2, 4):
            raise ValueError(f"gradient_bytes: {self.gradient_bytes}; allowed: 2 (bf16), 4 (fp32)")


def plan_collectives(mode: str, plan: str, num_tasks: int, backend: str = "nccl") -> dict[Collective, int]:
    """The collectives of P elements one step issues: collective → how many. `plan` may be "auto", resolved for
    `backend` as the engine resolves it (surgery.distributed.resolve_plan)."""
    if mode != "pcgrad" or num_tasks < 2:  # sum, pcgrad_local, or one task: DeepSpeed reduces one gradient
        return {"all_reduce": 1}
    if resolve_plan(plan, backend) == "allreduce":
        return {"all_reduce": num_tasks}
    return {"reduce_scatter": num_tasks, "all_gather": 1}


def plan_units(collectives: dict[Collective, int]) -> float:
    """The collectives' traffic in surgery.comm's units: 1 = a ring all-reduce of P."""
    return sum(UNITS_PER_PARAMETER_COUNT[c] * count for c, count in collectives.items())


def comm_s(num_workers: int, num_params: int, collectives: dict[Collective, int], network: Network) -> float:
    """Seconds of one step's communication on a ring of num_workers (0 on one worker)."""
    if num_workers == 1:
        return 0.0
    num_small = SMALL_COLLECTIVES + ("reduce_scatter" in collectives)  # + the Gram matrix on the sharded plan
    small = num_small * ring_all_reduce_s(num_workers, 0.0, network.bandwidth_gb_s, network.latency_us)
    # A collective of u units costs u ring all-reduces of P: its bytes term and its hops scale alike.
    full = ring_all_reduce_s(num_workers, num_params * network.gradient_bytes, network.bandwidth_gb_s,
                             network.latency_us)
    return plan_units(collectives) * full + small


def project(worker_counts: list[int], global_batch: float, compute_s_per_sample: float, num_params: int,
            collectives: dict[Collective, int], network: Network) -> list[dict]:
    """One row per worker count: step time, its compute and communication, samples/s and efficiency."""
    if not compute_s_per_sample > 0 or not global_batch > 0:
        raise ValueError(f"compute_s_per_sample {compute_s_per_sample}, global_batch {global_batch}: must be > 0")
    too_many = [n for n in worker_counts if n < 1 or n > global_batch]
    if too_many:
        raise ValueError(f"project workers: {too_many} outside 1..{global_batch:g} (the global batch, fixed)")
    single_rate = 1.0 / compute_s_per_sample  # one worker: B samples in B·c seconds, no communication
    rows = []
    for n in worker_counts:
        compute = compute_s_per_sample * global_batch / n
        communication = comm_s(n, num_params, collectives, network)
        step = compute + communication
        rate = global_batch / step
        rows.append({"kind": "projection", "workers": n, "num_params": num_params, "samples_per_s": rate,
                     "efficiency": rate / (n * single_rate), "step_s": step, "compute_s": compute,
                     "communication_s": communication})
    return rows


def flops_ratio(target: dict, measured: dict, tokens_per_sample: float) -> float:
    """Training FLOPs per sample of the target BERT over the measured one's, at the measured tokens per sample
    (bench simcse's count; its constant factor cancels in the ratio)."""
    if not math.isfinite(tokens_per_sample) or tokens_per_sample <= 0:
        raise ValueError(f"tokens_per_sample: {tokens_per_sample}; allowed: > 0")
    return train_flops_per_sentence(target, tokens_per_sample) / train_flops_per_sentence(measured, tokens_per_sample)


def encoder_size(spec: str) -> tuple[dict, int]:
    """(architecture under config.json's names, parameter count) of a named size (NAMED_SIZES) or of a checkpoint
    (a folder, an fsspec URL or "embedded", whose weights are read)."""
    from dataclasses import asdict

    from dist_minbert.bench.common import encoder_num_params
    from dist_minbert.model.bert import BertConfig
    from dist_minbert.model.checkpoint import load_encoder

    if spec in NAMED_SIZES:
        config = BertConfig.from_hf_dict(NAMED_SIZES[spec])
        return asdict(config), encoder_num_params(config)
    encoder = load_encoder(spec)
    return asdict(encoder.config), sum(p.numel() for p in encoder.parameters())
