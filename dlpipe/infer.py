"""Infer: score the test split with the registered model; write predictions with their provenance."""

from __future__ import annotations

import logging

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from dlpipe import tracking
from dlpipe.config import Config
from dlpipe.features import read_stats
from dlpipe.ingest import AccountingError
from dlpipe.storage import atomic_output, dataset_paths

log = logging.getLogger(__name__)


def model_uri(cfg: Config) -> str:
    return cfg.infer.model_uri or f"models:/{cfg.tracking.registered_model}@candidate"


def run(spark: SparkSession, cfg: Config) -> dict:
    import mlflow

    from udfs.score import score_column

    paths = dataset_paths(cfg)
    stats = read_stats(spark, cfg)
    uri = model_uri(cfg)
    mv = tracking.model_version_for(uri)
    log.info("infer: scoring %s with %s (version %s, run %s)", paths.split("test"), uri, mv["version"], mv["run_id"])
    mlflow.set_tags(
        {
            "dlpipe.model_uri": uri,
            "dlpipe.model_version": str(mv["version"]),
            "dlpipe.input": paths.split("test"),
            "dlpipe.output": paths.predictions,
        }
    )
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.infer.batch_size))
    key = stats["key"]
    rows = spark.read.parquet(paths.split("test"))
    scored = rows.select(
        key,
        "label",
        score_column(F.col("features"), mv["download_uri"], stats["feature_dim"], tracking.tracking_uri(cfg)).alias(
            "_score"
        ),
    ).select(
        key,
        "label",
        "_score.prediction",
        "_score.probabilities",
        F.lit(mv["name"]).alias("model_name"),
        F.lit(mv["version"]).alias("model_version"),
        F.lit(mv["run_id"]).alias("model_run_id"),
    )
    rows_in = rows.count()
    with atomic_output(spark, paths.predictions) as tmp:
        scored.write.mode("overwrite").parquet(tmp)
        rows_out = spark.read.parquet(tmp).count()
        if rows_out != rows_in:
            raise AccountingError(f"infer: {rows_in} rows in, {rows_out} predictions written")
    log.info("infer: wrote %d predictions to %s", rows_out, paths.predictions)
    return {"rows_in": rows_in, "rows_scored": rows_out}
