"""Evaluate: metrics of the predictions on the test split, computed in Spark, plus a confusion matrix."""

from __future__ import annotations

import logging

import numpy as np
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from dlpipe.config import Config
from dlpipe.features import read_stats
from dlpipe.generate import read_manifest
from dlpipe.storage import dataset_paths, storage_settings

log = logging.getLogger(__name__)


def confusion_matrix(spark_df, k: int) -> np.ndarray:
    cm = np.zeros((k, k), dtype=np.int64)
    for r in spark_df.groupBy("label", "prediction").count().collect():
        cm[int(r["label"]), int(r["prediction"])] = r["count"]
    return cm


def scores(cm: np.ndarray) -> dict:
    total = cm.sum()
    tp = np.diag(cm).astype(float)
    precision = np.divide(tp, cm.sum(0), out=np.zeros_like(tp), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros_like(tp), where=cm.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    return {"accuracy": float(tp.sum() / total), "macro_f1": float(f1.mean())}


def plot_confusion(cm: np.ndarray):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    im = ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set(
        xlabel="predicted", ylabel="true", title="confusion matrix (test)", xticks=range(len(cm)), yticks=range(len(cm))
    )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def run(spark: SparkSession, cfg: Config, force: bool = False) -> dict:
    """The evaluate stage (always runs: it is cheap and its figures belong to this run)."""
    import mlflow

    from dlpipe.tracking import require_active_run

    require_active_run("evaluate")
    paths = dataset_paths(cfg)
    stats = read_stats(spark, cfg)
    key, k = stats["key"], stats["num_classes"]
    preds = spark.read.parquet(paths.predictions)
    test = spark.read.parquet(paths.split("test")).select(key, "label")
    missing = test.join(preds.select(key), key, "left_anti").count()
    cm = confusion_matrix(preds, k)
    metrics = scores(cm)
    p_true = F.element_at("probabilities", F.col("label") + 1)
    metrics["log_loss"] = preds.agg(F.avg(-F.log(F.greatest(p_true, F.lit(1e-7))))).first()[0]
    metrics["majority_baseline_accuracy"] = float(cm[stats["majority_class"]].sum() / cm.sum())
    metrics["accuracy_over_baseline"] = metrics["accuracy"] - metrics["majority_baseline_accuracy"]
    metrics["test_rows"] = test.count()
    metrics["predictions"] = int(cm.sum())
    metrics["test_rows_without_prediction"] = missing
    manifest = read_manifest(paths.raw, storage_settings(cfg)) if cfg.dataset.generator else None
    if manifest and manifest.get("bayes_accuracy") is not None:
        metrics["bayes_accuracy"] = manifest["bayes_accuracy"]
    mlflow.log_figure(plot_confusion(cm), "confusion_matrix.png")
    mlflow.log_dict({"labels": list(range(k)), "matrix": cm.tolist()}, "confusion_matrix.json")
    log.info(
        "evaluate: accuracy %.4f (majority baseline %.4f), macro F1 %.4f, log-loss %.4f, %d rows without prediction",
        metrics["accuracy"],
        metrics["majority_baseline_accuracy"],
        metrics["macro_f1"],
        metrics["log_loss"],
        missing,
    )
    return metrics
