"""The tree-ensemble baseline the network must beat: gradient-boosted trees trained on Spark.

Evaluate trains XGBoost's Spark estimator (one barrier task per worker, evaluate.baseline.workers) on the
same train split the network learned from, early-stopped on the same val split, and scores the same test
rows. Its metrics (prefixed `baseline_`) and plots (under `baseline/`) go to the evaluate run beside the
network's, with a side-by-side plot, and the gate can require the network to beat it
(evaluate.require_beat_baseline). The tree is registered in the network's registered model under the alias
`baseline` behind the same raw-record interface (dlpipe.model.trees), so a user can choose it.

Nothing is collected: the features stay in Spark, each XGBoost worker holds its share of the (sampled,
evaluate.baseline.max_train_rows) train split, and the test rows are scored by the fitted Spark model.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dlpipe.config import Config
from dlpipe.data.stats import FittedStats
from dlpipe.model.task import LOWER_IS_BETTER
from dlpipe.storage import dataset_paths

log = logging.getLogger(__name__)
PREFIX = "baseline_"
VARIANT = "xgboost-baseline"  # its dlpipe.variant tag
VALIDATION = "_dlpipe_is_val"


def training_rows(spark: SparkSession, cfg: Config, stats: FittedStats) -> DataFrame:
    """The train split (sampled down to about max_train_rows) and the val split, marked: features, label,
    and whether the row is for early stopping."""
    paths = dataset_paths(cfg)
    limit = cfg.evaluate.baseline.max_train_rows
    train = spark.read.parquet(paths.split("train")).select("features", "label")
    n_train = stats.rows.get("train")
    if n_train and n_train > limit:
        train = train.sample(fraction=limit / n_train, seed=cfg.dataset.split.seed)
        log.info("evaluate: baseline trains on about %d of the %d train rows (max_train_rows)", limit, n_train)
    val = spark.read.parquet(paths.split("val")).select("features", "label")
    return train.withColumn(VALIDATION, F.lit(False)).unionByName(val.withColumn(VALIDATION, F.lit(True)))


def estimator(spark: SparkSession, cfg: Config, stats: FittedStats):
    """XGBoost's Spark classifier (or regressor) for the dataset's task, as evaluate.baseline sets it."""
    from xgboost.spark import SparkXGBClassifier, SparkXGBRegressor

    b = cfg.evaluate.baseline
    kind = SparkXGBRegressor if stats.is_regression else SparkXGBClassifier
    return kind(
        features_col="features",
        label_col="label",
        validation_indicator_col=VALIDATION,
        num_workers=b.workers or spark.sparkContext.defaultParallelism,
        n_estimators=b.rounds,
        early_stopping_rounds=b.early_stopping_rounds,
        max_depth=b.max_depth,
        learning_rate=b.learning_rate,
        tree_method="hist",
        random_state=cfg.dataset.split.seed,
        # always repartition: a barrier stage refuses the union of splits with other partition counts
        force_repartition=True,
    )


def fit(spark: SparkSession, cfg: Config, stats: FittedStats):
    """(the fitted Spark model, its booster cut at the best round, seconds)."""
    started = time.monotonic()
    model = estimator(spark, cfg, stats).fit(training_rows(spark, cfg, stats))
    booster = model.get_booster()
    best = booster.best_iteration if booster.attr("best_iteration") is not None else None
    if best is not None:
        booster = booster[: best + 1]  # early stopping keeps the later rounds: score with the best
    seconds = time.monotonic() - started
    log.info("evaluate: baseline trained in %.1f s (%d rounds)", seconds, booster.num_boosted_rounds())
    return model, booster, seconds


def score_test(model, spark: SparkSession, cfg: Config, stats: FittedStats) -> DataFrame:
    """The test split scored by the fitted Spark model: key, label, prediction, probabilities (classification),
    the columns evaluate's metrics read."""
    from pyspark.ml.functions import vector_to_array

    test = spark.read.parquet(dataset_paths(cfg).split("test")).select(stats.key, "features", "label")
    scored = model.transform(test)
    if stats.is_regression:
        return scored.select(stats.key, "label", F.col("prediction").cast("double").alias("prediction"))
    return scored.select(
        stats.key,
        "label",
        F.col("prediction").cast("int").alias("prediction"),
        vector_to_array("probability", "float32").alias("probabilities"),
    )


def beats(metric: str, network: float, baseline: float) -> bool:
    """Whether the network's value of metric is strictly better than the baseline's."""
    return network < baseline if metric in LOWER_IS_BETTER else network > baseline


def plot_comparison(network: dict, baseline: dict, names: list[str]):
    """The network's and the baseline's test metrics side by side (a bar pair per metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [n for n in names if n in network and n in baseline]
    fig, ax = plt.subplots(figsize=(1.4 * len(shown) + 2, 3.6))
    at = np.arange(len(shown))
    for offset, (label, values) in zip((-0.2, 0.2), (("network", network), ("tree baseline", baseline)), strict=True):
        heights = [values[n] for n in shown]
        bars = ax.bar(at + offset, heights, width=0.4, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize="x-small")
    ax.set_xticks(at, shown)
    ax.set(title="network vs gradient-boosted trees (test)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def register(cfg: Config, stats: FittedStats, booster, example) -> str:
    """Log the tree behind the raw-record interface as a new version of the network's registered model and
    point the alias `baseline` at it; returns the version."""
    import mlflow
    import xgboost

    from dlpipe import tracking
    from dlpipe.model.names import BASELINE_ALIAS
    from dlpipe.model.rawmodel import register_variant
    from dlpipe.model.trees import BoosterModule

    version = register_variant(
        cfg,
        stats,
        BoosterModule(booster, stats.task, stats.outputs),
        VARIANT,
        BASELINE_ALIAS,
        example,
        [*tracking.pip_requirements(), f"xgboost-cpu=={xgboost.__version__}"],
    )
    mlflow.set_tag("dlpipe.baseline_model_version", version)
    log.info("evaluate: the tree baseline is %s version %s (@%s)", cfg.model_name, version, BASELINE_ALIAS)
    return version
