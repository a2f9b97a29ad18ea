"""The compress stage (dlpipe.model.compress): the candidate's variants made, measured side by side on the
validation rows, registered behind the raw-record interface and scored by infer."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch

from dlpipe.model.compress import passes
from dlpipe.model.onnxmodel import OnnxModule, export
from dlpipe.pipeline import run_pipeline
from dlpipe.serve import infer
from dlpipe.storage import dataset_paths
from tests.conftest import make_cfg


def test_an_onnx_export_answers_like_the_network_and_survives_saving(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3), torch.nn.Softmax(-1))
    x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    onnx = export(net, x[:2])  # exported on 2 rows, called with 50 and 1
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    assert np.allclose(onnx(torch.from_numpy(x)).numpy(), expected, atol=1e-5)
    assert onnx(torch.from_numpy(x[:1])).shape == (1, 3)
    loaded = OnnxModule.load(onnx.save(tmp_path))
    assert loaded.size_bytes() == onnx.size_bytes() > 0
    assert np.array_equal(loaded(torch.from_numpy(x)).numpy(), onnx(torch.from_numpy(x)).numpy())


def test_the_variant_gate_registers_within_the_limit_and_refuses_beyond(tmp_path):
    cfg = make_cfg(tmp_path, "compress.max_accuracy_drop=0.01", "compress.max_rmse_increase=0.02")
    ok, why = passes({"accuracy": 0.905}, {"accuracy": 0.91}, cfg, regression=False)
    assert ok and why == "accuracy -0.0050 vs fp32 (registered)"
    ok, why = passes({"accuracy": 0.89}, {"accuracy": 0.91}, cfg, regression=False)
    assert not ok and why.endswith("(not registered: beyond the limit 0.01)")
    assert not passes({"rmse": 1.03}, {"rmse": 1.0}, cfg, regression=True)[0]
    assert passes({"rmse": 1.01}, {"rmse": 1.0}, cfg, regression=True)[0]


@pytest.mark.slow
def test_variants_are_measured_side_by_side_registered_and_scored_by_infer(spark, tmp_path):
    """The ONNX variant and train's int8 beside fp32 in one table; the ONNX one registered as
    @candidate-onnx, answering raw records like fp32 and scoring the test split through infer.variant=onnx."""
    cfg = make_cfg(tmp_path, "compress.onnx=true", "quantize.enabled=true", rows=3000)
    result = run_pipeline(spark, cfg, stages=("generate", "ingest", "preprocess", "train", "compress"))
    m = result.metrics["compress"]
    assert m["onnx_registered"] == 1.0 and abs(m["onnx_accuracy_delta"]) <= 0.002, m
    for variant in ("fp32", "int8", "onnx"):
        assert (
            m[f"{variant}_rows_per_s"] > 0 and m[f"{variant}_spark_rows_per_s"] > 0 and m[f"{variant}_size_bytes"] > 0
        )
    assert m["fp32_speedup"] == 1.0 and m["best_variant_speedup"] == max(m["onnx_speedup"], m["int8_speedup"])
    assert m["int8_size_bytes"] < m["fp32_size_bytes"]  # int8 weights

    table = json.loads((tmp_path / "data/warehouse/tabular_example/variants/variants.json").read_text())
    assert [r["variant"] for r in table] == ["fp32", "onnx", "int8"]
    client = mlflow.MlflowClient(result.tracking_uri)
    run = client.search_runs(
        [client.get_experiment_by_name("dlpipe").experiment_id], filter_string="tags.`dlpipe.stage` = 'compress'"
    )[0]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "variants")}
    assert {"variants/table.json", "variants/table.csv", "variants/comparison.png"} <= logged, logged

    candidate = client.get_model_version_by_alias(cfg.model_name, "candidate")
    onnx = client.get_model_version_by_alias(cfg.model_name, "candidate-onnx")
    assert str(onnx.version) == str(table[1]["model_version"]) != str(candidate.version)
    assert onnx.tags["dlpipe.variant"] == "onnx" and onnx.tags["dlpipe.variant_of"] == str(candidate.version)

    from dlpipe.data.ingest import read_clean

    records = read_clean(spark, cfg).limit(40).toPandas()[[c.name for c in cfg.dataset.features]]
    fp32 = mlflow.pyfunc.load_model(f"models:/{cfg.model_name}@candidate").predict(records)
    answered = mlflow.pyfunc.load_model(f"models:/{cfg.model_name}@candidate-onnx").predict(records)
    assert (answered["predicted_class"] == fp32["predicted_class"]).all()
    assert np.allclose(np.stack(answered["probabilities"]), np.stack(fp32["probabilities"]), atol=1e-5)

    scored = infer.run(spark, make_cfg(tmp_path, "infer.variant=onnx", rows=3000))
    preds = spark.read.parquet(dataset_paths(cfg).predictions).toPandas()
    assert scored["rows_scored"] == len(preds) > 0 and set(preds["model_version"]) == {int(onnx.version)}

    again = run_pipeline(spark, cfg, stages=("compress",))  # unchanged candidate and data: reused
    assert again.metrics["compress"]["skipped"] == 1
