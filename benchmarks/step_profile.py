"""Where the time of one CPU training step goes, part by part, side by side in one run.

The demo (configs/demo.yaml) runs 2 Ray workers × 1 thread; per step each rank takes half of every
task's global batch (32 SST rows, 16 QQP and 16 STS pairs; a bi-encoder pair is two encoder passes).
This script builds rank 0's batches with the real data path (prepared Arrow shards, TaskStream,
collate) and times, on one thread: the data path, our encoder against transformers.BertModel, SDPA
variants, dropout masks, the heads, the optimizer, a whole step in a plain torch loop against the same
step through a DeepSpeed engine (ZeRO 0, single-process gloo group), and the evaluation forward.

Times are CPU milliseconds of this process (time.process_time), medians over --reps: other
developers share the 2 cores, so wall time mostly measures them; the wall median stands beside it.

    .venv/bin/python benchmarks/step_profile.py [--config configs/demo.yaml] [--reps 3]
        [--only encoder step ...] [--set deepspeed.precision=bf16 ...]

The whole step through the DeepSpeed engine is timed with each forward its engine runs, their steps taken
in turn: an fp32 engine's (fp32, and autocast_bf16's, whose engine is the same), or DeepSpeed's bf16.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dist_minbert.config import RunConfig, load_config
from dist_minbert.data.collate import collate
from dist_minbert.data.stream import TaskStream
from dist_minbert.engine.autocast import training_forward
from dist_minbert.engine.deepspeed_engine import (build_engine, build_optimizer, lr_lambda, param_groups,
                                                 resolve_precision)
from dist_minbert.engine.task_inputs import TaskSplits, load_task_splits
from dist_minbert.model.bert import BertEncoder
from dist_minbert.model.checkpoint import load_encoder, resolve_checkpoint
from dist_minbert.model.dropout import keep_factors
from dist_minbert.model.tokenizer import WordPieceTokenizer
from dist_minbert.tasks.config import encoding_for
from dist_minbert.tasks.multitask import MultitaskModel

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Timing:
    cpu_ms: float  # median CPU time of this process per call
    wall_ms: float  # median wall time per call


def measure(fn: Callable[[], object], reps: int, warmup: int = 1) -> Timing:
    return measure_interleaved({"": fn}, reps, warmup)[""]


def measure_interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, Timing]:
    """Each function's Timing, their calls taken in turn, so that other work's load falls on each alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    wall: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            c, w = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    return {name: Timing(1e3 * statistics.median(cpu[name]), 1e3 * statistics.median(wall[name])) for name in fns}


class Report:
    """Rows printed as they come, so a long run shows progress."""

    def __init__(self, samples_per_step: int) -> None:
        self.samples_per_step = samples_per_step
        print(f"{'part':<58} {'CPU ms':>9} {'wall ms':>9} {'samples/s':>10}  note")

    def section(self, title: str) -> None:
        print(f"-- {title}")

    def row(self, name: str, t: Timing, note: str = "", per_step: bool = False) -> None:
        rate = f"{self.samples_per_step / t.cpu_ms * 1e3:10.1f}" if per_step else " " * 10
        print(f"{name:<58} {t.cpu_ms:9.1f} {t.wall_ms:9.1f} {rate}  {note}", flush=True)


# -- inputs ------------------------------------------------------------------------------------------------------
def rank_batches(cfg: RunConfig, tokenizer: WordPieceTokenizer, inputs: dict[str, TaskSplits], num_steps: int,
                 report: Report, reps: int) -> list[dict[str, Batch]]:
    """Rank 0's batches of `num_steps` steps, one per task each, built as the trainer builds them."""
    steps: list[dict[str, Batch]] = [{} for _ in range(num_steps)]
    num_workers = cfg.workers.num_workers
    for name, splits in inputs.items():
        stream = TaskStream(splits.sources["train"], cfg.train.seed, num_workers, 0, cfg.data.shuffle_block_rows)
        encoding, size = encoding_for(cfg.tasks[name]), cfg.tasks[name].batch_size

        def next_batch() -> Batch:
            rows = stream.next_batch(size)
            return collate(rows, encoding, cfg.model.max_length, tokenizer.cls_id, tokenizer.sep_id,
                           tokenizer.pad_id).tensors

        for step in steps:
            step[name] = next_batch()
        report.row(f"{name}: stream.next_batch + collate ({size // num_workers} rows)", measure(next_batch, 20 * reps))
    return steps


def encoder_passes(batch: Batch) -> list[Batch]:
    """The encoder inputs of a task batch: one pass for single and cross batches, two (a_, b_) for bi-encoder pairs."""
    prefixes = ("a_", "b_") if "a_input_ids" in batch else ("",)
    return [{key: batch[prefix + key] for key in ("input_ids", "attention_mask", "token_type_ids")}
            for prefix in prefixes]


def shape_note(steps: list[dict[str, Batch]]) -> str:
    masks = [p["attention_mask"] for step in steps for b in step.values() for p in encoder_passes(b)]
    real = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    widths = sorted({m.size(1) for m in masks})
    return f"batch widths {widths[0]}..{widths[-1]}; real tokens {real:.0%} of the padded grid"


# -- encoder -----------------------------------------------------------------------------------------------------
def encoder_rows(cfg: RunConfig, steps: list[dict[str, Batch]], report: Report, reps: int) -> None:
    """Forward + backward of every encoder pass of a step's task batches, through each encoder, in training mode."""
    import transformers

    report.section(f"encoder forward+backward, the passes of a step's {len(steps[0])} task batches "
                   f"({shape_note(steps)})")
    path = resolve_checkpoint(cfg.model.checkpoint)
    dropout = {"hidden_dropout_prob": cfg.model.dropout, "attention_probs_dropout_prob": cfg.model.dropout}
    ours = load_encoder(cfg.model.checkpoint, dropout=cfg.model.dropout).train()
    step = itertools.cycle(steps).__next__  # each timed call sees another step's batches

    def run(encoder: torch.nn.Module, all_real: bool = False, autocast: bool = False) -> None:
        for batch in (p for b in step().values() for p in encoder_passes(b)):
            mask = torch.ones_like(batch["attention_mask"]) if all_real else batch["attention_mask"]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = encoder(batch["input_ids"], mask, batch["token_type_ids"])
            out[1].float().sum().backward()

    report.row("ours: MinBERT, padding skipped (training path)", measure(lambda: run(ours), reps), per_step=True)
    report.row("ours, padding computed (all-ones mask: same FLOPs)", measure(lambda: run(ours, all_real=True), reps),
               "what the encoder cost before padding was skipped", per_step=True)
    for implementation in ("sdpa", "eager"):
        hf = transformers.BertModel.from_pretrained(path, attn_implementation=implementation, **dropout).train()
        report.row(f"transformers.BertModel, attn_implementation={implementation}", measure(lambda: run(hf), reps),
                   per_step=True)
        del hf
    report.row("ours under torch.autocast(cpu, bfloat16)", measure(lambda: run(ours, autocast=True), reps),
               "fp32 weights, bf16 matmuls: deepspeed.precision=autocast_bf16", per_step=True)
    for layer in ours.layers:
        layer.attn.dropout_p = 0.0  # model.dropout sets both dropouts; this keeps the hidden one only
    report.row("ours, attention dropout 0 (hidden dropout kept)", measure(lambda: run(ours), reps),
               "SDPA's flash kernel instead of our math path with dropout", per_step=True)


# -- attention ---------------------------------------------------------------------------------------------------
def attention_rows(encoder: BertEncoder, batch: Batch, report: Report, reps: int) -> None:
    """One layer's attention at a real batch's shape: mask kind, dropout, kernel, fused or separate q/k/v."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = encoder.config
    B, T = batch["input_ids"].shape
    H, nh = config.hidden_size, config.num_attention_heads
    report.section(f"one layer's attention projections + SDPA forward+backward, B={B} T={T} heads={nh}")
    torch.manual_seed(0)
    x = torch.randn(B, T, H, requires_grad=True)
    qkv = encoder.layers[0].attn.qkv
    separate = [torch.nn.Linear(H, H) for _ in range(3)]  # BertModel's query, key, value
    for linear, w, b in zip(separate, qkv.weight.detach().split(H), qkv.bias.detach().split(H)):
        linear.load_state_dict({"weight": w, "bias": b})
    real = batch["attention_mask"].bool()[:, None, None, :]  # (B, 1, 1, T)
    masks = {"bool": real, "additive": torch.zeros(real.shape).masked_fill(~real, float("-inf"))}

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(B, T, nh, H // nh).transpose(1, 2)  # (B, nh, T, hs)

    def attend(mask: torch.Tensor, p: float, fused: bool) -> None:
        if fused:  # ours: one matmul, q/k/v are strided views of its output
            q, k, v = map(heads, qkv(x).split(H, dim=2))
        else:  # BertModel's: three matmuls, three contiguous outputs
            q, k, v = (heads(linear(x)) for linear in separate)
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p).sum().backward()

    for p in (config.attention_probs_dropout_prob, 0.0):
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                attend(real, p, True)
            kernel = "flash kernel"
        except RuntimeError:
            kernel = "no flash kernel: math fallback"
        for mask_kind, mask in masks.items():
            for fused in (True, False):
                name = f"dropout {p}, {mask_kind} mask, {'fused qkv' if fused else 'separate q,k,v'}"
                report.row(name, measure(lambda: attend(mask, p, fused), 10 * reps), kernel)
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        with sdpa_kernel(backend):
            report.row(f"dropout 0.0, bool mask, fused qkv, forced {backend.name}",
                       measure(lambda: attend(real, 0.0, True), 10 * reps))


def dropout_rows(batch: Batch, hidden_size: int, report: Report, reps: int) -> None:
    """The RNG behind every dropout mask, at the size of one layer's hidden states."""
    report.section("dropout masks (random numbers) on one (B, T, H) activation")
    x = torch.randn(*batch["input_ids"].shape, hidden_size)
    report.row("F.dropout (bernoulli_)", measure(lambda: F.dropout(x, 0.1, True), 20 * reps))
    report.row("torch.rand_like(x) >= p", measure(lambda: torch.rand_like(x) >= 0.1, 20 * reps))
    report.row("keep_factors (ours: numpy SFC64, two halves)", measure(lambda: keep_factors(x.shape, 0.1), 20 * reps),
               "the factors the encoder multiplies by")


# -- heads, optimizer, whole step --------------------------------------------------------------------------------
def heads_rows(model: MultitaskModel, steps: list[dict[str, Batch]], report: Report, reps: int) -> None:
    report.section(f"task heads + losses forward+backward on pooled vectors ({len(steps[0])} tasks)")
    H = model.encoder.config.hidden_size
    pooled = {task: [torch.randn(len(b["labels"]), H, requires_grad=True) for _ in encoder_passes(b)]
              for task, b in steps[0].items()}  # a bi-encoder head takes one vector per text

    def run() -> None:
        total = sum(model.loss(task, model.heads[task](*v), steps[0][task]["labels"]) for task, v in pooled.items())
        total.backward()

    report.row("heads: " + ", ".join(f"{t}={model.tasks[t].head}" for t in pooled), measure(run, 20 * reps))


def optimizer_rows(model: MultitaskModel, cfg: RunConfig, report: Report, reps: int) -> None:
    num_params = sum(p.numel() for p in model.parameters())
    report.section(f"optimizer step over {num_params / 1e6:.1f}M parameters (dense gradients)")
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    groups = param_groups(model, cfg.optim)
    variants = {"fused (ours)": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}
    for name, kwargs in variants.items():
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, **kwargs)
        report.row(f"AdamW {name}", measure(optimizer.step, 5 * reps))
    params = list(model.parameters())
    report.row("clip_grad_norm_(1.0)", measure(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0), 5 * reps))
    model.zero_grad(set_to_none=True)


def step_rows(cfg: RunConfig, steps: list[dict[str, Batch]], report: Report, reps: int) -> None:
    """A whole optimizer step, identical work: plain torch loop against the DeepSpeed engine the trainer builds."""
    report.section("whole step: forward 3 tasks, summed loss, backward, clip 1.0, AdamW, LR schedule")

    def new_model() -> MultitaskModel:
        torch.manual_seed(cfg.train.seed)
        encoder = load_encoder(cfg.model.checkpoint, dropout=cfg.model.dropout)
        return MultitaskModel(encoder, cfg.tasks, cfg.model.pooling).train()

    model = new_model()
    weights = {task: spec.weight for task, spec in cfg.tasks.items()}
    optimizer = build_optimizer(param_groups(model, cfg.optim), cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, 1000))
    step = itertools.cycle(steps).__next__

    def loss_of(forward: Callable[[str, Batch], torch.Tensor]) -> torch.Tensor:
        return sum(weights[t] * model.loss(t, forward(t, b), b["labels"]) for t, b in step().items())

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.deepspeed.gradient_clipping)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    plain_phases = Phases()

    def plain_step() -> None:
        loss = plain_phases.run("forward + losses", lambda: loss_of(model))
        plain_phases.run("loss.backward()", loss.backward)
        plain_phases.run("clip + AdamW + LR + zero_grad", update)

    report.row("plain torch loop (MultitaskModel, fused AdamW)", measure(plain_step, reps), per_step=True)
    plain_phases.report(report)

    _single_process_group()
    # Its own copy: a bf16 engine casts the model it wraps.
    engine = build_engine(new_model(), cfg.deepspeed, cfg.optim, 1000, use_gpu=False, world_size=1)
    precision = resolve_precision(cfg.deepspeed, use_gpu=False)
    # An fp32 engine is autocast_bf16's too (only the forward differs): both forwards, their steps in turn.
    forwards = {p: training_forward(engine, p, torch.device("cpu"))
                for p in ([precision] if precision == "bf16" else ["fp32", "autocast_bf16"])}
    phases = {p: Phases() for p in forwards}

    def engine_step(p: str) -> None:
        loss = phases[p].run("engine(task, batch) + losses", lambda: loss_of(forwards[p]))
        phases[p].run("engine.backward(loss)", lambda: engine.backward(loss))
        phases[p].run("engine.step()", engine.step)

    timings = measure_interleaved({p: lambda p=p: engine_step(p) for p in forwards}, reps)
    for p, t in timings.items():
        note = f"{timings['fp32'].cpu_ms / t.cpu_ms:.2f}× fp32's speed (CPU time)" if p == "autocast_bf16" else ""
        report.row(f"DeepSpeed engine, ZeRO {cfg.deepspeed.zero_stage}, {p}, 1-rank gloo", t, note, per_step=True)
        phases[p].report(report)
    engine.backward(loss_of(engine))
    report.row("  engine.allreduce_gradients() alone", measure(engine.allreduce_gradients, reps),
               "inside engine.backward; 1 rank: bucket copies only, 2 ranks add the gloo all-reduce")
    engine.step()
    report.row("plain torch loop again (drift check)", measure(plain_step, reps), per_step=True)


class Phases:
    """CPU time of each phase of a step, over every call (the first, a warm-up, left out of the report)."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}

    def run(self, phase: str, fn: Callable[[], object]) -> object:
        start = time.process_time()
        result = fn()
        self.seconds.setdefault(phase, []).append(time.process_time() - start)
        return result

    def report(self, report: Report) -> None:
        for name, seconds in self.seconds.items():
            report.row(f"  of which {name}", Timing(1e3 * statistics.median(seconds[1:]), float("nan")))


def _single_process_group() -> None:
    """The environment deepspeed.init_distributed reads to build a one-rank gloo group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")


# -- evaluation -------------------------------------------------------------------------------------------------
def evaluation_rows(cfg: RunConfig, tokenizer: WordPieceTokenizer, inputs: dict[str, TaskSplits], report: Report,
                    reps: int, num_rows: int = 256) -> None:
    """Forward only, eval mode, no_grad, as predict_rows runs it: rows in file order, against length-sorted rows."""
    batch_size = cfg.train.eval_batch_size // cfg.workers.num_workers
    report.section(f"evaluation forward (eval mode, no_grad), per 100 dev rows, batches of {batch_size}")
    encoder = load_encoder(cfg.model.checkpoint, dropout=cfg.model.dropout).eval()
    for name, splits in inputs.items():
        source = splits.sources["dev"]
        n = min(num_rows, len(source))
        encoding = encoding_for(cfg.tasks[name])
        by_length = np.argsort(source.row_lengths(0, n), kind="stable")
        for order_name, order in (("file order", np.arange(n)), ("sorted by length", by_length)):
            batches = [p for i in range(0, n, batch_size)
                       for p in encoder_passes(collate(source.take(order[i:i + batch_size]), encoding,
                                                       cfg.model.max_length, tokenizer.cls_id, tokenizer.sep_id,
                                                       tokenizer.pad_id).tensors)]

            @torch.no_grad()
            def run() -> None:
                for b in batches:
                    encoder(b["input_ids"], b["attention_mask"], b["token_type_ids"])

            t = measure(run, reps)
            scale = 100 / n
            masks = [b["attention_mask"] for b in batches]
            real = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
            report.row(f"{name} dev, {order_name}", Timing(t.cpu_ms * scale, t.wall_ms * scale),
                       f"real tokens {real:.0%} of the padded grid")


SECTIONS = ("encoder", "attention", "dropout", "heads", "optimizer", "step", "evaluation")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each whole-step figure")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=SECTIONS, help="sections to run")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(args.config, args.set)
    tokenizer = WordPieceTokenizer.from_checkpoint(cfg.model.checkpoint)
    num_workers = cfg.workers.num_workers
    samples_per_step = sum(task.batch_size // num_workers for task in cfg.tasks.values())
    report = Report(samples_per_step)
    report.section(f"data path, rank 0 of {num_workers}; samples/s below = {samples_per_step} rank samples per step "
                   "/ CPU time, one thread")
    with tempfile.TemporaryDirectory(prefix="step_profile_") as output_dir:  # the prepared shards live there
        inputs = load_task_splits(cfg.tasks, cfg.data, tokenizer, cfg.model.max_length, output_dir, is_main=True,
                                  barrier=lambda: None, splits=("train", "dev"))
        steps = rank_batches(cfg, tokenizer, inputs, 4, report, args.reps)
        encoder = load_encoder(cfg.model.checkpoint, dropout=cfg.model.dropout).train()
        widest = max((p for b in steps[0].values() for p in encoder_passes(b)), key=lambda p: p["input_ids"].size(1))
        model = MultitaskModel(encoder, cfg.tasks, cfg.model.pooling).train()
        sections = {
            "encoder": lambda: encoder_rows(cfg, steps, report, args.reps),
            "attention": lambda: attention_rows(encoder, widest, report, args.reps),
            "dropout": lambda: dropout_rows(widest, encoder.config.hidden_size, report, args.reps),
            "heads": lambda: heads_rows(model, steps, report, args.reps),
            "optimizer": lambda: optimizer_rows(model, cfg, report, args.reps),
            "step": lambda: step_rows(cfg, steps, report, args.reps),
            "evaluation": lambda: evaluation_rows(cfg, tokenizer, inputs, report, args.reps),
        }
        for name in SECTIONS:
            if name in args.only:
                sections[name]()


if __name__ == "__main__":
    main()
