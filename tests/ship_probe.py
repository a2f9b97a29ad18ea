"""Submitted by tests/test_cluster.py with the shipped environment: where do the executors' Python,
dlpipe and torch come from? Prints one JSON line per task."""

import json
import sys

from pyspark.sql import SparkSession


def where(_):
    import os

    import torch

    import dlpipe
    import udfs.score

    yield json.dumps(
        {
            "executable": sys.executable,
            "prefix": sys.prefix,
            "cwd": os.getcwd(),
            "dlpipe": dlpipe.__file__,
            "udfs": udfs.score.__file__,
            "torch": torch.__file__,
        }
    )


if __name__ == "__main__":
    spark = SparkSession.builder.appName(sys.argv[1] if len(sys.argv) > 1 else "ship-probe").getOrCreate()
    for line in spark.sparkContext.parallelize(range(2), 2).mapPartitions(where).collect():
        print("PROBE " + line)
    spark.stop()
