"""Secrets never leave the process: not in MLflow params, tags or artifacts, logs, status output or the
command lines of the processes a run starts."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import yaml

from dlpipe import redact
from tests.conftest import REPO, CommandLines, run_dlpipe


@pytest.mark.parametrize(
    "key",
    [
        "spark.hadoop.fs.s3a.secret.key",
        "spark.hadoop.fs.s3a.access.key",
        "fs.s3a.session.token",
        "spark.hadoop.fs.azure.sas.token.provider",
        "spark.jdbc.password",
        "db_passwd",
        "storage.s3.hadoop.fs.s3a.bucket.b.secret.key",
        "AWS_SECRET_ACCESS_KEY",
        "GITHUB_TOKEN",
        "my_credential",
    ],
)
def test_keys_that_name_a_secret_are_masked(key):
    assert redact.is_secret_key(key)
    assert redact.mapping({key: "hunter2-value"})[key] == redact.MASK


@pytest.mark.parametrize("key", ["train.epochs", "tracking.uri", "storage.s3.credentials_file", "spark.master"])
def test_ordinary_keys_are_shown(key):
    assert not redact.is_secret_key(key)
    assert redact.mapping({key: "value-17"})[key] == "value-17"


def test_the_password_of_any_uri_is_masked_and_remembered_secrets_too(caplog):
    uri = "http://alice:pa55word-xyz@127.0.0.1:5000/api"
    assert redact.text(uri) == f"http://alice:{redact.MASK}@127.0.0.1:5000/api"
    assert "s3cr3t" not in redact.text("jdbc:postgresql://bob:s3cr3t@db:5432/x")
    redact.remember("remembered-secret-4711")
    logger = logging.getLogger("tests.secrets")
    handler = logging.StreamHandler()
    logging.getLogger().addHandler(handler)
    try:
        redact.install()
        assert redact._FILTER in handler.filters
        with caplog.at_level(logging.INFO):
            caplog.handler.addFilter(redact._FILTER)
            logger.info("connecting with %s to %s", "remembered-secret-4711", uri)
        assert "remembered-secret-4711" not in caplog.text and "pa55word" not in caplog.text
        assert redact.MASK in caplog.text
    finally:
        logging.getLogger().removeHandler(handler)


@pytest.mark.slow
def test_secrets_from_every_place_stay_out_of_mlflow_logs_status_and_command_lines(tmp_path):
    """A secret in spark.conf, in storage.s3.hadoop, in the credentials file and in a dataset-independent
    env setting; the pipeline runs generate -> preprocess; then the MLflow database, its artifacts, the
    run's output, `status` and every command line seen while it ran are searched for each secret."""
    secrets = {
        "spark_conf": "SparkConfSecret-9f1e2d",
        "s3_hadoop": "S3HadoopToken-7c6b5a",
        "file_key": "FileAccessKey-3e4d5c",
        "file_secret": "FileSecretKey-1a2b3c",
        "jdbc": "JdbcPassword-8h7g6f",
    }
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    local = yaml.safe_load((conf / "local.yaml").read_text()) or {}
    local.setdefault("spark", {}).setdefault("conf", {}).update(
        {
            "spark.hadoop.fs.s3a.secret.key": secrets["spark_conf"],
            "spark.sql.catalog.warehouse_db.password": secrets["jdbc"],
        }
    )
    local.setdefault("storage", {}).setdefault("s3", {})["hadoop"] = {"fs.s3a.session.token": secrets["s3_hadoop"]}
    (conf / "local.yaml").write_text(yaml.safe_dump(local))
    creds = tmp_path / "credentials.yaml"
    creds.write_text(yaml.safe_dump({"s3": {"access_key": secrets["file_key"], "secret_key": secrets["file_secret"]}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"DLPIPE_CONF_DIR": str(conf), "SPARK_LOCAL_IP": "127.0.0.1"})
    args = [f"project.root={tmp_path}", "dataset.generator.rows=400", "spark.master=local[2]"]
    args.append(f"storage.s3.credentials_file={creds}")
    with CommandLines() as watched:
        run = run_dlpipe("run", "--to", "preprocess", *args, env=env)
    seen = {line for line in watched.seen if "java" in line or "dlpipe" in line or "spark" in line}
    assert run.returncode == 0, run.stderr[-3000:]
    status = run_dlpipe("status", *args, env=env, timeout=300)
    assert status.returncode == 0, status.stderr[-2000:]
    assert any("org.apache.spark" in line for line in seen), "the watcher never saw the Spark JVM"
    places = {
        "run output": run.stdout + run.stderr,
        "status output": status.stdout + status.stderr,
        "command lines": "\n".join(seen),
        "MLflow database": (tmp_path / "mlruns" / "mlflow.db").read_bytes().decode(errors="replace"),
        "MLflow artifacts": "\n".join(
            p.read_bytes().decode(errors="replace") for p in (tmp_path / "mlruns").rglob("*") if p.is_file()
        ),
    }
    assert "spark.hadoop.fs.s3a.secret.key" in places["MLflow database"]  # the params are there, masked
    for where, content in places.items():
        for name, secret in secrets.items():
            assert secret not in content, f"the {name} secret leaked into the {where}"


def test_a_config_shown_in_a_notebook_or_log_masks_its_secrets(tmp_path):
    from dlpipe.config import load_config

    cfg = load_config(
        "local",
        [
            f"project.root={tmp_path}",
            "spark.conf.spark.hadoop.fs.s3a.secret.key=ReprSecret-0a9b8c",
            "tracking.uri=http://mlflow-user:ReprPassword-1d2e3f@127.0.0.1:5000",
        ],
        conf_dir=REPO / "conf",
    )
    for shown in (repr(cfg), str(cfg), repr(cfg.spark), f"{cfg.tracking}"):
        assert "ReprSecret-0a9b8c" not in shown and "ReprPassword-1d2e3f" not in shown, shown
    assert "mlflow-user" in repr(cfg.tracking) and "spark.hadoop.fs.s3a.secret.key" in repr(cfg.spark)
    assert cfg.spark.conf["spark.hadoop.fs.s3a.secret.key"] == "ReprSecret-0a9b8c"  # the value itself is intact
