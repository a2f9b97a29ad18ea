"""Inference group: batch scoring throughput of our UDF against the other ways to score in Spark.

One MLflow-registered MLP (64 features -> 128 -> 128 -> 4 classes, probabilities out) scores the same
BENCH_INFER_ROWS rows (default 1,000,000) with each method, in one Spark session (local[2]); every
method's output (the row key and the scores) is fully computed (`noop` sink) and every rate is the best
of two runs (the first warms the Python workers):
- udf: dlpipe's scorer (udfs/score.py `score_frame`: mapInArrow, model cached per worker, key carried
  through, every cell checked, quarantine_reason out) over the dataset's NdarrayCodec cells;
  `pandas_udf` is its iterator pandas UDF form;
- map_in_arrow: a plain `mapInArrow` scorer over the same cells (model loaded per task, Arrow decode);
- predict_batch_udf: Spark's `pyspark.ml.functions.predict_batch_udf` over an array<float> column;
- spark_udf: MLflow's `mlflow.pyfunc.spark_udf` over the same array column;
- torch: single-process PyTorch over the same rows already in memory (the ceiling, no Spark at all);
- passthrough: a `mapInArrow` that ships the same cells to Python and only hands the id back, no model:
  Spark's own cost, the floor under any mapInArrow scorer (udf_vs_passthrough: how close we are to it);
- quantized_speedup: our scorer with the dynamically quantized (int8) model over the fp32 one.

The candidate's variants (the compress stage's: int8; onnx run by ONNX Runtime; prune, half of each hidden
layer's units removed then fine-tuned; distill, a [32] student; and both of those compiled to ONNX) are
measured as that stage measures them: `<variant>_single_thread_rows_per_s` and `<variant>_speedup` over
fp32's (one torch or ONNX Runtime thread, what a Spark task gets), `<variant>_udf_rows_per_s` in our scorer,
and `<variant>_agreement` (the share of rows whose class matches fp32's: the accuracy gate's stand-in, the
weights being random). The bench has no labels, so prune and distill learn from the network's soft targets
alone, on the first 200,000 rows, in this process; agreement is measured on the last 100,000.
`best_variant_speedup` is the best single-thread speedup among variants within 0.01 of fp32
(`best_variant`), and `best_variant_udf_vs_passthrough` is that variant's scorer over the floor.

Every method gets the same Arrow batches of BATCH = 4096 rows (spark.sql.execution.arrow.maxRecordsPerBatch,
what the infer job sets from infer.batch_size, whose default is 4096); predict_batch_udf's batch_size is
the same 4096. Each method runs in Python workers of its own, as it would in an application of its own:
Spark keys its pools of Python workers by the UDF's environment, so a variable naming the method gives
each a fresh pool. Shared workers would carry one method's state into the next: our scorer freezes the
worker's objects out of the garbage collector (dlpipe/serve/scoring.py), which would speed up every method
measured after it in the same processes.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dlpipe.data.tensors import decode_arrow, encode_arrow

ROOT = Path("data/bench/inference-root").resolve()
DIM, CLASSES, BATCH = 64, 4, 4096


def _write_rows(path: Path, rows: int, files: int = 8) -> np.ndarray:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, DIM)).astype(np.float32)
    for i, idx in enumerate(np.array_split(np.arange(rows), files)):
        table = pa.table(
            {
                "id": pa.array(idx.astype(np.int64)),
                "features": encode_arrow(x[idx]),
                "features_arr": pa.FixedSizeListArray.from_arrays(pa.array(x[idx].reshape(-1)), DIM).cast(
                    pa.list_(pa.float32())
                ),
            }
        )
        pq.write_table(table, path / f"part-{i:05d}.parquet", row_group_size=65536)
    return x


def _register_int8(model: torch.nn.Module) -> str:
    import mlflow

    from dlpipe.model.quantize import quantize_dynamic

    int8 = quantize_dynamic(model)
    with mlflow.start_run():
        return mlflow.pytorch.log_model(int8, name="model_int8", serialization_format="pickle").model_uri


def _register_model(tracking_uri: str) -> tuple[str, torch.nn.Module]:
    import mlflow
    from mlflow.models import infer_signature

    from dlpipe.train.models import build_mlp, with_probabilities

    torch.manual_seed(0)
    model = with_probabilities(build_mlp((DIM,), CLASSES, [128, 128])).eval()
    example = np.random.default_rng(1).normal(size=(5, DIM)).astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(example)).numpy()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("bench-inference")
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(
            model, name="model", signature=infer_signature(example, out), input_example=example
        )
    return info.model_uri, model


def _register_onnx(model: torch.nn.Module, x: np.ndarray) -> str:
    """The ONNX variant as the compress stage registers it: behind the raw-record pyfunc (its statistics only
    describe the tensor: scorers read the network, never predict)."""
    import json
    import tempfile

    import mlflow

    from dlpipe.data.stats import FittedStats
    from dlpipe.model.onnxmodel import export
    from dlpipe.model.rawmodel import RawRecordModel

    stats = FittedStats(
        key="id", label="label", features=(), feature_names=(), feature_shape=(DIM,), num_classes=CLASSES
    )
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export(model, x[:5]).save(Path(tmp))
        (Path(tmp) / "stats.json").write_text(stats.to_json())
        (Path(tmp) / "columns.json").write_text(json.dumps([]))
        artifacts = {"onnx": str(onnx), "stats": f"{tmp}/stats.json", "columns": f"{tmp}/columns.json"}
        with mlflow.start_run():
            return mlflow.pyfunc.log_model(
                name="model_onnx", python_model=RawRecordModel(), artifacts=artifacts
            ).model_uri


def _register_torch(model: torch.nn.Module, name: str, x: np.ndarray) -> str:
    import mlflow
    from mlflow.models import infer_signature

    example = x[:5]
    with torch.no_grad():
        out = model.eval()(torch.from_numpy(example)).numpy()
    with mlflow.start_run():
        return mlflow.pytorch.log_model(
            model, name=name, signature=infer_signature(example, out), input_example=example
        ).model_uri


def _students(model: torch.nn.Module, x: np.ndarray, rows: int = 200_000) -> dict[str, torch.nn.Module]:
    """The compress stage's two trained variants of the bench's network, made as it makes them (pruning half
    of each hidden layer's units, then fine-tuning; a [32] student) but trained in this process on the bench
    rows, with the network's soft targets as the only labels (the bench rows have none); served forms."""
    from dlpipe.model.objective import Objective
    from dlpipe.model.prune import dense_layers, mlp_of, prune_layers
    from dlpipe.train.models import build_mlp, with_probabilities

    network = model[0]  # with_probabilities(mlp): the logits
    pruned = mlp_of(prune_layers(dense_layers(network.state_dict()), 0.5), (DIM,))
    torch.manual_seed(0)
    student = build_mlp((DIM,), CLASSES, [32])
    objective, xs = Objective("classification"), torch.from_numpy(x[:rows])
    with torch.no_grad():
        targets = network(xs)
    for net, epochs in ((pruned, 2), (student, 6)):
        optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(epochs):
            for i in range(0, rows, 1024):
                out = net(xs[i : i + 1024])
                zero = torch.zeros(())
                loss = objective.distilled(zero, out, targets[i : i + 1024], 2.0, 1.0) / len(out)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return {"prune": with_probabilities(pruned).eval(), "distill": with_probabilities(student).eval()}


def _variants(x: np.ndarray, uris: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per model: single-thread rows/s on x and, for a variant, the share of rows whose class matches fp32's."""
    from dlpipe.model.quantize import rows_per_second
    from dlpipe.serve.scoring import load_model

    models = {name: load_model(uri) for name, uri in uris.items()}
    with torch.inference_mode():
        answers = {name: m(torch.from_numpy(x)).numpy().argmax(1) for name, m in models.items()}
    return {
        name: {"rows_per_s": rows_per_second(m, x), "agreement": float((answers[name] == answers["fp32"]).mean())}
        for name, m in models.items()
    }


def _own_workers(spark, method: str) -> None:
    """UDFs built after this run in Python workers of their own (Spark pools workers by UDF environment)."""
    spark.sparkContext.environment["DLPIPE_BENCH_METHOD"] = method


def _rate(df, rows: int) -> float:
    best = 0.0
    for _ in range(2):
        started = time.perf_counter()
        df.write.format("noop").mode("overwrite").save()
        best = max(best, rows / (time.perf_counter() - started))
    return best


def _map_in_arrow(df, model_uri: str, tracking_uri: str):
    def score(batches):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
        torch.set_num_threads(1)
        for batch in batches:
            x = decode_arrow(batch.column(1), np.float32, (DIM,))
            with torch.inference_mode():
                p = model(torch.from_numpy(x)).numpy()
            offsets = pa.array(np.arange(0, p.size + 1, CLASSES, dtype=np.int32))
            yield pa.RecordBatch.from_arrays(
                [
                    batch.column(0),
                    pa.array(p.argmax(1).astype(np.int32)),
                    pa.ListArray.from_arrays(offsets, pa.array(p.reshape(-1))),
                ],
                names=["id", "prediction", "probabilities"],
            )

    return df.select("id", "features").mapInArrow(score, "id long, prediction int, probabilities array<float>")


def _passthrough(df):
    def passthrough(batches):
        for batch in batches:
            yield pa.RecordBatch.from_arrays([batch.column(0)], names=["id"])

    return df.select("id", "features").mapInArrow(passthrough, "id long")


def _predict_batch_udf(df, model_uri: str, tracking_uri: str):
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, FloatType

    def make_predict_fn():
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
        torch.set_num_threads(1)

        def predict(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(x.astype(np.float32, copy=False))).numpy()

        return predict

    udf = predict_batch_udf(
        make_predict_fn, return_type=ArrayType(FloatType()), batch_size=BATCH, input_tensor_shapes=[[DIM]]
    )
    return df.select("id", udf(F.col("features_arr")).alias("probabilities"))


def _spark_udf(spark, df, model_uri: str):
    import mlflow
    from pyspark.sql import functions as F

    udf = mlflow.pyfunc.spark_udf(spark, model_uri, result_type="array<float>", env_manager="local")
    return df.select("id", udf(F.col("features_arr")).alias("probabilities"))


def _torch(x: np.ndarray, model_uri: str) -> float:
    from dlpipe.serve.scoring import load_model

    model = load_model(model_uri)
    torch.set_num_threads(2)  # the two cores Spark gets
    best = 0.0
    for _ in range(2):
        started = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(x), BATCH):
                model(torch.from_numpy(x[i : i + BATCH]))
        best = max(best, len(x) / (time.perf_counter() - started))
    return best


def run() -> dict[str, float]:
    from pyspark.sql import functions as F

    from dlpipe.config import load_config
    from dlpipe.session import build_spark
    from udfs.score import score_column, score_frame

    rows = int(os.environ.get("BENCH_INFER_ROWS", "1000000"))
    data = ROOT / "rows"
    x = _write_rows(data, rows)
    shutil.rmtree(ROOT / "mlruns", ignore_errors=True)
    tracking_uri = f"sqlite:///{ROOT}/mlruns/mlflow.db"
    (ROOT / "mlruns").mkdir(parents=True, exist_ok=True)
    model_uri, model = _register_model(tracking_uri)
    int8_uri = _register_int8(model)
    uris = {"fp32": model_uri, "int8": int8_uri, "onnx": _register_onnx(model, x)}
    for name, student in _students(model, x).items():
        uris[name] = _register_torch(student, f"model_{name}", x)
        uris[f"{name}-onnx"] = _register_onnx(student, x)
    torch_rate = _torch(x, model_uri)
    variants = _variants(x[-100_000:], uris)  # rows the students never trained on

    cfg = load_config("local", [f"project.root={ROOT}", "spark.conf.spark.ui.enabled=false"])
    spark = build_spark(cfg)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(BATCH))
    try:
        df = spark.read.parquet(data.as_uri())
        _own_workers(spark, "udf")
        ours = _rate(score_frame(df, model_uri, (DIM,), ["id"], tracking_uri), rows)
        udf = {"fp32": ours}
        for name, uri in uris.items():
            if name != "fp32":
                _own_workers(spark, f"udf_{name}")
                udf[name] = _rate(score_frame(df, uri, (DIM,), ["id"], tracking_uri), rows)
        _own_workers(spark, "pandas_udf")
        pandas_udf = _rate(df.select("id", score_column(F.col("features"), model_uri, (DIM,), tracking_uri)), rows)
        _own_workers(spark, "map_in_arrow")
        arrow = _rate(_map_in_arrow(df, model_uri, tracking_uri), rows)
        _own_workers(spark, "predict_batch_udf")
        pbu = _rate(_predict_batch_udf(df, model_uri, tracking_uri), rows)
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # spark_udf's workers resolve the URI with it
        _own_workers(spark, "spark_udf")
        sudf = _rate(_spark_udf(spark, df, model_uri), rows)
        _own_workers(spark, "passthrough")
        floor = _rate(_passthrough(df), rows)
    finally:
        spark.stop()
    figures = {
        "rows": rows,
        "udf_rows_per_s": ours,
        "pandas_udf_rows_per_s": pandas_udf,
        "map_in_arrow_rows_per_s": arrow,
        "predict_batch_udf_rows_per_s": pbu,
        "spark_udf_rows_per_s": sudf,
        "torch_rows_per_s": torch_rate,
        "passthrough_rows_per_s": floor,
        "udf_vs_map_in_arrow": ours / arrow,
        "udf_vs_predict_batch_udf": ours / pbu,
        "udf_vs_spark_udf": ours / sudf,
        "udf_vs_torch": ours / torch_rate,
        "udf_vs_passthrough": ours / floor,
        "udf_int8_rows_per_s": udf["int8"],
        "quantized_speedup": udf["int8"] / ours,
    }
    for name, m in variants.items():
        figures[f"{name}_single_thread_rows_per_s"] = m["rows_per_s"]
        figures[f"{name}_speedup"] = m["rows_per_s"] / variants["fp32"]["rows_per_s"]
        figures[f"{name}_udf_rows_per_s"] = udf[name]
        figures[f"{name}_agreement"] = m["agreement"]
    within = [n for n in variants if n != "fp32" and variants[n]["agreement"] >= 0.99]
    if within:
        best = max(within, key=lambda n: figures[f"{n}_speedup"])
        figures["best_variant"] = best
        figures["best_variant_speedup"] = figures[f"{best}_speedup"]
        figures["best_variant_udf_vs_passthrough"] = udf[best] / floor
    return figures
