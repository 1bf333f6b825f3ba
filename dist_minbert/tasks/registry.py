"""The CS224N tasks as raw config dicts; a YAML entry with a builtin name is merged over them."""

from __future__ import annotations

BUILTIN_TASKS: dict[str, dict] = {
    "sst": {
        "kind": "classification",
        "train": "ids-sst-train.csv",
        "dev": "ids-sst-dev.csv",
        "test": "ids-sst-test-student.csv",
        "text_columns": ["sentence"],
        "label_column": "sentiment",
        "num_classes": 5,
        "head": "linear",
        "metric": "accuracy",
        "prediction_column": "Predicted_Sentiment",
    },
    "qqp": {
        "kind": "pair_classification",
        "train": "quora-train.csv",
        "dev": "quora-dev.csv",
        "test": "",  # the shared data has no Quora test file
        "text_columns": ["sentence1", "sentence2"],
        "label_column": "is_duplicate",
        "num_classes": 2,
        "head": "cross",
        "metric": "accuracy",
        "prediction_column": "Predicted_Is_Paraphrase",
    },
    "sts": {
        "kind": "pair_regression",
        "train": "sts-train.csv",
        "dev": "sts-dev.csv",
        "test": "sts-test-student.csv",
        "text_columns": ["sentence1", "sentence2"],
        "label_column": "similarity",
        "label_range": [0.0, 5.0],
        "head": "cross",
        "metric": "pearson",
        "prediction_column": "Predicted_Similiarity",  # sic: the CS224N spelling
    },
}
