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
from dlpipe.ops.processes import pid_alive
from dlpipe.pipeline import run_pipeline
from dlpipe.serve import infer
from dlpipe.serve.serving import ModelServer
from dlpipe.storage import dataset_paths
from tests.conftest import make_cfg, prepare


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
    """Every variant beside fp32 in one table: ONNX, the pruned and fine-tuned network, the distilled student
    (both trained through the Horovod launcher) and train's int8. The ONNX one registered as @candidate-onnx,
    answering raw records like fp32 and scoring the test split through infer.variant=onnx; the trained ones
    registered exactly when their gate says so, and smaller than fp32."""
    cfg = prepare(
        spark,
        tmp_path,
        "compress.onnx=true",
        "quantize.enabled=true",
        "compress.prune.sparsity=0.5",
        "compress.prune.finetune_epochs=3",
        "compress.distill.enabled=true",
        "compress.distill.epochs=8",
        "compress.max_accuracy_drop=0.1",  # 3,000 rows: the gate itself is checked above
        rows=3000,
    )
    result = run_pipeline(spark, cfg, stages=("train", "compress"))
    m = result.metrics["compress"]
    assert m["onnx_registered"] == 1.0 and abs(m["onnx_accuracy_delta"]) <= 0.002, m
    variants = ("fp32", "onnx", "prune", "prune-onnx", "distill", "distill-onnx", "int8")
    for variant in variants:
        assert m[f"{variant}_rows_per_s"] > 0 and m[f"{variant}_size_bytes"] > 0
        assert (m.get(f"{variant}_spark_rows_per_s", 0) > 0) == (m[f"{variant}_registered"] == 1.0), variant
    for variant in variants[2:-1]:
        within = -m[f"{variant}_accuracy_delta"] <= cfg.compress.max_accuracy_drop
        assert m[f"{variant}_registered"] == float(within), (variant, m)
    registered = [v for v in variants[1:] if m[f"{v}_registered"] == 1.0]
    assert registered == list(variants[1:]), {k: v for k, v in m.items() if "accuracy" in k}
    assert m["fp32_speedup"] == 1.0 and m["best_variant_speedup"] == max(m[f"{v}_speedup"] for v in registered)
    assert m["int8_size_bytes"] < m["fp32_size_bytes"]  # int8 weights
    # 64-64 hidden units: half of each pruned; the student has 32 in one layer
    assert m["distill_size_bytes"] < m["prune_size_bytes"] < m["fp32_size_bytes"]
    for variant in ("prune", "distill"):  # compiled, it answers as it does
        assert abs(m[f"{variant}-onnx_accuracy_delta"] - m[f"{variant}_accuracy_delta"]) <= 0.002, m

    table = json.loads((tmp_path / "data/warehouse/tabular_example/variants/variants.json").read_text())
    assert [r["variant"] for r in table] == list(variants)
    client = mlflow.MlflowClient(result.tracking_uri)
    run = client.search_runs(
        [client.get_experiment_by_name("dlpipe").experiment_id], filter_string="tags.`dlpipe.stage` = 'compress'"
    )[0]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "variants")}
    curves = {"variants/prune_learning_curve.png", "variants/distill_learning_curve.png"}
    assert {"variants/table.json", "variants/table.csv", "variants/comparison.png", *curves} <= logged, logged
    for variant in registered:
        mv = client.get_model_version_by_alias(cfg.model_name, f"candidate-{variant}")
        assert mv.tags["dlpipe.variant"] == variant

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

    # the serving check: every variant behind `mlflow models serve` answers as its pyfunc does (fp32 is
    # test_stages.py's)
    for variant in registered:
        uri = f"models:/{cfg.model_name}@candidate-{variant}"
        with ModelServer(uri, result.tracking_uri, tmp_path / f"{variant}.log") as server:
            served = server.predict(records)
        local = mlflow.pyfunc.load_model(uri).predict(records)
        assert list(served["predicted_class"]) == list(local["predicted_class"]), variant
        assert np.allclose(np.stack(served["probabilities"]), np.stack(local["probabilities"]), atol=1e-5)
        assert not pid_alive(server.proc.pid)

    scored = infer.run(spark, make_cfg(tmp_path, "infer.variant=onnx", rows=3000))
    preds = spark.read.parquet(dataset_paths(cfg).predictions).toPandas()
    assert scored["rows_scored"] == len(preds) > 0 and set(preds["model_version"]) == {int(onnx.version)}

    again = run_pipeline(spark, cfg, stages=("compress",))  # unchanged candidate and data: reused
    assert again.metrics["compress"]["skipped"] == 1


def _mlp_with_dead_units(dead: list[int]) -> torch.nn.Sequential:
    """An MLP 5 -> 8 -> 8 -> 3 whose listed units of each hidden layer have no incoming weight or bias."""
    from dlpipe.train.models import build_mlp

    torch.manual_seed(0)
    net = build_mlp((5,), 3, hidden=[8, 8])
    with torch.no_grad():
        for linear in (net[1], net[3]):
            linear.weight[dead] = 0.0
            linear.bias[dead] = 0.0
    return net


def test_pruning_removes_whole_units_of_least_weight_and_keeps_the_answers_they_did_not_change():
    from dlpipe.model.prune import dense_layers, mlp_of, prune_layers, widths

    net = _mlp_with_dead_units([0, 2, 5, 7])  # 4 of 8 units in each hidden layer: the least important
    layers = dense_layers(net.state_dict())
    smaller = prune_layers(layers, 0.5)
    assert widths(layers) == [8, 8] and widths(smaller) == [4, 4]
    assert [tuple(w.shape) for w, _ in smaller] == [(4, 5), (4, 4), (3, 4)]  # the next layer's columns too
    pruned = mlp_of(smaller, (5,))
    x = torch.randn(64, 5)
    with torch.no_grad():
        assert torch.allclose(pruned(x), net(x), atol=1e-6)  # the dead units changed nothing
    alive = _mlp_with_dead_units([])  # the same weights with every unit alive: pruning now changes answers
    with torch.no_grad():
        assert not torch.allclose(mlp_of(prune_layers(dense_layers(alive.state_dict()), 0.5), (5,))(x), alive(x))
    assert widths(prune_layers(layers, 0.9)) == [1, 1]  # at least one unit stays


def test_pruning_refuses_a_network_that_is_not_dense_layers():
    from dlpipe.model.prune import dense_layers
    from dlpipe.train.models import build_cnn

    with pytest.raises(ValueError, match=r"0\.weight \(16, 1, 3, 3\) is not a dense layer's"):
        dense_layers(build_cnn((1, 8, 8), 3).state_dict())


def test_the_distillation_loss_blends_soft_targets_and_labels_by_alpha():
    from dlpipe.model.objective import Objective

    obj = Objective("classification")
    out, y = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 1])
    hard = obj.loss(out, y)
    assert obj.distilled(hard, out, out.clone(), 4.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)  # same as teacher
    assert obj.distilled(hard, out, -out, 4.0, 0.0).item() == pytest.approx(hard.item())  # labels only
    soft = obj.distilled(hard, out, -out, 4.0, 1.0).item()
    assert soft > 0 and obj.distilled(hard, out, -out, 4.0, 0.5).item() == pytest.approx(0.5 * soft + 0.5 * hard.item())
    reg = Objective("regression", 10.0, 2.0)
    assert reg.distilled(hard, torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]), 4.0, 1.0).item() == 4.0
