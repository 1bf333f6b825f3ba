"""The multitask train loop: the one place where model, tasks, data, schedule, engine and observability meet.

It knows nothing of Ray: it runs in any process group (Ray Train workers, torchrun, a test). Each part
it meets is its own module — the data and schedule (multitask_data), the gradient strategy and its
DeepSpeed engine (step_gradients), evaluation and predictions (evaluation), what follows a step
(step_policy), checkpoints and resume (run_checkpoint) — so another job can reuse them.
"""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from functools import partial

import torch

from dist_minbert.config import RunConfig, save_config
from dist_minbert.data.prefetch import Prefetcher
from dist_minbert.data.step_reader import StepBatches
from dist_minbert.data.stream import samples_seen
from dist_minbert.engine import checkpointing
from dist_minbert.engine.autocast import training_forward
from dist_minbert.engine.dist_context import DistContext
from dist_minbert.engine.evaluation import Evaluator, Metrics, SplitPredictions
from dist_minbert.engine.multitask_data import MultitaskData
from dist_minbert.engine.run_checkpoint import Report, RunCheckpointer
from dist_minbert.engine.run_storage import RunStorage
from dist_minbert.engine.run_summary import write_summary
from dist_minbert.engine.step_gradients import NonFiniteStep, build_gradients
from dist_minbert.engine.step_policy import SkippedSteps, step_actions
from dist_minbert.engine.task_inputs import merge_rejects
from dist_minbert.model.checkpoint import load_encoder
from dist_minbert.observe.loss_window import LossWindow, num_tokens
from dist_minbert.observe.memory import memory_scalars
from dist_minbert.observe.metrics_logger import MetricsLogger
from dist_minbert.observe.progress import progress_bar
from dist_minbert.observe.run_figures import hparam_metrics, run_figures, run_hparams
from dist_minbert.observe.surgery_scalars import surgery_scalars
from dist_minbert.observe.timers import StepTimers, timed_iter
from dist_minbert.surgery.comm import CommCounter
from dist_minbert.tasks.metrics import overall_score
from dist_minbert.tasks.multitask import MultitaskModel

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: RunConfig, ctx: DistContext, report: Report | None = None):
        """`report(metrics, checkpoint_folder)` is called on every rank after each checkpoint. Collective."""
        self.started = time.perf_counter()
        self.cfg, self.ctx = cfg, ctx
        self.storage = RunStorage.for_run(cfg.train.output_dir, cfg.train.local_dir, ctx.rank)
        self.out = self.storage.local  # where this process writes; a URL output_dir is reached through storage
        self.data = MultitaskData(cfg, ctx, cfg.train.output_dir)  # shards on the run's storage, seen by every node
        self.total_steps = self.data.total_steps

        torch.manual_seed(cfg.train.seed)  # heads start identical on every rank
        model = MultitaskModel(load_encoder(cfg.model.checkpoint, dropout=cfg.model.dropout), cfg.tasks,
                               cfg.model.pooling)
        self.timers = StepTimers()
        self.comm = CommCounter(sum(p.numel() for p in model.shared_parameters()),
                                timed=partial(self.timers.phase, "communication"))
        self.gradients = build_gradients(model, cfg.surgery, cfg.deepspeed, cfg.optim, self.total_steps,
                                         cfg.workers.use_gpu, ctx.world_size, cfg.train.seed, self.comm, self.timers)
        self.engine = self.gradients.engine
        self.model: MultitaskModel = self.engine.module
        # The training forward (under bf16 autocast if asked); evaluation calls self.model, in fp32.
        self.forward = training_forward(self.model, cfg.deepspeed.precision, ctx.device)
        torch.manual_seed(cfg.train.seed + 1 + ctx.rank)  # distinct dropout masks per rank

        self.evaluator = Evaluator(self.engine, self.model, cfg.tasks, self.data.inputs, self.data.collators, ctx,
                                   cfg.train.eval_batch_size, cfg.train.eval_max_rows)
        self.num_truncated: dict[str, int] = defaultdict(int)
        self.logger = MetricsLogger(str(self.out / "tensorboard") if ctx.is_main and cfg.observe.tensorboard else None)
        self.skipped_steps = SkippedSteps(cfg.train.max_nonfinite_steps, self.logger)
        if ctx.is_main:
            self._write_run_files()
        self.checkpoints = RunCheckpointer(self.engine, self.storage, cfg.checkpoint, ctx,
                                           lambda path: save_config(cfg, path), report, self.logger.flush)
        self.state = self.checkpoints.resume(self.data.streams, cfg.train.seed, cfg.deepspeed.zero_stage,
                                             list(cfg.tasks))

    def _write_run_files(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out / "config.yaml")
        num_rejects = merge_rejects([f for splits in self.data.inputs.values() for f in splits.rejects_files],
                                    str(self.out / "rejects.tsv"))
        if num_rejects:
            log.warning("%d malformed rows rejected; see %s", num_rejects, self.out / "rejects.tsv")

    @property
    def global_step(self) -> int:
        return self.state.global_step

    # -- one step -----------------------------------------------------------------------------
    def positions(self) -> list[tuple[int, int]]:
        """(epoch, step in epoch) of every optimizer step still to run."""
        return self.data.positions(self.global_step)

    def read_step(self, position: tuple[int, int]) -> StepBatches:
        return self.data.reader()(position)

    def loss(self, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.loss(task, self.forward(task, batch), batch.get("labels"))

    def train_step(self, step: StepBatches) -> dict[str, float]:
        """One optimizer step on this rank's batches; returns this rank's mean loss per task ({} if skipped)."""
        micro_batches = []
        for batches in step.micro_batches:
            for task, collated in batches.items():
                self.num_truncated[task] += collated.num_truncated
            micro_batches.append({task: {k: v.to(self.ctx.device, non_blocking=True) for k, v in c.tensors.items()}
                                  for task, c in batches.items()})
        weights = {task: self.cfg.tasks[task].weight for task in micro_batches[0]}
        self.state.stream_states = step.stream_states
        self.state.global_step += 1
        try:
            outcome = self.gradients.run(micro_batches, self.loss, weights, self.global_step)
        except NonFiniteStep as exc:
            self.skipped_steps.skipped(self.global_step, exc)
            return {}
        self.skipped_steps.trained()
        if outcome.stats is not None and self.global_step % self.cfg.observe.log_every == 0:
            self.logger.scalars(self.global_step, surgery_scalars(outcome.stats, list(self.model.tasks)))
        return outcome.losses

    # -- the run ------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to the end of the schedule, evaluating and checkpointing as step_policy says; then load the
        best weights, write predictions and summary.json. Returns the summary."""
        cfg, history = self.cfg, self.state.dev_history
        if history.initial is None:  # a resumed run carries its dev history on
            history.initial = history.last = self._evaluate()[0]
        best_predictions: SplitPredictions | None = None
        samples, train_s, window = 0, 0.0, LossWindow(self.ctx.device)
        bar = progress_bar(self.total_steps, "train", enabled=self.ctx.is_main and cfg.observe.progress)
        bar.update(self.global_step)
        with Prefetcher(self.data.reader(), self.positions(), cfg.data.prefetch) as steps:
            for step, waited_s in timed_iter(steps, self.timers, "data"):
                started = time.perf_counter()
                losses = self.train_step(step)
                step_s = waited_s + time.perf_counter() - started  # a data stall is lost training time
                self.timers.end_step(step_s)
                step_samples = sum(self.data.plan(step.position)[t] for t in losses)  # proportional: not the config's
                samples, train_s = samples + step_samples, train_s + step_s
                window.add(losses, step_samples, num_tokens(step.micro_batches) if losses else 0, step_s)
                bar.update(1)
                epoch, step_in_epoch = step.position
                actions = step_actions(self.global_step, epoch, step_in_epoch, self.data.epoch_steps,
                                       self.total_steps, cfg.train, cfg.checkpoint, cfg.observe,
                                       evaluate_every=cfg.train.eval_every_steps)
                if actions.log:
                    self._log_train(epoch, window.drain())
                checkpointing.inject_fault(cfg.checkpoint, self.global_step, self.ctx.rank, self.out)
                metrics, is_best = {"epoch": epoch, "step": self.global_step}, False
                if actions.evaluate:
                    dev, predictions = self._evaluate()
                    score = overall_score(dev) if dev else float("nan")
                    is_best = history.record(dev, score, checkpointing.step_tag(self.global_step))
                    if is_best:
                        best_predictions = predictions
                    metrics.update(score=score, dev=dev)
                if actions.checkpoint:
                    self.checkpoints.save(self.state, is_best, metrics)
        bar.close()
        self.checkpoints.load_best_weights()
        # The best evaluation's dev predictions are those of the weights just loaded: no second pass. Every
        # rank decides alike ({} on ranks other than 0 is known too), so the gathers stay matched.
        known = {"dev": best_predictions} if best_predictions is not None else None
        predictions = self.evaluator.write_predictions(self.out / "predictions",
                                                       cfg.train.predict_splits or ["dev", "test"], known)
        return self._summary(samples, train_s, predictions, run_figures(self.timers, window, train_s, self.ctx.device))

    def _evaluate(self) -> tuple[Metrics, SplitPredictions | None]:
        dev, predictions = self.evaluator.evaluate("dev")
        self.logger.nested(self.global_step, "dev", dev)
        if dev:
            self.logger.scalars(self.global_step, {"dev/score": overall_score(dev)})
        if self.ctx.is_main:
            log.info("dev at step %d: %s", self.global_step, json.dumps(dev))
        return dev, predictions

    def _summary(self, samples: int, train_s: float, predictions: dict[str, str], figures: dict) -> dict:
        last = self.state.dev_history.last
        summary = write_summary(self.storage, self.ctx, self.state, samples, train_s, self.started,
                                self.checkpoints.final_path(),
                                {"predictions": predictions, "rejects": str(self.out / "rejects.tsv")},
                                score=overall_score(last) if last else None,
                                truncated_rows=dict(self.num_truncated), **figures)
        self.logger.hparams(self.global_step, self._hparams(), hparam_metrics(summary))
        self.logger.close()
        self.storage.sync()  # summary, predictions and the last events reach a URL output_dir
        return summary

    def _hparams(self) -> dict:
        cfg = self.cfg
        return run_hparams(cfg, self.total_steps, **{
            "surgery.mode": cfg.surgery.mode, "surgery.weighting": cfg.surgery.weighting,
            "schedule.name": cfg.schedule.name, "schedule.tasks_per_step": cfg.schedule.tasks_per_step,
            "optim.head_lr": cfg.optim.head_lr or cfg.optim.lr, "model.pooling": cfg.model.pooling,
            "tasks": ",".join(cfg.tasks), **{f"tasks.{t}.batch_size": task.batch_size for t, task in cfg.tasks.items()}})

    def _log_train(self, epoch: int, window: dict[str, float]) -> None:
        values = {**window, **self.timers.drain(), **memory_scalars(self.ctx.device), "lr": self.engine.get_lr()[0],
                  "epoch": epoch, **{f"sampling/{t}_p": p for t, p in self.data.probabilities(epoch).items()},
                  **{f"samples_seen/{t}": samples_seen(s) for t, s in self.state.stream_states.items()},
                  **{f"truncated_rows/{t}": n for t, n in self.num_truncated.items()}}
        self.logger.scalars(self.global_step, values)
        if self.ctx.is_main:
            losses = " ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in window.items() if k.startswith("loss/"))
            log.info("step %d/%d epoch %d %s %.1f samples/s", self.global_step, self.total_steps, epoch, losses,
                     window.get("throughput/samples_per_s", 0.0))
