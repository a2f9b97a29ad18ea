"""Training on a real Spark standalone cluster: a master and two 1-core workers on 127.0.0.1 (the
`standalone_cluster` fixture, i.e. `make cluster-up`). Jobs run as their own driver processes, as a user's
would: the whole pipeline through spark-submit with 2 Horovod ranks (one of them killed mid-training, so
Spark retries the barrier stage and the ranks resume from the checkpoint), the image dataset's CNN trained
by TorchDistributor, and a slot shortage that fails fast with both numbers instead of waiting for slots.

Where the time goes: each job is a Spark application (a driver JVM, two executor JVMs, Python workers; with
the shipped environment, two unpacked archives) and each training a fresh MLflow store; the epochs
themselves take seconds. So the whole pipeline runs once, through spark-submit with the shipped environment;
the image data is prepared locally and only its training job meets the cluster. Each launcher runs on the
cluster once (the model is the training function's business, not the launcher's: Horovod trains the
tabular MLP, TorchDistributor the CNN). The int8 variant is driver-side work that the stage tests check, so
it is off here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from dlpipe import tracking
from tests.conftest import KILL_RANK_1, REPO, cfg_overrides, make_cfg, prepare

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _job(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _on_cluster(cluster, root: Path, app: str, *more: str, rows: int, dataset: str | None = None) -> list[str]:
    return cfg_overrides(
        root,
        f"spark.master={cluster.master_url}",
        f"spark.app_name={app}",
        "spark.conf.spark.ui.enabled=false",
        *more,
        rows=rows,
        dataset=dataset,
    )


def _last_train(root: Path, dataset: str | None = None):
    cfg = make_cfg(root, dataset=dataset)
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    return client.search_runs(
        [client.get_experiment_by_name("dlpipe").experiment_id],
        filter_string="tags.`dlpipe.stage` = 'train'",
        order_by=["attributes.start_time DESC"],
    )[0]


def _ran_on_the_cluster(cluster, app: str) -> None:
    """The master lists the application as finished, with both workers' cores granted to it."""
    apps = [a for a in cluster.status()["completedapps"] if a["name"] == app]
    assert apps, f"{app} never ran on {cluster.master_url}"
    assert apps[-1]["cores"] == 2, apps[-1]


NO_INT8 = "quantize.enabled=false"  # driver-side, checked by the stage tests; no executor takes part


def _train_on_the_cluster(
    cluster,
    root: Path,
    rows: int,
    dataset: str | None,
    min_accuracy: float,
    *more: str,
    launcher: str = "horovod",
    first=None,
) -> subprocess.CompletedProcess:
    """Train once with `launcher`, as its own application on the cluster; first(args) runs the job (default:
    `python jobs/train.py` on prepared data). Each launcher meets the cluster once: Horovod in the
    spark-submit pipeline, TorchDistributor in the image CNN's job."""
    app = f"dlpipe-test-{dataset or 'tabular'}-{launcher}"
    args = _on_cluster(cluster, root, app, NO_INT8, *more, f"train.launcher={launcher}", rows=rows, dataset=dataset)
    proc = first(args) if first else _job("jobs/train.py", *args)
    # spark-submit hands its Python driver's stderr to its own stdout: read both
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-4000:]
    _ran_on_the_cluster(cluster, app)
    run = _last_train(root, dataset)
    assert run.data.params["train.launcher"] == launcher
    assert run.data.metrics["ranks"] == 2
    assert run.data.metrics["best_val_accuracy"] > min_accuracy
    assert run.data.metrics["epochs_logged_live"] == run.data.metrics["epochs_run"]
    assert "dlpipe.train.rank1" in said  # rank 1's log reached the driver from its executor
    return proc


@pytest.fixture(scope="session")
def shipment():
    """The code zip and the packed environment (`make ship`; rebuilt only when the lock changes)."""
    from dlpipe.ops import ship

    return ship.build()


def test_the_packed_environment_leaves_out_only_what_executors_never_run(tmp_path):
    """ship.ENV_EXCLUDES on a real (tiny) virtualenv: test suites, torch's C++ test binaries and pip stay
    out; a module merely named tests.py, torch's shared-memory manager and headers stay in."""
    import tarfile

    from dlpipe.ops import ship

    venv = tmp_path / "venv"
    base = Path(sys.base_prefix) / "bin" / "python3.11"
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(venv)], check=True)
    site = "lib/python3.11/site-packages"
    kept = ["pkg/__init__.py", "jinja2/tests.py", "torch/bin/torch_shm_manager", "torch/include/ATen/ATen.h"]
    left_out = ["pkg/tests/test_a.py", "pkg/sub/tests/test_b.py", "torch/test/Dict_test", "torch/bin/test_api"]
    left_out.append("pip/__init__.py")
    for rel in kept + left_out:
        (venv / site / rel).parent.mkdir(parents=True, exist_ok=True)
        (venv / site / rel).write_text("x = 1\n")
    with tarfile.open(ship.pack_env(venv, tmp_path / "env.tar.gz")) as tf:
        names = set(tf.getnames())
        python = tf.getmember("bin/python3.11")
    assert {f"{site}/{rel}" for rel in kept} <= names, sorted(names)
    assert not {f"{site}/{rel}" for rel in left_out} & names, sorted(names)
    assert python.issym() or python.mode & 0o111, python.mode  # still runnable once tar unpacks it


def _submit(cluster, shipment, script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """spark-submit against the cluster, shipping the code and the environment. The executors get no
    PYSPARK_PYTHON and no PYTHONPATH from here: what they run is what the archives hold."""
    spark_submit = str(Path(sys.executable).parent / "spark-submit")
    env = {k: v for k, v in os.environ.items() if k not in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "PYTHONPATH")}
    import pyspark

    # the driver runs here (client mode): spark-submit finds Spark and the driver's Python from these
    env.update(SPARK_LOCAL_IP="127.0.0.1", SPARK_HOME=os.path.dirname(pyspark.__file__))
    env["PYSPARK_DRIVER_PYTHON"] = sys.executable
    cmd = [spark_submit, "--master", cluster.master_url, *shipment.spark_submit_args(sys.executable), script, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


RANK_ORIGIN = re.compile(r"dlpipe\.train\.rank(\d): python (\S+), torch \S+ from (\S+), dlpipe from (\S+)")


def test_the_pipeline_runs_through_spark_submit_with_only_what_it_ships_and_a_killed_rank_resumes(
    standalone_cluster, shipment, tmp_path
):
    """The whole tabular pipeline, submitted with the code as --py-files and a packed virtualenv as
    --archives, trains with Horovod. Each rank says
    where its interpreter, torch and dlpipe come from (dlpipe.train.worker.runtime_origin): the unpacked
    archive and the zip, never the project folder or its .venv. Infer's UDF (udfs/) runs on the executors
    too, so a zip without it fails the run. Rank 1 is killed after epoch 2: its executor reports the task
    lost, Spark retries the barrier stage, and both ranks resume from the epoch-2 checkpoint to a model of an
    uninterrupted run's quality."""

    def submitted(args: list[str]) -> subprocess.CompletedProcess:
        return _submit(standalone_cluster, shipment, "pipelines/run.py", *args)

    # Bayes accuracy 0.933 on this generator; the local tests reach 0.9
    proc = _train_on_the_cluster(
        standalone_cluster, tmp_path, 6000, None, 0.85, "train.epochs=8", *KILL_RANK_1, first=submitted
    )
    said = proc.stdout + proc.stderr
    assert "test accuracy:" in proc.stdout
    assert "fault injection: killing rank 1" in said, said[-4000:]
    run = _last_train(tmp_path)
    assert run.data.metrics["resumed_from_epoch"] == 2, "the retried stage did not start from the saved epoch"
    assert run.data.metrics["epochs_run"] == 8
    client = mlflow.MlflowClient(tracking.tracking_uri(make_cfg(tmp_path)))
    assert [h.step for h in client.get_metric_history(run.info.run_id, "val_loss")] == list(range(1, 9))

    origins = {int(m[1]): m.groups()[1:] for m in RANK_ORIGIN.finditer(said)}
    assert sorted(origins) == [0, 1], said[-4000:]
    for prefix, torch_dir, dlpipe_dir in origins.values():
        assert prefix.endswith("/environment") and not prefix.startswith(str(REPO)), prefix  # the unpacked archive
        assert torch_dir.startswith(f"{prefix}/"), torch_dir
        assert dlpipe_dir.endswith("dlpipe-code.zip/dlpipe"), dlpipe_dir


def test_images_train_a_cnn_on_the_cluster(standalone_cluster, spark, tmp_path):
    """The image dataset's model by configuration ('auto': a CNN), trained by TorchDistributor's ranks (torchrun
    on the executors, DDP) on the cluster. The data is prepared by the local session (file:// is shared): the
    training meets the cluster."""
    more = ("train.epochs=10", "train.batch_size=32", "train.lr=0.002")
    cfg = prepare(spark, tmp_path, NO_INT8, *more, rows=1797, dataset="digits_images")
    # 10 balanced classes: chance is 0.1
    _train_on_the_cluster(standalone_cluster, tmp_path, 1797, "digits_images", 0.9, *more, launcher="torch_distributor")
    run = _last_train(tmp_path, "digits_images")
    assert run.data.params["train.model.factory"] == "auto"
    assert run.data.tags["dlpipe.model_factory"] == "dlpipe.train.models:build_cnn"
    # the registered model takes image tensors (1x8x8) and answers one score per digit
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    version = client.get_model_version_by_alias(cfg.model_name, "candidate")
    assert version.run_id == run.info.run_id
    model = mlflow.pytorch.load_model(client.get_model_version_download_uri(cfg.model_name, version.version))
    assert tuple(model(torch.zeros(3, 1, 8, 8)).shape) == (3, 10)


def test_a_slot_shortage_on_the_cluster_fails_fast(standalone_cluster, spark, tmp_path):
    # 3 ranks on a cluster of 2 one-core workers: Spark alone would keep the barrier stage waiting.
    # The data is prepared by the local session (file:// is shared); only the train job meets the cluster.
    # Both launchers call the same check first (test_train.py checks each refuses); one job covers the cluster.
    prepare(spark, tmp_path, rows=1500)
    args = _on_cluster(standalone_cluster, tmp_path, "dlpipe-test-short", "train.num_proc=3", rows=1500)
    proc = _job("jobs/train.py", *args, timeout=300)  # the timeout is the hang guard
    assert proc.returncode != 0
    assert "SlotShortageError: training needs 3 task slots at once (train.num_proc=3), the cluster has 2" in proc.stderr
    assert "train: launching" not in proc.stderr  # refused before launching anything
