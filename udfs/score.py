"""Batch scoring in Spark, the model loaded once per Python worker (dlpipe.serve.scoring caches it by URI).

`score_frame` is what the infer job uses: a `mapInArrow` scorer that decodes the feature tensors
(dlpipe.data.tensors: list or NdarrayCodec layout) straight from Arrow buffers, scores a whole Arrow batch at once
and builds the probability lists from one buffer, carrying the key columns through. `score_column` is the same
scoring as an iterator pandas UDF, for when a column expression is handier (it pays pandas conversions: `make
bench ONLY=inference`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark.sql import Column, DataFrame
from pyspark.sql import types as T
from pyspark.sql.functions import pandas_udf

from dlpipe.data.tensors import decode_cells, decode_column_checked
from dlpipe.serve.scoring import load_model, predict_proba, task_device
from dlpipe.tracking import Credentials

RESULT_TYPE = "prediction int, probabilities array<float>"


def _probability_lists(probs: np.ndarray, bad: np.ndarray | None = None) -> pa.ListArray:
    offsets = pa.array(np.arange(0, probs.size + 1, probs.shape[1], dtype=np.int32))
    mask = pa.array(bad) if bad is not None and bad.any() else None
    return pa.ListArray.from_arrays(offsets, pa.array(probs.reshape(-1)), mask=mask)


def _score_arrays(scores: np.ndarray, bad: np.ndarray | None, regression: bool) -> list[pa.Array]:
    """prediction and probabilities (a classifier), or the predicted value (a regressor); null where bad."""
    if regression:
        return [pa.array(scores.reshape(-1).astype(np.float64), mask=bad)]
    return [pa.array(scores.argmax(1).astype(np.int32), mask=bad), _probability_lists(scores, bad)]


def arrow_scorer(
    model_uri: str,
    feature_shape: tuple[int, ...],
    keep: Sequence[str],
    tracking_uri: str | None = None,
    regression: bool = False,
    credentials: Credentials | None = None,
):
    """The function mapInArrow runs: Arrow batches (keep..., features) -> (keep..., prediction,
    probabilities, quarantine_reason); a regressor's prediction is its value and it has no probabilities.
    A row whose features cannot be scored (missing, not a tensor of the model's shape and dtype, NaN/inf)
    gets null scores and its reason; the others are scored."""
    keep = list(keep)
    outputs = ["prediction"] if regression else ["prediction", "probabilities"]

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        device = task_device()  # the task's GPU when it has one
        model = load_model(model_uri, tracking_uri, device, credentials)
        for batch in batches:
            x, reasons = decode_column_checked(batch.column(len(keep)), np.float32, feature_shape)
            bad = None if reasons is None else np.not_equal(reasons, None)
            probs = predict_proba(model, x, device).astype(np.float32, copy=False)
            yield pa.RecordBatch.from_arrays(
                [
                    *(batch.column(i) for i in range(len(keep))),
                    *_score_arrays(probs, bad, regression),
                    pa.nulls(len(x), pa.string()) if reasons is None else pa.array(reasons, pa.string()),
                ],
                names=[*keep, *outputs, "quarantine_reason"],
            )

    return score


def score_frame(
    df: DataFrame,
    model_uri: str,
    feature_shape: tuple[int, ...],
    keep: Sequence[str] = (),
    tracking_uri: str | None = None,
    features: str = "features",
    regression: bool = False,
    credentials: Credentials | None = None,
) -> DataFrame:
    """df (keep..., features cells) -> keep..., prediction, probabilities (classifiers only),
    quarantine_reason (null when the row was scored). credentials: the driver's MLflow credentials for an
    authenticated tracking server (dlpipe.tracking.credentials), for executors that lack them."""
    if regression:
        outputs = [T.StructField("prediction", T.DoubleType())]
    else:
        outputs = [
            T.StructField("prediction", T.IntegerType()),
            T.StructField("probabilities", T.ArrayType(T.FloatType())),
        ]
    schema = T.StructType([df.schema[c] for c in keep] + outputs + [T.StructField("quarantine_reason", T.StringType())])
    scorer = arrow_scorer(model_uri, feature_shape, keep, tracking_uri, regression, credentials)
    return df.select(*keep, features).mapInArrow(scorer, schema)


def scoring_udf(model_uri: str, feature_shape: tuple[int, ...], tracking_uri: str | None = None):
    """A UDF over a column of feature tensors (either layout) -> struct(prediction, probabilities)."""

    @pandas_udf(RESULT_TYPE)
    def score(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        model = load_model(model_uri, tracking_uri)
        for cells in batches:
            x = decode_cells(cells.tolist(), np.float32, feature_shape)
            probs = predict_proba(model, x)
            yield pd.DataFrame({"prediction": probs.argmax(axis=1).astype(np.int32), "probabilities": list(probs)})

    return score


def score_column(
    features: Column, model_uri: str, feature_shape: tuple[int, ...], tracking_uri: str | None = None
) -> Column:
    return scoring_udf(model_uri, feature_shape, tracking_uri)(features)
