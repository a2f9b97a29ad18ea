"""Shared fixtures: one real local Spark for the session, configs rooted in temp folders, tiny data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


def make_cfg(root: Path, *overrides: str, rows: int = 1500):
    """A config rooted in root (data, warehouse and the MLflow SQLite store all live there)."""
    from dlpipe.config import load_config

    return load_config(
        "local",
        [
            f"project.root={root}",
            f"dataset.generator.rows={rows}",
            "spark.master=local[2]",
            "preprocess.num_files=2",
            "train.epochs=3",
            *overrides,
        ],
        conf_dir=REPO / "conf",
    )


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    """A real Spark in local mode (2 cores), UI off, warehouse and scratch in temp folders."""
    from pyspark.sql import SparkSession

    tmp = tmp_path_factory.mktemp("spark")
    session = (
        SparkSession.builder.master("local[2]")
        .appName("dlpipe-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.default.parallelism", "2")
        .config("spark.sql.warehouse.dir", str(tmp / "warehouse"))
        .config("spark.local.dir", str(tmp / "local"))
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(autouse=True)
def _no_dangling_mlflow_run():
    yield
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run("FAILED")
