"""A run's checkpoints as one object: what a job saves after a step and how it continues from one.

The state beside DeepSpeed's (model, optimizer, scheduler) is a handful of values: the optimizer step,
every stream's position after the last step trained, and the dev history that chooses `best`. Any job
on the engine (multitask training, SimCSE) saves and resumes through here.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from dist_minbert.data.stream import TaskStream
from dist_minbert.engine import checkpointing
from dist_minbert.engine.checkpointing import RUN_CONFIG
from dist_minbert.engine.config import CheckpointConfig
from dist_minbert.engine.dist_context import DistContext
from dist_minbert.engine.run_storage import RunStorage
from dist_minbert.engine.step_policy import DevHistory

log = logging.getLogger(__name__)

Report = Callable[[dict, str], None]  # (metrics, checkpoint folder: path or URL), on every rank after each checkpoint


@dataclass
class RunState:
    global_step: int = 0  # optimizer steps taken (skipped non-finite steps count)
    stream_states: dict[str, dict[str, int]] = field(default_factory=dict)  # after the last step trained
    dev_history: DevHistory = field(default_factory=DevHistory)


class RunCheckpointer:
    """Saves and resumes `<output_dir>/checkpoints/` for one engine (at a URL through the storage's staging
    folder). Every method is collective."""

    def __init__(self, engine, storage: RunStorage, cfg: CheckpointConfig, ctx: DistContext,
                 save_run_config: Callable[[Path], None], report: Report | None = None,
                 on_saved: Callable[[], None] = lambda: None) -> None:
        """`save_run_config(path)` writes the resolved config, which each checkpoint keeps (rank 0); `on_saved`
        runs after each save (flushing the logged history, as durable as the state it leads to)."""
        if cfg.kill_at_step and not cfg.kill_rank < ctx.world_size:
            raise ValueError(f"checkpoint.kill_rank: {cfg.kill_rank} is not a rank of the {ctx.world_size} "
                             f"workers; allowed: 0 to {ctx.world_size - 1}")
        self.engine, self.cfg, self.ctx = engine, cfg, ctx
        self.storage = storage
        self.folder = storage.local / checkpointing.CHECKPOINTS_DIR
        self.save_run_config, self.report, self.on_saved = save_run_config, report, on_saved

    def save(self, state: RunState, is_best: bool, metrics: dict) -> Path:
        """Checkpoint `state` (taken after optimizer step state.global_step); returns its folder."""
        client_state = {"version": checkpointing.STATE_VERSION, "global_step": state.global_step,
                        "world_size": self.ctx.world_size, "streams": state.stream_states,
                        "dev_history": asdict(state.dev_history)}
        folder = checkpointing.save_checkpoint(self.engine, self.folder, state.global_step, client_state,
                                               self.ctx.rank, lambda temp: self.save_run_config(temp / RUN_CONFIG),
                                               self.cfg.keep_last, is_best, self.storage)
        self.on_saved()
        self.storage.sync()  # the logged history reaches the URL with the state it leads to
        if self.report:
            self.report(metrics, self.storage.location(folder))
        return folder

    def resume(self, streams: dict[str, TaskStream], seed: int, zero_stage: int, tasks: list[str]) -> RunState:
        """Continue from checkpoint.resume (engine state, stream positions, step, RNG and dev history), or
        start fresh; then rank 0 makes the checkpoint folder this run's linear history (later ones go).
        `tasks`: the task heads, in order, that the checkpoint's parameters must have been written with."""
        source = self.storage.resume_source(self.cfg.resume)
        tag_dir = self.storage.stage(source, self.ctx.barrier) if isinstance(source, str) else source
        state = RunState(stream_states={name: s.state_dict() for name, s in streams.items()})
        if tag_dir is not None:
            checkpointing.check_resumable(tag_dir, zero_stage, tasks)
            saved = checkpointing.load_checkpoint(self.engine, tag_dir, self.ctx.rank, self.ctx.world_size,
                                                  self.folder)
            for name, stream in streams.items():
                try:
                    stream.load_state_dict(saved["streams"][name])
                except ValueError as exc:
                    raise ValueError(f"{tag_dir}: tasks.{name}: {exc}") from None
            state = RunState(saved["global_step"], {name: s.state_dict() for name, s in streams.items()},
                             DevHistory(**saved["dev_history"]))
            checkpointing.restore_or_reseed_rng(tag_dir, self.ctx.rank, saved["world_size"] == self.ctx.world_size,
                                                seed, state.global_step)
            if self.ctx.is_main:
                log.info("resumed from %s at step %d (written by %d workers, now %d)", tag_dir, state.global_step,
                         saved["world_size"], self.ctx.world_size)
        best = state.dev_history.best_tag
        own = tag_dir is not None and tag_dir.parent == self.folder  # this run's own folder: its pointers carry on
        if self.storage.remote and own and best:
            self.storage.stage_own(best, self.ctx.barrier)  # the best weights, which the end of the run loads
        if self.ctx.is_main:
            checkpointing.begin_history(self.folder, state.global_step, tag_dir,
                                        tag_dir.parent / best if tag_dir and best else None)
            self.storage.begin_history(state.global_step, tag_dir.name if own else None, best if own else None)
        return state

    def load_best_weights(self) -> bool:
        """The best evaluation's model weights into the engine, if there is a `best`; True if loaded."""
        if self.storage.remote:  # the URL's pointer, which every rank reads alike; another node stages the folder
            best = self.storage.pointer(checkpointing.BEST)
            if best is None:
                return False
            self.storage.stage_own(best, self.ctx.barrier)
            self.engine.load_checkpoint(str(self.folder), tag=best, load_module_only=True)
            return True
        if not (self.folder / checkpointing.BEST).exists():
            return False
        self.engine.load_checkpoint(str(self.folder), tag=checkpointing.BEST, load_module_only=True)
        return True

    def final_path(self) -> Path | None:
        """The checkpoint a finished run stands for: `best`, else the latest (no evaluation was ever best)."""
        best = self.folder / checkpointing.BEST
        return best if best.exists() else checkpointing.latest_checkpoint(self.folder)

