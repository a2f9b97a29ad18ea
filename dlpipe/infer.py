"""Infer: score rows with a registered model; write predictions with their provenance.

Two inputs, one scorer (udfs/score.py):
- the test split (default): Petastorm feature cells already made by preprocess; evaluate reads these;
- new raw data (`infer.source`): read like ingest reads dataset.source (the label optional), validated with
  ingest's checks, transformed with the statistics logged with the model's own training run (so new rows
  are scaled exactly like the rows it learned from, whatever preprocess has run since), then scored.

Every row in comes out either scored or quarantined with its reason (validation or scoring), and the
stage checks rows in = rows scored + rows quarantined from what it wrote. Output is Parquet partitioned by
`infer.partition_by`, written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import logging

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dlpipe import lineage, tracking
from dlpipe.config import Config
from dlpipe.features import model_stats, read_stats, transform
from dlpipe.ingest import AccountingError, BadDataError, quarantine_rows, read_raw, typed_clean, validate
from dlpipe.objective import is_regression
from dlpipe.promotion import CANDIDATE
from dlpipe.quantize import INT8_ALIAS
from dlpipe.storage import HadoopFS, atomic_output, dataset_paths, resolve_uri

log = logging.getLogger(__name__)

SCORING_FAILED = "scoring"  # the reason_code of rows that passed validation but could not be scored


def model_uri(cfg: Config) -> str:
    alias = INT8_ALIAS if cfg.infer.variant == "int8" else CANDIDATE
    return cfg.infer.model_uri or f"models:/{cfg.model_name}@{alias}"


def quarantine_path(predictions: str) -> str:
    """Rows that were not scored, with the reason: beside the predictions."""
    return predictions.rstrip("/") + "_quarantine"


def output_path(cfg: Config) -> str:
    paths = dataset_paths(cfg)
    if cfg.infer.output:
        return resolve_uri(cfg.root, cfg.infer.output)
    return paths.scored if cfg.infer.source else paths.predictions


def _identity(mv: dict) -> list:
    return [
        F.lit(mv["name"]).cast("string").alias("model_name"),
        F.lit(mv["version"]).cast("int").alias("model_version"),
        F.lit(mv["run_id"]).cast("string").alias("model_run_id"),
    ]


def score_rows(spark: SparkSession, cfg: Config, rows: DataFrame, stats: dict, mv: dict) -> DataFrame:
    """rows (key, label, features cells) -> key, label, prediction, probabilities (classification),
    quarantine_reason (null for scored rows) and the model's identity, scored in Arrow batches of
    infer.batch_size (udfs/score.py)."""
    from udfs.score import score_frame

    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.infer.batch_size))
    key, regression = stats["key"], is_regression(stats)
    scored = score_frame(
        rows,
        mv["download_uri"],
        tuple(stats["feature_shape"]),
        [key, "label"],
        tracking.tracking_uri(cfg),
        regression=regression,
    )
    outputs = ["prediction"] if regression else ["prediction", "probabilities"]
    return scored.select(key, "label", *outputs, "quarantine_reason", *_identity(mv))


def _new_rows(spark: SparkSession, cfg: Config, source: str, stats: dict) -> tuple[DataFrame, DataFrame, DataFrame]:
    """Raw rows at source -> (checked rows to persist, feature cells of the valid ones, quarantine of the
    invalid ones: key, reason, reason_code, raw_line, source_file)."""
    checked = validate(read_raw(spark, cfg, source, label_optional=True), cfg, scoring=True)
    clean = typed_clean(checked, cfg)
    cells = transform(clean, cfg, stats, label_optional=True)
    invalid = quarantine_rows(checked, cfg, scoring=True, keep=[stats["key"]])
    return checked, cells, invalid


def run(spark: SparkSession, cfg: Config, force: bool = False) -> dict:
    """The infer stage; skipped when the same model already scored the same input the same way."""
    import mlflow

    paths = dataset_paths(cfg)
    uri = model_uri(cfg)
    mv = tracking.model_version_for(uri)
    out = output_path(cfg)
    if cfg.infer.source:
        source = resolve_uri(cfg.root, cfg.infer.source)
        if not HadoopFS(spark).exists(source):
            raise FileNotFoundError(f"infer: input path {source} does not exist (infer.source)")
        source_fp = lineage.source_fingerprint(spark, source)
        stats = model_stats(mv, fallback=lambda: read_stats(spark, cfg))
    else:
        source = paths.split("test")
        source_fp = lineage.dataset_fingerprint(spark, paths.petastorm)
        stats = read_stats(spark, cfg)
    if mlflow.active_run() is not None:
        mlflow.set_tags({"dlpipe.model_uri": uri, "dlpipe.model_version": str(mv["version"])})
    inputs = {source: source_fp, uri: f"{mv['name']}/{mv['version']}/{mv['run_id']}"}
    spec = cfg.infer.model_dump(mode="json", exclude={"output"})
    fp = lineage.digest({"stage": "infer", "inputs": inputs, "infer": spec, "out": out})
    quarantine = quarantine_path(out)
    done = None if force else lineage.reusable(spark, out, fp)
    if done:
        log.info("infer: %s is up to date (fingerprint %s), skipping; use --force to redo", out, fp)
        lineage.log_lineage("infer", fp, inputs, [out, quarantine], skipped=True)
        return {**done["metrics"], "skipped": 1}
    log.info("infer: scoring %s with %s (version %s, run %s)", source, uri, mv["version"], mv["run_id"])
    if cfg.infer.source:
        checked, cells, invalid = _new_rows(spark, cfg, source, stats)
        checked = checked.persist(StorageLevel.MEMORY_AND_DISK)  # parsed once, for the count and both outputs
    else:
        checked = cells = spark.read.parquet(source)
        invalid = None
    try:
        rows_in = checked.count()
        log.info("infer: %d rows in", rows_in)
        scored = score_rows(spark, cfg, cells, stats, mv).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            metrics = _write(spark, cfg, scored, invalid, stats, mv, rows_in, out, quarantine, fp, inputs)
        finally:
            scored.unpersist()
    finally:
        if invalid is not None:
            checked.unpersist()
    lineage.log_lineage("infer", fp, inputs, [out, quarantine], skipped=False)
    log.info("infer: wrote %d predictions to %s", metrics["rows_scored"], out)
    return {**metrics, "skipped": 0}


def _write(
    spark: SparkSession,
    cfg: Config,
    scored: DataFrame,
    invalid: DataFrame | None,
    stats: dict,
    mv: dict,
    rows_in: int,
    out: str,
    quarantine: str,
    fp: str,
    inputs: dict[str, str],
) -> dict:
    """Both outputs, checked against rows_in before either is committed."""
    key = stats["key"]
    bad = F.col("quarantine_reason").isNotNull()
    unscored = scored.where(bad).select(
        F.col(key).cast("string").alias(key),
        F.col("quarantine_reason").alias("reason"),
        F.lit(SCORING_FAILED).alias("reason_code"),
        F.lit(None).cast("string").alias("raw_line"),
        F.lit(None).cast("string").alias("source_file"),
    )
    rejected = unscored
    if invalid is not None:
        rejected = invalid.select(F.col(key).cast("string").alias(key), *unscored.columns[1:]).unionByName(unscored)
    with atomic_output(spark, out) as tmp, atomic_output(spark, quarantine) as qtmp:
        preds = scored.where(~bad).drop("quarantine_reason")
        preds.write.mode("overwrite").partitionBy(*cfg.infer.partition_by).parquet(tmp)
        rejected.select("*", *_identity(mv)).write.mode("overwrite").parquet(qtmp)
        rows_out = spark.read.parquet(tmp).count()
        q = spark.read.parquet(qtmp)
        by_code = {r["reason_code"]: r["count"] for r in q.groupBy("reason_code").count().collect()}
        rows_bad = sum(by_code.values())
        if rows_out + rows_bad != rows_in:
            raise AccountingError(f"infer: {rows_in} rows in, {rows_out} predictions + {rows_bad} quarantined written")
        if rows_bad:
            reasons = q.groupBy("reason").count().orderBy(F.desc("count")).limit(10).collect()
            log.warning("infer: %d rows quarantined to %s: %s", rows_bad, quarantine, {r[0]: r[1] for r in reasons})
        if invalid is not None and rows_in and rows_bad / rows_in > cfg.dataset.max_bad_fraction:
            raise BadDataError(
                f"infer: {rows_bad} of {rows_in} rows ({rows_bad / rows_in:.1%}) could not be scored, more than "
                f"dataset.max_bad_fraction={cfg.dataset.max_bad_fraction}; by reason {by_code}. Fix the input, "
                "or raise dataset.max_bad_fraction to accept it. Nothing was written."
            )
        metrics = {
            "rows_in": rows_in,
            "rows_scored": rows_out,
            "rows_quarantined": rows_bad,
            **{f"quarantined_{c}": n for c, n in sorted(by_code.items())},
        }
        lineage.write_meta(spark, qtmp, "infer-quarantine", fp, inputs, metrics)
        lineage.write_meta(spark, tmp, "infer", fp, inputs, metrics)
    return metrics
