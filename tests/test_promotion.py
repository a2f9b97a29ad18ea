"""The evaluation gate: AUC computed in Spark, and the candidate -> production decision on the same rows."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dlpipe import tracking
from dlpipe.model.evaluate import macro_auc
from dlpipe.model.promotion import decide
from dlpipe.pipeline import run_pipeline
from tests.conftest import make_cfg


def test_macro_auc_matches_scikit_learn(spark):
    rng = np.random.default_rng(0)
    n, k = 3000, 3
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    df = spark.createDataFrame(
        [(int(y), [float(p) for p in row]) for y, row in zip(labels, probs, strict=True)],
        "label int, probabilities array<double>",
    )
    expected = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert 0.7 < expected < 0.95
    assert macro_auc(df, k) == pytest.approx(expected, abs=2e-3)  # 1/1000 buckets


def test_the_int8_gate_registers_a_variant_within_its_limit_and_rejects_one_beyond():
    from dlpipe.config import QuantizeConfig
    from dlpipe.train.stage import int8_gate

    limits = QuantizeConfig(max_accuracy_drop=0.01, max_rmse_increase=0.02)
    ok, why = int8_gate("classification", {"int8_accuracy_delta": -0.004, "int8_speedup": 1.8}, limits)
    assert ok and why == "accuracy -0.0040 vs fp32, 1.80x the rows/s (registered)"
    ok, why = int8_gate("classification", {"int8_accuracy_delta": -0.03, "int8_speedup": 1.8}, limits)
    assert not ok and why.endswith("(not registered: beyond the limit 0.01)")
    ok, why = int8_gate("regression", {"int8_rmse_increase": 0.05, "int8_speedup": 2.0}, limits)
    assert not ok and why.startswith("RMSE +5.00% vs fp32")
    assert int8_gate("regression", {"int8_rmse_increase": 0.01, "int8_speedup": 2.0}, limits)[0]


def test_the_decision_rule():
    assert decide("accuracy", 0.8, None, 0.1).promote  # the first model
    assert decide("accuracy", 0.85, 0.80, 0.02).promote
    assert not decide("accuracy", 0.81, 0.80, 0.02).promote  # better, not by the margin
    assert decide("log_loss", 0.30, 0.40, 0.05).promote  # lower is better
    assert not decide("log_loss", 0.40, 0.30, 0.0).promote
    assert "worse by 0.1000" in decide("log_loss", 0.40, 0.30, 0.0).reason


@pytest.mark.slow
def test_the_gate_promotes_the_first_model_keeps_one_short_of_the_margin_and_promotes_a_better_one(spark, tmp_path):
    """Three runs on one store: a weak first model (one epoch at a tiny learning rate) becomes production;
    a good one asked to win by 0.9 does not; the same good one asked to win by 0.05 does (its training and
    scoring are reused: only the gate runs again)."""
    weak = ("train.epochs=1", "train.lr=0.00001")
    first = run_pipeline(spark, make_cfg(tmp_path, *weak, rows=3000))
    client = mlflow.MlflowClient(first.tracking_uri)
    cfg = make_cfg(tmp_path, "train.epochs=3", "evaluate.promote_margin=0.9", rows=3000)
    assert first.metrics["evaluate"]["promoted"] == 1.0
    assert str(client.get_model_version_by_alias(cfg.model_name, "production").version) == "1"

    second = run_pipeline(spark, cfg)
    ev = second.metrics["evaluate"]
    assert ev["promoted"] == 0.0
    candidate = str(second.metrics["train"]["model_version"])
    assert str(client.get_model_version_by_alias(cfg.model_name, "candidate").version) == candidate
    assert str(client.get_model_version_by_alias(cfg.model_name, "production").version) == "1"
    # both scores are from the same test rows: production's is what the first run measured
    assert ev["production_accuracy"] == pytest.approx(first.metrics["evaluate"]["accuracy"])
    run = client.search_runs(
        [client.get_experiment_by_name("dlpipe").experiment_id],
        filter_string="tags.`dlpipe.stage` = 'evaluate'",
        order_by=["attributes.start_time DESC"],
    )[0]
    assert run.data.tags["dlpipe.promotion"] == "kept production"
    # the gate weighed this run's test accuracy against production's, measured on the same rows
    gain = ev["accuracy"] - first.metrics["evaluate"]["accuracy"]
    said = f"accuracy {'better' if gain >= 0 else 'worse'} by {abs(gain):.4f}; margin 0.9"
    assert run.data.tags["dlpipe.promotion_reason"] == said
    assert client.get_model_version(cfg.model_name, candidate).tags["dlpipe.promotion"].endswith("margin 0.9")
    assert tracking.tracking_uri(cfg) == first.tracking_uri

    assert gain > 0.05, f"the good model should beat the weak one clearly: {ev['accuracy']} vs production's"
    third = run_pipeline(spark, make_cfg(tmp_path, "train.epochs=3", "evaluate.promote_margin=0.05", rows=3000))
    assert third.metrics["train"]["skipped"] == 1 and third.metrics["infer"]["skipped"] == 1
    assert third.metrics["evaluate"]["promoted"] == 1.0
    assert str(client.get_model_version_by_alias(cfg.model_name, "production").version) == candidate
    assert client.get_model_version(cfg.model_name, candidate).tags["dlpipe.promotion"].endswith("margin 0.05")


def test_the_decision_rule_with_a_required_baseline():
    assert decide("accuracy", 0.90, None, 0.0, baseline=0.85).promote
    kept = decide("accuracy", 0.85, None, 0.0, baseline=0.90)
    assert not kept.promote and kept.reason == "accuracy 0.8500 does not beat the tree baseline's 0.9000"
    assert not decide("accuracy", 0.90, 0.70, 0.0, baseline=0.90).promote  # a tie does not beat it
    assert decide("rmse", 1.0, None, 0.0, baseline=1.2).promote  # lower is better
    assert not decide("rmse", 1.3, 1.5, 0.0, baseline=1.2).promote  # better than production is not enough
