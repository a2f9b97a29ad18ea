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

from dlpipe.storage.runlock import LOCK, STALE_S, RunLockedError, dataset_lock
from tests.conftest import REPO, UNCHECKED_WORK, make_cfg

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


def test_a_run_told_to_wait_runs_after_the_first(tmp_path):
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


def _holder(host: str, pid: int, heartbeat: float) -> str:
    return json.dumps(
        {
            "host": host,
            "pid": pid,
            "what": "pipeline run",
            "started": heartbeat - 60,
            "heartbeat": heartbeat,
            "token": "theirs",
        }
    )


def test_a_lock_whose_holder_is_gone_is_taken_over_and_a_live_remote_ones_is_not(spark, tmp_path, caplog):
    """A lock left behind (its run killed before it could release it) does not block the next run: on this
    host when its process is not running, on another when its heartbeat is older than STALE_S. A remote
    holder with a fresh heartbeat may still be at work: the run fails, naming it. (A killed task's retry
    taking over end to end: test_airflow.py.)"""
    cfg = make_cfg(tmp_path)
    lock = _lock(tmp_path)
    lock.parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    caplog.set_level("WARNING", logger="dlpipe.storage.runlock")
    for holder, why in [
        (_holder(socket.gethostname(), dead.pid, time.time()), f"process {dead.pid} on this host is not running"),
        (
            _holder("elsewhere.example", os.getpid(), time.time() - STALE_S - 5),
            f"no heartbeat for more than {STALE_S:.0f}s",
        ),
    ]:
        lock.write_text(holder)
        caplog.clear()
        with dataset_lock(spark, cfg, "stage ingest"):
            mine = json.loads(lock.read_text())
            assert (mine["pid"], mine["what"]) == (os.getpid(), "stage ingest")
        assert "taking over from pipeline run" in caplog.text and why in caplog.text, caplog.text
        assert not lock.exists(), "the lock outlived its run"
    lock.write_text(_holder("elsewhere.example", dead.pid, time.time()))
    with pytest.raises(RunLockedError, match=f"pipeline run \\(pid {dead.pid} on elsewhere.example"):
        with dataset_lock(spark, cfg, "stage ingest"):
            pass
    assert json.loads(lock.read_text())["token"] == "theirs", "a failed run touched another run's lock"
