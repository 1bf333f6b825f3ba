"""The config of `dist-minbert table`: the rows of the study's tables, each a run config with only what the row is
about, the settings every row shares (the one training budget), and where the results go.

Loaded strictly like a run config (unknown keys are errors naming the key path), with dotted overrides on the
table's own tree (`rows.b2.seeds=3`, `shared.train.max_steps=2`). `shared` and each row's `overrides` are
partial run-config trees; every row's run config is built and validated when the table loads, so a typo in
row b3 stops the table before row 1 starts.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_minbert.config import load_config, load_simcse_config
from dist_minbert.config_loader import ConfigError, apply_override, build, parse_override, read_yaml


RESERVED_NAMES = ("pretrain", "tune")  # folders under the table's output_dir besides the rows'


@dataclass
class PretrainConfig:
    """A SimCSE job whose encoder/ a row fine-tunes (B3): run once per seed and reused by every row naming it."""

    config: str  # a SimCSE config, e.g. configs/simcse.yaml
    overrides: dict[str, Any] = field(default_factory=dict)  # a partial SimCSE config tree over it (its budget)


@dataclass
class StudyFigures:
    """The study's dev figures for the row (BERT-base on the full QQP set), shown beside ours."""

    sst: float
    qqp: float
    sts: float
    source: str = ""  # where in the study, e.g. "Table 2"


@dataclass
class RowConfig:
    config: str  # the row's run config, e.g. configs/b2.yaml
    label: str = ""  # the row's name in RESULTS.md; "" = its key
    overrides: dict[str, Any] = field(default_factory=dict)  # a partial run-config tree: only what the row is about
    seeds: int = 1  # train.seed = 0 … seeds - 1, one run each
    pretrain: str = ""  # a key of `pretrains`: SimCSE first, its encoder/ becomes model.checkpoint
    study: StudyFigures | None = None

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"seeds: {self.seeds} must be ≥ 1")


@dataclass
class TargetConfig:
    """Dev figures a row should reach; RESULTS.md says by how much each is met or missed."""

    row: str
    sst: float
    qqp: float
    sts: float


@dataclass
class TableConfig:
    rows: dict[str, RowConfig]  # in the order RESULTS.md lists them
    shared: dict[str, Any] = field(default_factory=dict)  # a partial run-config tree applied to every row first
    pretrains: dict[str, PretrainConfig] = field(default_factory=dict)
    output_dir: str = "runs/table"  # run folders (<row>/seed-<s>), SimCSE runs (pretrain/…), Ray Tune's experiment
    results: str = "docs/results/table.json"  # the finished runs, committed: a later checkout skips them
    report: str = "docs/RESULTS.md"  # written from `results` after every finished run
    analysis_dir: str = "docs/results"  # the best run's analysis and test predictions
    best_of: list[str] = field(default_factory=list)  # rows whose best run is analysed and predicts the test sets
    predict_tasks: list[str] = field(default_factory=lambda: ["sst", "sts"])  # test-set predictions of that run
    targets: TargetConfig | None = None
    ordering: list[str] = field(default_factory=list)  # rows expected in increasing score (the study's claim)
    notes: str = ""  # markdown placed in RESULTS.md as written: what was tried, where a target is missed
    title: str = "Results: the study's tables, rebuilt by `dist-minbert table`"  # the report's heading

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError("rows: the table has no rows; allowed: a mapping of row name → {config, …}")
        if "://" in self.output_dir:
            raise ValueError(f"output_dir: {self.output_dir!r} is a URL; allowed: a local folder (shared storage on "
                             f"a cluster), where Tune's experiment and the run folders live")
        reserved = [name for name in self.rows if name in RESERVED_NAMES or "/" in name]
        if reserved:
            raise ValueError(f"rows.{reserved[0]}: the name is a folder of the table's own or holds a '/'; "
                             f"allowed: any other name")
        for name, row in self.rows.items():
            if row.pretrain and row.pretrain not in self.pretrains:
                raise ValueError(f"rows.{name}.pretrain: {row.pretrain!r} is not in pretrains; allowed: "
                                 f"{', '.join(self.pretrains) or 'none defined'}")
        for key, names in (("best_of", self.best_of), ("ordering", self.ordering),
                           ("targets.row", [self.targets.row] if self.targets else [])):
            unknown = [n for n in names if n not in self.rows]
            if unknown:
                raise ValueError(f"{key}: {unknown[0]!r} is not a row; allowed: {', '.join(self.rows)}")


@dataclass(frozen=True)
class Trial:
    """One run of the table: a row at a seed, or the SimCSE job a row starts from. `overrides` are the
    command line's (shared, then the row's, then the seed), without the output folder, so `spec` says what was
    run wherever it ran."""

    row: str  # the row's key, or the pretrain's for kind "simcse"
    seed: int
    kind: str  # "train" or "simcse"
    config: str  # as written in the table (relative to the working directory)
    config_digest: str  # of the config file's tree, its `extends:` parents merged: an edited file is another run
    overrides: tuple[str, ...]
    pretrain: Trial | None = None

    @property
    def key(self) -> str:
        """Its name in the results file and its folder under the table's output folder."""
        return f"{'pretrain/' if self.kind == 'simcse' else ''}{self.row}/seed-{self.seed}"

    @property
    def spec(self) -> dict:
        return {"kind": self.kind, "config": self.config, "config_digest": self.config_digest,
                "overrides": list(self.overrides), "pretrain": self.pretrain.spec if self.pretrain else None}

    @property
    def fingerprint(self) -> str:
        return _digest(self.spec)

    def output_dir(self, table_output: str) -> str:
        return str(Path(table_output) / self.key)

    def command_overrides(self, table_output: str) -> list[str]:
        """The full override list: the trial's, its output folder, and a pretrained encoder's folder."""
        extra = [f"train.output_dir={_yaml_value(self.output_dir(table_output))}"]
        if self.pretrain:
            encoder = Path(self.pretrain.output_dir(table_output)) / "encoder"
            extra.append(f"model.checkpoint={_yaml_value(str(encoder))}")
        return [*self.overrides, *extra]

    def command(self, table_output: str) -> str:
        """The `dist-minbert` command that runs this trial alone (the table runs the same code path)."""
        import shlex

        return " ".join(["dist-minbert", self.kind, "--config", self.config,
                         *map(shlex.quote, self.command_overrides(table_output))])


def load_table_config(path: str | os.PathLike, overrides: list[str] = ()) -> TableConfig:
    """The table, with every row's run config (and pretrain's SimCSE config) built and validated."""
    raw = read_yaml(Path(path).resolve())
    for text in overrides:
        apply_override(raw, *parse_override(text))
    table = build(TableConfig, raw)
    for name, row in table.rows.items():
        where = f"rows.{name} ({row.config})"
        try:
            for trial in trials(table, [name]):
                trial_config(trial, table.output_dir)
                if trial.pretrain is not None:
                    where = f"pretrains.{row.pretrain} ({trial.pretrain.config})"
                    trial_config(trial.pretrain, table.output_dir)
        except (ConfigError, ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"{path}: {where}: {exc}") from None
    return table


def trial_config(trial: Trial, table_output: str):
    """The trial's typed run config (SimCSE's for a pretrain), local paths resolved against the working folder."""
    load = load_simcse_config if trial.kind == "simcse" else load_config
    return load(trial.config, trial.command_overrides(table_output))


def trials(table: TableConfig, rows: list[str] | None = None, seeds: int | None = None) -> list[Trial]:
    """Every (row, seed) of `rows` (default all, in table order), `seeds` per row if given, else the row's."""
    unknown = [r for r in rows or [] if r not in table.rows]
    if unknown:
        raise ConfigError(f"--rows: {unknown[0]!r} is not a row of the table; allowed: {', '.join(table.rows)}")
    if seeds is not None and seeds < 1:
        raise ConfigError(f"--seeds: {seeds} must be ≥ 1")
    shared = dotted_overrides(table.shared, "shared")
    out = []
    for name in rows or table.rows:
        row = table.rows[name]
        for seed in range(seeds or row.seeds):
            pretrain = None
            if row.pretrain:
                spec = table.pretrains[row.pretrain]
                pretrain = Trial(row.pretrain, seed, "simcse", spec.config, _config_digest(spec.config),
                                 (*dotted_overrides(spec.overrides, f"pretrains.{row.pretrain}.overrides"),
                                  f"train.seed={seed}"))
            out.append(Trial(name, seed, "train", row.config, _config_digest(row.config),
                             (*shared, *dotted_overrides(row.overrides, f"rows.{name}.overrides"),
                              f"train.seed={seed}"), pretrain))
    return out


def _config_digest(path: str) -> str:
    return _digest(read_yaml(Path(path).resolve()))


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def dotted_overrides(tree: dict[str, Any], where: str) -> list[str]:
    """A partial config tree as the command line's `key=value` overrides, leaves in the order written."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            if not value:
                raise ConfigError(f"{where}.{key}: an empty section sets nothing; allowed: a value or keys under it")
            out += [f"{key}.{sub}" for sub in dotted_overrides(value, f"{where}.{key}")]
        else:
            out.append(f"{key}={_yaml_value(value)}")
    return out


def _yaml_value(value: Any) -> str:
    """The value as one line that parse_override reads back equal (flow style for lists)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return text.removesuffix("...").strip()
