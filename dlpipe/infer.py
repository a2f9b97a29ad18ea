"""Infer: score the test split with the registered model; write predictions with their provenance."""

from __future__ import annotations

import logging

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dlpipe import lineage, tracking
from dlpipe.config import Config
from dlpipe.features import read_stats
from dlpipe.ingest import AccountingError
from dlpipe.storage import atomic_output, dataset_paths

log = logging.getLogger(__name__)


def model_uri(cfg: Config) -> str:
    alias = "candidate-int8" if cfg.infer.variant == "int8" else "candidate"
    return cfg.infer.model_uri or f"models:/{cfg.model_name}@{alias}"


def quarantine_path(predictions: str) -> str:
    """Rows the model could not score, with the reason: beside the predictions."""
    return predictions.rstrip("/") + "_quarantine"


def score_rows(spark: SparkSession, cfg: Config, rows: DataFrame, stats: dict, mv: dict) -> DataFrame:
    """rows (key, label, features cells) -> key, label, prediction, probabilities, quarantine_reason (null
    for scored rows) and the model's identity, scored in Arrow batches of infer.batch_size (udfs/score.py)."""
    from udfs.score import score_frame

    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.infer.batch_size))
    key = stats["key"]
    scored = score_frame(
        rows, mv["download_uri"], tuple(stats["feature_shape"]), [key, "label"], tracking.tracking_uri(cfg)
    )
    return scored.select(
        key,
        "label",
        "prediction",
        "probabilities",
        "quarantine_reason",
        F.lit(mv["name"]).alias("model_name"),
        F.lit(mv["version"]).alias("model_version"),
        F.lit(mv["run_id"]).alias("model_run_id"),
    )


def run(spark: SparkSession, cfg: Config, force: bool = False) -> dict:
    """The infer stage; skipped when the same model already scored the same test split."""
    import mlflow

    paths = dataset_paths(cfg)
    stats = read_stats(spark, cfg)
    uri = model_uri(cfg)
    mv = tracking.model_version_for(uri)
    test_uri = paths.split("test")
    if mlflow.active_run() is not None:
        mlflow.set_tags({"dlpipe.model_uri": uri, "dlpipe.model_version": str(mv["version"])})
    inputs = {
        test_uri: lineage.dataset_fingerprint(spark, paths.petastorm),
        uri: f"{mv['name']}/{mv['version']}/{mv['run_id']}",
    }
    fp = lineage.digest({"stage": "infer", "inputs": inputs, "infer": cfg.infer.model_dump(mode="json")})
    done = None if force else lineage.reusable(spark, paths.predictions, fp)
    if done:
        log.info("infer: %s is up to date (fingerprint %s), skipping; use --force to redo", paths.predictions, fp)
        lineage.log_lineage("infer", fp, inputs, [paths.predictions], skipped=True)
        return {**done["metrics"], "skipped": 1}
    log.info("infer: scoring %s with %s (version %s, run %s)", test_uri, uri, mv["version"], mv["run_id"])
    rows = spark.read.parquet(test_uri)
    scored = score_rows(spark, cfg, rows, stats, mv).persist(StorageLevel.MEMORY_AND_DISK)
    bad = F.col("quarantine_reason").isNotNull()
    rows_in = rows.count()
    quarantine = quarantine_path(paths.predictions)
    try:
        with atomic_output(spark, paths.predictions) as tmp, atomic_output(spark, quarantine) as qtmp:
            scored.where(~bad).drop("quarantine_reason").write.mode("overwrite").parquet(tmp)
            scored.where(bad).drop("prediction", "probabilities").write.mode("overwrite").parquet(qtmp)
            rows_out, rows_bad = spark.read.parquet(tmp).count(), spark.read.parquet(qtmp).count()
            if rows_out + rows_bad != rows_in:
                raise AccountingError(
                    f"infer: {rows_in} rows in, {rows_out} predictions + {rows_bad} quarantined written"
                )
            metrics = {"rows_in": rows_in, "rows_scored": rows_out, "rows_quarantined": rows_bad}
            if rows_bad:
                reasons = scored.where(bad).groupBy("quarantine_reason").count().collect()
                log.warning("infer: %d rows quarantined to %s: %s", rows_bad, quarantine, {r[0]: r[1] for r in reasons})
            lineage.write_meta(spark, qtmp, "infer-quarantine", fp, inputs, metrics)
            lineage.write_meta(spark, tmp, "infer", fp, inputs, metrics)
    finally:
        scored.unpersist()
    lineage.log_lineage("infer", fp, inputs, [paths.predictions, quarantine], skipped=False)
    log.info("infer: wrote %d predictions to %s", rows_out, paths.predictions)
    return {**metrics, "skipped": 0}
