"""The config loader: strict YAML → RunConfig, dotted overrides, `extends:`, task defaults, saved-config round trip."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dist_minbert.config import (ConfigError, RunConfig, SimCSERunConfig, config_from_dict, load_config, load_job_config,
                                 load_simcse_config, save_config)
from dist_minbert.tasks.registry import BUILTIN_TASKS

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))
TABLES = [p for p in SHIPPED if "rows" in yaml.safe_load(p.read_text())]  # `dist-minbert table`'s configs
CONFIGS = [p for p in SHIPPED if p not in TABLES]

REVIEWS_TASK = """\
tasks:
  reviews:
    kind: classification
    train: reviews-train.tsv
    dev: reviews-dev.tsv
    test: ""
    text_columns: [body]
    label_column: verdict
    id_column: review_id
    num_classes: 2
    label_range: null
    head: linear
    metric: accuracy
    prediction_column: Predicted_Verdict
    weight: 0.5
    batch_size: 16
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


# -- strictness: every error names the key path and what is allowed ---------------------------------------------

@pytest.mark.parametrize("yaml_text,key,allowed", [
    ("train:\n  epochz: 3\n", "train.epochz", "epochs"),
    ("trian:\n  epochs: 3\n", "trian", "train"),
    ("tasks:\n  sst:\n    hed: linear\n", "tasks.sst.hed", "head"),
    ("optim:\n  learning_rate: 1.0e-4\n", "optim.learning_rate", "lr"),
])
def test_unknown_key_names_its_path_and_the_allowed_keys(tmp_path, yaml_text, key, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "bad.yaml", yaml_text))
    message = str(err.value)
    assert f"unknown key {key}" in message
    assert re.search(rf"allowed in .*\b{allowed}\b", message)


@pytest.mark.parametrize("override,message", [
    ("train.epochs=three", "train.epochs: expected an integer, got 'three'"),
    ("train.epochs=2.5", "train.epochs: expected an integer, got 2.5"),
    ("workers.num_workers=true", "workers.num_workers: expected an integer, got True"),
    ("workers.use_gpu=1", "workers.use_gpu: expected true or false, got 1"),
    ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
    ("model.checkpoint=12", "model.checkpoint: expected a string, got 12"),
    ("train.predict_splits=dev", "train.predict_splits: expected a list, got 'dev'"),
    ("schedule.steps_per_epoch=many", "schedule.steps_per_epoch: expected an integer, got 'many'"),
    ("train=5", "train: expected a section (mapping), got 5"),
    ("tasks.sst.text_columns=[1]", "tasks.sst.text_columns[0]: expected a string, got 1"),
])
def test_wrong_type_names_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


@pytest.mark.parametrize("override,key,allowed", [
    ("deepspeed.precision=fp16", "deepspeed.precision", "'auto', 'fp32', 'bf16', 'autocast_bf16'"),
    ("model.pooling=max", "model.pooling", "'cls', 'pooler', 'mean'"),
    ("tasks.sts.kind=regression", "tasks.sts.kind", "'classification', 'pair_classification', 'pair_regression', 'contrastive'"),
])
def test_bad_literal_lists_the_allowed_values(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    value = override.partition("=")[2]
    assert str(err.value) == f"{key}: {value!r} is not allowed; allowed: {allowed}"


@pytest.mark.parametrize("overrides,prefix", [
    (["deepspeed.zero_stage=3"], "deepspeed.zero_stage: 3; allowed: 0, 1, 2"),
    (["optim.lr=0"], "optim.lr: 0.0 must be > 0"),
    (["model.max_length=2"], "model.max_length: 2 leaves no room"),
    (["tasks.sts.head=linear"], "tasks.sts.head: 'linear' does not fit kind pair_regression"),
    (["data.on_bad_row=error", "data.prefetch=-1"], "data.prefetch: -1 is negative"),
    # RunConfig's own cross-section check names the task key itself.
    (["workers.num_workers=3"], "tasks.sst.batch_size: 64 is global per step and must divide by "
                                "workers.num_workers × deepspeed.gradient_accumulation_steps = 3 × 1"),
    (["deepspeed.gradient_accumulation_steps=3"], "tasks.sst.batch_size: 64 is global per step and must divide by "
                                                  "workers.num_workers × deepspeed.gradient_accumulation_steps = 2 × 3"),
])
def test_post_init_error_is_prefixed_with_the_key_path(overrides, prefix):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "demo.yaml", overrides)
    assert str(err.value).startswith(prefix)


@pytest.mark.parametrize("override", ["train.epochs", "=3", "train..epochs=3", ".epochs=3"])
def test_malformed_override_is_an_error(override):
    with pytest.raises(ConfigError, match=re.escape(f"override {override!r}: expected dotted key=value")):
        load_config(None, [override])


def test_override_through_a_value_is_an_error():
    with pytest.raises(ConfigError, match=r"^train\.epochs: is a value, not a section; cannot set train\.epochs\.x$"):
        load_config(None, ["train.epochs=2", "train.epochs.x=1"])


# -- overrides --------------------------------------------------------------------------------------------------

def test_dotted_overrides_are_yaml_typed_and_win_over_the_file(tmp_path):
    path = write(tmp_path, "run.yaml", "train:\n  epochs: 1\n  seed: 7\noptim:\n  lr: 1.0e-5\n")
    cfg = load_config(path, ["train.epochs=3", "optim.lr=2e-4", "workers.use_gpu=true",
                             "train.predict_splits=[dev]", "schedule.steps_per_epoch=null",
                             "deepspeed.zero_stage=2", "train.epochs=4"])
    assert cfg.train.epochs == 4  # the last override of a key wins
    assert cfg.train.seed == 7  # untouched keys keep the file's value
    assert cfg.optim.lr == pytest.approx(2e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.workers.use_gpu is True
    assert cfg.train.predict_splits == ["dev"]
    assert cfg.schedule.steps_per_epoch is None
    assert cfg.deepspeed.zero_stage == 2


def test_task_field_override_keeps_the_builtin_defaults():
    cfg = load_config(REPO / "configs" / "b1_cross.yaml", ["tasks.sts.head=bi_cosine", "tasks.qqp.batch_size=32"])
    sts = cfg.tasks["sts"]
    assert sts.head == "bi_cosine"
    assert (sts.kind, sts.label_range, sts.metric) == ("pair_regression", [0.0, 5.0], "pearson")
    assert sts.train == str(Path(BUILTIN_TASKS["sts"]["train"]))  # relative to data.root, not resolved
    assert cfg.tasks["qqp"].batch_size == 32 and cfg.tasks["qqp"].head == "cross"
    assert cfg.tasks["sst"].batch_size == 64


def test_new_task_from_yaml_alone(tmp_path):
    cfg = load_config(write(tmp_path, "reviews.yaml", REVIEWS_TASK), ["tasks.reviews.batch_size=8"])
    assert list(cfg.tasks) == ["reviews"]  # a tasks section lists the run's tasks; builtins are not added
    task = cfg.tasks["reviews"]
    assert (task.kind, task.text_columns, task.label_column, task.id_column) == (
        "classification", ["body"], "verdict", "review_id")
    assert (task.num_classes, task.head, task.prediction_column, task.weight, task.batch_size) == (
        2, "linear", "Predicted_Verdict", 0.5, 8)


def test_new_task_is_validated_like_a_builtin(tmp_path):
    text = REVIEWS_TASK.replace("num_classes: 2", "num_classes: null")
    with pytest.raises(ConfigError, match=r"^tasks\.reviews\.num_classes: None with kind classification; allowed: "):
        load_config(write(tmp_path, "reviews.yaml", text))


# -- extends ----------------------------------------------------------------------------------------------------

def test_extends_merges_the_parent_under_the_child(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path / "base", "parent.yaml",
          "train:\n  epochs: 5\n  seed: 3\ntasks:\n  sst: {batch_size: 32}\n  sts: {head: bi_mlp}\n")
    child = write(tmp_path, "child.yaml",
                  "extends: base/parent.yaml\ntrain:\n  epochs: 2\ntasks:\n  sts: {weight: 2.0}\n")
    cfg = load_config(child, ["train.seed=4"])
    assert (cfg.train.epochs, cfg.train.seed) == (2, 4)
    assert list(cfg.tasks) == ["sst", "sts"]  # merged per key, not replaced per section
    assert cfg.tasks["sst"].batch_size == 32
    assert (cfg.tasks["sts"].head, cfg.tasks["sts"].weight) == ("bi_mlp", 2.0)


def test_extends_chain_of_three_files(tmp_path):
    write(tmp_path, "a.yaml", "train: {epochs: 1, seed: 1, max_steps: 1}\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\ntrain: {seed: 2, max_steps: 2}\n")
    cfg = load_config(write(tmp_path, "c.yaml", "extends: b.yaml\ntrain: {max_steps: 3}\n"))
    assert (cfg.train.epochs, cfg.train.seed, cfg.train.max_steps) == (1, 2, 3)


@pytest.mark.parametrize("files", [
    {"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"},
    {"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: c.yaml\n", "c.yaml": "extends: a.yaml\n"},
    {"a.yaml": "extends: ./a.yaml\n"},
])
def test_extends_cycle_is_detected(tmp_path, files):
    for name, text in files.items():
        write(tmp_path, name, text)
    with pytest.raises(ConfigError, match=r"a\.yaml: `extends` cycle"):
        load_config(tmp_path / "a.yaml")


def test_missing_parent_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"config file not found: {tmp_path / 'nowhere.yaml'}")):
        load_config(write(tmp_path, "child.yaml", "extends: nowhere.yaml\n"))


@pytest.mark.parametrize("text,message", [
    ("train: [1, 2\n", "not valid YAML"),
    ("- train\n", "the top level must be a mapping of sections"),
    ("tasks: [sst, qqp]\n", "tasks: expected a mapping of task name"),
])
def test_malformed_files_name_the_file(tmp_path, text, message):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)


# -- builtin defaults, paths, round trip ------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BUILTIN_TASKS))
def test_builtin_task_defaults_are_merged_under_yaml_values(tmp_path, name):
    cfg = load_config(write(tmp_path, "one.yaml", f"tasks:\n  {name}:\n    weight: 0.25\n"))
    assert list(cfg.tasks) == [name]
    task = cfg.tasks[name]
    assert task.weight == 0.25
    for key, value in BUILTIN_TASKS[name].items():
        assert getattr(task, key) == value, key


def test_no_tasks_section_means_the_three_builtin_tasks():
    assert load_config(None).tasks == RunConfig().tasks
    assert list(RunConfig().tasks) == ["sst", "qqp", "sts"]


def test_relative_local_paths_become_absolute_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.root=data/cs224n", "train.output_dir=runs/x", "model.checkpoint=ckpt/bert"])
    assert cfg.data.root == str(tmp_path / "data" / "cs224n")
    assert cfg.train.output_dir == str(tmp_path / "runs" / "x")
    assert cfg.model.checkpoint == str(tmp_path / "ckpt" / "bert")
    assert cfg.tasks["sst"].train == "ids-sst-train.csv"  # task files stay relative to data.root


def test_urls_absolute_paths_and_embedded_are_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.root=s3://bucket/cs224n", "train.output_dir=/abs/runs/y",
                             "model.checkpoint=embedded"])
    assert (cfg.data.root, cfg.train.output_dir, cfg.model.checkpoint) == (
        "s3://bucket/cs224n", "/abs/runs/y", "embedded")
    cfg = load_config(None, ["model.checkpoint=gs://bucket/bert-base-uncased"])
    assert cfg.model.checkpoint == "gs://bucket/bert-base-uncased"


def test_saved_config_reloads_to_an_equal_run_config(tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      ["tasks.sts.head=bi_cosine", "optim.betas=[0.9, 0.98]", "train.predict_splits=[test]"])
    saved = tmp_path / "config.yaml"
    save_config(cfg, saved)
    assert load_config(saved) == cfg
    # Workers get the same tree as plain data; no base_dir there because the paths are already absolute.
    import yaml
    assert config_from_dict(yaml.safe_load(saved.read_text())) == cfg


@pytest.mark.parametrize("text", ["optim:\n  lr: 5e-5\n", "optim:\n  lr: 5.0e-5\n", "optim:\n  lr: '5e-5'\n"])
def test_exponent_without_a_dot_is_a_float(tmp_path, text):
    cfg = load_config(write(tmp_path, "lr.yaml", text))
    assert cfg.optim.lr == 5e-5 and isinstance(cfg.optim.lr, float)


def test_exponent_override_is_a_float():
    cfg = load_config(None, ["optim.lr=5e-5", "model.dropout=0"])
    assert cfg.optim.lr == 5e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_job_config(path)
    assert isinstance(cfg, SimCSERunConfig if path.name == "simcse.yaml" else RunConfig)
    assert Path(cfg.train.output_dir).is_absolute()


@pytest.mark.parametrize("path", TABLES, ids=[p.name for p in TABLES])
def test_every_shipped_table_loads_and_so_does_each_of_its_runs(path, monkeypatch):
    from dist_minbert.table.config import load_table_config, trial_config, trials

    monkeypatch.chdir(REPO)
    table = load_table_config(path)
    for trial in trials(table):
        for run in filter(None, (trial, trial.pretrain)):
            trial_config(run, table.output_dir)


@pytest.mark.parametrize("name", ["b3.yaml", "b1_pcgrad_simcse.yaml"])
def test_simcse_rows_start_from_the_simcse_encoder(name, monkeypatch):
    monkeypatch.chdir(REPO)
    simcse = load_simcse_config(REPO / "configs" / "simcse.yaml")
    assert load_config(REPO / "configs" / name).model.checkpoint == str(Path(simcse.train.output_dir) / "encoder")


def test_simcse_config_defaults_are_the_papers_and_errors_name_the_key():
    cfg = load_simcse_config(None, ["simcse.corpus=/data/shards"])
    assert (cfg.optim.lr, cfg.simcse.batch_size_per_worker, cfg.model.max_length, cfg.simcse.temperature,
            cfg.train.epochs, cfg.simcse.pooling) == (3e-5, 64, 32, 0.05, 1, "cls_mlp")
    for overrides, message in [([], "simcse.corpus: no corpus shards given"),
                               (["simcse.corpus=x", "simcse.temperature=0"], "simcse.temperature: 0.0 must be > 0"),
                               (["simcse.corpus=x", "deepspeed.gradient_accumulation_steps=2"],
                                "deepspeed.gradient_accumulation_steps: a contrastive batch"),
                               (["simcse.corpus=x", "simcse.pooling=max"], "simcse.pooling")]:
        with pytest.raises(ConfigError) as err:
            load_simcse_config(None, overrides)
        assert str(err.value).startswith(message), err.value
