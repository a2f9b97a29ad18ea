"""A class-data-sharing archive of Spark's classes (JDK AppCDS) for every JVM the tests start.

The suite starts dozens of Spark JVMs (jobs, spark-submit, the notebooks' kernels, Airflow's tasks, the
cluster's executors), each for seconds on tiny data, and each loads and verifies the same few thousand
classes from Spark's jars. Mapped from an archive made once, a small Spark application took 8 CPU-seconds
instead of 11-13 (7 s of wall time instead of 9.5-11; measured, three runs each). A JVM whose class path
differs (the HDFS daemons) cannot use the archive and runs as it would without it, silently."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# The work whose classes go into the archive: what the tests' Spark does (CSV, Parquet, Arrow and pandas
# UDFs, an RDD), on a few rows; the JVM writes the archive when it exits, so wait for it.
DUMP = r"""
import os, sys
from pyspark.sql import SparkSession, functions as F

work = os.getcwd()  # a temporary folder of the caller's, removed afterwards
s = (
    SparkSession.builder.master("local[2]")
    .config("spark.ui.enabled", "false")
    .config("spark.driver.extraJavaOptions", "-XX:ArchiveClassesAtExit=" + sys.argv[1])
    .getOrCreate()
)
df = s.range(1000).withColumn("x", F.rand(1)).withColumn("c", (F.col("id") % 3).cast("string"))
df.write.option("header", True).csv(work + "/csv")
csv = s.read.option("header", True).schema("id long, x double, c string").csv(work + "/csv")
csv.write.parquet(work + "/pq")
pq = s.read.parquet(work + "/pq")
pq.groupBy("c").agg(F.mean("x"), F.count("*")).collect()
pq.mapInArrow(lambda it: it, pq.schema).count()
pq.mapInPandas(lambda it: it, pq.schema).count()
s.sparkContext.parallelize(range(4), 2).barrier().mapPartitions(lambda it: it).collect()
s.stop()
from pyspark import SparkContext
proc = SparkContext._gateway.proc
SparkContext._gateway.shutdown()
proc.stdin.close()  # the JVM ends when its stdin closes, and writes the archive as it goes
sys.exit(proc.wait(timeout=120))
"""


def _key() -> str:
    """What the archive is only valid for: this JVM build and this Spark's jars."""
    import pyspark

    java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=60).stderr
    return hashlib.sha256(f"{java}\n{pyspark.__version__}\n{pyspark.__file__}".encode()).hexdigest()[:16]


def spark_class_archive(cache: Path) -> Path | None:
    """The archive for this JVM and Spark under cache/jvm, made (once, under a lock: parallel test workers
    may race) if missing; None, saying why on stderr, when it cannot be made (the tests then run without)."""
    folder = cache / "jvm"
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / f"spark-classes-{_key()}.jsa"
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if archive.is_file():
            return archive
        partial = archive.with_name(f"{archive.name}.{os.getpid()}.tmp")
        env = {**os.environ, "JAVA_TOOL_OPTIONS": "", "SPARK_LOCAL_IP": "127.0.0.1"}
        env.setdefault("PYSPARK_PYTHON", sys.executable)
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                [sys.executable, "-c", DUMP, str(partial)],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
        if proc.returncode != 0 or not partial.is_file():
            partial.unlink(missing_ok=True)
            said = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            sys.stderr.write(f"tests: no Spark class archive (the JVMs start without it): {' | '.join(said)}\n")
            return None
        partial.replace(archive)
        return archive
