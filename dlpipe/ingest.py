"""Ingest: raw files -> a clean Parquet dataset and a quarantine dataset with one reason per bad row.

Every value is read as a string first and cast here, so a bad value becomes a reason instead of a silent
null. The stage checks its own books: rows in = rows kept + rows quarantined, counted from what was
written, or it fails and commits nothing.
"""

from __future__ import annotations

import logging

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from dlpipe.config import ColumnSpec, Config
from dlpipe.storage import HadoopFS, atomic_output, dataset_paths

log = logging.getLogger(__name__)

CORRUPT = "_corrupt_record"
SPARK_TYPES = {"int": "int", "long": "bigint", "float": "float", "double": "double", "string": "string"}
NUMERIC = {"int", "long", "float", "double"}


class AccountingError(RuntimeError):
    """Rows went missing between input and outputs."""


def read_raw(spark: SparkSession, cfg: Config, uri: str) -> DataFrame:
    """The raw files with every declared column as a string, plus the malformed line and its file."""
    fs = HadoopFS(spark)
    if not fs.exists(uri):
        raise FileNotFoundError(f"ingest: input path {uri} does not exist (dataset.raw_uri)")
    schema = T.StructType(
        [T.StructField(c.name, T.StringType()) for c in cfg.dataset.columns] + [T.StructField(CORRUPT, T.StringType())]
    )
    df = (
        spark.read.schema(schema)
        .option("header", True)
        .option("mode", "PERMISSIVE")
        .option("columnNameOfCorruptRecord", CORRUPT)
        .option("enforceSchema", False)
        .csv(uri)
    )
    return df.withColumn("_source_file", F.input_file_name())


def _reason(cfg: Config) -> tuple[Column, Column]:
    """(reason, code) for the first check a row fails, null for a good row."""
    checks: list[tuple[Column, Column, str]] = [
        (F.col(CORRUPT).isNotNull(), F.lit("malformed line: wrong number of fields"), "malformed"),
    ]
    label = cfg.dataset.column("label")
    for col in cfg.dataset.columns:
        raw = F.col(col.name)
        empty = raw.isNull() | (F.trim(raw) == "")
        if col.required or col.role in ("key", "label"):
            checks.append((empty, F.lit(f"missing value: {col.name}"), "missing"))
        if col.type in NUMERIC:
            typed = _typed(col)
            checks.append((~empty & typed.isNull(), F.concat(F.lit(f"not a {col.type}: {col.name}="), raw), "type"))
            if col.type in ("float", "double"):
                checks.append(
                    (
                        typed.isNotNull() & (F.isnan(typed) | (F.abs(typed) == float("inf"))),
                        F.concat(F.lit(f"not finite: {col.name}="), raw),
                        "not_finite",
                    )
                )
    k = cfg.dataset.num_classes
    typed_label = _typed(label)
    checks.append(
        (
            typed_label.isNotNull() & ((typed_label < 0) | (typed_label >= k)),
            F.concat(F.lit(f"label out of range [0, {k}): {label.name}="), F.col(label.name)),
            "label_range",
        )
    )
    reason = F.coalesce(*[F.when(cond, msg) for cond, msg, _ in checks])
    code = F.coalesce(*[F.when(cond, F.lit(c)) for cond, _, c in checks])
    return reason, code


def _typed(col: ColumnSpec) -> Column:
    if col.type == "string":
        return F.col(col.name)
    return F.expr(f"try_cast(trim(`{col.name}`) AS {SPARK_TYPES[col.type]})")


def validate(df: DataFrame, cfg: Config) -> DataFrame:
    """Add `_reason` and `_reason_code` (null when the row is good)."""
    reason, code = _reason(cfg)
    return df.withColumn("_reason", reason).withColumn("_reason_code", code)


def typed_clean(df: DataFrame, cfg: Config) -> DataFrame:
    return df.where(F.col("_reason").isNull()).select(*[_typed(c).alias(c.name) for c in cfg.dataset.columns])


def quarantine_rows(df: DataFrame, cfg: Config) -> DataFrame:
    raw_line = F.coalesce(
        F.col(CORRUPT), F.concat_ws(",", *[F.coalesce(F.col(c.name), F.lit("")) for c in cfg.dataset.columns])
    )
    return df.where(F.col("_reason").isNotNull()).select(
        F.col("_reason").alias("reason"),
        F.col("_reason_code").alias("reason_code"),
        raw_line.alias("raw_line"),
        F.col("_source_file").alias("source_file"),
    )


def run(spark: SparkSession, cfg: Config) -> dict:
    """The ingest stage. Returns metrics: rows_in, rows_kept, rows_quarantined, quarantined_<code>."""
    paths = dataset_paths(cfg)
    raw = read_raw(spark, cfg, paths.raw)
    checked = validate(raw, cfg)
    rows_in = raw.count()
    if rows_in == 0:
        raise ValueError(f"ingest: no rows in {paths.raw} (dataset.raw_uri): the input is empty")
    log.info("ingest: %d rows in from %s", rows_in, paths.raw)
    with atomic_output(spark, paths.clean) as clean_tmp, atomic_output(spark, paths.quarantine) as q_tmp:
        typed_clean(checked, cfg).write.mode("overwrite").parquet(clean_tmp)
        quarantine_rows(checked, cfg).write.mode("overwrite").parquet(q_tmp)
        kept = spark.read.parquet(clean_tmp).count()
        quarantine = spark.read.parquet(q_tmp)
        by_code = {r["reason_code"]: r["count"] for r in quarantine.groupBy("reason_code").count().collect()}
        quarantined = sum(by_code.values())
        if rows_in != kept + quarantined:
            raise AccountingError(
                f"ingest: rows in ({rows_in}) != rows kept ({kept}) + rows quarantined ({quarantined})"
            )
    log.info("ingest: kept %d, quarantined %d %s", kept, quarantined, by_code)
    metrics = {"rows_in": rows_in, "rows_kept": kept, "rows_quarantined": quarantined}
    metrics.update({f"quarantined_{code}": n for code, n in sorted(by_code.items())})
    return metrics
