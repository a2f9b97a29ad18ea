"""Data group: ingest + preprocess throughput against a single-process pyarrow CSV -> Parquet baseline.

Both read the same generated CSV files (BENCH_ROWS rows, default 1,000,000). The baseline only converts
(no validation, no split, no statistics, no tensors), so it is the floor a user compares us to: what one
Python process does with pyarrow alone. Spark's start-up is not counted; everything after it is.
A second reference, Spark's own typed CSV -> Parquet on the same files (`ingest_vs_spark_csv`), shows
how much of the gap is Spark itself and how much is our validation.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ROOT = Path("data/bench/data-root").resolve()


def _pyarrow_baseline(raw: Path, out: Path) -> tuple[int, float]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    rows = 0
    for i, path in enumerate(sorted(raw.glob("part-*.csv"))):
        opts = pacsv.ConvertOptions(strings_can_be_null=True)
        table = pacsv.read_csv(
            path, parse_options=pacsv.ParseOptions(invalid_row_handler=lambda row: "skip"), convert_options=opts
        )
        pq.write_table(table, out / f"part-{i:05d}.parquet", compression="snappy")
        rows += table.num_rows
    return rows, time.perf_counter() - started


def _spark_csv_to_parquet(spark, cfg, raw: str, out: str) -> float:
    """Seconds for Spark's typed CSV reader to write the files as Parquet, nothing else."""
    from pyspark.sql import types as T

    kinds = {"long": T.LongType(), "int": T.IntegerType(), "double": T.DoubleType(), "string": T.StringType()}
    schema = T.StructType([T.StructField(c.name, kinds[c.type]) for c in cfg.dataset.columns])
    started = time.perf_counter()
    spark.read.schema(schema).option("header", True).csv(raw).write.mode("overwrite").parquet(out)
    return time.perf_counter() - started


def run() -> dict[str, float]:
    from dlpipe import features, ingest
    from dlpipe.config import load_config
    from dlpipe.generate import generate
    from dlpipe.session import build_spark
    from dlpipe.storage import dataset_paths, local_path

    rows = int(os.environ.get("BENCH_ROWS", "1000000"))
    cfg = load_config(
        "local",
        [
            f"project.root={ROOT}",
            f"dataset.generator.rows={rows}",
            "dataset.generator.files=8",
            "spark.conf.spark.ui.enabled=false",
            "preprocess.num_files=8",
        ],
    )
    paths = dataset_paths(cfg)
    t0 = time.perf_counter()
    generate(cfg, paths.raw)
    print(f"# generated {rows} rows in {time.perf_counter() - t0:.1f}s", flush=True)

    base_rows, base_s = _pyarrow_baseline(local_path(paths.raw), ROOT / "pyarrow-baseline")
    spark = build_spark(cfg)
    try:
        spark.range(1).count()  # JVM and Python workers warm, outside the timings
        spark_csv_s = _spark_csv_to_parquet(spark, cfg, paths.raw, str(ROOT / "spark-baseline"))
        t0 = time.perf_counter()
        ing = ingest.run(spark, cfg, force=True)
        ingest_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pre = features.run(spark, cfg, force=True)
        preprocess_s = time.perf_counter() - t0
    finally:
        spark.stop()
    ours = ing["rows_in"] / (ingest_s + preprocess_s)
    baseline = base_rows / base_s
    return {
        "rows": ing["rows_in"],
        "ingest_rows_per_s": ing["rows_in"] / ingest_s,
        "preprocess_rows_per_s": pre["rows_in"] / preprocess_s,
        "ingest_plus_preprocess_rows_per_s": ours,
        "pyarrow_csv_to_parquet_rows_per_s": baseline,
        "spark_csv_to_parquet_rows_per_s": ing["rows_in"] / spark_csv_s,
        "ingest_vs_spark_csv": spark_csv_s / ingest_s,
        "preprocess_vs_pyarrow": ours / baseline,
    }
