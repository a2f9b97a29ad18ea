"""One run at a time per dataset and warehouse (dlpipe.storage.runlock): a second run fails at once, or waits; a
lock left by a dead process is taken over; nothing is corrupted and the counts stay exact."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import mlflow
import pyarrow.parquet as pq
import pytest

from dlpipe.storage.runlock import LOCK
from tests.conftest import REPO, UNCHECKED_WORK

pytestmark = pytest.mark.slow


def _start(root, *more: str, to: str = "preprocess") -> subprocess.Popen:
    args = [f"project.root={root}", "dataset.generator.rows=3000", "spark.master=local[1]", *more]
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
    return subprocess.Popen(
        [sys.executable, "-m", "dlpipe", "run", "--to", to, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _lock(root):
    return root / "data" / "warehouse" / "tabular_example" / LOCK


def _wait_for_lock(root, first: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert first.poll() is None, first.communicate()[0][-3000:]
        if _lock(root).is_file() and _lock(root).read_text().strip():
            return json.loads(_lock(root).read_text())
        time.sleep(0.2)
    raise AssertionError("the first run never took the lock")


def test_a_second_run_on_the_same_dataset_fails_at_once_naming_the_first(tmp_path):
    first = _start(tmp_path)
    holder = _wait_for_lock(tmp_path, first)
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    started = time.monotonic()
    second = _start(tmp_path)
    out, _ = second.communicate(timeout=300)
    waited = time.monotonic() - started
    first_out, _ = first.communicate(timeout=600)
    assert second.returncode != 0, out[-3000:]
    assert "another dlpipe run is at work on dataset tabular_example" in out, out[-3000:]
    assert f"pid {first.pid}" in out and waited < 120
    assert first.returncode == 0, first_out[-3000:]
    assert not _lock(tmp_path).exists(), "the lock outlived its run"
    # the first run's outputs are whole: rows in = kept + quarantined, and the splits hold every kept row
    meta = json.loads((tmp_path / "data/warehouse/tabular_example/clean/_dlpipe_meta.json").read_text())
    m = meta["metrics"]
    assert m["rows_in"] == 3000 == m["rows_kept"] + m["rows_quarantined"]
    splits = json.loads((tmp_path / "data/warehouse/tabular_example/petastorm/_dlpipe_meta.json").read_text())
    assert sum(splits["metrics"][f"rows_{s}"] for s in ("train", "val", "test")) == m["rows_kept"]


def test_a_run_told_to_wait_runs_after_the_first_and_a_dead_holders_lock_is_taken_over(tmp_path):
    """Two pipeline runs that each register a model, the second (the whole pipeline, with another epoch count)
    started while the first (up to train) is at work and told to wait: both succeed, one after the other, and
    the registry holds one version per run. The second finds the first's data made from the same config and
    reuses it; its own training makes the version it registers."""
    whole = ("train.num_proc=1", *UNCHECKED_WORK)
    first = _start(tmp_path, *whole, "train.epochs=2", to="train")
    _wait_for_lock(tmp_path, first)
    second = _start(tmp_path, *whole, "train.epochs=3", "storage.lock_wait_seconds=600", to="evaluate")
    first_out, _ = first.communicate(timeout=900)
    out, _ = second.communicate(timeout=900)
    assert first.returncode == 0, first_out[-3000:]
    assert second.returncode == 0 and "waiting up to 600s" in out, out[-3000:]
    # the first run's data reused (made from the same config), the model trained again
    before_train, started_train, train_on = out.partition("stage train: start")
    assert started_train and re.search(r"preprocess: file:\S+ is up to date", before_train), out[-3000:]
    assert "train: launching" in train_on and "stage train: done" in train_on, out[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    versions = sorted(client.search_model_versions("name = 'tabular_example-classifier'"), key=lambda v: int(v.version))
    assert [str(v.version) for v in versions] == ["1", "2"], versions  # one per run, none lost or doubled
    runs = {v.run_id: client.get_run(v.run_id) for v in versions}
    assert all(r.info.status == "FINISHED" for r in runs.values()) and len(runs) == 2
    candidate = client.get_model_version_by_alias("tabular_example-classifier", "candidate")
    assert str(candidate.version) == "2", "the later run's model is the candidate"
    stages = client.search_runs(
        [client.get_experiment_by_name("dlpipe").experiment_id], "tags.`dlpipe.stage` = 'train'"
    )
    assert len(stages) == 2 and all(r.info.status == "FINISHED" for r in stages)
    # the second run's predictions cover its test split exactly
    test_rows = json.loads((tmp_path / "data/warehouse/tabular_example/petastorm/_dlpipe_meta.json").read_text())
    predictions = tmp_path / "data/warehouse/tabular_example/predictions"
    assert pq.ParquetDataset(predictions).read().num_rows == test_rows["metrics"]["rows_test"]
    # a lock whose process died (killed before it could release it) does not block the next run
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {"host": socket.gethostname(), "pid": dead.pid, "what": "pipeline run", "started": time.time()}
    _lock(tmp_path).write_text(json.dumps({**record, "heartbeat": time.time(), "token": "x"}))
    third = _start(tmp_path)
    out, _ = third.communicate(timeout=600)
    assert third.returncode == 0, out[-3000:]
    assert f"taking over from pipeline run (pid {dead.pid}" in out and "is not running" in out, out[-3000:]
    assert not _lock(tmp_path).exists()
