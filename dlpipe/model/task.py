"""What kind of model a dataset asks for, as plain facts: classification or regression, the label's type,
the per-epoch figure and which way is better. Torch-free, so driver code (preprocess, evaluate, the
promotion gate, infer's planning) asks here without loading a deep-learning framework."""

from __future__ import annotations

from typing import Any

import numpy as np

CLASSIFICATION, REGRESSION = "classification", "regression"
LOWER_IS_BETTER = frozenset({"log_loss", "rmse", "mae"})


def is_regression(stats_or_task: Any) -> bool:
    """Of a task name, or of fitted statistics (which carry their task)."""
    if isinstance(stats_or_task, str):
        task = stats_or_task
    elif isinstance(stats_or_task, dict):
        task = stats_or_task.get("task", CLASSIFICATION)
    else:
        task = stats_or_task.task
    return task == REGRESSION


def outputs(task: str, num_classes: int | None) -> int:
    """Width of the network's last layer."""
    return 1 if task == REGRESSION else int(num_classes or 0)


def label_numpy_type(task: str) -> type:
    return np.float32 if task == REGRESSION else np.int32


def label_spark_type(task: str) -> str:
    return "float" if task == REGRESSION else "int"


def epoch_metric(task: str) -> str:
    """The per-epoch quality figure next to the loss: accuracy, or mean absolute error in label units."""
    return "mae" if task == REGRESSION else "accuracy"


def best(metric: str, values: list[float]) -> float:
    return min(values) if metric in LOWER_IS_BETTER else max(values)
