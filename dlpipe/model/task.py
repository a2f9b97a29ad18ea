"""What kind of model a dataset asks for, as plain facts: classification or regression, the label's type,
the per-epoch figure and which way is better. Torch-free, so driver code (preprocess, evaluate, the
promotion gate, infer's planning) asks here without loading a deep-learning framework."""

from __future__ import annotations

import numpy as np

# defined beside the statistics, which carry the task; named here for the code that asks about a task
from dlpipe.data.stats import CLASSIFICATION as CLASSIFICATION
from dlpipe.data.stats import REGRESSION as REGRESSION

LOWER_IS_BETTER = frozenset({"log_loss", "rmse", "mae"})


def is_regression(task: str) -> bool:
    """For a task named in the config; fitted statistics answer `FittedStats.is_regression`."""
    return task == REGRESSION


def label_numpy_type(task: str) -> type:
    return np.float32 if task == REGRESSION else np.int32


def label_spark_type(task: str) -> str:
    return "float" if task == REGRESSION else "int"


def epoch_metric(task: str) -> str:
    """The per-epoch quality figure next to the loss: accuracy, or mean absolute error in label units."""
    return "mae" if task == REGRESSION else "accuracy"


def best(metric: str, values: list[float]) -> float:
    return min(values) if metric in LOWER_IS_BETTER else max(values)
