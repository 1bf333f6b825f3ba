"""`dist-minbert bench encoder`: our encoder's training step against transformers.BertModel's, side by side.

Both models load the same checkpoint with its own dropout, in one process on the same torch threads; the
peer runs in its fastest form (SDPA attention), both step with `torch.optim.AdamW(fused=True)`. A training
step is forward, a loss over every real token's state and the pooler output, backward, AdamW. Cases:
- fixed-length batches (every token real) at each length, in fp32 and under bf16 autocast (CPU);
- real CS224N batches: SST and QQP rows collated as the data service collates them (data/collate.py, the
  tasks' builtin encodings), each padded to its longest row, alternating, at each maximum length; fp32;
- forward only (eval mode, no autograd) on the fixed-length batches, fp32.
In each case the two sides alternate step by step after warm-up, the order flipped every pair, and a ratio is
the median over pairs of the peer's step time over ours: load from other processes on a shared machine falls
on both alike. A headline ratio is the smallest over its cases (a target must hold at every length).

FLOP/s count the model's matmul FLOPs (bench/flops.py) on fixed-length batches; MFU divides them by the best
rate of plain matmuls measured in the same run, per precision. `same_function`: both sides in train mode with
dropout 0 on one padded real batch, fp32 and bf16 autocast: the largest output difference at real tokens and
the largest gradient difference over the largest gradient (HF names through checkpoint.native_to_hf).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dist_minbert.bench.flops import forward_flops_per_token
from dist_minbert.data.config import DataConfig

TARGETS = {"train_ratio_fp32": 1.2, "train_ratio_bf16": 1.2, "train_ratio_real_batches": 1.6}
Batch = dict[str, torch.Tensor]


@dataclass
class EncoderBenchConfig:
    checkpoint: str = "embedded"  # both sides load it: "embedded" = all-MiniLM-L6-v2, or an HF BERT folder
    data_root: str = DataConfig().root  # CS224N files of the real batches
    threads: int = 2  # torch threads, both sides
    batch_size: int = 32  # rows per step, every case
    lengths: tuple[int, ...] = (64, 128)  # fixed-length batches: every token real
    real_max_lengths: tuple[int, ...] = (64, 128)  # model.max_length of the real batches
    real_tasks: tuple[str, ...] = ("sst", "qqp")  # builtin tasks whose train rows make the real batches
    warmup_steps: int = 2  # untimed steps of each side before each case's pairs
    pairs: int = 8  # timed steps of each side per case
    lr: float = 1e-5  # AdamW, both sides
    seed: int = 0
    peak_size: int = 2048  # n of the n×n×n matmuls that measure the peak

    def __post_init__(self) -> None:
        self.lengths, self.real_max_lengths, self.real_tasks = (
            tuple(self.lengths), tuple(self.real_max_lengths), tuple(self.real_tasks))
        for name in ("threads", "batch_size", "pairs", "peak_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)}; allowed: ≥ 1")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: {self.warmup_steps}; allowed: ≥ 0")
        if not self.lengths or min(self.lengths) < 2:
            raise ValueError(f"lengths: {self.lengths}; allowed: one or more lengths ≥ 2 ([CLS] and [SEP])")
        if not self.real_max_lengths or min(self.real_max_lengths) < 3:
            raise ValueError(f"real_max_lengths: {self.real_max_lengths}; allowed: one or more ≥ 3 "
                             "([CLS] a [SEP] b [SEP])")
        if not self.real_tasks:
            raise ValueError("real_tasks: empty; allowed: builtin task names, e.g. sst, qqp")


def quick_config(**overrides) -> EncoderBenchConfig:
    """Seconds instead of minutes (tests, smoke runs): small batches, short lengths, few pairs; same keys out."""
    quick = dict(threads=1, batch_size=4, lengths=(16, 32), real_max_lengths=(32,), warmup_steps=1, pairs=3,
                 peak_size=256)
    return EncoderBenchConfig(**{**quick, **overrides})


@dataclass
class Case:
    name: str
    mode: str  # "train" or "forward"
    precision: str  # "fp32" or "bf16" (autocast on CPU)
    batches: list[Batch]  # one per step, warm-up first; both sides see the same
    fixed_length: int | None  # the length of a fixed-length case (every token real); None for real batches


# -- driver ------------------------------------------------------------------------------------------------------
def run_encoder_benchmark(config: EncoderBenchConfig | None = None) -> dict:
    """Every case, both sides alternating; returns the report (JSON-serialisable)."""
    from dist_minbert.observe.progress import progress_bar

    config = config or EncoderBenchConfig()
    load_before = os.getloadavg()
    start = time.perf_counter()
    with _torch_threads(config.threads):
        sides = _Sides(config)
        cases = _cases(config, sides.tokenizer)
        timed, peaks = {}, _MatmulPeaks(config.peak_size, sides.encoder.config)
        peaks.sample()
        with progress_bar(sum(2 * len(c.batches) for c in cases), "bench encoder") as bar:
            for case in cases:
                timed[case.name] = sides.compare(case, config.warmup_steps, bar.update)
                peaks.sample()  # between cases: the best rate seen, on a machine other work shares
        same = {precision: sides.same_function(cases[-1].batches[0], precision) for precision in ("fp32", "bf16")}
        threads = torch.get_num_threads()
    return report(config, cases, timed, peaks.report(), same, asdict(sides.encoder.config), threads,
                  wall_s=time.perf_counter() - start,
                  load_average=[round(x, 2) for x in (*load_before, *os.getloadavg())])


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cases(config: EncoderBenchConfig, tokenizer) -> list[Case]:
    """Fixed-length train cases (fp32, bf16), forward-only ones, then the real batches (the last case: the
    same-function check runs on its first batch, which has padding)."""
    generator = torch.Generator().manual_seed(config.seed)
    steps = config.warmup_steps + config.pairs
    cases = []
    for precision in ("fp32", "bf16"):
        for length in config.lengths:
            batches = [_fixed_batch(config.batch_size, length, tokenizer, generator) for _ in range(steps)]
            cases.append(Case(f"train_{precision}_{config.batch_size}x{length}", "train", precision, batches, length))
    for length in config.lengths:
        batches = [_fixed_batch(config.batch_size, length, tokenizer, generator) for _ in range(steps)]
        cases.append(Case(f"forward_fp32_{config.batch_size}x{length}", "forward", "fp32", batches, length))
    for max_length in config.real_max_lengths:
        batches = _real_batches(config, tokenizer, max_length, steps)
        cases.append(Case(f"train_fp32_real_max{max_length}", "train", "fp32", batches, None))
    return cases


def _fixed_batch(batch_size: int, length: int, tokenizer, generator: torch.Generator) -> Batch:
    """[CLS] random word pieces [SEP], every position real, one segment."""
    ids = torch.randint(1000, tokenizer.vocab_size, (batch_size, length), generator=generator)
    ids[:, 0], ids[:, -1] = tokenizer.cls_id, tokenizer.sep_id
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def _real_batches(config: EncoderBenchConfig, tokenizer, max_length: int, steps: int) -> list[Batch]:
    """`steps` batches of random train rows, the tasks taking turns, collated with each task's builtin encoding."""
    from dist_minbert.config import load_config
    from dist_minbert.data.collate import collate
    from dist_minbert.tasks.config import encoding_for
    from dist_minbert.tasks.readers import read_task_file

    data = DataConfig(root=config.data_root)
    tasks = load_config(None, resolve_paths=False).tasks
    rng = np.random.default_rng(config.seed)
    rows, encodings = {}, {}
    for name in config.real_tasks:
        if name not in tasks:
            raise ValueError(f"real_tasks: {name!r} is not a builtin task; allowed: {', '.join(tasks)}")
        encodings[name] = encoding_for(tasks[name])  # builtin heads: single or cross, one encoder pass per row
        rows[name] = read_task_file(data.resolve(tasks[name].train), tasks[name], labelled=False, on_bad_row="reject")
    batches = []
    for step in range(steps):
        name = config.real_tasks[step % len(config.real_tasks)]
        picked = rng.choice(len(rows[name].a), config.batch_size, replace=False)
        columns = {"a": tokenizer.encode([rows[name].a[i] for i in picked])}
        if rows[name].b is not None:
            columns["b"] = tokenizer.encode([rows[name].b[i] for i in picked])
        batches.append(collate(columns, encodings[name], max_length, tokenizer.cls_id, tokenizer.sep_id,
                               tokenizer.pad_id).tensors)
    return batches


class _MatmulPeaks:
    """The best FLOP/s of plain matmuls per precision on this process's threads, over samples taken through the
    run: an n×n×n product and the encoder's largest (its MLP's, at 4096 tokens), 3 timings after a warm-up."""

    DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

    def __init__(self, size: int, bert) -> None:
        self.shapes = {"square": (size, size, size), "mlp_up": (4096, bert.hidden_size, bert.intermediate_size)}
        self.best = {precision: dict.fromkeys(self.shapes, 0.0) for precision in self.DTYPES}
        self.samples = 0

    def sample(self) -> None:
        for precision, dtype in self.DTYPES.items():
            for name, (m, k, n) in self.shapes.items():
                a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
                torch.mm(a, b)
                for _ in range(3):
                    began = time.perf_counter()
                    torch.mm(a, b)
                    rate = 2 * m * k * n / (time.perf_counter() - began)
                    self.best[precision][name] = max(self.best[precision][name], rate)
        self.samples += 1

    def report(self) -> dict:
        return {precision: {"flop_s": max(rates.values()), "by_shape": rates, "samples": self.samples}
                for precision, rates in self.best.items()}


# -- report ------------------------------------------------------------------------------------------------------
def report(config: EncoderBenchConfig, cases: list[Case], timed: dict, peaks: dict, same: dict, bert: dict,
           threads: int, wall_s: float, load_average: list[float]) -> dict:
    """Per case: samples/s of both sides (over the timed steps: real batches differ in width), the paired ratio,
    FLOP/s and MFU where every token is real; headline ratios (the smallest over their cases), MFU at the first
    fixed length, targets."""
    rows = {}
    for case in cases:
        ours, theirs = timed[case.name]["ours"], timed[case.name]["transformers"]
        row = {"mode": case.mode, "precision": case.precision,
               "ratio": statistics.median(t / o for t, o in zip(theirs["step_s_all"], ours["step_s_all"])),
               "cpu_ratio": statistics.median(t / o for t, o in zip(theirs["cpu_s_all"], ours["cpu_s_all"])),
               # each side's fastest step: the least disturbed by other work (fixed-length: the same work)
               "fastest_step_ratio": min(theirs["step_s_all"]) / min(ours["step_s_all"]),
               **_padding(case.batches[config.warmup_steps:])}
        for side, steps in (("ours", ours), ("transformers", theirs)):
            row[f"{side}_samples_per_s"] = config.batch_size * len(steps["step_s_all"]) / sum(steps["step_s_all"])
        if case.fixed_length is not None:
            flops = forward_flops_per_token(bert, case.fixed_length) * case.fixed_length * config.batch_size
            flops *= 3 if case.mode == "train" else 1
            peak = peaks[case.precision]["flop_s"]
            for side in ("ours", "transformers"):
                row[f"{side}_flop_s"] = flops * row[f"{side}_samples_per_s"] / config.batch_size
                row[f"{side}_mfu"] = row[f"{side}_flop_s"] / peak
        rows[case.name] = {**row, **timed[case.name]}

    def smallest(mode: str, precision: str, fixed: bool) -> float:
        return min(rows[c.name]["ratio"] for c in cases
                   if (c.mode, c.precision, c.fixed_length is not None) == (mode, precision, fixed))

    first = f"{config.batch_size}x{config.lengths[0]}"
    out = {
        "train_ratio_fp32": smallest("train", "fp32", True),
        "train_ratio_bf16": smallest("train", "bf16", True),
        "train_ratio_real_batches": smallest("train", "fp32", False),
        "forward_ratio_fp32": smallest("forward", "fp32", True),
        "ours_samples_per_s": {name: row["ours_samples_per_s"] for name, row in rows.items()},
        "transformers_samples_per_s": {name: row["transformers_samples_per_s"] for name, row in rows.items()},
        "mfu_fp32": rows[f"train_fp32_{first}"]["ours_mfu"],
        "mfu_bf16": rows[f"train_bf16_{first}"]["ours_mfu"],
        "mfu_case": f"ours, training step, {first}",
        "matmul_peak_flop_s": peaks,
        "same_function": same,
        "targets": dict(TARGETS),
        "cases": rows,
        "config": asdict(config),
        "torch_threads": threads,
        "wall_s": wall_s,
        "load_average_before_after": load_average,
    }
    out["passed"] = {name: out[name] >= bound for name, bound in TARGETS.items()}
    out["all_passed"] = all(out["passed"].values())
    return out


def _padding(batches: list[Batch]) -> dict:
    masks = [b["attention_mask"] for b in batches]
    real = sum(int(m.sum()) for m in masks)
    return {"real_token_fraction": real / sum(m.numel() for m in masks),
            "widths": sorted({m.size(1) for m in masks})}


# -- the two sides -----------------------------------------------------------------------------------------------
class _Sides:
    """Both encoders from the same checkpoint, each with its own fused AdamW; the timed step functions."""

    def __init__(self, config: EncoderBenchConfig) -> None:
        import transformers

        from dist_minbert.model.checkpoint import load_encoder, resolve_checkpoint
        from dist_minbert.model.tokenizer import WordPieceTokenizer

        self.config = config
        torch.manual_seed(config.seed)
        self.tokenizer = WordPieceTokenizer.from_checkpoint(config.checkpoint)
        self.path = resolve_checkpoint(config.checkpoint)
        self.models = {"ours": load_encoder(config.checkpoint),
                       "transformers": transformers.BertModel.from_pretrained(self.path, attn_implementation="sdpa")}
        self.encoder = self.models["ours"]
        self.optimizers = {side: torch.optim.AdamW(model.parameters(), lr=config.lr, fused=True)
                           for side, model in self.models.items()}
        generator = torch.Generator().manual_seed(config.seed)
        hidden = self.encoder.config.hidden_size
        self.weights = torch.randn(hidden, generator=generator), torch.randn(hidden, generator=generator)

    def loss(self, hidden: torch.Tensor, pooled: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Random projections of every real token's state (mean) and of the pooler output, in fp32."""
        mask = attention_mask.float()
        per_token = hidden.float() @ self.weights[0]  # (B, T)
        return (per_token * mask).sum() / mask.sum() + (pooled.float() @ self.weights[1]).mean()

    def step(self, side: str, case: Case, batch: Batch) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.precision == "bf16"):
            if case.mode == "forward":
                with torch.no_grad():
                    _forward(side, self.models[side], batch)
                return
            hidden, pooled = _forward(side, self.models[side], batch)
        self.loss(hidden, pooled, batch["attention_mask"]).backward()
        self.optimizers[side].step()
        self.optimizers[side].zero_grad(set_to_none=True)

    def compare(self, case: Case, warmup_steps: int, advance: Callable[[int], object]) -> dict:
        for model in self.models.values():
            model.train(case.mode == "train")
        timed = {side: {"step_s_all": [], "cpu_s_all": []} for side in ("ours", "transformers")}
        for i, batch in enumerate(case.batches):
            for side in (("ours", "transformers") if i % 2 == 0 else ("transformers", "ours")):
                wall, cpu = time.perf_counter(), time.process_time()
                self.step(side, case, batch)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if i >= warmup_steps:
                    timed[side]["step_s_all"].append(wall)
                    timed[side]["cpu_s_all"].append(cpu)
                advance(1)
        return timed

    def same_function(self, batch: Batch, precision: str) -> dict:
        """Both sides in train mode with dropout 0 (fresh copies of the checkpoint), one step's outputs and
        gradients: the largest differences, gradients relative to the largest gradient entry."""
        import transformers

        from dist_minbert.model.checkpoint import load_encoder, native_to_hf

        models = {"ours": load_encoder(self.config.checkpoint, dropout=0.0).train(),
                  "transformers": transformers.BertModel.from_pretrained(
                      self.path, attn_implementation="sdpa", hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0).train()}
        results = {}
        for side, model in models.items():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                hidden, pooled = _forward(side, model, batch)
            self.loss(hidden, pooled, batch["attention_mask"]).backward()
            grads = {name: p.grad for name, p in model.named_parameters()}
            results[side] = (hidden.detach().float(), pooled.detach().float(),
                             native_to_hf(grads) if side == "ours" else grads)
        (h, p, g), (h_ref, p_ref, g_ref) = results["ours"], results["transformers"]
        real = batch["attention_mask"].bool()
        scale = max(t.abs().max().item() for t in g_ref.values())
        return {"hidden_max_abs_diff": (h[real] - h_ref[real]).abs().max().item(),
                "pooled_max_abs_diff": (p - p_ref).abs().max().item(),
                "grad_max_abs_diff_over_largest": max((g[k] - g_ref[k]).abs().max().item() for k in g_ref) / scale,
                "same_parameters": sorted(g) == sorted(g_ref),
                "padding_fraction": 1 - real.float().mean().item()}


def _forward(side: str, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden state, pooler output) of either side."""
    if side == "ours":
        return tuple(model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"])
    return out.last_hidden_state, out.pooler_output
