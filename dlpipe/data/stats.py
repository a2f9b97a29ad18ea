"""What preprocess fits on the train split, as one typed, immutable value (`FittedStats`).

The same statistics travel three ways: beside the Petastorm datasets (`storage.STATS_FILE`), in the training
run of every model (`preprocessing/stats.json`) and inside the registered raw-record model. Each reader gets
them through `FittedStats.from_dict`, which also takes what earlier versions wrote (no `task`, `label_type`
or class names; a `feature_dim` beside the shape), and each writer through `to_dict`, which writes the
layout those versions read. Nothing here imports Spark, torch or MLflow: executors and the served model
load it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

CLASSIFICATION, REGRESSION = "classification", "regression"
# The columns a scored row answers with: a regressor's value; a classifier's class index, name and
# probabilities (in class order, and by class name).
REGRESSION_OUTPUTS = ("prediction",)
CLASSIFICATION_OUTPUTS = ("prediction", "predicted_class", "probabilities", "class_probabilities")

JsonScalar = float | int | str | bool


@dataclass(frozen=True)
class FeatureStats:
    """One input column as fitted: its transform and what the transform needs.

    transform is one of scale (an image: mean, std, shape), standardize (mean, std), onehot (vocab; other:
    a top_k column's extra __other__ column), hash (buckets, hash), date (kind, year_mean, year_std) or none.
    fill is the train split's value for a missing one (None: the column's rows are never missing, they are
    quarantined); indicator adds a 0/1 `<name>_missing` feature after the column's own."""

    name: str
    transform: str
    mean: float | None = None
    std: float | None = None
    shape: tuple[int, ...] | None = None
    vocab: tuple[str, ...] | None = None
    other: bool = False
    buckets: int | None = None
    hash: str | None = None
    kind: str | None = None
    year_mean: float | None = None
    year_std: float | None = None
    fill: JsonScalar | None = None
    missing_share_train: float | None = None
    indicator: bool = False
    # the drift watch's reference (dlpipe.serve.drift): a number's train deciles (edges) and the share of the
    # train split's values in each bin they make; a category's share of each vocab value (+ __other__)
    drift_edges: tuple[float, ...] | None = None
    drift_shares: tuple[float, ...] | None = None

    @property
    def imputed(self) -> bool:
        return self.fill is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON entry: only the keys this transform has (the layout earlier versions wrote and read)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name in ("other", "indicator") and not value):
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> FeatureStats:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in entry.items() if k in known}
        for name in ("shape", "vocab", "drift_edges", "drift_shares"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        values["other"] = bool(values.get("other", False))
        values["indicator"] = bool(values.get("indicator", False))
        return cls(**values)


@dataclass(frozen=True)
class FittedStats:
    """Everything a later stage (or the served model) needs to transform rows and read the model's answers.

    feature_shape is one row's tensor: (width,) for tabular rows, (channels, height, width) for images.
    Classification: classes in output order (None in statistics written before names existed), the train
    split's count of each and the most frequent one. Regression: the target's train mean and std (targets
    are standardized while training). rows: rows per split, once they are written."""

    key: str
    label: str
    features: tuple[FeatureStats, ...]
    feature_names: tuple[str, ...]
    feature_shape: tuple[int, ...]
    task: str = CLASSIFICATION
    label_type: str = "int"
    num_classes: int | None = None
    classes: tuple[str, ...] | None = None
    class_counts_train: tuple[int, ...] | None = None
    majority_class: int | None = None
    label_mean: float = 0.0
    label_std: float = 1.0
    rows: Mapping[str, int] = field(default_factory=dict)
    # regression: the train labels' deciles and the share in each bin (the predicted values' drift reference)
    label_edges: tuple[float, ...] | None = None
    label_shares: tuple[float, ...] | None = None

    @property
    def is_regression(self) -> bool:
        return self.task == REGRESSION

    @property
    def is_image(self) -> bool:
        return bool(self.features) and self.features[0].transform == "scale"

    @property
    def input_width(self) -> int:
        """Numbers per row the network reads (the product of feature_shape)."""
        return math.prod(self.feature_shape)

    @property
    def outputs(self) -> int:
        """Width of the network's last layer: the classes, or 1 for a regressor."""
        return 1 if self.is_regression else int(self.num_classes or 0)

    @property
    def class_names(self) -> list[str]:
        """The model's classes in index order (statistics written before names existed: "0", "1", ...)."""
        if self.is_regression:
            return []
        return list(self.classes) if self.classes else [str(k) for k in range(self.num_classes or 0)]

    @property
    def output_columns(self) -> list[str]:
        """The columns of a scored row after key and label (dlpipe.serve.infer, dlpipe.model.rawmodel.answers)."""
        return list(REGRESSION_OUTPUTS if self.is_regression else CLASSIFICATION_OUTPUTS)

    @property
    def imputed(self) -> list[FeatureStats]:
        """The features whose missing values are filled (counted while preprocess writes)."""
        return [f for f in self.features if f.imputed]

    def feature(self, name: str) -> FeatureStats:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature '{name}' in the statistics; they have {[f.name for f in self.features]}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout of `_dlpipe_stats.json` (with `feature_dim`, and the classification or regression
        keys only for its task), as earlier versions wrote it."""
        out: dict[str, Any] = {
            "key": self.key,
            "label": self.label,
            "label_type": self.label_type,
            "task": self.task,
            "features": [f.to_dict() for f in self.features],
            "feature_names": list(self.feature_names),
            "feature_shape": list(self.feature_shape),
            "feature_dim": self.input_width,
            "num_classes": self.num_classes,
        }
        if self.is_regression:
            out.update(label_mean=self.label_mean, label_std=self.label_std)
            if self.label_edges is not None:
                out.update(label_edges=list(self.label_edges), label_shares=list(self.label_shares or ()))
        else:
            for name in ("classes", "class_counts_train"):
                value = getattr(self, name)
                if value is not None:
                    out[name] = list(value)
            if self.majority_class is not None:
                out["majority_class"] = self.majority_class
        if self.rows:
            out["rows"] = dict(self.rows)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FittedStats:
        """Statistics as any version wrote them. Keys this version does not know are ignored (feature_dim is
        derived from feature_shape); the ones earlier versions lacked take their meaning of then."""
        features = tuple(FeatureStats.from_dict(f) for f in d["features"])

        def maybe_tuple(name: str) -> tuple | None:
            return tuple(d[name]) if d.get(name) is not None else None

        return cls(
            key=d["key"],
            label=d["label"],
            features=features,
            feature_names=tuple(d.get("feature_names") or [f.name for f in features]),
            feature_shape=tuple(int(n) for n in d["feature_shape"]),
            task=d.get("task") or CLASSIFICATION,
            label_type=d.get("label_type") or "int",
            num_classes=d.get("num_classes"),
            classes=maybe_tuple("classes"),
            class_counts_train=maybe_tuple("class_counts_train"),
            majority_class=d.get("majority_class"),
            label_mean=float(d.get("label_mean", 0.0)),
            label_std=float(d.get("label_std", 1.0)),
            rows={str(k): int(v) for k, v in (d.get("rows") or {}).items()},
            label_edges=maybe_tuple("label_edges"),
            label_shares=maybe_tuple("label_shares"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> FittedStats:
        return cls.from_dict(json.loads(text))
