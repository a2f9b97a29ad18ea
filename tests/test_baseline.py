"""The tree-ensemble baseline (dlpipe.model.baseline): XGBoost on Spark beside the network, in the gate and
in the registry; the booster behind the network's interface (dlpipe.model.trees)."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from dlpipe.config import ConfigError
from dlpipe.model.trees import BoosterModule
from dlpipe.pipeline import run_pipeline
from tests.conftest import make_cfg, prepare


def _booster(objective: str, classes: int | None, rng) -> object:
    import xgboost

    x = rng.normal(size=(400, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 1).astype(int) if classes else x[:, 0] * 2.0
    if classes == 2:
        y = np.minimum(y, 1)
    params = {"objective": objective, "max_depth": 3, "nthread": 1}
    if classes and classes > 2:
        params["num_class"] = classes
    return xgboost.train(params, xgboost.DMatrix(x, label=y), num_boost_round=10), x


@pytest.mark.parametrize(
    "objective, task, classes, width",
    [
        ("multi:softprob", "classification", 3, 3),
        ("binary:logistic", "classification", 2, 2),
        ("reg:squarederror", "regression", None, 1),
    ],
)
def test_a_booster_answers_like_the_network_and_survives_saving(objective, task, classes, width, tmp_path):
    """float32 features in; probabilities in class order (a binary booster's single column widened to two)
    or a (n, 1) value out; the same after a save and load in XGBoost's own format."""
    booster, x = _booster(objective, classes, np.random.default_rng(0))
    module = BoosterModule(booster, task, classes or 1)
    out = module(torch.from_numpy(x[:7]))
    assert out.dtype == torch.float32 and tuple(out.shape) == (7, width)
    if task == "classification":
        assert torch.allclose(out.sum(1), torch.ones(7), atol=1e-5)
        expected = booster.inplace_predict(x[:7])
        assert np.allclose(out[:, -1].numpy(), expected if expected.ndim == 1 else expected[:, -1], atol=1e-6)
    loaded = BoosterModule.load(module.save(tmp_path), task, classes or 1)
    assert torch.equal(loaded(torch.from_numpy(x[:7])), out)
    assert module.size_bytes() > 0


def test_requiring_the_baseline_needs_it_on(tmp_path):
    with pytest.raises(ConfigError, match="evaluate.require_beat_baseline=true needs the baseline"):
        make_cfg(tmp_path, "evaluate.require_beat_baseline=true", "evaluate.baseline.enabled=false")


@pytest.mark.slow
def test_the_tree_baseline_is_measured_like_the_network_gates_it_and_is_registered_to_score_with(spark, tmp_path):
    """A weak network (one epoch at a tiny learning rate) against the tree baseline, with the gate requiring
    the network to beat it: the baseline's metrics and plots sit beside the network's on the evaluate run, the
    network is not promoted and says why, and the tree, registered as @baseline, answers raw records and
    scores the test split through infer with the accuracy evaluate measured."""
    from dlpipe.data.ingest import read_clean
    from dlpipe.serve import infer

    cfg = prepare(
        spark,
        tmp_path,
        "train.epochs=1",
        "train.lr=0.00001",
        "evaluate.baseline.enabled=true",
        "evaluate.require_beat_baseline=true",
        rows=3000,
    )
    result = run_pipeline(spark, cfg, stages=("train", "infer", "evaluate"))
    ev = result.metrics["evaluate"]
    for name in ("accuracy", "macro_f1", "auc", "log_loss"):
        assert name in ev and f"baseline_{name}" in ev, (name, sorted(ev))
    # the trees learn (2,100 train rows: 0.84 measured, Bayes accuracy 0.93); the weak network does not
    assert ev["majority_baseline_accuracy"] + 0.25 < ev["baseline_accuracy"] <= ev["bayes_accuracy"] + 0.03, ev
    assert ev["accuracy"] < ev["baseline_accuracy"] - 0.1 and ev["beats_baseline"] == 0.0, ev
    assert 0 < ev["baseline_rounds"] <= cfg.evaluate.baseline.rounds
    assert ev["promoted"] == 0.0

    client = mlflow.MlflowClient(result.tracking_uri)
    run = client.search_runs(
        [client.get_experiment_by_name("dlpipe").experiment_id], filter_string="tags.`dlpipe.stage` = 'evaluate'"
    )[0]
    assert run.data.tags["dlpipe.promotion_reason"] == (
        f"accuracy {ev['accuracy']:.4f} does not beat the tree baseline's {ev['baseline_accuracy']:.4f}"
    )
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    logged |= {a.path for a in client.list_artifacts(run.info.run_id, "baseline")}
    assert {"confusion_matrix.png", "roc.png", "baseline_comparison.png"} <= logged, logged
    assert {"baseline/confusion_matrix.png", "baseline/roc.png", "baseline/confusion_matrix.json"} <= logged, logged
    with pytest.raises(mlflow.exceptions.MlflowException, match="not found"):
        client.get_model_version_by_alias(cfg.model_name, "production")

    tree = client.get_model_version_by_alias(cfg.model_name, "baseline")
    assert str(tree.version) == str(int(ev["baseline_model_version"])) != str(result.metrics["train"]["model_version"])
    assert tree.run_id == run.info.run_id and tree.tags["dlpipe.variant"] == "xgboost-baseline"
    model = mlflow.pyfunc.load_model(f"models:/{cfg.model_name}@baseline")
    records = read_clean(spark, cfg).limit(50).toPandas()
    answered = model.predict(records[[c.name for c in cfg.dataset.features]])
    assert set(answered.columns) == {"prediction", "predicted_class", "probabilities"}
    assert (answered["predicted_class"] == records["label"].astype(str)).mean() > 0.7
    assert np.allclose(np.stack(answered["probabilities"]).sum(1), 1.0, atol=1e-5)

    # infer scores the test split with the tree, as with any registered model, to the accuracy evaluate measured
    scored = make_cfg(tmp_path, f"infer.model_uri=models:/{cfg.model_name}@baseline", rows=3000)
    infer.run(spark, scored)
    preds = spark.read.parquet(result.predictions).where(f"model_version = {tree.version}")
    accuracy = preds.where("prediction = label").count() / preds.count()
    assert preds.count() == ev["test_rows"]
    assert accuracy == pytest.approx(ev["baseline_accuracy"], abs=0.002)
