"""The SparkSession, built from config."""

from __future__ import annotations

import os
import re
import sys

from pyspark.sql import SparkSession

from dlpipe.config import Config
from dlpipe.storage import hadoop_s3a_conf, s3a_jars, storage_settings


def under_spark_submit() -> bool:
    """True when spark-submit started this Python process (its --master and --conf then win)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def on_loopback(master: str) -> bool:
    """Local mode, or a cluster whose master is on this machine's loopback (`make cluster-up`): the driver
    must then be reachable on 127.0.0.1 too."""
    return master.startswith("local") or bool(re.match(r"spark://(127\.0\.0\.1|localhost)[:/]", master))


def build_spark(cfg: Config) -> SparkSession:
    """Create (or get) the session for cfg: master, app name and every `spark.*` setting from conf/.

    In local mode (or against a cluster on loopback) everything binds 127.0.0.1: on many machines the
    first non-loopback address is one that nothing can reach, and Spark (and Gloo later) would hang on it.
    """
    master = cfg.spark.master
    builder = SparkSession.builder.appName(cfg.spark.app_name)
    if not under_spark_submit():
        builder = builder.master(master)
    if on_loopback(master):
        # Python workers run this interpreter (the project's venv), not whatever python3 is on PATH.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
    for key, value in cfg.spark.conf.items():
        builder = builder.config(key, str(value).lower() if isinstance(value, bool) else str(value))
    # s3a:// needs hadoop-aws + the AWS SDK on the classpath at start (under spark-submit: pass --jars)
    jars = s3a_jars(cfg)
    if jars:
        extra = cfg.spark.conf.get("spark.jars")
        builder = builder.config("spark.jars", ",".join(jars + ([str(extra)] if extra else [])))
    for key, value in hadoop_s3a_conf(storage_settings(cfg)).items():
        builder = builder.config(f"spark.hadoop.{key}", value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.spark.log_level)
    return spark


def stop_spark(spark: SparkSession) -> None:
    """Stop the session and let a spark-submit driver's JVM exit.

    Spark 3.5 keeps a non-daemon java.util.Timer in BarrierTaskContext's companion object, created by the
    first barrier()/allGather() in a JVM. In local mode the tasks run in the driver's JVM, so after a barrier
    stage (train) `spark-submit` never exits once the Python driver returns. Cancelled only under spark-submit,
    at the end of the application: a later barrier() in the same JVM would fail."""
    spark.stop()
    if under_spark_submit():
        try:
            module = spark._jvm.java.lang.Class.forName("org.apache.spark.BarrierTaskContext$").getField("MODULE$")
            getattr(module.get(None), "org$apache$spark$BarrierTaskContext$$timer")().cancel()
        except Exception as exc:  # never fail a finished job over this
            print(f"dlpipe: could not stop Spark's barrier timer ({exc}); spark-submit may not exit", file=sys.stderr)
