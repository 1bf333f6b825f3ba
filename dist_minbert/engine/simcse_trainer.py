"""The SimCSE job: the engine's second loop, assembled from the same parts as the multitask trainer.

A corpus stream read through the step reader and its prefetch thread, a DeepSpeed engine fed by a
gradient strategy (ContrastiveGradients), the step policy, checkpoints and resume (RunCheckpointer), the
same logger and timers. What is its own: the loss (dist_minbert.contrastive), and an evaluation that
needs no head — STS dev correlations of the embeddings' cosines, zero-shot, with alignment and
uniformity — whose Spearman chooses `best`. At the end the best encoder is written as a Hugging Face
folder, which `dist-minbert train` takes as `model.checkpoint`.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dist_minbert.config import SimCSERunConfig, save_config
from dist_minbert.contrastive.evaluation import sts_metrics
from dist_minbert.contrastive.model import SentenceEncoder
from dist_minbert.data.collate import collator
from dist_minbert.data.prefetch import Prefetcher
from dist_minbert.data.shards import open_source
from dist_minbert.data.step_reader import Position, StepReader, step_positions
from dist_minbert.data.stream import TaskStream, samples_seen
from dist_minbert.engine import checkpointing
from dist_minbert.engine.deepspeed_engine import build_engine
from dist_minbert.engine.dist_context import DistContext
from dist_minbert.engine.multitask_data import task_seed
from dist_minbert.engine.run_checkpoint import Report, RunCheckpointer
from dist_minbert.engine.run_storage import RunStorage
from dist_minbert.engine.run_summary import write_summary
from dist_minbert.engine.step_gradients import ContrastiveGradients, NonFiniteStep
from dist_minbert.engine.step_policy import SkippedSteps, step_actions
from dist_minbert.model.checkpoint import load_encoder
from dist_minbert.model.export import export_hf
from dist_minbert.model.tokenizer import WordPieceTokenizer
from dist_minbert.observe.loss_window import LossWindow, num_tokens
from dist_minbert.observe.memory import memory_scalars
from dist_minbert.observe.metrics_logger import MetricsLogger
from dist_minbert.observe.progress import progress_bar
from dist_minbert.observe.run_figures import hparam_metrics, run_figures, run_hparams
from dist_minbert.observe.timers import StepTimers, timed_iter
from dist_minbert.tasks.config import TaskConfig
from dist_minbert.tasks.readers import read_task_file
from dist_minbert.tasks.registry import BUILTIN_TASKS
from dist_minbert.tasks.sentence_embedding import embed_sentences

log = logging.getLogger(__name__)

CORPUS = "corpus"  # the one stream's name in checkpoints
ENCODER_DIR = "encoder"  # in train.output_dir: the best encoder as a Hugging Face folder


class SimCSETrainer:
    def __init__(self, cfg: SimCSERunConfig, ctx: DistContext, report: Report | None = None) -> None:
        """Opens this rank's stream of the corpus shards, builds the engine, resumes if asked. Collective."""
        self.started = time.perf_counter()
        self.cfg, self.ctx = cfg, ctx
        self.storage = RunStorage.for_run(cfg.train.output_dir, cfg.train.local_dir, ctx.rank)
        self.out = self.storage.local  # where this process writes; a URL output_dir is reached through storage
        self.tokenizer = WordPieceTokenizer.from_checkpoint(cfg.model.checkpoint)
        self.stream = TaskStream(open_source(cfg.simcse.corpus), task_seed(cfg.train.seed, CORPUS), ctx.world_size,
                                 ctx.rank, length_group_rows=cfg.data.length_group_rows)
        self.global_batch = cfg.simcse.batch_size_per_worker * ctx.world_size
        steps_per_epoch = len(self.stream.source) // self.global_batch
        if steps_per_epoch < 1:
            raise ValueError(f"simcse.corpus: {cfg.simcse.corpus} has {len(self.stream.source)} sentences, fewer "
                             f"than one step's {self.global_batch} (batch_size_per_worker × {ctx.world_size} workers)")
        self.epoch_steps = [steps_per_epoch] * cfg.train.epochs
        self.total_steps = min(sum(self.epoch_steps), cfg.train.max_steps or math.inf)
        self.reader = StepReader({CORPUS: self.stream},
                                 {CORPUS: collator(self.tokenizer, "single", cfg.model.max_length)},
                                 lambda position: {CORPUS: self.global_batch})

        torch.manual_seed(cfg.train.seed)  # the MLP starts identical on every rank
        model = SentenceEncoder(load_encoder(cfg.model.checkpoint, dropout=cfg.model.dropout), cfg.simcse.pooling)
        self.engine = build_engine(model, cfg.deepspeed, cfg.optim, self.total_steps, cfg.workers.use_gpu,
                                   ctx.world_size)
        self.model: SentenceEncoder = self.engine.module
        self.timers = StepTimers()
        self.gradients = ContrastiveGradients(self.engine, self.model, cfg.simcse, self.timers, cfg.deepspeed.precision)
        torch.manual_seed(cfg.train.seed + 1 + ctx.rank)  # distinct dropout masks per rank
        self.sts = _read_sts(Path(cfg.data.root) / cfg.simcse.sts_dev, cfg.data.on_bad_row)
        self.logger = MetricsLogger(str(self.out / "tensorboard") if ctx.is_main and cfg.observe.tensorboard else None)
        self.skipped_steps = SkippedSteps(cfg.train.max_nonfinite_steps, self.logger)
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        self.checkpoints = RunCheckpointer(self.engine, self.storage, cfg.checkpoint, ctx,
                                           lambda path: save_config(cfg, path), report, self.logger.flush)
        self.state = self.checkpoints.resume({CORPUS: self.stream}, cfg.train.seed, cfg.deepspeed.zero_stage,
                                             tasks=[])

    @property
    def global_step(self) -> int:
        return self.state.global_step

    def positions(self) -> list[Position]:
        return step_positions(self.epoch_steps, self.global_step, self.total_steps)

    def train_step(self, step) -> float | None:
        """One optimizer step; this rank's loss, or None when a NaN/inf skipped it on every rank."""
        batch = {k: v.to(self.ctx.device, non_blocking=True) for k, v in step.micro_batches[0][CORPUS].tensors.items()}
        self.state.stream_states = step.stream_states
        self.state.global_step += 1
        try:
            loss = self.gradients.run(batch)
        except NonFiniteStep as exc:
            self.skipped_steps.skipped(self.global_step, exc)
            return None
        self.skipped_steps.trained()
        return loss

    def evaluate(self) -> dict[str, float]:
        """STS dev figures of the current weights, identical on every rank (rank 0 computes, then broadcasts)."""
        values = [self._sts_figures() if self.ctx.is_main else None]
        if dist.is_initialized():
            dist.broadcast_object_list(values, src=0)
        figures = values[0]
        self.logger.scalars(self.global_step, {f"dev/sts/{k}": v for k, v in figures.items()})
        if self.ctx.is_main:
            log.info("dev at step %d: %s", self.global_step, json.dumps(figures))
        return figures

    def _sts_figures(self) -> dict[str, float]:
        texts_a, texts_b, scores = self.sts
        pooling, max_length = self.cfg.simcse.embedding_pooling(), self.cfg.model.max_length
        a = embed_sentences(self.model.encoder, self.tokenizer, texts_a, pooling, max_length)
        b = embed_sentences(self.model.encoder, self.tokenizer, texts_b, pooling, max_length)
        return sts_metrics(_STS_TASK, a, b, scores)

    def fit(self) -> dict:
        cfg, history = self.cfg, self.state.dev_history
        if history.initial is None:
            history.initial = history.last = {"sts": self.evaluate()}
        samples, train_s, window = 0, 0.0, LossWindow(self.ctx.device)
        every = cfg.simcse.eval_every_steps
        bar = progress_bar(self.total_steps, "simcse", enabled=self.ctx.is_main and cfg.observe.progress)
        bar.update(self.global_step)
        with Prefetcher(self.reader, self.positions(), cfg.data.prefetch) as steps:
            for step, waited_s in timed_iter(steps, self.timers, "data"):
                started = time.perf_counter()
                loss = self.train_step(step)
                step_s = waited_s + time.perf_counter() - started
                self.timers.end_step(step_s)
                losses = {} if loss is None else {"simcse": loss}
                step_samples = self.global_batch if losses else 0
                samples, train_s = samples + step_samples, train_s + step_s
                # Each sentence's tokens once, though the encoder reads it twice (its two dropout views).
                window.add(losses, step_samples, num_tokens(step.micro_batches) if losses else 0, step_s)
                bar.update(1)
                epoch, step_in_epoch = step.position
                # SimCSE converges within an epoch: evaluation (and `best`) every N steps, besides the epoch ends.
                actions = step_actions(self.global_step, epoch, step_in_epoch, self.epoch_steps, self.total_steps,
                                       cfg.train, cfg.checkpoint, cfg.observe, evaluate_every=every)
                if actions.log:
                    self._log_train(epoch, window.drain())
                checkpointing.inject_fault(cfg.checkpoint, self.global_step, self.ctx.rank, self.out)
                metrics, is_best = {"epoch": epoch, "step": self.global_step}, False
                if actions.evaluate:
                    figures = self.evaluate()
                    is_best = history.record({"sts": figures}, figures["spearman"],
                                             checkpointing.step_tag(self.global_step))
                    metrics.update(score=figures["spearman"], dev={"sts": figures})
                if actions.checkpoint:
                    self.checkpoints.save(self.state, is_best, metrics)
        bar.close()
        self.checkpoints.load_best_weights()
        encoder_dir = self.out / ENCODER_DIR
        if self.ctx.is_main:
            export_hf(self.model.encoder, cfg.model.checkpoint, str(encoder_dir))
        return self._summary(samples, train_s, encoder_dir,
                             run_figures(self.timers, window, train_s, self.ctx.device))

    def _summary(self, samples: int, train_s: float, encoder_dir: Path, figures: dict) -> dict:
        summary = write_summary(self.storage, self.ctx, self.state, samples, train_s, self.started,
                                self.checkpoints.final_path(), {"encoder": str(encoder_dir), "predictions": {}},
                                pooling=self.cfg.simcse.pooling,
                                embedding_pooling=self.cfg.simcse.embedding_pooling(), **figures)
        self.logger.hparams(self.global_step, self._hparams(), hparam_metrics(summary))
        self.logger.close()
        self.storage.sync()  # summary, encoder and the last events reach a URL output_dir
        return summary

    def _hparams(self) -> dict:
        simcse = self.cfg.simcse
        return run_hparams(self.cfg, self.total_steps, **{
            "simcse.pooling": simcse.pooling, "simcse.temperature": simcse.temperature,
            "simcse.negatives": simcse.negatives, "simcse.batch_size_per_worker": simcse.batch_size_per_worker,
            "simcse.chunk_size": simcse.chunk_size, "simcse.corpus": simcse.corpus})

    def _log_train(self, epoch: int, window: dict[str, float]) -> None:
        values = {**window, **self.timers.drain(), **memory_scalars(self.ctx.device), "lr": self.engine.get_lr()[0],
                  "epoch": epoch, "samples_seen/corpus": samples_seen(self.state.stream_states[CORPUS])}
        self.logger.scalars(self.global_step, values)
        if self.ctx.is_main:
            log.info("step %d/%d epoch %d loss=%.4f %.1f sentences/s", self.global_step, self.total_steps, epoch,
                     window.get("loss/simcse", math.nan), window.get("throughput/samples_per_s", 0.0))


_STS_TASK = TaskConfig(**BUILTIN_TASKS["sts"])


def _read_sts(path: Path, on_bad_row: str) -> tuple[list[str], list[str], np.ndarray]:
    """The STS dev pairs' texts and gold scores."""
    rows = read_task_file(str(path), _STS_TASK, labelled=True, on_bad_row=on_bad_row)
    return rows.a, rows.b, np.asarray(rows.labels, dtype=np.float64)
