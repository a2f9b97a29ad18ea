"""Services that are down or refuse the run fail it before any Spark work, within 30 s, with one line each
naming the setting to fix (dlpipe.ops.preflight)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from dlpipe.ops.processes import free_ports
from tests.conftest import REPO, run_dlpipe

LIMIT_S = 30  # the promise: a dead or misconfigured service is named within this


def _dlpipe(tmp_path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "DLPIPE_"))}
    started = time.monotonic()
    extra = (f"project.root={tmp_path}", "dataset.generator.rows=300")
    proc = run_dlpipe(*args, *extra, env={**base, "SPARK_LOCAL_IP": "127.0.0.1", **(env or {})}, timeout=120)
    return proc, time.monotonic() - started


def _failed_fast(proc: subprocess.CompletedProcess, seconds: float, expected: str) -> str:
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert seconds < LIMIT_S, f"took {seconds:.1f}s"
    assert "pre-flight check failed, before any Spark work" in proc.stderr
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "SparkContext" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def test_a_tracking_server_that_is_down_is_named_at_once(tmp_path):
    (port,) = free_ports(1, "127.0.0.1")
    proc, seconds = _dlpipe(tmp_path, "run", f"tracking.uri=http://127.0.0.1:{port}")
    _failed_fast(proc, seconds, f"tracking.uri=http://127.0.0.1:{port}: no MLflow tracking server answers")


def test_an_s3_endpoint_that_is_down_is_named_at_once(tmp_path):
    (port,) = free_ports(1, "127.0.0.1")
    env = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "not-a-real-secret-123"}
    overrides = ["storage.warehouse=s3a://bucket/w", f"storage.s3.endpoint=http://127.0.0.1:{port}"]
    proc, seconds = _dlpipe(tmp_path, "run", *overrides, env=env)
    stderr = _failed_fast(proc, seconds, f"storage.s3.endpoint=http://127.0.0.1:{port}: nothing answers")
    assert "not-a-real-secret-123" not in stderr


def test_s3_credentials_that_are_refused_are_named_with_the_default_retries(tmp_path, s3_server, monkeypatch):
    env = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": "wrong-secret-98765"}
    overrides = [
        f"storage.warehouse=s3a://{s3_server.bucket}/preflight",
        f"storage.s3.endpoint={s3_server.endpoint}",
        "storage.s3.path_style_access=true",
    ]
    proc, seconds = _dlpipe(tmp_path, "run", *overrides, env=env)
    refused = f"s3a://{s3_server.bucket} at {s3_server.endpoint}: the credentials were refused"
    stderr = _failed_fast(proc, seconds, refused)
    assert "AWS_SECRET_ACCESS_KEY" in stderr and "wrong-secret-98765" not in stderr
    from dlpipe.config import load_config
    from dlpipe.ops.preflight import check_s3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    cfg = load_config("local", [f"project.root={tmp_path}", *overrides], conf_dir=REPO / "conf")
    assert check_s3(cfg, [f"s3a://{s3_server.bucket}/preflight"]) == []  # the right key passes the same check


def test_an_hdfs_namenode_and_webhdfs_that_are_down_are_named_at_once(tmp_path):
    nn, web = free_ports(2, "127.0.0.1")
    overrides = [f"storage.warehouse=hdfs://127.0.0.1:{nn}/w", f"storage.hdfs.webhdfs_url=http://127.0.0.1:{web}"]
    proc, seconds = _dlpipe(tmp_path, "run", *overrides)
    stderr = _failed_fast(proc, seconds, f"hdfs://127.0.0.1:{nn}: the NameNode does not answer")
    assert f"storage.hdfs.webhdfs_url=http://127.0.0.1:{web}: WebHDFS does not answer" in stderr


@pytest.mark.parametrize(
    ("model_uri", "expected"),
    [
        ("models:/nobody-trained-this@candidate", "infer.model_uri=models:/nobody-trained-this@candidate"),
        ("models:/known@production", "infer.model_uri=models:/known@production"),
        ("models:/known/7", "infer.model_uri=models:/known/7"),
    ],
)
def test_an_unknown_registered_model_alias_or_version_is_named_at_once(tmp_path, model_uri, expected):
    import mlflow

    from dlpipe.ops.preflight import check_model
    from tests.conftest import make_cfg

    (tmp_path / "mlruns").mkdir()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    client.create_registered_model("known")
    client.create_model_version("known", source=(tmp_path / "model").as_uri())
    client.set_registered_model_alias("known", "candidate", "1")
    proc, seconds = _dlpipe(tmp_path, "stage", "infer", f"infer.model_uri={model_uri}")
    stderr = _failed_fast(proc, seconds, expected)
    assert "no such registered model, alias or version" in stderr and "train one first" in stderr
    if "known" in model_uri:  # what the registry does hold is listed
        assert "it has versions [1]" in stderr, stderr[-3000:]
    # the model, alias and version that do exist pass
    for good in ("models:/known@candidate", "models:/known/1", "models:/known"):
        assert check_model(make_cfg(tmp_path, f"infer.model_uri={good}"), ["infer"]) == [], good
