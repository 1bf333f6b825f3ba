from __future__ import annotations

import pytest

from dist_minbert.tasks.config import TaskConfig, encoding_for, objective_for
from dist_minbert.tasks.registry import BUILTIN_TASKS


def _task(**overrides) -> TaskConfig:
    fields = {**BUILTIN_TASKS["sts"], **overrides}
    return TaskConfig(**fields)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"text_columns": ["sentence1"]}, "text_columns"),
        ({"text_columns": ["sentence1", ""]}, "text_columns"),
        ({"text_columns": ["sentence1", "similarity"]}, "text_columns"),
        ({"label_range": None}, "label_range"),
        ({"label_range": [5.0, 0.0]}, "label_range"),
        ({"label_range": [0.0, 2.0, 5.0]}, "label_range"),
        ({"num_classes": 5}, "num_classes"),
        ({"head": "linear"}, "head"),
        ({"metric": "accuracy"}, "metric"),
        ({"weight": -1.0}, "weight"),
        ({"batch_size": 0}, "batch_size"),
        ({"prediction_column": ""}, "prediction_column"),
        ({"kind": "pair_classification", "label_range": None, "num_classes": 1, "metric": "accuracy"}, "num_classes"),
        ({"kind": "pair_classification", "num_classes": 2, "metric": "accuracy"}, "label_range"),
        ({"kind": "pair_classification", "label_range": None, "num_classes": 3, "metric": "accuracy",
          "head": "bi_cosine"}, "head"),
        ({"kind": "classification", "text_columns": ["sentence1", "sentence2"], "label_range": None,
          "num_classes": 5, "metric": "accuracy", "head": "linear"}, "text_columns"),
        ({"kind": "classification", "text_columns": ["sentence1"], "label_range": None,
          "num_classes": 5, "metric": "accuracy", "head": "cross"}, "head"),
    ],
)
def test_invalid_fields_name_field_and_allowed(overrides, field):
    with pytest.raises(ValueError, match=rf"^{field}: .*; allowed: "):
        _task(**overrides)


def test_builtin_tasks_are_valid_and_point_at_cs224n_files():
    tasks = {name: TaskConfig(**raw) for name, raw in BUILTIN_TASKS.items()}
    assert (tasks["sst"].train, tasks["sst"].dev, tasks["sst"].test) == (
        "ids-sst-train.csv", "ids-sst-dev.csv", "ids-sst-test-student.csv")
    assert (tasks["qqp"].train, tasks["qqp"].dev, tasks["qqp"].test) == ("quora-train.csv", "quora-dev.csv", "")
    assert tasks["sts"].prediction_column == "Predicted_Similiarity"
    assert tasks["sts"].label_range == [0.0, 5.0]


@pytest.mark.parametrize(
    "name, head, encoding, objective",
    [
        ("sst", "linear", "single", "ce"),
        ("qqp", "cross", "cross", "bce"),
        ("qqp", "bi_mlp", "bi", "bce"),
        ("qqp", "bi_cosine", "bi", "bce"),
        ("sts", "cross", "cross", "mse"),
        ("sts", "bi_cosine", "bi", "mse"),
    ],
)
def test_encoding_and_objective_follow_kind_and_head(name, head, encoding, objective):
    task = TaskConfig(**{**BUILTIN_TASKS[name], "head": head})
    assert encoding_for(task) == encoding
    assert objective_for(task) == objective


def test_binary_single_text_classification_uses_one_logit():
    task = TaskConfig(kind="classification", text_columns=["text"], label_column="y", num_classes=2)
    assert (encoding_for(task), objective_for(task)) == ("single", "bce")
