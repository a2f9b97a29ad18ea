"""Bounded memory: ingest and preprocess run on data well beyond the driver's heap.

A run of 10M rows once died in ingest with `OutOfMemoryError: Java heap space` on a 1 GiB heap: a
persisted dataset read back into memory. No stage holds a dataset in memory now; this test gives the
driver (which in local mode is also every executor) a 256 MiB heap, a quarter of what failed, and feeds it
3.5M rows: 1.1 times the heap in CSV (a dataset held in memory needs more than its CSV's bytes). Spark
refuses a heap under 1.5 times the 300 MiB it reserves for itself, so the reserve is set to 100 MiB
(`spark.testing.reservedMemory`, Spark's own knob for small test heaps): its pool for storage and execution
is then 88 MiB, less than a 512 MiB heap's 127 MiB. Half the rows of a 512 MiB run, the same bound: the
test took 175-180 CPU-seconds instead of 228 here. The 10M rows themselves, and 20M, on Spark's defaults,
are `make bench ONLY=scale`'s: this test guards the bound in the suite's time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

HEAP_MB = 256
ROWS = 3_500_000  # about 0.28 GiB of CSV, 1.1 times the heap (the run that once died had 10M)
RESERVED_MB = 100  # what Spark keeps back from the heap (300 by default, which needs a heap of 450 or more)


def test_ingest_and_preprocess_run_on_data_beyond_a_small_driver_heap(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "dlpipe",
        "run",
        "--to",
        "preprocess",
        f"project.root={tmp_path}",
        f"dataset.generator.rows={ROWS}",
        "dataset.generator.files=8",
        "spark.master=local[2]",
        f"spark.conf.spark.driver.memory={HEAP_MB}m",
        f"spark.conf.spark.testing.reservedMemory={RESERVED_MB * 1024**2}",
        "spark.conf.spark.ui.enabled=false",
    ]
    env = {k: v for k, v in os.environ.items() if k != "JAVA_TOOL_OPTIONS"}  # Java's full JIT, as users run it
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert f"spark: driver memory {HEAP_MB}m (your setting)" in log

    warehouse = tmp_path / "data" / "warehouse" / "tabular_example"
    csv_bytes = sum(p.stat().st_size for p in (tmp_path / "data" / "raw" / "tabular_example").glob("*.csv"))
    assert csv_bytes > 1.05 * HEAP_MB * 1024**2, f"only {csv_bytes / 1024**2:.0f} MB of CSV"

    ingest = json.loads((warehouse / "clean" / "_dlpipe_meta.json").read_text())["metrics"]
    assert ingest["rows_in"] == ROWS == ingest["rows_kept"] + ingest["rows_quarantined"]
    assert ingest["rows_quarantined"] == round(ROWS * 0.03)  # the generator's malformed lines
    pre = json.loads((warehouse / "petastorm" / "_dlpipe_meta.json").read_text())["metrics"]
    assert pre["rows_in"] == ingest["rows_kept"] == pre["rows_train"] + pre["rows_val"] + pre["rows_test"]
    assert (warehouse / "petastorm" / "train" / "_common_metadata").is_file()
