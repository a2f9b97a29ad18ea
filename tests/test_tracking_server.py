"""The whole pipeline against a real MLflow tracking server (tests/servers.py MlflowServer): basic
authentication on, artifacts on the test S3 server, started once for this module and stopped by process id.

One pipeline run (`python -m dlpipe run`, credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD,
never on a command line) is checked for its runs, its per-epoch metrics logged live from the executors, the
registered model and its artifacts in the bucket, and the model served from the registry; a wrong password
fails before anything runs; the password leaves no trace in MLflow, the output or a command line.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import UNCHECKED_WORK, CommandLines, MlflowEndpoint, make_cfg, run_dlpipe

pytestmark = [pytest.mark.servers, pytest.mark.slow]

EPOCHS = 2
ROWS = 3000
LIMIT_S = 30  # dlpipe.ops.preflight's promise: a refusing tracking server is named within this


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without any MLflow, AWS or dlpipe settings, plus extra."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "DLPIPE_"))}
    return {**base, "SPARK_LOCAL_IP": "127.0.0.1", **extra}


def _overrides(root: Path, server: MlflowEndpoint, experiment: str) -> list[str]:
    return [
        f"project.root={root}",
        f"dataset.generator.rows={ROWS}",
        "spark.master=local[2]",
        f"train.epochs={EPOCHS}",
        *UNCHECKED_WORK,
        "spark.conf.spark.ui.enabled=false",
        f"tracking.uri={server.uri}",
        f"tracking.experiment={experiment}",
    ]


@pytest.fixture(scope="module")
def credentials(mlflow_server):
    """MLFLOW_TRACKING_* for this process (the MlflowClient here, and what the model server inherits)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_USERNAME", mlflow_server.username)
    mp.setenv("MLFLOW_TRACKING_PASSWORD", mlflow_server.password)
    mp.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    yield mlflow_server
    mp.undo()


@pytest.fixture(scope="module")
def pipeline(mlflow_server, tmp_path_factory):
    """One `python -m dlpipe run` against the server, as the user dlpipe-ci; command lines watched meanwhile."""
    root = tmp_path_factory.mktemp("tracked")
    experiment = f"tracked-{uuid.uuid4().hex[:8]}"
    env = _env(MLFLOW_TRACKING_USERNAME=mlflow_server.username, MLFLOW_TRACKING_PASSWORD=mlflow_server.password)
    started = time.monotonic()
    with CommandLines() as watched:
        run = run_dlpipe("run", *_overrides(root, mlflow_server, experiment), env=env, timeout=480)
    seconds = time.monotonic() - started
    assert run.returncode == 0, run.stderr[-4000:]
    cfg = make_cfg(root, *_overrides(root, mlflow_server, experiment)[1:], rows=ROWS)
    return {"cfg": cfg, "run": run, "seconds": seconds, "cmdlines": watched.seen, "experiment": experiment}


def test_the_pipeline_logs_its_runs_live_metrics_and_model_to_the_server(credentials, pipeline):
    from mlflow import MlflowClient

    client = MlflowClient(credentials.uri)
    exp = client.get_experiment_by_name(pipeline["experiment"])
    assert exp is not None, "the run's experiment is not on the server"
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location  # proxied by the server
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("dlpipe.kind") == "pipeline"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.user_id == credentials.username
    parent_id = parent.info.run_id
    children = {r.data.tags["dlpipe.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}
    assert set(children) == {"generate", "ingest", "preprocess", "train", "infer", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in children.values())

    train = children["train"]
    for metric in ("val_loss", "train_loss", "val_accuracy"):
        steps = sorted(m.step for m in client.get_metric_history(train.info.run_id, metric))
        assert steps == list(range(1, EPOCHS + 1)), (metric, steps)
    # rank 0 (a Spark task) logged every epoch as it ended; the driver had nothing left to log afterwards
    assert train.data.metrics["epochs_logged_live"] == EPOCHS
    assert "learning_curve.png" in {a.path for a in client.list_artifacts(train.info.run_id)}

    name = pipeline["cfg"].model_name
    candidate = client.get_model_version_by_alias(name, "candidate")
    production = client.get_model_version_by_alias(name, "production")  # the first model passes the gate
    assert candidate.version == production.version == train.data.tags["dlpipe.model_version"]
    assert candidate.run_id == train.info.run_id
    assert children["evaluate"].data.tags["dlpipe.promotion"] == "promoted"


def _s3_objects(s3_server, prefix: str) -> dict[str, bytes]:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix=prefix)
    keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    return {k: s3.get_object(Bucket=s3_server.bucket, Key=k)["Body"].read() for k in keys}


def test_the_artifacts_are_in_the_s3_bucket(credentials, pipeline, s3_server):
    """The server proxies artifacts to s3://BUCKET/PREFIX: mlflow-artifacts:/X is the object PREFIX/X."""
    from mlflow import MlflowClient

    client = MlflowClient(credentials.uri)
    name = pipeline["cfg"].model_name
    version = client.get_model_version_by_alias(name, "candidate")
    keys = set(_s3_objects(s3_server, f"{credentials.artifacts_prefix}/"))

    def key(artifact_uri: str) -> str:
        assert artifact_uri.startswith("mlflow-artifacts:/"), artifact_uri
        return f"{credentials.artifacts_prefix}/{artifact_uri.removeprefix('mlflow-artifacts:/').strip('/')}"

    train_artifacts = key(client.get_run(version.run_id).info.artifact_uri)
    assert {f"{train_artifacts}/learning_curve.png", f"{train_artifacts}/preprocessing/stats.json"} <= keys, keys
    model = key(client.get_model_version_download_uri(name, version.version))
    model_files = {k.removeprefix(f"{model}/") for k in keys if k.startswith(f"{model}/")}
    assert {"MLmodel", "python_model.pkl", "artifacts/network/data/model.pt2"} <= model_files, sorted(keys)


def test_the_registered_model_is_served_from_the_server(credentials, pipeline, tmp_path):
    """`mlflow models serve -m models:/NAME@production` (dlpipe.serve.serving, credentials from its environment)
    answers raw records from the clean data with what the batch job predicted for them."""
    import numpy as np
    import pandas as pd

    from dlpipe.ops.processes import pid_alive
    from dlpipe.serve.serving import ModelServer
    from dlpipe.storage import dataset_paths

    cfg = pipeline["cfg"]
    paths = dataset_paths(cfg)
    batch = pd.read_parquet(paths.predictions.removeprefix("file://")).set_index("id")
    clean = pd.read_parquet(paths.clean.removeprefix("file://"))
    rows = clean[clean["id"].isin(batch.index)].sort_values("id").head(5)
    assert len(rows) == 5
    names = [c.name for c in cfg.dataset.features]
    server = ModelServer(f"models:/{cfg.model_name}@production", credentials.uri, tmp_path / "serve.log")
    with server:
        cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().decode(errors="replace")
        served = server.predict(rows[names])
    assert not pid_alive(server.proc.pid)
    assert credentials.password not in cmdline
    expected = batch.loc[rows["id"]]
    assert list(served["predicted_class"]) == list(expected["predicted_class"])
    np.testing.assert_allclose(
        np.stack(served["probabilities"]), np.stack(expected["probabilities"]), rtol=1e-5, atol=1e-6
    )


def test_the_password_is_in_no_param_tag_artifact_output_or_command_line(credentials, pipeline, s3_server):
    from mlflow import MlflowClient

    secret = credentials.password
    client = MlflowClient(credentials.uri)
    exp = client.get_experiment_by_name(pipeline["experiment"])
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 7  # the pipeline run and its six stages
    for r in runs:
        for where, values in (("params", r.data.params), ("tags", r.data.tags)):
            leaked = [k for k, v in values.items() if secret in v]
            assert not leaked, f"the password is in the {where} {leaked} of run {r.info.run_name}"
    parent = next(r for r in runs if r.data.tags.get("dlpipe.kind") == "pipeline")
    assert parent.data.params["tracking.uri"] == credentials.uri  # the config's params are there
    artifacts = _s3_objects(s3_server, f"{credentials.artifacts_prefix}/")
    assert len(artifacts) > 10
    assert not [k for k, body in artifacts.items() if secret.encode() in body]
    output = pipeline["run"].stdout + pipeline["run"].stderr
    assert "train: registered" in output  # the log was captured
    assert secret not in output
    seen = pipeline["cmdlines"]
    assert any("org.apache.spark" in line for line in seen), "the watcher never saw the Spark JVM"
    assert any("dlpipe run" in line for line in seen)
    assert not [line for line in seen if secret in line]


def test_executors_without_credentials_in_their_environment_use_the_drivers(credentials, pipeline, monkeypatch):
    """A cluster's executors do not inherit the driver's MLFLOW_TRACKING_*: rank 0's live tracker and the
    scorer's model load get them with the task (dlpipe.tracking.Credentials) and use them there."""
    import logging

    from mlflow import MlflowClient

    from dlpipe.serve.scoring import load_model
    from dlpipe.tracking import CREDENTIAL_ENV, Credentials
    from dlpipe.train.live import LiveTracker

    client = MlflowClient(credentials.uri)
    run_id = client.create_run(client.create_experiment(f"live-{uuid.uuid4().hex[:8]}")).info.run_id
    for var in CREDENTIAL_ENV.values():  # what an executor on another machine sees
        monkeypatch.delenv(var, raising=False)
    given = Credentials(credentials.username, credentials.password)
    assert credentials.password not in repr(given)
    log = logging.getLogger("tests.tracking_server")
    assert not LiveTracker(credentials.uri, run_id, log).active  # refused without them
    tracker = LiveTracker(credentials.uri, run_id, log, given)
    assert tracker.active
    record = {"epoch": 1, "train_loss": 0.9, "val_loss": 0.8, "train_accuracy": 0.5, "val_accuracy": 0.6}
    assert tracker.log_epoch(record, [record])
    model_uri = f"models:/{pipeline['cfg'].model_name}@candidate"
    assert load_model(model_uri, credentials.uri, credentials=given) is not None
    assert not [var for var in CREDENTIAL_ENV.values() if var in os.environ]  # put back as they were
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", credentials.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", credentials.password)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_loss")] == [(1, 0.8)]
    assert "learning_curve.png" in {a.path for a in client.list_artifacts(run_id)}
    client.set_terminated(run_id)


def test_a_wrong_password_fails_at_once_naming_the_setting(mlflow_server, tmp_path):
    experiment = f"refused-{uuid.uuid4().hex[:8]}"
    wrong = "WrongPassword-5e6f7a"
    env = _env(MLFLOW_TRACKING_USERNAME=mlflow_server.username, MLFLOW_TRACKING_PASSWORD=wrong)
    started = time.monotonic()
    proc = run_dlpipe("run", *_overrides(tmp_path, mlflow_server, experiment), env=env, timeout=120)
    seconds = time.monotonic() - started
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert seconds < LIMIT_S, f"took {seconds:.1f}s"
    problems = [line.strip() for line in proc.stderr.splitlines() if line.startswith("  ")]
    assert problems == [
        f"tracking.uri={mlflow_server.uri}: the credentials of user '{mlflow_server.username}' were refused "
        "(HTTP 401); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "SparkContext" not in proc.stderr, proc.stderr[-3000:]
    assert wrong not in proc.stderr + proc.stdout
    # nothing ran: no data generated, no experiment on the server
    assert not (tmp_path / "data").exists()
    from mlflow import MlflowClient

    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_USERNAME", mlflow_server.admin_username)
    mp.setenv("MLFLOW_TRACKING_PASSWORD", mlflow_server.admin_password)
    try:
        assert MlflowClient(mlflow_server.uri).get_experiment_by_name(experiment) is None
    finally:
        mp.undo()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, "the server needs credentials and none were given (HTTP 401); set MLFLOW_TRACKING_USERNAME and"),
        ({"MLFLOW_TRACKING_USERNAME": "dlpipe-ci"}, "only one of user and password was given (HTTP 401)"),
        # a bearer token: MLflow 3.17.2's basic-auth app, with its credential cache on, fails on it with HTTP 500
        # (it hashes the missing password): pre-flight names that in one line too
        (
            {"MLFLOW_TRACKING_TOKEN": "NotAToken-8b9c0d"},
            "the API answered HTTP 500 to the bearer token in MLFLOW_TRACKING_TOKEN",
        ),
    ],
)
def test_missing_or_refused_credentials_are_told_apart(mlflow_server, monkeypatch, tmp_path, given, expected):
    from dlpipe.ops.preflight import check_tracking

    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    for var, value in given.items():
        monkeypatch.setenv(var, value)
    cfg = make_cfg(tmp_path, f"tracking.uri={mlflow_server.uri}")
    problems = check_tracking(cfg)
    assert len(problems) == 1 and problems[0].startswith(f"tracking.uri={mlflow_server.uri}: {expected}"), problems
    assert "NotAToken-8b9c0d" not in problems[0]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", mlflow_server.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", mlflow_server.password)
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    assert check_tracking(cfg) == []  # the right user and password pass the same check


def test_a_client_without_credentials_is_refused(mlflow_server, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(MlflowException) as refused:
        MlflowClient(mlflow_server.uri).search_experiments()
    assert "401" in str(refused.value), str(refused.value)
