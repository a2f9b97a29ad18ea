"""Ingest: raw files -> a clean Parquet dataset and a quarantine dataset with one reason per bad row.

Every value is read as a string first (images: decoded to ndarrays on the executors) and checked here, so
a bad value becomes a reason instead of a silent null: malformed line, missing value, wrong type,
NaN/inf, out of the declared range, not an allowed value, undecodable image, wrong image shape. The stage
checks its own books: rows in = rows kept + rows quarantined, counted from what was written, or it fails
and commits nothing. More bad rows than `dataset.max_bad_fraction` also fail it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from dlpipe import lineage
from dlpipe.config import ColumnSpec, Config
from dlpipe.storage import HadoopFS, atomic_output, dataset_paths

log = logging.getLogger(__name__)

CORRUPT = "_corrupt_record"
PRE_REASON = "_pre_reason"  # a reason found while reading (image decoding)
SPARK_TYPES = {"int": "int", "long": "bigint", "float": "float", "double": "double", "string": "string"}
NUMERIC = {"int", "long", "float", "double"}


class AccountingError(RuntimeError):
    """Rows went missing between input and outputs."""


class BadDataError(ValueError):
    """More rows failed validation than dataset.max_bad_fraction allows."""


class SchemaMismatchError(ValueError):
    """The files do not have the columns the dataset declares."""


# --- reading -------------------------------------------------------------------------------------------
def reader_options(cfg: Config) -> dict[str, str]:
    """dataset.source.options as Spark reader options (YAML booleans as Spark's "true"/"false")."""
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in cfg.dataset.source.options.items()}


def read_raw(spark: SparkSession, cfg: Config, uri: str, label_optional: bool = False) -> DataFrame:
    """Declared columns as strings (images as NdarrayCodec cells), plus the malformed record and source file.

    label_optional (scoring new data): files may lack the label column; it then reads as null.
    The caller has checked that uri exists (it must, to fingerprint it first)."""
    fmt = cfg.dataset.source.format
    if fmt == "image":
        return _read_images(spark, cfg, uri)
    label = cfg.dataset.column("label").name
    columns = cfg.dataset.columns
    if label_optional and not _has_column(spark, cfg, uri, label):
        columns = [c for c in columns if c.name != label]
    schema = T.StructType(
        [T.StructField(c.name, T.StringType()) for c in columns] + [T.StructField(CORRUPT, T.StringType())]
    )
    opts = reader_options(cfg)
    if fmt == "csv":
        reader = spark.read.schema(schema).options(**{"header": "true", "enforceSchema": "false", **opts})
        df = reader.option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", CORRUPT).csv(uri)
    elif fmt == "jsonl":
        reader = spark.read.schema(schema).options(**opts).option("mode", "PERMISSIVE")
        df = reader.option("columnNameOfCorruptRecord", CORRUPT).json(uri)
    else:  # parquet: typed already; check the columns exist, then the same string-first checks
        df = spark.read.options(**opts).parquet(uri)
        missing = [c.name for c in columns if c.name not in df.columns]
        if missing:
            raise SchemaMismatchError(
                f"ingest: {uri} has no column(s) {missing} declared in dataset.columns; it has {df.columns}"
            )
        df = df.select(
            *[F.col(c.name).cast("string").alias(c.name) for c in columns], F.lit(None).cast("string").alias(CORRUPT)
        )
    if len(columns) < len(cfg.dataset.columns):
        df = df.withColumn(label, F.lit(None).cast("string"))
    return df.withColumn("_source_file", F.input_file_name()).withColumn(PRE_REASON, F.lit(None).cast("string"))


def _has_column(spark: SparkSession, cfg: Config, uri: str, name: str) -> bool:
    """Whether the files at uri have column `name`: the CSV header or the Parquet schema (JSON lines
    need no answer: a field absent from a line reads as null)."""
    fmt = cfg.dataset.source.format
    opts = reader_options(cfg)
    if fmt == "csv":
        return name in spark.read.options(**{"header": "true", **opts}).csv(uri).columns
    if fmt == "parquet":
        return name in spark.read.options(**opts).parquet(uri).columns
    return True


def _decode_images(shape: tuple[int, ...], image: str):
    def decode(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import io

        import numpy as np
        from PIL import Image, UnidentifiedImageError

        from dlpipe.tensors import encode_rows

        mode = "L" if len(shape) == 2 or shape[2] == 1 else "RGB"
        for pdf in batches:
            cells, reasons = [], []
            for content in pdf["content"]:
                try:
                    with Image.open(io.BytesIO(content)) as img:
                        arr = np.asarray(img.convert(mode), dtype=np.uint8).reshape(-1)
                        size = img.size
                except (UnidentifiedImageError, OSError, ValueError) as exc:
                    cells.append(None)
                    reasons.append(f"not a decodable image: {type(exc).__name__}")
                    continue
                if (size[1], size[0]) != tuple(shape[:2]) or arr.size != int(np.prod(shape)):
                    cells.append(None)
                    reasons.append(f"image shape {size[1]}x{size[0]} is not the declared {'x'.join(map(str, shape))}")
                    continue
                cells.append(encode_rows(arr.reshape(1, *shape))[0])
                reasons.append(None)
            yield pd.DataFrame({"path": pdf["path"], image: cells, PRE_REASON: reasons})

    return decode


def _read_images(spark: SparkSession, cfg: Config, uri: str) -> DataFrame:
    src = cfg.dataset.source
    opts = reader_options(cfg)
    files = spark.read.format("binaryFile").options(**opts).load(uri)
    col = cfg.dataset.image_column
    key, label = cfg.dataset.column("key").name, cfg.dataset.column("label").name
    out_schema = f"path string, {col.name} binary, {PRE_REASON} string"
    decoded = files.select("path", "content").mapInPandas(_decode_images(tuple(col.shape), col.name), schema=out_schema)
    extracted = F.regexp_extract("path", src.label_from_path, 1)
    return decoded.select(
        F.col("path").alias(key),
        F.col(col.name),
        F.when(extracted == "", None).otherwise(extracted).alias(label),
        F.lit(None).cast("string").alias(CORRUPT),
        F.col("path").alias("_source_file"),
        F.col(PRE_REASON),
    )


# --- validating ----------------------------------------------------------------------------------------
def _typed(col: ColumnSpec) -> Column:
    """The typed value, or null when the text is not of the declared type.

    Integers also accept integral decimal text ("3.0", "1e3": what a float column or a spreadsheet export
    holds for a whole number), exactly within 2**53; "1.5" stays a type error.
    """
    if col.type in ("string", "image"):
        return F.col(col.name)
    text = f"trim(`{col.name}`)"
    if col.type in ("int", "long"):
        whole = f"try_cast({text} AS double)"
        via_double = (
            f"CASE WHEN {whole} = floor({whole}) AND abs({whole}) < 9007199254740992 THEN CAST({whole} AS bigint) END"
        )
        return F.expr(f"try_cast(coalesce(try_cast({text} AS bigint), {via_double}) AS {SPARK_TYPES[col.type]})")
    return F.expr(f"try_cast({text} AS {SPARK_TYPES[col.type]})")


def _t(name: str) -> Column:
    """The typed value of a column, computed once per row by `validate`."""
    return F.col(f"__t_{name}")


def _checks(cfg: Config, scoring: bool = False) -> list[tuple[Column, Column, str]]:
    """(condition, reason, code) in the order they are tried; a row gets the first that applies.

    Conditions read the typed columns `validate` computed once; reasons are only built for bad rows.
    scoring: rows to be scored, not learned from; the label is not checked (new data has none).
    """
    checks: list[tuple[Column, Column, str]] = [
        (F.col(CORRUPT).isNotNull(), F.lit("malformed line: wrong number of fields or bad syntax"), "malformed"),
        (F.col(PRE_REASON).isNotNull(), F.col(PRE_REASON), "image"),
    ]
    label = cfg.dataset.column("label")
    for col in cfg.dataset.columns:
        if scoring and col.name == label.name:
            continue
        raw, typed = F.col(col.name), _t(col.name)
        empty = raw.isNull() if col.type == "image" else (raw.isNull() | (F.trim(raw) == ""))
        if col.required or col.role in ("key", "label"):
            checks.append((empty, F.lit(f"missing value: {col.name}"), "missing"))
        if col.type in NUMERIC:
            article = "an" if col.type == "int" else "a"
            checks.append(
                (~empty & typed.isNull(), F.concat(F.lit(f"not {article} {col.type}: {col.name}="), raw), "type")
            )
            if col.type in ("float", "double"):
                bad = F.isnan(typed) | (F.abs(typed) == float("inf"))
                checks.append((bad, F.concat(F.lit(f"not finite: {col.name}="), raw), "not_finite"))
            if col.min is not None or col.max is not None:
                low = typed < F.lit(col.min) if col.min is not None else F.lit(False)
                high = typed > F.lit(col.max) if col.max is not None else F.lit(False)
                msg = F.lit(f"out of range [{col.min}, {col.max}]: {col.name}=")
                checks.append((low | high, F.concat(msg, raw), "range"))
        if col.type == "string" and col.values is not None:
            bad = ~empty & ~raw.isin(col.values)
            checks.append((bad, F.concat(F.lit(f"not an allowed value of {col.name}: "), raw), "value"))
    if scoring or cfg.dataset.task == "regression":  # a regression label is checked like any number
        return checks
    k, typed_label = cfg.dataset.num_classes, _t(label.name)
    checks.append(
        (
            (typed_label < 0) | (typed_label >= k),
            F.concat(F.lit(f"label out of range [0, {k}): {label.name}="), F.col(label.name)),
            "label_range",
        )
    )
    return checks


def validate(df: DataFrame, cfg: Config, scoring: bool = False) -> DataFrame:
    """Add typed columns `__t_<name>` and `_check`: the index of the first failed check, null if good.

    Two projections on purpose: Spark does not merge them when that would repeat the casts, so each
    value is parsed once per row instead of once per check.
    """
    typed = df.select("*", *[_typed(c).alias(f"__t_{c.name}") for c in cfg.dataset.columns])
    check = F.coalesce(*[F.when(cond, F.lit(i)) for i, (cond, _, _) in enumerate(_checks(cfg, scoring))])
    return typed.withColumn("_check", check)


def typed_clean(df: DataFrame, cfg: Config) -> DataFrame:
    return df.where(F.col("_check").isNull()).select(*[_t(c.name).alias(c.name) for c in cfg.dataset.columns])


def quarantine_rows(df: DataFrame, cfg: Config, scoring: bool = False, keep: Sequence[str] = ()) -> DataFrame:
    """One row per bad input row: the raw text of the keep columns, its reason, reason code, the raw text
    and the file it came from."""
    checks = _checks(cfg, scoring)
    by_index = lambda part: F.coalesce(*[F.when(F.col("_check") == i, c[part]) for i, c in enumerate(checks)])  # noqa: E731
    codes = [F.lit(c) for _, _, c in checks]
    text_cols = [c.name for c in cfg.dataset.columns if c.type != "image"]
    raw_line = F.coalesce(F.col(CORRUPT), F.concat_ws(",", *[F.coalesce(F.col(c), F.lit("")) for c in text_cols]))
    return df.where(F.col("_check").isNotNull()).select(
        *keep,
        by_index(1).alias("reason"),
        F.element_at(F.array(*codes), F.col("_check") + 1).alias("reason_code"),
        raw_line.alias("raw_line"),
        F.col("_source_file").alias("source_file"),
    )


def _explain_spark_error(exc: Exception, uri: str) -> Exception | None:
    text = str(exc)
    if "does not conform to the schema" in text:
        detail = [
            ln.strip() for ln in text.splitlines() if ln.strip().startswith(("Expected:", "CSV file:", "Header:"))
        ]
        return SchemaMismatchError(
            f"ingest: {uri}: CSV header does not match dataset.columns: " + "; ".join(detail[:3])
        )
    return None


# --- the stage -----------------------------------------------------------------------------------------
def fingerprint(spark: SparkSession, cfg: Config) -> tuple[str, dict[str, str]]:
    paths = dataset_paths(cfg)
    inputs = {paths.raw: lineage.source_fingerprint(spark, paths.raw)}
    spec = cfg.dataset.model_dump(mode="json", exclude={"generator", "split"})
    return lineage.digest({"stage": "ingest", "inputs": inputs, "dataset": spec}), inputs


def run(spark: SparkSession, cfg: Config, force: bool = False) -> dict:
    """The ingest stage. Returns metrics: rows_in, rows_kept, rows_quarantined, quarantined_<code>."""
    paths = dataset_paths(cfg)
    if not HadoopFS(spark).exists(paths.raw):
        raise FileNotFoundError(f"ingest: input path {paths.raw} does not exist (dataset.source.uri)")
    fp, inputs = fingerprint(spark, cfg)
    done = None if force else lineage.reusable(spark, paths.clean, fp)
    if done and HadoopFS(spark).exists(paths.quarantine):
        log.info("ingest: %s is up to date (fingerprint %s), skipping; use --force to redo", paths.clean, fp)
        lineage.log_lineage("ingest", fp, inputs, [paths.clean, paths.quarantine], skipped=True)
        return {**done["metrics"], "skipped": 1}
    try:
        metrics = _ingest(spark, cfg, paths, fp, inputs)
    except Exception as exc:
        clear = _explain_spark_error(exc, paths.raw)
        if clear is not None:
            raise clear from None
        raise
    lineage.log_lineage("ingest", fp, inputs, [paths.clean, paths.quarantine], skipped=False)
    return {**metrics, "skipped": 0}


def _ingest(spark: SparkSession, cfg: Config, paths, fp: str, inputs: dict[str, str]) -> dict:
    raw = read_raw(spark, cfg, paths.raw)
    # parsed and checked once, kept (spilling to local disk when large) for the count and both writes
    checked = validate(raw, cfg).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        return _write_outputs(spark, cfg, paths, checked, fp, inputs)
    finally:
        checked.unpersist()


def _write_outputs(
    spark: SparkSession, cfg: Config, paths, checked: DataFrame, fp: str, inputs: dict[str, str]
) -> dict:
    rows_in = checked.count()
    if rows_in == 0:
        raise ValueError(f"ingest: no rows in {paths.raw} (dataset.source.uri): the input is empty")
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
        bad_share = quarantined / rows_in
        if bad_share > cfg.dataset.max_bad_fraction:
            examples = [f"{r['reason']} ({r['source_file']})" for r in quarantine.limit(3).collect()]
            raise BadDataError(
                f"ingest: {quarantined} of {rows_in} rows ({bad_share:.1%}) failed validation, more than "
                f"dataset.max_bad_fraction={cfg.dataset.max_bad_fraction}; by reason {by_code}; e.g. {examples}. "
                "Fix the input, or raise dataset.max_bad_fraction to accept it. Nothing was written."
            )
        metrics = {
            "rows_in": rows_in,
            "rows_kept": kept,
            "rows_quarantined": quarantined,
            "bad_fraction": bad_share,
            **{f"quarantined_{c}": n for c, n in sorted(by_code.items())},
        }
        lineage.write_meta(spark, clean_tmp, "ingest", fp, inputs, metrics)
        lineage.write_meta(spark, q_tmp, "ingest", fp, inputs, metrics)
    return metrics
