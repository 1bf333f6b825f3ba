"""The train loop: the one place where model, tasks, data, schedule, engine and observability meet.

It knows nothing of Ray: it runs in any process group (Ray Train workers, torchrun, a test).
"""
from __future__ import annotations

import json
import logging
import math
import time
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from dist_minbert.config import RunConfig, save_config
from dist_minbert.data.collate import collator
from dist_minbert.data.prefetch import Prefetcher
from dist_minbert.data.schedule import sampling_probabilities, steps_in_epoch, tasks_for_step
from dist_minbert.data.stream import TaskStream
from dist_minbert.engine import checkpointing
from dist_minbert.engine.checkpoint_io import RUN_CONFIG
from dist_minbert.engine.deepspeed_engine import build_engine
from dist_minbert.engine.step_gradients import NonFiniteStep, SummedGradients, SurgeryGradients
from dist_minbert.engine.inference import predict_rows
from dist_minbert.engine.task_inputs import load_task_splits, merge_rejects
from dist_minbert.model.checkpoint import load_encoder
from dist_minbert.model.tokenizer import WordPieceTokenizer
from dist_minbert.observe.metrics_logger import MetricsLogger
from dist_minbert.observe.progress import progress_bar
from dist_minbert.observe.surgery_scalars import surgery_scalars
from dist_minbert.surgery.comm import CommCounter
from dist_minbert.observe.timers import StepTimers
from dist_minbert.tasks.config import encoding_for
from dist_minbert.tasks.metrics import compute_metrics, overall_score
from dist_minbert.tasks.multitask import MultitaskModel
from dist_minbert.tasks.predictions import write_predictions

log = logging.getLogger(__name__)

Metrics = dict[str, dict[str, float]]  # task → metric → value
BEST_TAG = checkpointing.BEST


@dataclass(frozen=True)
class StepInput:
    position: tuple[int, int]  # (epoch, step in epoch)
    micro_batches: list[dict[str, dict[str, torch.Tensor]]]  # per micro-batch: task → this rank's batch
    stream_states: dict[str, dict[str, int]]  # every stream's position after this step


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def current(cls, use_gpu: bool) -> DistContext:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
        return cls(rank, world, device)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def task_seed(seed: int, task: str) -> int:
    """Each task's sample order gets its own seed, stable under renaming of other tasks."""
    return (seed * 1_000_003 + zlib.crc32(task.encode())) % 2**31


class Trainer:
    def __init__(self, cfg: RunConfig, ctx: DistContext, report: Callable[[dict, Path], None] | None = None):
        """`report(metrics, checkpoint_folder)` is called on every rank after each checkpoint."""
        self.started = time.perf_counter()
        self.cfg, self.ctx, self.report = cfg, ctx, report
        self.is_main = ctx.rank == 0
        self.out = Path(cfg.train.output_dir)
        self.tokenizer = WordPieceTokenizer.from_checkpoint(cfg.model.checkpoint)
        self._collators = {name: collator(self.tokenizer, encoding_for(spec), cfg.model.max_length)
                           for name, spec in cfg.tasks.items()}
        self.inputs = load_task_splits(cfg.tasks, cfg.data, self.tokenizer, cfg.model.max_length,
                                       str(self.out), self.is_main, _barrier)
        self.streams = {
            name: TaskStream(splits.sources["train"], task_seed(cfg.train.seed, name), ctx.world_size, ctx.rank,
                             length_group_rows=cfg.data.length_group_rows)
            for name, splits in self.inputs.items()}
        self.sizes = {name: len(s.source) for name, s in self.streams.items()}
        self.batch_sizes = {name: task.batch_size for name, task in cfg.tasks.items()}
        self.epoch_steps = [self._steps_in(e) for e in range(cfg.train.epochs)]
        self.total_steps = min(sum(self.epoch_steps), cfg.train.max_steps or math.inf)

        torch.manual_seed(cfg.train.seed)  # heads start identical on every rank
        model = MultitaskModel(load_encoder(cfg.model.checkpoint, dropout=cfg.model.dropout), cfg.tasks,
                               cfg.model.pooling)
        # Surgery modes accumulate per-task gradients themselves, then hand DeepSpeed one backward per step.
        self.accumulation = cfg.deepspeed.gradient_accumulation_steps
        engine_accumulation = self.accumulation if cfg.surgery.mode == "sum" else 1
        self.engine = build_engine(model, cfg.deepspeed, cfg.optim, self.total_steps, cfg.workers.use_gpu,
                                   ctx.world_size, engine_accumulation)
        self.model: MultitaskModel = self.engine.module
        self.comm = CommCounter(sum(p.numel() for p in self.model.shared_parameters()))
        self.gradients = (SummedGradients(self.engine) if cfg.surgery.mode == "sum" else
                          SurgeryGradients(self.engine, self.model, cfg.surgery, cfg.train.seed, self.comm))
        self.num_skipped_in_a_row = 0
        self._last_dev_predictions = self._best_dev_predictions = None  # rank 0's (predictions, rows) per task
        torch.manual_seed(cfg.train.seed + 1 + ctx.rank)  # distinct dropout masks per rank
        self.global_step = 0
        self.timers = StepTimers()
        self.num_truncated: dict[str, int] = defaultdict(int)
        self.logger = MetricsLogger(str(self.out / "tensorboard") if self.is_main and cfg.observe.tensorboard else None)
        if self.is_main:
            self._write_run_files()
        if cfg.checkpoint.kill_at_step and not cfg.checkpoint.kill_rank < ctx.world_size:
            raise ValueError(f"checkpoint.kill_rank: {cfg.checkpoint.kill_rank} is not a rank of the {ctx.world_size} "
                             f"workers; allowed: 0 to {ctx.world_size - 1}")
        self.dev_history = checkpointing.DevHistory()
        self._resume(checkpointing.resolve_resume(cfg.checkpoint.resume, self.checkpoint_dir))
        self.stream_states = {name: s.state_dict() for name, s in self.streams.items()}  # of the last step trained

    # -- setup --------------------------------------------------------------------------------
    def _steps_in(self, epoch: int) -> int:
        return steps_in_epoch(self.cfg.schedule, epoch, self.sizes, self.batch_sizes, self.cfg.train.epochs)

    def _write_run_files(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out / "config.yaml")
        num_rejects = merge_rejects([f for splits in self.inputs.values() for f in splits.rejects_files],
                                    str(self.out / "rejects.tsv"))
        if num_rejects:
            log.warning("%d malformed rows rejected; see %s", num_rejects, self.out / "rejects.tsv")

    # -- training -----------------------------------------------------------------------------
    def _batch(self, task: str, global_batch_size: int) -> dict[str, torch.Tensor]:
        rows = self.streams[task].next_table(global_batch_size)
        batch = self._collate(task, rows)
        return {k: v.to(self.ctx.device, non_blocking=True) for k, v in batch.items()}

    def _collate(self, task: str, rows: dict[str, list]) -> dict[str, torch.Tensor]:
        collated = self._collators[task](rows)
        self.num_truncated[task] += collated.num_truncated
        return collated.tensors

    def positions(self) -> list[tuple[int, int]]:
        """(epoch, step in epoch) of every optimizer step still to run, up to max_steps."""
        every = [(epoch, step) for epoch, num_steps in enumerate(self.epoch_steps) for step in range(num_steps)]
        return every[self.global_step: self.total_steps]

    def read_step(self, position: tuple[int, int]) -> StepInput:
        """The micro-batches of one step, and every stream's position right after them.

        With prefetch this runs ahead on the data thread, so the streams' live positions are ahead of
        training: a checkpoint stores the positions of the last step trained, never the live ones.
        """
        epoch, step = position
        plan = tasks_for_step(self.cfg.schedule, self.cfg.train.seed, epoch, step, self.sizes, self.batch_sizes,
                              self.cfg.train.epochs)
        micro_batches = [{task: self._batch(task, size // self.accumulation) for task, size in plan.items()}
                         for _ in range(self.accumulation)]
        return StepInput(position, micro_batches, {name: s.state_dict() for name, s in self.streams.items()})

    def train_step(self, epoch: int, step: int, prefetched: StepInput | None = None) -> dict[str, float]:
        """One optimizer step of the schedule; returns this rank's mean loss per task ({} if skipped)."""
        with self.timers.phase("data"):
            step_input = prefetched or self.read_step((epoch, step))
        micro_batches, self.stream_states = step_input.micro_batches, step_input.stream_states
        plan = micro_batches[0]
        weights = {task: self.cfg.tasks[task].weight for task in plan}
        self.global_step += 1
        try:
            with self.timers.phase("step"):
                outcome = self.gradients.run(micro_batches, self._loss, weights, self.global_step)
        except NonFiniteStep as exc:
            self.num_skipped_in_a_row += 1
            log.warning("step %d skipped on every rank: %s (%d in a row)", self.global_step, exc,
                        self.num_skipped_in_a_row)
            self.logger.scalars(self.global_step, {"train/skipped_nonfinite": 1.0})
            if self.num_skipped_in_a_row >= self.cfg.train.max_nonfinite_steps:
                raise RuntimeError(f"{self.num_skipped_in_a_row} steps in a row had a non-finite loss or gradient "
                                   f"(train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}); last: {exc}")
            return {}
        self.num_skipped_in_a_row = 0
        if outcome.stats is not None and self.global_step % self.cfg.observe.log_every == 0:
            self.logger.scalars(self.global_step, surgery_scalars(outcome.stats, list(self.model.tasks)))
        return outcome.losses

    def _loss(self, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Under surgery the plain module runs the forward: DeepSpeed 0.19.8 hooks the engine's outputs and
        # refuses any backward through them but engine.backward (autograd.grad included).
        forward = self.engine if isinstance(self.gradients, SummedGradients) else self.model
        return self.model.loss(task, forward(task, batch), batch["labels"])

    def fit(self) -> dict:
        cfg, history = self.cfg, self.dev_history
        if history.initial is None:  # a resumed run carries its dev history on
            history.initial = history.last = self.evaluate("dev")
            self._log_dev(history.initial)
        self.samples, self.train_s = 0, 0.0
        bar = progress_bar(self.total_steps, "train", enabled=self.is_main and cfg.observe.progress)
        bar.update(self.global_step)
        window = _LossWindow()
        with Prefetcher(self.read_step, self.positions(), cfg.data.prefetch) as steps:
            self._train_epochs(steps, history, window, bar)
        bar.close()
        if (self.checkpoint_dir / BEST_TAG).exists():
            self.engine.load_checkpoint(str(self.checkpoint_dir), tag=BEST_TAG, load_module_only=True)
        prediction_paths = self.write_predictions()
        summary = {
            "num_workers": self.ctx.world_size,
            "steps": self.global_step,
            "samples": self.samples,
            "samples_per_s": self.samples / self.train_s if self.train_s else 0.0,
            "train_s": self.train_s,
            "wall_s": time.perf_counter() - self.started,  # this worker: data, engine, training, evaluation
            "initial_dev": history.initial,
            "dev": history.last,
            "best_dev": history.best,
            "score": overall_score(history.last) if history.last else None,
            "best_score": history.best_score if history.last else None,
            "truncated_rows": dict(self.num_truncated),
            "paths": {"output_dir": str(self.out), "tensorboard": str(self.out / "tensorboard"),
                      "checkpoint": str(self.checkpoint_dir / BEST_TAG), "predictions": prediction_paths,
                      "config": str(self.out / "config.yaml"), "rejects": str(self.out / "rejects.tsv")},
        }
        if self.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            self.logger.close()
        return summary

    def _train_epochs(self, steps, history: checkpointing.DevHistory, window: _LossWindow, bar) -> None:
        cfg = self.cfg
        for step_input in steps:
            epoch, step = step_input.position
            start = time.perf_counter()
            losses = self.train_step(epoch, step, step_input)
            elapsed = time.perf_counter() - start
            step_samples = sum(self.batch_sizes[t] for t in losses)
            self.samples, self.train_s = self.samples + step_samples, self.train_s + elapsed
            window.add(losses, step_samples, elapsed)
            bar.update(1)
            if self.global_step % cfg.observe.log_every == 0 or self.global_step == self.total_steps:
                self._log_train(epoch, window.drain(self.ctx))
            checkpointing.inject_fault(cfg.checkpoint, self.global_step, self.ctx.rank, self.out)
            last = self.global_step >= self.total_steps
            epoch_end = step == self.epoch_steps[epoch] - 1 or last
            if epoch_end and (cfg.train.eval_every_epoch or epoch == cfg.train.epochs - 1 or last):
                dev = self.evaluate("dev")
                self._log_dev(dev)
                score = overall_score(dev) if dev else -math.inf
                is_best = history.record(dev, score, checkpointing.step_tag(self.global_step))
                if is_best:
                    self._best_dev_predictions = self._last_dev_predictions  # {} on ranks other than 0
                self._checkpoint({"epoch": epoch, "step": self.global_step, "score": score, "dev": dev}, is_best)
            elif epoch_end or (cfg.checkpoint.every_steps and self.global_step % cfg.checkpoint.every_steps == 0):
                self._checkpoint({"epoch": epoch, "step": self.global_step}, is_best=False)

    # -- evaluation and predictions -----------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / checkpointing.CHECKPOINTS_DIR

    def save_checkpoint(self, is_best: bool = False) -> Path:
        """Checkpoint the state after `global_step` on every rank (collective); returns its folder."""
        state = {"version": checkpointing.STATE_VERSION, "global_step": self.global_step,
                 "world_size": self.ctx.world_size, "streams": self.stream_states,
                 "dev_history": asdict(self.dev_history)}
        folder = checkpointing.save_checkpoint(
            self.engine, self.checkpoint_dir, self.global_step, state, self.ctx.rank,
            lambda temp: save_config(self.cfg, temp / RUN_CONFIG), self.cfg.checkpoint.keep_last, is_best)
        self.logger.flush()  # the logged history is as durable as the state it leads to
        return folder

    def _checkpoint(self, metrics: dict, is_best: bool) -> None:
        folder = self.save_checkpoint(is_best)
        if self.report:
            self.report(metrics, folder)

    def _resume(self, tag_dir: Path | None) -> None:
        """Continue from `tag_dir`: engine state, stream positions, step, RNG and dev history. Collective.

        Then rank 0 makes the checkpoint folder this run's linear history (checkpoints past the start go).
        """
        if tag_dir is not None:
            checkpointing.check_resumable(tag_dir, self.cfg.deepspeed.zero_stage, list(self.cfg.tasks))
            state = checkpointing.load_checkpoint(self.engine, tag_dir, self.ctx.rank, self.ctx.world_size,
                                                  self.checkpoint_dir)
            for name, stream in self.streams.items():
                try:
                    stream.load_state_dict(state["streams"][name])
                except ValueError as exc:
                    raise ValueError(f"{tag_dir}: tasks.{name}: {exc}") from None
            self.global_step = state["global_step"]
            self.dev_history = checkpointing.DevHistory(**state["dev_history"])
            checkpointing.restore_or_reseed_rng(tag_dir, self.ctx.rank, state["world_size"] == self.ctx.world_size,
                                                self.cfg.train.seed, self.global_step)
            if self.is_main:
                log.info("resumed from %s at step %d (written by %d workers, now %d)", tag_dir, self.global_step,
                         state["world_size"], self.ctx.world_size)
        if self.is_main:
            best = self.dev_history.best_tag
            checkpointing.begin_history(self.checkpoint_dir, self.global_step, tag_dir,
                                        tag_dir.parent / best if tag_dir and best else None)

    def _predict_split(self, split: str) -> dict[str, tuple[np.ndarray, dict[str, list]]]:
        """task → (predictions of all rows in file order, the rows' ids/labels) on rank 0; {} elsewhere.

        Each rank predicts a contiguous slice; rank 0 gathers the slices (one gather per task).
        """
        results = {}
        for name, splits in self.inputs.items():
            source = splits.sources.get(split)
            if source is None:
                continue
            n = len(source) if split != "dev" or not self.cfg.train.eval_max_rows else min(
                len(source), self.cfg.train.eval_max_rows)
            local = predict_rows(self.engine, self.model, name, source, n, self.ctx,
                                 lambda rows, name=name: self._collators[name](rows).tensors,
                                 self.cfg.train.eval_batch_size // self.ctx.world_size)
            gathered = [None] * self.ctx.world_size if self.is_main else None
            dist.gather_object(local, gathered, dst=0)
            if self.is_main:
                meta = source.take(np.arange(n))
                results[name] = (np.concatenate(gathered), meta)
        return results

    def evaluate(self, split: str) -> Metrics:
        """Metrics of every labelled task on `split`, identical on all ranks."""
        results = self._predict_split(split)
        self._last_dev_predictions = results if split == "dev" and not self.cfg.train.eval_max_rows else None
        metrics = [{name: compute_metrics(self.cfg.tasks[name], preds, np.asarray(meta["label"]))
                    for name, (preds, meta) in results.items()} if self.is_main else None]
        dist.broadcast_object_list(metrics, src=0)
        return metrics[0]

    def write_predictions(self) -> dict[str, str]:
        paths = {}
        for split in self.cfg.train.predict_splits or ["dev", "test"]:
            # The best evaluation's dev predictions are those of the weights just loaded: no second pass.
            cached = self._best_dev_predictions if split == "dev" else None
            for name, (preds, meta) in (cached if cached is not None else self._predict_split(split)).items():
                path = self.out / "predictions" / f"{name}-{split}-output.csv"
                if self.is_main:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_predictions(str(path), self.cfg.tasks[name], meta["id"], preds)
                paths[f"{name}-{split}"] = str(path)
        return paths

    # -- logging ------------------------------------------------------------------------------
    def _log_train(self, epoch: int, window: dict[str, float]) -> None:
        probabilities = sampling_probabilities(self.cfg.schedule, epoch, self.sizes, self.cfg.train.epochs)
        values = {**window, **self.timers.drain(), "lr": self.engine.get_lr()[0], "epoch": epoch,
                  **{f"sampling/{t}_p": p for t, p in probabilities.items()},
                  **{f"samples_seen/{t}": s["epoch"] * s["num_rows"] + s["consumed"] for t, s in self.stream_states.items()},
                  **{f"truncated_rows/{t}": n for t, n in self.num_truncated.items()}}
        self.logger.scalars(self.global_step, values)
        if self.is_main:
            losses = " ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in window.items() if k.startswith("loss/"))
            log.info("step %d/%d epoch %d %s %.1f samples/s", self.global_step, self.total_steps, epoch, losses,
                     window.get("throughput/samples_per_s", 0.0))

    def _log_dev(self, dev: Metrics) -> None:
        self.logger.nested(self.global_step, "dev", dev)
        if dev:
            self.logger.scalars(self.global_step, {"dev/score": overall_score(dev)})
        if self.is_main:
            log.info("dev at step %d: %s", self.global_step, json.dumps(dev))


class _LossWindow:
    """Per-task losses and throughput between two log writes, averaged over ranks when drained."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.samples, self.seconds = 0, 0.0

    def add(self, losses: dict[str, float], samples: int, seconds: float) -> None:
        for task, loss in losses.items():
            self.sums[task] += loss
            self.counts[task] += 1
        self.samples += samples
        self.seconds += seconds

    def drain(self, ctx: DistContext) -> dict[str, float]:
        tasks = sorted(self.sums)
        # One small all-reduce per log write: rank-mean of each task's loss (ranks see disjoint samples).
        values = torch.tensor([self.sums[t] / self.counts[t] for t in tasks], dtype=torch.float64)
        if dist.is_initialized() and ctx.world_size > 1:
            dist.all_reduce(values)
            values /= ctx.world_size
        out = {f"loss/{t}": float(v) for t, v in zip(tasks, values)}
        out["throughput/samples_per_s"] = self.samples / self.seconds if self.seconds else 0.0
        self.__init__()
        return out
