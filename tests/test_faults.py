"""Faults beyond a killed rank: ingest killed mid-write, a task lost and retried, a warehouse that runs out of
space. Each leaves nothing readable half-written, and the counts of the run that follows stay exact."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dlpipe.data import ingest
from dlpipe.data.generate import generate
from dlpipe.storage import dataset_paths, local_path
from tests.conftest import REPO, cfg_overrides, job_env, kill_once_it_writes, make_cfg

pytestmark = pytest.mark.slow


def _expect_exact(m: dict, manifest: dict) -> None:
    """Ingest's counts against the generator's ground truth: every line in, each bad one quarantined."""
    bad = sum(manifest["malformed"].values())
    assert m["rows_in"] == manifest["rows_written"] == m["rows_kept"] + m["rows_quarantined"], m
    assert m["rows_quarantined"] == bad, (m, manifest["malformed"])


def test_killed_ingest_leaves_nothing_readable_and_a_rerun_is_correct(spark, tmp_path):
    cfg = make_cfg(tmp_path, rows=100_000)
    paths = dataset_paths(cfg)
    manifest = generate(cfg, paths.raw)
    dataset = local_path(paths.clean).parent
    argv = [sys.executable, "jobs/ingest.py", *cfg_overrides(tmp_path, rows=100_000)]
    kill_once_it_writes(argv, dataset, "*.tmp-*/**/*.parquet")
    for name in ("clean", "quarantine"):
        assert not (dataset / name).exists(), f"a killed ingest left {name} under its final name"
    assert list(dataset.glob("*.tmp-*")), "expected the killed run's temporary folders"

    m = ingest.run(spark, cfg)
    _expect_exact(m, manifest)
    assert not list(dataset.glob("*.tmp-*")), "the rerun did not clear the stale temporary folders"
    assert spark.read.parquet(paths.clean).count() == m["rows_kept"]
    assert spark.read.parquet(paths.quarantine).count() == m["rows_quarantined"]


def _task_rows(spark, stage_id: int) -> list[dict]:
    """Every attempt of a stage's tasks, from Spark's own status store (what the UI's task table shows)."""
    tasks = spark.sparkContext._jsc.sc().statusStore().taskList(stage_id, 0, 100_000)
    rows = []
    for i in range(tasks.size()):
        t = tasks.apply(i)
        rows.append({"id": t.taskId(), "index": t.index(), "attempt": t.attempt(), "status": t.status()})
    return rows


def test_a_task_lost_during_ingest_is_retried_and_the_counts_stay_exact(spark, tmp_path):
    """A running ingest task is killed through Spark's scheduler (as the UI's kill link or a lost executor
    would end it); Spark runs it again, and not one row is lost or written twice."""
    cfg = make_cfg(tmp_path, rows=100_000)
    paths = dataset_paths(cfg)
    manifest = generate(cfg, paths.raw)
    dataset = local_path(paths.clean).parent
    result: dict = {}

    def run() -> None:
        try:
            result["metrics"] = ingest.run(spark, cfg)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread, which raises it
            result["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    sc, killed = spark.sparkContext, None
    deadline = time.time() + 240
    while worker.is_alive() and killed is None and time.time() < deadline:
        if any(dataset.glob("clean.tmp-*")):  # the pass that reads, checks and writes has begun
            for stage_id in sc.statusTracker().getActiveStageIds():
                running = [t for t in _task_rows(spark, stage_id) if t["status"] == "RUNNING"]
                if running:
                    killed = (stage_id, running[0])
                    sc._jsc.sc().killTaskAttempt(running[0]["id"], True, "dlpipe test: a lost task")
                    break
        time.sleep(0.05)
    worker.join(timeout=600)
    assert killed is not None, "no ingest task was caught running"
    assert "error" not in result, result.get("error")
    stage_id, task = killed
    attempts = [t for t in _task_rows(spark, stage_id) if t["index"] == task["index"]]
    assert {t["status"] for t in attempts} >= {"KILLED", "SUCCESS"}, attempts  # killed, then run again
    _expect_exact(result["metrics"], manifest)
    assert spark.read.parquet(paths.clean).count() == result["metrics"]["rows_kept"]
    assert spark.read.parquet(paths.quarantine).count() == result["metrics"]["rows_quarantined"]


def _can_mount_a_small_disk() -> str | None:
    if shutil.which("unshare") is None:
        return "needs util-linux's unshare to mount a small tmpfs as a full warehouse disk"
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"needs user and mount namespaces (unshare) to mount a small tmpfs: {probe.stderr.strip()}"
    return None


def test_a_warehouse_out_of_space_fails_clearly_and_leaves_no_partial_output(spark, tmp_path):
    """The warehouse on a 512 KiB tmpfs (in a mount namespace of the job's own): ingest's outputs do not fit.
    The job fails naming the stage and the disk, and the warehouse holds nothing afterwards: no output,
    no temporary folder, no run lock."""
    why = _can_mount_a_small_disk()
    if why:
        pytest.skip(why)
    warehouse = tmp_path / "small-disk"
    warehouse.mkdir()
    overrides = cfg_overrides(tmp_path, f"storage.warehouse={warehouse}", rows=20_000)
    cfg = make_cfg(tmp_path, f"storage.warehouse={warehouse}", rows=20_000)
    generate(cfg, dataset_paths(cfg).raw)  # the raw data lies outside the small disk
    job = " ".join([sys.executable, "jobs/ingest.py", *(f"'{o}'" for o in overrides)])
    script = (
        f"mount -t tmpfs -o size=512k tmpfs {warehouse} || exit 90\n"
        f'{job} > {tmp_path}/job.log 2>&1; echo "rc=$?"\n'
        f"df -k {warehouse} | tail -1\n"
        f"cd {warehouse} && find . -type f\n"
    )
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        cwd=REPO,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = (tmp_path / "job.log").read_text(errors="replace") if (tmp_path / "job.log").exists() else ""
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines and lines[0].startswith("rc="), proc.stdout + proc.stderr + log[-3000:]
    assert lines[0] != "rc=0", "ingest fitted on the small disk: the test data is too small to fill it"
    assert "stage ingest ran out of disk space" in log and "storage.warehouse" in log, log[-4000:]
    assert "Traceback" not in log.split("stage ingest ran out of disk space")[-1], log[-4000:]
    left = [ln for ln in lines[2:] if ln.strip()]
    assert left == [], f"the failed ingest left files in the warehouse: {left}"
    # the same job, given room, then runs and counts every row
    m = ingest.run(spark, cfg)
    manifest = json.loads(Path(local_path(dataset_paths(cfg).raw), "_manifest.json").read_text())
    _expect_exact(m, manifest)
