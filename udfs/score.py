"""Batch scoring as an iterator pandas UDF: the model is loaded once per Python worker, not per batch."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import Column
from pyspark.sql.functions import pandas_udf

from dlpipe.scoring import load_model, predict_proba
from dlpipe.tensors import decode_cells

RESULT_TYPE = "prediction int, probabilities array<float>"


def scoring_udf(model_uri: str, feature_shape: tuple[int, ...], tracking_uri: str | None = None):
    """A UDF over a column of NdarrayCodec feature cells -> struct(prediction, probabilities)."""

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
