"""Data group: ingest + preprocess against Spark's own typed CSV -> Parquet conversion of the same files.

Both sides read the same generated CSV files (BENCH_ROWS rows, default 1,000,000) in the same Spark session
(the embedded defaults). The reference does nothing but parse the declared types and write Parquet: the
least any Spark job must spend to read and store these rows. Our data path validates every value,
quarantines bad rows with reasons, checks its row accounting, splits, fits statistics on the train split
and writes three Petastorm datasets.

Like with like: each side runs once to warm the JVM up (a cold JIT runs 2-3x slower), then BENCH_REPS
times (default 3), alternating, and the median counts. `data_path_vs_spark_csv` is our rows/s over the
reference's. The Spark jobs of our last round are printed as a profile (per stage, per job: wall time, task
and CPU time, GC, rows) from Spark's event log.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path

from bench.sparkprofile import event_log_conf, latest_log, profile_lines

ROOT = Path("data/bench/data-root").resolve()
ROUND = "dlpipe.bench.round"  # a Spark local property: which round a job belongs to, for the profile


def _spark_csv_to_parquet(spark, cfg, raw: str, out: str) -> float:
    """Seconds for Spark's typed CSV reader to write the files as Parquet, nothing else."""
    from pyspark.sql import types as T

    from dlpipe.data.ingest import SPARK_DATA_TYPES

    schema = T.StructType([T.StructField(c.name, SPARK_DATA_TYPES[c.type]) for c in cfg.dataset.columns])
    started = time.perf_counter()
    spark.read.schema(schema).option("header", True).csv(raw).write.mode("overwrite").parquet(out)
    return time.perf_counter() - started


def run() -> dict[str, float]:
    from dlpipe.config import load_config
    from dlpipe.data import features, ingest
    from dlpipe.data.generate import generate
    from dlpipe.session import build_spark
    from dlpipe.storage import dataset_paths

    rows = int(os.environ.get("BENCH_ROWS", "1000000"))
    reps = int(os.environ.get("BENCH_REPS", "3"))
    events = ROOT / "events"
    shutil.rmtree(events, ignore_errors=True)
    cfg = load_config(
        "local",
        [
            f"project.root={ROOT}",
            f"dataset.generator.rows={rows}",
            "dataset.generator.files=8",
            "spark.conf.spark.ui.enabled=false",
            *event_log_conf(events),
        ],
    )
    paths = dataset_paths(cfg)
    t0 = time.perf_counter()
    generate(cfg, paths.raw)
    print(f"# generated {rows} rows in {time.perf_counter() - t0:.1f}s", flush=True)

    spark = build_spark(cfg)
    reference, ingest_s, preprocess_s = [], [], []
    try:
        for rep in range(reps + 1):  # the first round warms the JVM up and is not counted
            spark.sparkContext.setLocalProperty(ROUND, str(rep))
            ref = _spark_csv_to_parquet(spark, cfg, paths.raw, str(ROOT / "spark-baseline"))
            t0 = time.perf_counter()
            ing = ingest.run(spark, cfg, force=True)
            t1 = time.perf_counter()
            pre = features.run(spark, cfg, force=True)
            t2 = time.perf_counter()
            print(f"# round {rep}: spark csv->parquet {ref:.2f}s, ingest {t1 - t0:.2f}s, preprocess {t2 - t1:.2f}s")
            if rep:
                reference.append(ref)
                ingest_s.append(t1 - t0)
                preprocess_s.append(t2 - t1)
    finally:
        spark.stop()
    for line in profile_lines(latest_log(events), ("ingest", "preprocess"), {ROUND: str(reps)}):
        print(line)
    ref_s = statistics.median(reference)
    ours_s = statistics.median([a + b for a, b in zip(ingest_s, preprocess_s, strict=True)])
    n = ing["rows_in"]
    return {
        "rows": n,
        "ingest_rows_per_s": n / statistics.median(ingest_s),
        "preprocess_rows_per_s": pre["rows_in"] / statistics.median(preprocess_s),
        "data_path_rows_per_s": n / ours_s,
        "spark_csv_to_parquet_rows_per_s": n / ref_s,
        "ingest_vs_spark_csv": ref_s / statistics.median(ingest_s),
        "data_path_vs_spark_csv": ref_s / ours_s,
    }
