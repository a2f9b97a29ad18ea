"""Memory sized from the machine, errors that name the setting when memory or disk runs out, progress of
long Spark jobs: dlpipe.session."""

from __future__ import annotations

import logging
import time

import pytest

from dlpipe.session import StageResourceError, driver_memory, job_description, memory_defaults, resource_error
from tests.conftest import make_cfg

GiB = 1024**3


def test_local_driver_memory_is_a_quarter_of_the_machine_within_bounds(tmp_path, monkeypatch):
    assert driver_memory(24 * GiB) == "6144m"
    assert driver_memory(2 * GiB) == "1024m"  # never below Spark's own default
    assert driver_memory(256 * GiB) == "8192m"  # nor above 8 GiB
    assert memory_defaults(make_cfg(tmp_path))["spark.driver.memory"].endswith("m")
    assert memory_defaults(make_cfg(tmp_path, "spark.conf.spark.driver.memory=3g")) == {}  # the user's wins
    assert memory_defaults(make_cfg(tmp_path, "spark.master=spark://127.0.0.1:7077")) == {}  # a cluster's own
    conf_dir = tmp_path / "spark-conf"
    conf_dir.mkdir()
    (conf_dir / "spark-defaults.conf").write_text("# an admin's defaults\nspark.driver.memory   2g\n")
    monkeypatch.setenv("SPARK_CONF_DIR", str(conf_dir))
    assert memory_defaults(make_cfg(tmp_path)) == {}  # Spark's own configuration wins too
    monkeypatch.delenv("SPARK_CONF_DIR")
    monkeypatch.setenv("SPARK_DRIVER_MEMORY", "2g")
    assert memory_defaults(make_cfg(tmp_path)) == {}


def test_a_stage_out_of_java_heap_names_itself_and_the_setting(spark):
    from py4j.protocol import Py4JJavaError

    jvm = spark.sparkContext._jvm
    with pytest.raises(Py4JJavaError) as raised:
        jvm.java.lang.reflect.Array.newInstance(jvm.java.lang.Long.TYPE, 2**30)  # 8 GiB in a 1 GiB heap
    err = resource_error(raised.value, "ingest", spark)
    assert isinstance(err, StageResourceError)
    assert str(err).startswith("stage ingest ran out of Java heap")
    assert "raise spark.conf.spark.driver.memory (now" in str(err) and "Nothing was committed" in str(err)
    assert resource_error(ValueError("a bad value"), "ingest", spark) is None


def test_a_stage_out_of_disk_names_itself_and_where_to_make_room(spark):
    with pytest.raises(OSError) as raised, open("/dev/full", "wb") as full:  # the kernel's always-full device
        full.write(b"x" * 65536)
        full.flush()
    err = resource_error(raised.value, "preprocess", spark)
    assert isinstance(err, StageResourceError)
    assert str(err).startswith("stage preprocess ran out of disk space")
    assert "spark.conf.spark.local.dir" in str(err) and "storage.warehouse" in str(err)


def test_a_long_spark_job_logs_its_progress(spark, caplog):
    caplog.set_level(logging.INFO, logger="dlpipe.session")
    with job_description(spark, "test: slow job", progress_every=0.3):
        spark.sparkContext.parallelize(range(4), 4).map(lambda x: time.sleep(0.6) or x).collect()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("test: slow job: ")]
    assert lines and all(" of 4 tasks done after " in line for line in lines)
    assert spark.sparkContext.getLocalProperty("spark.job.description") is None  # restored
