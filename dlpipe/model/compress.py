"""The compress stage: smaller, faster variants of the candidate, measured side by side and registered.

After train, each variant switched on in `compress.*` is made from the @candidate network:
- `onnx`: the network compiled to ONNX and run by ONNX Runtime;
- `prune`: whole hidden units removed (compress.prune.sparsity), then fine-tuned (dlpipe.model.prune);
- `distill`: a smaller student trained on the candidate's soft targets (compress.distill).
The two trained ones train through train's launcher (dlpipe.model.students); with compress.onnx, each is
also compiled to ONNX (`prune-onnx`, `distill-onnx`). Train's int8 variant, when registered for this
candidate, joins the comparison. Every variant is measured against the fp32 network on the validation rows
(streamed: the split may be larger than memory):
- quality: accuracy (regression: RMSE) and its delta to fp32;
- size on disk of what is registered;
- single-thread rows/s (what one Spark task gets) and its speedup over fp32;
- rows/s in the Spark scorer (udfs/score.py over the whole validation split, the second of two passes).

A new variant within `compress.max_accuracy_drop` (regression: `max_rmse_increase`) is registered behind the
raw-record interface as its own version, alias `candidate-<variant>`; `infer.variant=<variant>` scores with
it. The comparison goes to `<warehouse>/<dataset>/variants/variants.json` and to the stage's MLflow run as a
table (`variants/table.json`, `variants/table.csv`) and a plot (`variants/comparison.png`).
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np
from pyspark.sql import SparkSession

from dlpipe.config import Config
from dlpipe.data.stats import FittedStats
from dlpipe.model import task
from dlpipe.model.names import CANDIDATE, INT8_ALIAS, variant_alias
from dlpipe.stage import Plan, Stage, execute, require_input
from dlpipe.storage import HadoopFS, dataset_paths, lineage, storage_settings

log = logging.getLogger(__name__)
TABLE = "variants.json"


def passes(variant: dict, fp32: dict, cfg: Config, regression: bool) -> tuple[bool, str]:
    """(register it?, why): its quality against fp32's on the same rows, within compress's limit."""
    if regression:
        change = variant["rmse"] / max(fp32["rmse"], 1e-12) - 1
        ok, what, limit = (
            change <= cfg.compress.max_rmse_increase,
            f"RMSE {change:+.2%}",
            cfg.compress.max_rmse_increase,
        )
    else:
        delta = variant["accuracy"] - fp32["accuracy"]
        ok, what, limit = (
            -delta <= cfg.compress.max_accuracy_drop,
            f"accuracy {delta:+.4f}",
            cfg.compress.max_accuracy_drop,
        )
    return ok, f"{what} vs fp32 ({'registered' if ok else f'not registered: beyond the limit {limit}'})"


def size_on_disk(model) -> int:
    """Bytes of a model as saved: an ONNX model's own; TorchScript for a scripted one, else its state dict."""
    import torch

    if hasattr(model, "size_bytes"):
        return model.size_bytes()
    buf = io.BytesIO()
    if isinstance(model, torch.jit.ScriptModule):
        torch.jit.save(model, buf)
    else:
        torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def spark_rows_per_s(spark: SparkSession, cfg: Config, stats: FittedStats, mv) -> float:
    """Rows/s of the Spark scorer (udfs/score.py) over the validation split with model version mv (a
    ModelRef): the second of two passes (the first loads the model into the Python workers)."""
    from dlpipe.serve.infer import score_rows

    rows = spark.read.parquet(dataset_paths(cfg).split("val")).select(stats.key, "label", "features")
    n = stats.rows.get("val") or rows.count()
    for _ in range(2):
        started = time.perf_counter()
        score_rows(spark, cfg, rows, stats, mv).write.format("noop").mode("overwrite").save()
        seconds = time.perf_counter() - started
    return n / seconds


def plot(table: list[dict], metric: str):
    """Speedup (single thread and Spark: 0 for a variant not registered, so never scored there), quality delta
    and size of each variant, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in table]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    panels = [
        (
            "rows/s over fp32's",
            [r["speedup"] for r in table],
            np.nan_to_num(np.array([r["spark_speedup"] for r in table], float)),
        ),
        (f"{metric} delta vs fp32", [r[f"{metric}_delta"] for r in table], None),
        ("size on disk (KiB)", [r["size_bytes"] / 1024 for r in table], None),
    ]
    at = np.arange(len(names))
    for ax, (title, first, second) in zip(axes, panels, strict=True):
        if second is None:
            ax.bar(at, first)
        else:
            ax.bar(at - 0.2, first, width=0.4, label="one thread")
            ax.bar(at + 0.2, second, width=0.4, label="Spark scorer")
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
            ax.legend(fontsize="small")
        ax.set_xticks(at, names)
        ax.set_title(title, fontsize="medium")
    fig.suptitle("the candidate's variants (validation rows)")
    fig.tight_layout()
    return fig


class Compress(Stage):
    """@candidate -> its compressed variants, measured against it and registered (see the module)."""

    name = "compress"

    def plan(self, spark: SparkSession, cfg: Config) -> Plan:
        from dlpipe import tracking

        if not cfg.compress.enabled:
            raise ValueError(
                "the compress stage has no variant to make: set compress.onnx=true, compress.prune.sparsity (0-1) "
                "or compress.distill.enabled=true (conf or override)"
            )
        if cfg.dataset.source.format == "image":
            raise ValueError("compress: the variants take raw records; image models are not compressed yet")
        tracking.require_active_run("compress")
        paths = dataset_paths(cfg)
        require_input(spark, paths.stats, f"compress: no preprocessed data at {paths.petastorm}: run preprocess")
        mv = tracking.model_version_for(f"models:/{cfg.model_name}@{CANDIDATE}")
        val = paths.split("val")
        inputs = {val: lineage.dataset_fingerprint(spark, val), f"models:/{mv.name}/{mv.version}": mv.run_id or ""}
        fp = lineage.digest({"stage": "compress", "inputs": inputs, "compress": cfg.compress.model_dump()})
        return Plan(fp, inputs, outputs={"variants": paths.variants}, context={"candidate": mv})

    def compute(self, spark: SparkSession, cfg: Config, plan: Plan, tmp: dict[str, str]) -> dict:
        from dlpipe.data.features import model_stats, read_stats
        from dlpipe.model.onnxmodel import export
        from dlpipe.model.quantize import measure
        from dlpipe.model.rawmodel import network_of

        candidate = plan.context["candidate"]
        stats = model_stats(candidate, lambda: read_stats(spark, cfg))
        regression = stats.is_regression
        metric = "rmse" if regression else "accuracy"
        fp32 = _inference_form(network_of(candidate.download_uri))
        batches = _val_batches(cfg, stats)
        example = next(iter(batches()))[0][:5]
        made = {"onnx": export(fp32, example)} if cfg.compress.onnx else {}
        trained = _trained_variants(spark, cfg, stats, fp32, example)
        for name, net in trained.items():
            made[name] = net
            if cfg.compress.onnx:  # the trained variants compiled too: the smallest network, the fastest runtime
                made[f"{name}-onnx"] = export(net, example)
        models: dict[str, Any] = {"fp32": fp32, **made}
        registered = {"fp32": candidate}  # variant -> its registered version (ModelRef)
        int8 = _registered_int8(cfg, candidate)
        if int8 is not None:
            models["int8"] = network_of(int8.download_uri)
            registered["int8"] = int8
        measured = measure(models, batches(), regression)
        verdicts = {}
        for name, model in made.items():
            ok, why = passes(measured[name], measured["fp32"], cfg, regression)
            verdicts[name] = why
            log.info("compress: %s variant: %s, %.2fx fp32's single-thread rows/s", name, why, _speedup(measured, name))
            if ok:
                registered[name] = _register(spark, cfg, stats, name, model, candidate, example)
        spark_rates = {name: spark_rows_per_s(spark, cfg, stats, mv) for name, mv in registered.items()}
        table = [_row(name, models[name], measured, spark_rates, registered, verdicts, metric) for name in models]
        HadoopFS(spark).write_json(f"{tmp['variants']}/{TABLE}", table)
        _log_table(table, metric)
        return _metrics(table, metric, cfg)


def run(spark: SparkSession, cfg: Config, force: bool = False) -> dict:
    """The compress stage (see Compress)."""
    return execute(Compress(), spark, cfg, force)


def _inference_form(model):
    """The network ready to score: a pickled module in eval mode; a torch.export program (how MLflow 3 saves
    the candidate) is in that form already and refuses eval()."""
    import torch

    return model if isinstance(model, torch.fx.GraphModule) else model.eval()


def _trained_variants(spark: SparkSession, cfg: Config, stats: FittedStats, fp32, example: np.ndarray) -> dict:
    """The pruned and the distilled variants switched on (dlpipe.model.students), in their served form; the
    learning curve of each goes to the run as variants/<variant>_learning_curve.png."""
    import matplotlib.pyplot as plt
    import mlflow

    from dlpipe.model import students
    from dlpipe.model.objective import served
    from dlpipe.train.live import learning_curve

    wanted = {}
    if cfg.compress.prune.sparsity > 0:
        wanted["prune"] = students.pruned
    if cfg.compress.distill.enabled:
        wanted["distill"] = students.distilled
    if not wanted:
        return {}
    teacher = students.candidate_network(fp32, stats, example)
    out = {}
    for name, make in wanted.items():
        net, history = make(spark, cfg, stats, teacher)
        out[name] = served(net, stats).eval()
        if history:
            fig = learning_curve(history)
            mlflow.log_figure(fig, f"variants/{name}_learning_curve.png")
            plt.close(fig)
    return out


def _speedup(measured: dict, name: str) -> float:
    return measured[name]["rows_per_s"] / measured["fp32"]["rows_per_s"]


def _val_batches(cfg: Config, stats: FittedStats):
    """A function giving a fresh stream of the validation split's (x, y) batches."""
    from dlpipe.train.loader import ShardLoader

    def batches():
        loader = ShardLoader(
            dataset_paths(cfg).split("val"),
            0,
            1,
            4096,
            stats.feature_shape,
            shuffle=False,
            storage=storage_settings(cfg),
            label_dtype=task.label_numpy_type(stats.task),
        )
        return ((x.numpy(), y.numpy()) for x, y in loader.epoch(0))

    return batches


def _registered_int8(cfg: Config, candidate):
    """Train's int8 variant of this very candidate, if it registered one (its run is the candidate's)."""
    from mlflow.exceptions import MlflowException

    from dlpipe import tracking

    try:
        int8 = tracking.model_version_for(f"models:/{cfg.model_name}@{INT8_ALIAS}")
    except MlflowException:
        return None
    return int8 if int8.run_id == candidate.run_id else None


def _register(spark: SparkSession, cfg: Config, stats: FittedStats, name: str, model, candidate, example):
    """Log the variant behind the raw-record interface as a new version under alias candidate-<name>; its
    ModelRef. example: a few validation rows' features (a torch variant's own input example)."""
    from dlpipe import tracking
    from dlpipe.model.rawmodel import raw_example, register_variant

    requirements = tracking.pip_requirements()
    if name.endswith("onnx"):
        import onnxruntime

        requirements.append(f"onnxruntime=={onnxruntime.__version__}")
    tags = {"dlpipe.variant_of": str(candidate.version)}
    records = raw_example(spark, cfg)
    version = register_variant(cfg, stats, model, name, variant_alias(name), records, requirements, tags, example)
    log.info("compress: registered %s version %s as @%s", cfg.model_name, version, variant_alias(name))
    return tracking.model_version_for(f"models:/{cfg.model_name}/{version}")


def _row(name, model, measured, spark_rates, registered, verdicts, metric) -> dict:
    fp32 = measured["fp32"]
    return {
        "variant": name,
        "model_version": registered[name].version if name in registered else None,
        "registered": name in registered,
        metric: measured[name][metric],
        f"{metric}_delta": measured[name][metric] - fp32[metric],
        "size_bytes": size_on_disk(model),
        "rows_per_s": measured[name]["rows_per_s"],
        "speedup": _speedup(measured, name),
        "spark_rows_per_s": spark_rates.get(name),
        "spark_speedup": (spark_rates[name] / spark_rates["fp32"]) if name in spark_rates else None,
        "gate": verdicts.get(name, "the reference" if name == "fp32" else "train's int8 gate"),
    }


def _log_table(table: list[dict], metric: str) -> None:
    import matplotlib.pyplot as plt
    import mlflow
    import pandas as pd

    mlflow.log_dict(table, "variants/table.json")
    mlflow.log_text(pd.DataFrame(table).to_csv(index=False), "variants/table.csv")
    fig = plot(table, metric)
    mlflow.log_figure(fig, "variants/comparison.png")
    plt.close(fig)


def _metrics(table: list[dict], metric: str, cfg: Config) -> dict:
    out: dict[str, Any] = {}
    for r in table:
        v = r["variant"]
        for key in (f"{metric}_delta", "size_bytes", "rows_per_s", "speedup", "spark_rows_per_s"):
            if r[key] is not None:
                out[f"{v}_{key}"] = float(r[key])
        out[f"{v}_registered"] = float(r["registered"])
    within = [r for r in table if r["variant"] != "fp32" and r["registered"]]
    if within:
        best = max(within, key=lambda r: r["speedup"])
        out["best_variant_speedup"] = best["speedup"]
        out["_outputs"] = [f"models:/{cfg.model_name}/{r['model_version']}" for r in within]
        log.info("compress: best variant %s, %.2fx fp32's single-thread rows/s", best["variant"], best["speedup"])
    return out
