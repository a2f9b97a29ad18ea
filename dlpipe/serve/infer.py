"""Infer: score rows with a registered model; write predictions with their provenance.

Two inputs, one scorer (udfs/score.py):
- the test split (default): Petastorm feature cells already made by preprocess; evaluate reads these;
- new raw data (`infer.source`): read like ingest reads dataset.source (the label optional), validated with
  ingest's checks, transformed with the statistics logged with the model's own training run (so new rows
  are scaled exactly like the rows it learned from, whatever preprocess has run since), then scored.

Every row in comes out either scored or quarantined with its reason (validation or scoring), in one pass
over the input (dlpipe.storage.parquet_io: nothing cached, each row scored once), and the stage checks rows in
(counted on the way) = rows scored + rows quarantined (from the footers of what it wrote). Both outputs are
Parquet partitioned by `infer.partition_by`, written to temporary folders and renamed into place; the
quarantine holds the row's key (null where the key itself was unreadable), the reason, its code, the raw
line and the source file.

A label in new data that is not one of the model's classes does not stop a row from being scored (its
features are what the model reads): the row is scored, its `label` is null in the predictions, and the
rows are counted (`unseen_label_rows`) with a warning naming the classes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from dlpipe import redact, tracking
from dlpipe.config import Config
from dlpipe.data import drift
from dlpipe.data.features import label_index, model_stats, read_stats, transform
from dlpipe.data.ingest import (
    QUARANTINE_COLUMNS,
    BadDataError,
    quarantine_by_code,
    read_source,
    validate,
)
from dlpipe.data.stats import FittedStats
from dlpipe.model.names import variant_alias
from dlpipe.session import job_description
from dlpipe.stage import Plan, Stage, execute, require_input
from dlpipe.storage import HadoopFS, dataset_paths, lineage, resolve_uri, storage_settings
from dlpipe.storage.parquet_io import Output, write_routed
from dlpipe.tracking import ModelRef

log = logging.getLogger(__name__)

SCORING_FAILED = "scoring"  # the reason_code of rows that passed validation but could not be scored
IDENTITY = ("model_name", "model_version", "model_run_id")


def model_uri(cfg: Config) -> str:
    return cfg.infer.model_uri or f"models:/{cfg.model_name}@{variant_alias(cfg.infer.variant)}"


def _identity(mv: ModelRef) -> list:
    return [
        F.lit(mv.name).cast("string").alias("model_name"),
        F.lit(mv.version).cast("int").alias("model_version"),
        F.lit(mv.run_id).cast("string").alias("model_run_id"),
    ]


def _named(stats: FittedStats) -> list:
    """predicted_class and class_probabilities of a classifier's scored rows: the names come from the
    statistics the model was trained with (integer labels: "0", "1", ...)."""
    if stats.is_regression:
        return []
    classes = F.array(*[F.lit(c) for c in stats.class_names])
    return [
        F.element_at(classes, F.col("prediction") + 1).alias("predicted_class"),
        F.when(F.col("probabilities").isNotNull(), F.map_from_arrays(classes, F.col("probabilities"))).alias(
            "class_probabilities"
        ),
    ]


def score_rows(
    spark: SparkSession, cfg: Config, rows: DataFrame, stats: FittedStats, mv: ModelRef, carry: tuple[str, ...] = ()
) -> DataFrame:
    """rows (key, label, *carry, features) -> key, label, prediction, probabilities (classification),
    quarantine_reason (null for scored rows), *carry and the model's identity, scored in Arrow batches of
    infer.batch_size (udfs/score.py)."""
    from udfs.score import score_frame

    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.infer.batch_size))
    key = stats.key
    scored = score_frame(
        rows,
        mv.download_uri,
        stats.feature_shape,
        [key, "label", *carry],
        tracking.tracking_uri(cfg),
        regression=stats.is_regression,
        credentials=tracking.credentials(tracking.tracking_uri(cfg)),
    )
    scored = scored.select("*", *_named(stats))
    return scored.select(key, "label", *stats.output_columns, "quarantine_reason", *carry, *_identity(mv))


UNSEEN = "unseen_label_rows"


def scoring_tasks(input_bytes: int, bytes_per_task: int) -> int:
    """The most tasks that score an input of input_bytes. Each task's Python worker loads the model (in a fresh
    worker, seconds of CPU: torch, MLflow, the model), while Spark splits a small input into at least one task
    per file or per core: scoring 200 rows in two files loaded the model twice. Coalescing to this count only
    ever lowers the count, so an input larger than bytes_per_task times Spark's split keeps Spark's split."""
    return max(1, -(-input_bytes // bytes_per_task))


def _new_rows(
    spark: SparkSession, cfg: Config, source: str, stats: FittedStats
) -> tuple[DataFrame, Observation | None, Observation | None]:
    """Raw rows at source, validated: (key, label, the validation's reason columns, features), features null
    where the row failed validation; for a classifier, an Observation of the valid rows whose label is a class
    the model never saw (counted as they pass; the rows are scored all the same); and, with monitor.enabled,
    the drift watch's Observation of the valid rows' features (dlpipe.data.drift)."""
    checked = validate(read_source(spark, cfg, source, label_optional=True), cfg, scoring=True)
    rows = checked.rows()
    watched = None
    if cfg.monitor.enabled:
        rows, watched = drift.watch_rows(rows, stats, F.col("reason_code").isNull())
    unseen = None
    if not stats.is_regression:
        label = F.col(stats.label)  # typed; null where missing or where the row failed validation
        other = F.when(label.isNotNull() & label_index(stats, stats.label).isNull(), label.cast("string"))
        unseen = Observation("infer-labels")
        rows = rows.observe(
            unseen,
            F.count(other).alias(UNSEEN),
            F.approx_count_distinct(other).alias("classes"),
            F.min(other).alias("first"),
            F.max(other).alias("last"),
        )
    valid = F.col("reason_code").isNull()
    cells = transform(rows, cfg, stats, label_optional=True, carry=list(QUARANTINE_COLUMNS))
    cells = cells.select(stats.key, "label", *QUARANTINE_COLUMNS, F.when(valid, F.col("features")).alias("features"))
    return cells, unseen, watched


def _report_unseen(unseen: Observation | None, stats: FittedStats, out: str) -> dict[str, int]:
    """The unseen_label_rows metric, and a warning naming the classes (the first and last by name, and how
    many: four numbers kept whatever the data's size)."""
    if unseen is None:
        return {}
    got = unseen.get
    n = int(got[UNSEEN])
    if n:
        names = got["first"] if got["first"] == got["last"] else f"{got['first']} .. {got['last']}"
        log.warning(
            "infer: %d rows have a label the model was never trained on (about %d class(es): %s; its classes: %s). "
            "They are scored all the same; their label is null in %s",
            n,
            int(got["classes"]),
            names,
            stats.class_names,
            out,
        )
    return {UNSEEN: n}


def _unify_reasons(scored: DataFrame, stats: FittedStats, validated: bool) -> DataFrame:
    """One set of quarantine columns for both kinds of bad row: the validation's reason where there is one,
    else the scorer's."""
    failed = F.col("quarantine_reason").isNotNull()
    scoring = [
        F.col("quarantine_reason").alias("reason"),
        F.when(failed, F.lit(SCORING_FAILED)).alias("reason_code"),
        F.lit(None).cast("string").alias("raw_line"),
        F.lit(None).cast("string").alias("source_file"),
    ]
    if validated:
        scoring = [F.coalesce(F.col(c), s).alias(c) for c, s in zip(QUARANTINE_COLUMNS, scoring, strict=True)]
    keep = [stats.key, "label", *stats.output_columns, *IDENTITY]
    return scored.select(*keep, *scoring)


class Infer(Stage):
    """The test split (or infer.source's new raw data) -> predictions + quarantine, with the registered model;
    reused when the same model already scored the same input the same way."""

    name = "infer"
    accounting = ("rows_in", ("rows_scored", "rows_quarantined"))

    def plan(self, spark: SparkSession, cfg: Config) -> Plan:
        import mlflow

        paths = dataset_paths(cfg)
        uri = model_uri(cfg)
        mv = tracking.model_version_for(uri)
        if cfg.infer.source:
            source = resolve_uri(cfg.root, cfg.infer.source)
            require_input(spark, source, f"infer: input path {source} does not exist (infer.source)")
            source_fp = lineage.source_fingerprint(spark, source)
            stats = model_stats(mv, fallback=lambda: read_stats(spark, cfg))
        else:
            source = paths.split("test")
            source_fp = lineage.dataset_fingerprint(spark, paths.petastorm)
            stats = read_stats(spark, cfg)
        if mlflow.active_run() is not None:
            mlflow.set_tags(redact.tree({"dlpipe.model_uri": uri, "dlpipe.model_version": str(mv.version)}))
        inputs = {source: source_fp, uri: mv.lineage()}
        spec = cfg.infer.model_dump(mode="json", exclude={"output"})
        out = paths.infer_output
        watch = cfg.monitor.model_dump() if cfg.infer.source else None  # new thresholds: a new verdict
        fp = lineage.digest({"stage": "infer", "inputs": inputs, "infer": spec, "out": out, "monitor": watch})
        context = {"source": source, "stats": stats, "mv": mv, "uri": uri}
        return Plan(fp, inputs, {"scored": out, "quarantine": paths.infer_quarantine}, context=context)

    def compute(self, spark: SparkSession, cfg: Config, plan: Plan, tmp: dict[str, str]) -> dict:
        source, stats, mv = plan.context["source"], plan.context["stats"], plan.context["mv"]
        uri = plan.context["uri"]
        log.info("infer: scoring %s with %s (version %s, run %s)", source, uri, mv.version, mv.run_id)
        unseen = watched = predicted = None
        if cfg.infer.source:
            (rows, unseen, watched), carry = _new_rows(spark, cfg, source, stats), QUARANTINE_COLUMNS
        else:
            rows, carry = spark.read.parquet(source), ()
        seen = Observation("infer")  # rows in, counted on the way, apart from the outputs' footers
        rows = rows.observe(seen, F.count(F.lit(1)).alias("rows_in"))
        rows = rows.coalesce(scoring_tasks(HadoopFS(spark).total_bytes(source), cfg.infer.bytes_per_task))
        scored = _unify_reasons(score_rows(spark, cfg, rows, stats, mv, carry), stats, bool(carry))
        if watched is not None:
            scored, predicted = drift.watch_predictions(scored, stats)
        out = plan.outputs["scored"]
        report = partial(_report_unseen, unseen, stats, out)
        metrics = _write(spark, cfg, scored, stats, tmp, seen, bool(carry), report)
        log.info("infer: wrote %d predictions to %s", metrics["rows_scored"], out)
        if watched is not None:
            metrics.update(_drift(spark, cfg, stats, mv, watched, predicted, metrics, tmp["scored"]))
        return metrics


def _drift(
    spark: SparkSession,
    cfg: Config,
    stats: FittedStats,
    mv: ModelRef,
    watched: Observation,
    predicted: Observation,
    metrics: dict,
    folder: str,
) -> dict[str, float]:
    """The drift report of this run, from what was counted while scoring: beside the predictions
    (drift.REPORT_FILE), on the run (metrics, drift/report.json, drift/worst_features.png, the tags
    dlpipe.drift and dlpipe.drift_features); a DriftAlert, before anything is committed, when
    monitor.fail_on_alert and a threshold was passed."""
    import matplotlib.pyplot as plt
    import mlflow

    report = drift.report(
        watched.get, predicted.get, stats, metrics["rows_in"], metrics["rows_quarantined"], cfg.monitor
    )
    report["model"] = {"name": mv.name, "version": mv.version, "run_id": mv.run_id}
    HadoopFS(spark).write_json(f"{folder}/{drift.REPORT_FILE}", report)
    if mlflow.active_run() is not None:
        mlflow.log_dict(report, "drift/report.json")
        fig = drift.plot(report, cfg.monitor)
        mlflow.log_figure(fig, "drift/worst_features.png")
        plt.close(fig)
        tags = {"dlpipe.drift": report["verdict"], "dlpipe.drift_features": ",".join(report["drifted_features"])}
        mlflow.set_tags({**tags, "dlpipe.drift_model": mv.name or ""})
    if report["alerts"]:
        log.warning("infer: drift alert (%d): %s", len(report["alerts"]), "; ".join(report["alerts"]))
        if cfg.monitor.fail_on_alert:
            raise drift.DriftAlert(
                f"infer: the new data drifted from the model's training data: {'; '.join(report['alerts'])}. "
                "Nothing was written (monitor.fail_on_alert=true); the report is on the run (drift/report.json)"
            )
    else:
        log.info("infer: no drift alert (largest feature PSI %.3f)", _largest_psi(report))
    return drift.metrics(report)


def _largest_psi(report: dict) -> float:
    return max((e["psi"] for e in report["features"].values() if "psi" in e), default=0.0)


def run(spark: SparkSession, cfg: Config, force: bool = False) -> dict:
    """The infer stage; skipped when the same model already scored the same input the same way."""
    return execute(Infer(), spark, cfg, force)


def _write(
    spark: SparkSession,
    cfg: Config,
    scored: DataFrame,
    stats: FittedStats,
    tmp: dict[str, str],
    seen: Observation,
    new_data: bool,
    report: Callable[[], dict[str, int]] = dict,
) -> dict:
    """Predictions and quarantine in one pass into the stage's temporary folders; report() adds the metrics
    observed on the way (unseen labels) once the pass is done."""
    key = stats.key
    with job_description(spark, "infer: score and write predictions + quarantine"):
        written = write_routed(
            spark,
            scored,
            F.when(F.col("reason_code").isNull(), "scored").otherwise("quarantine"),
            {
                "scored": Output(tmp["scored"], [key, "label", *stats.output_columns, *IDENTITY]),
                "quarantine": Output(tmp["quarantine"], [key, *QUARANTINE_COLUMNS, *IDENTITY]),
            },
            staging=f"{tmp['scored']}-routing",
            settings=storage_settings(cfg),
            partition_by=cfg.infer.partition_by,
        )
    n_in = int(seen.get["rows_in"])
    rows_out = sum(f.rows for f in written["scored"])
    rows_bad = sum(f.rows for f in written["quarantine"])
    by_code = quarantine_by_code(spark, tmp["quarantine"]) if rows_bad else {}
    if rows_bad:
        log.warning("infer: %d rows quarantined, by reason %s", rows_bad, by_code)
    if new_data and n_in and rows_bad / n_in > cfg.dataset.max_bad_fraction:
        raise BadDataError(
            f"infer: {rows_bad} of {n_in} rows ({rows_bad / n_in:.1%}) could not be scored, more than "
            f"dataset.max_bad_fraction={cfg.dataset.max_bad_fraction}; by reason {by_code}. Fix the input, "
            "or raise dataset.max_bad_fraction to accept it. Nothing was written."
        )
    return {
        "rows_in": n_in,
        "rows_scored": rows_out,
        "rows_quarantined": rows_bad,
        **{f"quarantined_{c}": n for c, n in sorted(by_code.items())},
        **report(),
    }
