"""A regression dataset through the whole pipeline: numeric target, MSE training, RMSE/MAE evaluation,
value predictions, the int8 gate on RMSE and promotion on RMSE."""

from __future__ import annotations

import mlflow
import pytest

from dlpipe import tracking
from dlpipe.data.generate import read_manifest
from dlpipe.pipeline import run_pipeline
from dlpipe.storage import dataset_paths
from tests.conftest import make_cfg, quantized_layers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("regression")
    cfg = make_cfg(
        root,
        "train.epochs=8",
        "quantize.enabled=true",
        "evaluate.baseline.enabled=true",
        "evaluate.baseline.register_model=false",
        rows=6000,
        dataset="tabular_regression",
    )
    return cfg, run_pipeline(spark, cfg)


def test_a_regressor_learns_the_target_close_to_the_noise_floor(pipeline):
    cfg, result = pipeline
    ev, manifest = result.metrics["evaluate"], read_manifest(dataset_paths(cfg).raw)
    floor, spread = manifest["bayes_rmse"], manifest["label_std"]
    assert floor < 0.25 * spread  # the generator leaves a lot to learn
    # a model that learned nothing scores the mean baseline; a working one closes most of the gap
    assert ev["mean_baseline_rmse"] == pytest.approx(spread, rel=0.1)
    assert ev["rmse"] <= floor + 0.2 * (spread - floor), ev
    assert ev["rmse"] >= floor * 0.85  # nothing beats the noise beyond sampling error
    assert 0 < ev["mae"] < ev["rmse"] and ev["r2"] > 0.8
    assert ev["test_rows_without_prediction"] == 0 and ev["predictions"] == ev["test_rows"]


def test_the_tree_baseline_of_a_regressor_is_measured_and_plotted_like_the_network(pipeline):
    cfg, result = pipeline
    ev, manifest = result.metrics["evaluate"], read_manifest(dataset_paths(cfg).raw)
    # the same metrics, on the same test rows: far better than the mean, not better than the noise
    assert {"baseline_rmse", "baseline_mae", "baseline_r2"} <= set(ev), sorted(ev)
    assert manifest["bayes_rmse"] * 0.85 <= ev["baseline_rmse"] < 0.5 * ev["mean_baseline_rmse"], ev
    assert ev["beats_baseline"] == float(ev["rmse"] < ev["baseline_rmse"])
    client = mlflow.MlflowClient(result.tracking_uri)
    run = client.search_runs(
        [client.get_experiment_by_name("dlpipe").experiment_id], filter_string="tags.`dlpipe.stage` = 'evaluate'"
    )[0]
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "baseline")}
    assert "baseline/predicted_vs_true.png" in plots, plots
    assert "dlpipe.baseline_model_version" not in run.data.tags  # evaluate.baseline.register_model=false


def test_bad_targets_are_quarantined_like_any_bad_number(pipeline):
    _, result = pipeline
    ing = result.metrics["ingest"]
    assert ing["rows_in"] == ing["rows_kept"] + ing["rows_quarantined"]
    assert ing["quarantined_type"] > 0 and "quarantined_label_range" not in ing  # "n/a" targets, no class range


def test_predictions_are_values_and_the_model_is_promoted_on_rmse(spark, pipeline):
    cfg, result = pipeline
    preds = spark.read.parquet(dataset_paths(cfg).predictions)
    assert "probabilities" not in preds.columns and dict(preds.dtypes)["prediction"] == "double"
    train, ev = result.metrics["train"], result.metrics["evaluate"]
    assert train["best_val_mae"] > 0 and "final_val_accuracy" not in train
    assert train["int8_registered"] == 1.0
    assert quantized_layers(f"models:/{cfg.model_name}/{int(train['int8_model_version'])}", tracking.tracking_uri(cfg))
    # the gate's metric is named in its keys: RMSE, not the classifier's accuracy; no production to beat yet
    assert ev["promoted"] == 1.0 and "candidate_rmse" in ev and "candidate_accuracy" not in ev
    assert "production_rmse" not in ev
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    assert cfg.model_name == "tabular_regression-regressor"
    prod = client.get_model_version_by_alias(cfg.model_name, "production")
    assert int(prod.version) == train["model_version"]
    evaluate_run = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
        "tags.`dlpipe.stage` = 'evaluate'",
    )[0]
    assert evaluate_run.data.tags["dlpipe.promotion_reason"] == "no production model yet"
    assert "predicted_vs_true.png" in {a.path for a in client.list_artifacts(evaluate_run.info.run_id)}


def test_the_registered_regressor_answers_raw_records_in_label_units(spark, pipeline):
    """The pyfunc model takes the raw feature columns and answers the value the batch job predicted."""
    import numpy as np

    from dlpipe.data.features import read_stats
    from dlpipe.data.ingest import read_clean

    cfg, result = pipeline
    mlflow.set_tracking_uri(result.tracking_uri)
    key = read_stats(spark, cfg).key
    test_keys = spark.read.parquet(dataset_paths(cfg).split("test")).select(key).limit(30)
    rows = read_clean(spark, cfg).join(test_keys, key).orderBy(key).toPandas()
    batch = spark.read.parquet(dataset_paths(cfg).predictions).toPandas().set_index(key)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.model_name}@candidate")
    answered = model.predict(rows[[c.name for c in cfg.dataset.features]])
    assert list(answered.columns) == ["prediction"]
    np.testing.assert_allclose(answered["prediction"], batch.loc[rows[key], "prediction"], rtol=1e-5, atol=1e-5)
    assert np.corrcoef(answered["prediction"], rows[cfg.dataset.column("label").name])[0, 1] > 0.9  # label units
