"""The whole pipeline on small data, in one Spark application, checked through an MLflow client."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest

from dlpipe.data.generate import read_manifest
from dlpipe.pipeline import run_pipeline, stages_for
from dlpipe.storage import dataset_paths
from tests.conftest import REPO, cfg_overrides, make_cfg

pytestmark = pytest.mark.slow

# Enough to close the Bayes-vs-majority gap well past the 60% asked below (3000 rows, 2 epochs: 0.85 test accuracy)
ROWS, EPOCHS = 4000, 5


@pytest.fixture(scope="module")
def pipeline(spark, tmp_path_factory):
    cfg = make_cfg(tmp_path_factory.mktemp("pipeline"), f"train.epochs={EPOCHS}", rows=ROWS)
    return cfg, run_pipeline(spark, cfg)


def test_model_beats_majority_baseline_by_the_guaranteed_margin(pipeline):
    cfg, result = pipeline
    ev = result.metrics["evaluate"]
    manifest = read_manifest(dataset_paths(cfg).raw)
    bayes, majority = manifest["bayes_accuracy"], ev["majority_baseline_accuracy"]
    # The generator guarantees a gap (Bayes 0.933 vs a majority class below 0.55): a working model must
    # close at least 60% of it; one that learned nothing scores the baseline.
    assert bayes - majority > 0.35
    assert ev["accuracy"] >= majority + 0.6 * (bayes - majority)
    assert ev["accuracy"] <= bayes + 0.03  # nothing beats the Bayes rate beyond sampling noise


def test_predictions_cover_every_test_row(pipeline):
    _, result = pipeline
    ev = result.metrics["evaluate"]
    assert ev["test_rows_without_prediction"] == 0
    assert ev["predictions"] == ev["test_rows"] == result.metrics["preprocess"]["rows_test"]


def test_quarantine_counts_match_the_malformed_lines_written(pipeline):
    cfg, result = pipeline
    gen, ing = result.metrics["generate"], result.metrics["ingest"]
    assert ing["rows_quarantined"] == gen["malformed_total"] == round(ROWS * 0.03)
    assert ing["rows_in"] == ing["rows_kept"] + ing["rows_quarantined"] == ROWS


def test_mlflow_has_parent_child_runs_and_a_registered_version(pipeline):
    cfg, result = pipeline
    client = mlflow.MlflowClient(result.tracking_uri)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.epochs"] == str(EPOCHS)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    by_stage = {r.data.tags["dlpipe.stage"]: r for r in children}
    assert set(by_stage) == set(stages_for(cfg)) and "tune" not in by_stage  # tune.enabled is false
    assert by_stage["ingest"].data.metrics["rows_quarantined"] == result.metrics["ingest"]["rows_quarantined"]
    assert by_stage["preprocess"].data.metrics["rows_train"] > 0
    assert by_stage["evaluate"].data.metrics["accuracy"] == pytest.approx(result.metrics["evaluate"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(by_stage["train"].info.run_id)}
    assert "learning_curve.png" in artifacts
    mv = client.get_model_version_by_alias(cfg.model_name, "candidate")
    assert mv.run_id == by_stage["train"].info.run_id
    reqs = mlflow.artifacts.download_artifacts(
        f"models:/{cfg.model_name}/{mv.version}", tracking_uri=result.tracking_uri
    )
    text = open(os.path.join(reqs, "requirements.txt")).read()
    assert "torch==2.13.0+cpu" in text and "download.pytorch.org/whl/cpu" in text


def test_every_stage_run_records_its_lineage_chained_through_the_fingerprints(spark, pipeline):
    """The lineage tags and lineage.json of each stage run: what it read (with that input's fingerprint) and
    wrote, each output's fingerprint being what the next stage recorded as its input."""
    import json

    from dlpipe.storage import lineage

    cfg, result = pipeline
    client = mlflow.MlflowClient(result.tracking_uri)
    children = client.search_runs(
        [client.get_run(result.run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'",
    )
    runs = {r.data.tags["dlpipe.stage"]: r for r in children}
    record = {}
    for stage, r in runs.items():
        assert r.data.tags["dlpipe.skipped"] == "false", stage
        path = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="lineage.json")
        record[stage] = json.loads(open(path).read())
        assert record[stage]["fingerprint"] == r.data.tags["dlpipe.fingerprint"], stage
    paths = dataset_paths(cfg)
    for stage, out, reader in (
        ("ingest", paths.clean, "preprocess"),
        ("preprocess", paths.petastorm, "train"),
        ("preprocess", paths.petastorm, "evaluate"),
    ):
        committed = lineage.read_meta(spark, out)["fingerprint"]
        assert record[stage]["fingerprint"] == committed and out in record[stage]["outputs"]
        assert record[reader]["inputs"][out] == committed, f"{reader} does not name {stage}'s output"
    assert record["ingest"]["inputs"][paths.raw] == lineage.source_fingerprint(spark, paths.raw)
    # generate's fingerprint is its params' digest: what `status` shows from the manifest
    assert record["generate"]["fingerprint"] == lineage.digest(read_manifest(paths.raw)["params"])
    version = result.metrics["train"]["model_version"]
    assert record["train"]["outputs"] == [f"models:/{cfg.model_name}/{version}"]
    model = f"models:/{cfg.model_name}@candidate"
    assert record["infer"]["inputs"][model] == f"{cfg.model_name}/{version}/{runs['train'].info.run_id}"
    assert record["infer"]["outputs"] == [paths.predictions, paths.infer_quarantine]


def test_the_registered_model_declares_raw_columns_in_and_answers_out(pipeline):
    """Its signature: the dataset's raw feature columns with their YAML types, and the columns it answers."""
    cfg, result = pipeline
    version = result.metrics["train"]["model_version"]
    sig = mlflow.models.get_model_info(f"models:/{cfg.model_name}/{version}").signature
    inputs = {c.name: c.type.name for c in sig.inputs.inputs}
    assert list(inputs) == [c.name for c in cfg.dataset.features]
    assert inputs["x0"] == "double" and inputs["segment"] == "string"
    outputs = {c.name for c in sig.outputs.inputs}
    assert {"prediction", "predicted_class", "probabilities"} <= outputs


def test_the_cli_reruns_from_a_stage_skipping_what_is_unchanged_and_shows_status(pipeline):
    """`python -m dlpipe run --from train` on the finished pipeline: train finds @candidate trained on the
    same data and config, infer its output made from that model and input, and both skip; `python -m
    dlpipe status` shows each stage's output and last run."""
    cfg, result = pipeline
    args = cfg_overrides(cfg.root, f"train.epochs={EPOCHS}", "spark.conf.spark.ui.enabled=false", rows=ROWS)
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    run = subprocess.run(
        [sys.executable, "-m", "dlpipe", "run", "--from", "train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pipeline: stage 1/3: train" in run.stderr and "trained on the same data with the same config" in run.stderr
    assert "infer: " in run.stderr and "is up to date" in run.stderr
    assert f"predictions: {result.predictions}" in run.stdout
    status = subprocess.run(
        [sys.executable, "-m", "dlpipe", "status", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr[-3000:]
    lines = {ln.split()[0]: ln for ln in status.stdout.splitlines() if ln and not ln.startswith(" ")}
    assert set(lines) == set(stages_for(cfg))
    ing = result.metrics["ingest"]
    assert "committed" in lines["ingest"] and f"rows_quarantined={ing['rows_quarantined']}" in lines["ingest"]
    assert f"rows_scored={result.metrics['infer']['rows_scored']}" in lines["infer"]
    assert "mlflow only" in lines["train"] and "model_version=1" in lines["train"]
    assert status.stdout.count("last run ") == len(stages_for(cfg))


def test_stage_job_runs_under_spark_submit_with_the_same_arguments(tmp_path):
    """`spark-submit jobs/<stage>.py` takes the same arguments as the pipeline; checked on two stages."""
    spark_submit = os.path.join(os.path.dirname(sys.executable), "spark-submit")
    env = {
        **os.environ,
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
    }
    args = [f"project.root={tmp_path}", "dataset.generator.rows=600", "spark.conf.spark.ui.enabled=false"]
    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    client = mlflow.MlflowClient(store)
    experiment = client.create_experiment("dlpipe", artifact_location=(tmp_path / "mlruns" / "artifacts").as_uri())
    parent = client.create_run(experiment).info.run_id  # e.g. an orchestrator's run
    for stage in ("generate", "ingest"):
        proc = subprocess.run(
            [spark_submit, "--master", "local[2]", f"jobs/{stage}.py", "--parent-run-id", parent, *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    clean = list((tmp_path / "data/warehouse/tabular_example/clean").glob("*.parquet"))
    assert clean, "ingest under spark-submit wrote no clean dataset"
    runs = client.search_runs(
        [client.get_experiment_by_name("dlpipe").experiment_id], filter_string="tags.`dlpipe.stage` != ''"
    )
    assert {r.data.tags["dlpipe.stage"]: r.info.status for r in runs} == {"generate": "FINISHED", "ingest": "FINISHED"}
    # --parent-run-id: both stage runs hang under the run they were given
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent}
    ingest_run = next(r for r in runs if r.data.tags["dlpipe.stage"] == "ingest")
    assert ingest_run.data.metrics["rows_in"] == 600
    assert ingest_run.data.metrics["rows_kept"] + ingest_run.data.metrics["rows_quarantined"] == 600
