"""The SparkSession, built from config, with memory sized from the machine it runs on.

Stages hold no dataset in memory (nothing cached or collected, every write streamed), so Spark's memory
sets how fast they go, not how much data they take. Spark's own local-mode default, a 1 GiB driver heap,
is small for a modern machine, so when the user sets none the driver gets a share of this machine's
memory (`driver_memory`), and says so in the log. Any `spark.driver.memory` in conf (or spark-submit's
--driver-memory) wins. When a stage runs out of memory or disk anyway, `resource_error` turns Spark's
error into one that names the stage and the setting to change.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pyspark.sql import SparkSession

from dlpipe import redact
from dlpipe.config import Config, ConfigError
from dlpipe.storage import hadoop_s3a_conf, s3a_jars, storage_settings

log = logging.getLogger(__name__)

GiB = 1024**3
# In local mode the driver's JVM is also every executor: a quarter of the machine, at least Spark's own
# 1 GiB and at most 8 GiB (beyond that a bounded-memory stage gains little but GC pauses). The rest is left
# to the Python workers (training ranks, scorers) and the page cache that serves Parquet reads.
DRIVER_MEMORY_SHARE, DRIVER_MEMORY_MIN, DRIVER_MEMORY_MAX = 0.25, 1 * GiB, 8 * GiB


def machine_memory() -> int:
    """Physical memory of this machine, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def driver_memory(total: int) -> str:
    """The driver heap dlpipe gives local mode on a machine with `total` bytes of memory, in Spark's units."""
    share = min(max(int(total * DRIVER_MEMORY_SHARE), DRIVER_MEMORY_MIN), DRIVER_MEMORY_MAX)
    return f"{share // (1024**2)}m"


def under_spark_submit() -> bool:
    """True when spark-submit started this Python process (its --master and --conf then win)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def on_loopback(master: str) -> bool:
    """Local mode, or a cluster whose master is on this machine's loopback (`make cluster-up`): the driver
    must then be reachable on 127.0.0.1 too."""
    return master.startswith("local") or bool(re.match(r"spark://(127\.0\.0\.1|localhost)[:/]", master))


HADOOP_PREFIX = "spark.hadoop."


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
    # PySpark hands the builder's settings to spark-submit as --conf arguments: on the JVM's command line,
    # readable by anyone on the machine. Secret settings are set on the running session instead.
    secret_hadoop: dict[str, str] = {}
    secret_runtime: dict[str, str] = {}
    for key, value in cfg.spark.conf.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if not redact.is_secret_key(key):
            builder = builder.config(key, text)
        elif key.startswith(HADOOP_PREFIX):
            secret_hadoop[key[len(HADOOP_PREFIX) :]] = text
        else:
            secret_runtime[key] = text
    memory = memory_defaults(cfg)
    for key, value in memory.items():
        builder = builder.config(key, value)
    # s3a:// needs hadoop-aws + the AWS SDK on the classpath at start (under spark-submit: pass --jars)
    jars = s3a_jars(cfg)
    if jars:
        extra = cfg.spark.conf.get("spark.jars")
        builder = builder.config("spark.jars", ",".join(jars + ([str(extra)] if extra else [])))
    for key, value in hadoop_s3a_conf(storage_settings(cfg)).items():
        if redact.is_secret_key(key):
            secret_hadoop[key] = value
        else:
            builder = builder.config(f"{HADOOP_PREFIX}{key}", value)
    spark = builder.getOrCreate()
    hadoop_conf = spark.sparkContext._jsc.hadoopConfiguration()  # tasks get it with every job's Hadoop conf
    for key, value in secret_hadoop.items():
        hadoop_conf.set(key, value)
    for key, value in secret_runtime.items():
        _set_secret(spark, key, value)
    spark.sparkContext.setLogLevel(cfg.spark.log_level)
    log_memory(spark, chosen=memory)
    return spark


def _set_secret(spark: SparkSession, key: str, value: str) -> None:
    """A secret Spark setting, set on the running session (never on a command line)."""
    from pyspark.errors import AnalysisException

    try:
        spark.conf.set(key, value)
    except AnalysisException as exc:  # a static setting: only read when Spark starts
        raise ConfigError(
            f"spark.conf.{key} names a secret and Spark reads it only at start, where dlpipe would have to put it "
            "on the spark-submit command line (readable by every user of the machine); set it in a "
            f"spark-defaults.conf only you can read instead ({type(exc).__name__})"
        ) from None


def memory_defaults(cfg: Config) -> dict[str, str]:
    """spark.driver.memory for local mode when nobody chose one (conf, spark-defaults.conf, SPARK_DRIVER_MEMORY,
    spark-submit): a share of this machine. A driver already started (under spark-submit) cannot change its
    heap, so nothing is set there."""
    if under_spark_submit() or not cfg.spark.master.startswith("local") or "spark.driver.memory" in cfg.spark.conf:
        return {}
    if os.environ.get("SPARK_DRIVER_MEMORY") or _in_spark_defaults("spark.driver.memory"):
        return {}
    return {"spark.driver.memory": driver_memory(machine_memory())}


def _in_spark_defaults(key: str) -> bool:
    """Whether Spark's own spark-defaults.conf (SPARK_CONF_DIR, else SPARK_HOME/conf, else pyspark's) sets key."""
    import pyspark

    home = os.environ.get("SPARK_HOME") or os.path.dirname(pyspark.__file__)
    path = os.path.join(os.environ.get("SPARK_CONF_DIR") or os.path.join(home, "conf"), "spark-defaults.conf")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return any(line.split(None, 1)[0] == key for line in f if line.strip() and not line.lstrip().startswith("#"))


def log_memory(spark: SparkSession, chosen: dict[str, str]) -> None:
    conf = spark.sparkContext.getConf()
    total = machine_memory() / GiB
    if chosen:
        log.info(
            "spark: driver memory %s (%.0f%% of this machine's %.1f GiB, dlpipe's local default; set "
            "spark.conf.spark.driver.memory to choose)",
            chosen["spark.driver.memory"],
            100 * DRIVER_MEMORY_SHARE,
            total,
        )
    elif spark.sparkContext.master.startswith("local"):
        log.info("spark: driver memory %s (your setting)", conf.get("spark.driver.memory", "1g (Spark's default)"))
    else:
        log.info(
            "spark: executor memory %s, driver memory %s (set spark.conf.spark.executor.memory to change)",
            conf.get("spark.executor.memory", "1g (Spark's default)"),
            conf.get("spark.driver.memory", "1g (Spark's default)"),
        )


PROGRESS_EVERY_S = 30.0


@contextmanager
def job_description(spark: SparkSession, text: str, progress_every: float | None = PROGRESS_EVERY_S) -> Iterator[None]:
    """Spark jobs started inside carry `text` (the Spark UI and event log show it: what a stage's job does),
    and while they run, the log says every `progress_every` seconds how many of their tasks are done and
    when the rest should be (a pass over a big dataset is one long Spark job). None: no progress lines
    (training logs its own)."""
    sc = spark.sparkContext
    before = sc.getLocalProperty("spark.job.description")
    sc.setJobDescription(text)
    done = threading.Event()
    reporter = None
    if progress_every is not None:
        reporter = threading.Thread(target=_report_progress, args=(spark, text, progress_every, done), daemon=True)
        reporter.start()
    try:
        yield
    finally:
        done.set()
        if reporter is not None:
            reporter.join()
        sc.setJobDescription(before)  # type: ignore[arg-type]


def _report_progress(spark: SparkSession, text: str, every: float, done: threading.Event) -> None:
    tracker, started = spark.sparkContext.statusTracker(), time.monotonic()
    while not done.wait(every):
        stages = [s for s in map(tracker.getStageInfo, tracker.getActiveStageIds()) if s is not None]
        total, finished = sum(s.numTasks for s in stages), sum(s.numCompletedTasks for s in stages)
        if not total:
            continue
        elapsed = time.monotonic() - started
        eta = f", ETA {elapsed * (total - finished) / finished:.0f}s" if finished else ""
        log.info("%s: %d of %d tasks done after %.0fs%s", text, finished, total, elapsed, eta)


_OUT_OF_MEMORY = ("OutOfMemoryError", "Java heap space", "GC overhead limit exceeded")
_OUT_OF_DISK = ("No space left on device",)
_PYTHON_WORKER_DIED = ("Python worker exited unexpectedly", "MemoryError")


class StageResourceError(RuntimeError):
    """A stage ran out of memory or disk; the message names the stage and the setting to change."""


def resource_error(exc: BaseException, stage: str, spark: SparkSession) -> StageResourceError | None:
    """What to tell the user when a stage died for lack of memory or disk, or None for any other error.
    Every stage writes to a temporary folder renamed into place at the end, so nothing half-written
    remains either way."""
    text = str(exc)
    first = next((ln.strip() for ln in text.splitlines() if any(m in ln for m in (*_OUT_OF_MEMORY, *_OUT_OF_DISK))), "")
    conf = spark.sparkContext.getConf()
    local = spark.sparkContext.master.startswith("local")
    nothing = "Nothing was committed: the stage's outputs are written to a temporary folder and renamed at the end."
    if any(m in text for m in _OUT_OF_DISK):
        scratch = conf.get("spark.local.dir", "/tmp (Spark's default)")
        return StageResourceError(
            f"stage {stage} ran out of disk space ({first}): free space, or point spark.conf.spark.local.dir "
            f"(Spark's scratch for spills, now {scratch}) or storage.warehouse at a larger disk. {nothing}"
        )
    if any(m in text for m in _OUT_OF_MEMORY):
        if local:
            setting = f"spark.conf.spark.driver.memory (now {conf.get('spark.driver.memory', '1g')})"
        else:
            setting = f"spark.conf.spark.executor.memory (now {conf.get('spark.executor.memory', '1g')})"
        return StageResourceError(f"stage {stage} ran out of Java heap ({first}): raise {setting}. {nothing}")
    if any(m in text for m in _PYTHON_WORKER_DIED):
        return StageResourceError(
            f"stage {stage}: a Spark Python worker died, most often for lack of memory: raise "
            "spark.conf.spark.executor.pyspark.memory (or give the machine more memory), or lower "
            f"infer.batch_size / train.batch_size. {nothing}"
        )
    return None


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
