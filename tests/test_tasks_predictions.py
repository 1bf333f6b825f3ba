from __future__ import annotations

import numpy as np
import pytest

from dist_minbert.tasks.config import TaskConfig
from dist_minbert.tasks.predictions import write_predictions
from dist_minbert.tasks.registry import BUILTIN_TASKS


def test_classification_predictions_in_cs224n_format(tmp_path):
    out = tmp_path / "sst-test-output.csv"
    write_predictions(str(out), TaskConfig(**BUILTIN_TASKS["sst"]), ["a1", "b2"], np.array([3, 0]))
    assert out.read_text() == "id \t Predicted_Sentiment \na1 , 3 \nb2 , 0 \n"


def test_regression_predictions_keep_the_score(tmp_path):
    out = tmp_path / "sts-test-output.csv"
    write_predictions(str(out), TaskConfig(**BUILTIN_TASKS["sts"]), ["x"], [4.25])
    assert out.read_text() == "id \t Predicted_Similiarity \nx , 4.25 \n"


def test_binary_predictions_given_as_floats_are_written_as_classes(tmp_path):
    out = tmp_path / "para-dev-output.csv"
    write_predictions(str(out), TaskConfig(**BUILTIN_TASKS["qqp"]), ["p", "q"], np.array([1.0, 0.0]))
    assert out.read_text() == "id \t Predicted_Is_Paraphrase \np , 1 \nq , 0 \n"


def test_one_prediction_per_id(tmp_path):
    with pytest.raises(ValueError, match="2 ids for 1 predictions"):
        write_predictions(str(tmp_path / "o.csv"), TaskConfig(**BUILTIN_TASKS["sst"]), ["a", "b"], [1])
