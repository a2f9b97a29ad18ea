"""FittedStats, with no Spark: the files earlier versions wrote still load, and what it derives."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from dlpipe.data.stats import FeatureStats, FittedStats

# `_dlpipe_stats.json` of a tabular classifier as preprocess wrote it before the statistics were typed: one
# column of every transform (a boolean's fill False is a fill all the same), the rows added after the write
TODAYS_TABULAR = {
    "features": [
        {"name": "x", "transform": "standardize", "mean": 0.0, "std": 2.0, "fill": 1.0, "missing_share_train": 0.1},
        {"name": "flag", "transform": "none", "fill": False, "missing_share_train": 0.0, "indicator": True},
        {"name": "seg", "transform": "onehot", "vocab": ["a", "b"]},
        {"name": "city", "transform": "onehot", "vocab": ["c0", "c1"], "other": True},
        {"name": "user", "transform": "hash", "buckets": 4, "hash": "crc32_utf8"},
        {"name": "day", "transform": "date", "kind": "date", "year_mean": 2020.0, "year_std": 2.0},
    ],
    "feature_names": [
        "x",
        "flag",
        "flag_missing",
        "seg=a",
        "seg=b",
        "city=c0",
        "city=c1",
        "city=__other__",
        *(f"user#{b}" for b in range(4)),
        *(f"day_{p}" for p in ("year", "month_sin", "month_cos", "dow_sin", "dow_cos", "doy")),
    ],
    "feature_shape": [18],
    "feature_dim": 18,
    "task": "classification",
    "key": "id",
    "label": "species",
    "label_type": "string",
    "classes": ["Adelie", "Gentoo", "Chinstrap"],
    "num_classes": 3,
    "class_counts_train": [10, 30, 5],
    "majority_class": 1,
    "rows": {"train": 45, "val": 10, "test": 12},
}
TODAYS_REGRESSION = {
    "features": [{"name": "x", "transform": "standardize", "mean": 1.5, "std": 0.5}],
    "feature_names": ["x"],
    "feature_shape": [1],
    "feature_dim": 1,
    "task": "regression",
    "key": "id",
    "label": "y",
    "label_type": "double",
    "num_classes": None,
    "label_mean": 10.0,
    "label_std": 4.0,
    "rows": {"train": 7, "val": 2, "test": 1},
}
# written before the task, the label's type and class names were kept: an integer-labelled image classifier
OLDEST_IMAGE = {
    "features": [{"name": "image", "transform": "scale", "mean": 0.4, "std": 0.3, "shape": [8, 8, 3]}],
    "feature_names": ["image"],
    "feature_shape": [3, 8, 8],
    "feature_dim": 192,
    "key": "id",
    "label": "label",
    "num_classes": 10,
    "class_counts_train": [5] * 10,
    "majority_class": 0,
    "rows": {"train": 50, "val": 10, "test": 10},
}


@pytest.mark.parametrize("today", [TODAYS_TABULAR, TODAYS_REGRESSION], ids=["classifier", "regressor"])
def test_todays_files_load_typed_and_are_written_back_key_for_key(today):
    stats = FittedStats.from_dict(copy.deepcopy(today))
    assert stats.to_dict() == today
    assert FittedStats.from_json(stats.to_json()) == stats
    assert json.loads(stats.to_json()) == today


def test_a_tabular_classifiers_statistics_are_typed_and_answer_what_consumers_ask():
    stats = FittedStats.from_dict(TODAYS_TABULAR)
    assert (stats.key, stats.label, stats.label_type, stats.task) == ("id", "species", "string", "classification")
    assert not stats.is_regression and not stats.is_image
    assert stats.feature_shape == (18,) and stats.input_width == 18 == len(stats.feature_names)
    assert stats.outputs == 3 and stats.class_names == ["Adelie", "Gentoo", "Chinstrap"]  # their order, not sorted
    assert stats.output_columns == ["prediction", "predicted_class", "probabilities", "class_probabilities"]
    assert stats.rows == {"train": 45, "val": 10, "test": 12} and stats.majority_class == 1
    assert stats.class_counts_train == (10, 30, 5)
    flag, city = stats.feature("flag"), stats.feature("city")
    assert flag.fill is False and flag.imputed and flag.indicator
    assert city.vocab == ("c0", "c1") and city.other and not city.imputed and city.fill is None
    assert stats.feature("user").buckets == 4 and stats.feature("day").year_std == 2.0
    assert [f.name for f in stats.imputed] == ["x", "flag"]
    with pytest.raises(KeyError, match="no feature 'nope'"):
        stats.feature("nope")
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.key = "other"  # type: ignore[misc]


def test_a_regressors_statistics_answer_one_value():
    stats = FittedStats.from_dict(TODAYS_REGRESSION)
    assert stats.is_regression and stats.outputs == 1 and stats.class_names == []
    assert stats.output_columns == ["prediction"]
    assert (stats.label_mean, stats.label_std) == (10.0, 4.0)


def test_the_oldest_statistics_load_with_their_meaning_of_then():
    stats = FittedStats.from_dict(OLDEST_IMAGE)
    assert stats.task == "classification" and stats.label_type == "int" and stats.classes is None
    assert stats.class_names == [str(k) for k in range(10)] and stats.outputs == 10
    assert stats.is_image and stats.feature_shape == (3, 8, 8) and stats.input_width == 192
    assert stats.features[0] == FeatureStats("image", "scale", mean=0.4, std=0.3, shape=(8, 8, 3))
    assert (stats.label_mean, stats.label_std) == (0.0, 1.0)
    written = stats.to_dict()  # the keys it lacked are written with what they meant
    assert written == OLDEST_IMAGE | {"task": "classification", "label_type": "int"}
    assert FittedStats.from_dict(written) == stats


def test_keys_a_later_version_adds_are_ignored():
    later = copy.deepcopy(TODAYS_REGRESSION)
    later["calibration"] = {"kind": "isotonic"}
    later["features"][0]["clip"] = [-3, 3]
    assert FittedStats.from_dict(later) == FittedStats.from_dict(TODAYS_REGRESSION)


def test_the_stats_module_loads_without_spark_torch_or_mlflow():
    """Executors and the served model import it; none of the heavy packages may come with it."""
    code = "import sys, dlpipe.data.stats; print(sorted(m for m in ('pyspark', 'torch', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_model_registered_with_todays_statistics_still_transforms_and_answers_records():
    """What RawRecordModel.load_context reads from an already registered model's stats.json."""
    from dlpipe.model import rawmodel

    stats = FittedStats.from_json(json.dumps(TODAYS_TABULAR))
    columns = [
        {"name": "x", "type": "double", "min": None, "max": None, "values": None, "missing": "impute"},
        {"name": "flag", "type": "boolean", "min": None, "max": None, "values": None, "missing": "indicator"},
        {"name": "seg", "type": "string", "min": None, "max": None, "values": ["a", "b"], "missing": "quarantine"},
        {"name": "city", "type": "string", "min": None, "max": None, "values": None, "missing": "quarantine"},
        {"name": "user", "type": "string", "min": None, "max": None, "values": None, "missing": "quarantine"},
        {"name": "day", "type": "date", "values": None, "missing": "quarantine", "format": "yyyy-MM-dd"},
    ]
    records = pd.DataFrame(
        [{"x": None, "flag": None, "seg": "b", "city": "elsewhere", "user": "u", "day": "2022-01-03"}]
    )
    x, reasons = rawmodel.transform_records(records, stats, columns)
    assert reasons == [None] and x.shape == (1, stats.input_width)
    got = dict(zip(stats.feature_names, x[0].tolist(), strict=True))
    assert got["x"] == pytest.approx((1.0 - 0.0) / 2.0)  # the train fill, standardized
    assert (got["flag"], got["flag_missing"]) == (0.0, 1.0)  # filled with False, and flagged
    assert (got["seg=a"], got["seg=b"], got["city=__other__"]) == (0.0, 1.0, 1.0)
    assert got["day_year"] == pytest.approx((2022 - 2020) / 2.0)
    answered = rawmodel.answers(np.array([[0.1, 0.2, 0.7]], np.float32), stats)
    assert answered["predicted_class"].tolist() == ["Chinstrap"] and answered["prediction"].tolist() == [2]
