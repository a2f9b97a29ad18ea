"""What the notebooks in notebooks/ call, so that they hold no logic of their own: a config and session
rooted in the project folder, the datasets and MLflow runs as tables, and the plots people want to see.

`DLPIPE_NOTEBOOK_ROOT` moves everything a notebook writes (data, MLflow store) to another folder, and
`DLPIPE_NOTEBOOK_OVERRIDES` (key.path=value items, space-separated, quoted as in a shell) goes after the notebook's own
overrides: a notebook run headless (the tests, a scheduled run) is changed without editing it.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

import pandas as pd
from pyspark.sql import DataFrame, SparkSession

from dlpipe.config import Config, default_conf_dir, load_config
from dlpipe.storage import dataset_paths


def start(*overrides: str, env: str | None = None) -> tuple[Config, SparkSession]:
    """The config (conf/ + env + overrides + $DLPIPE_NOTEBOOK_OVERRIDES, rooted in the project folder or
    $DLPIPE_NOTEBOOK_ROOT) and its Spark session, with dlpipe's progress logging on."""
    from dlpipe.cli import setup_logging
    from dlpipe.session import build_spark

    conf_dir = default_conf_dir()
    root = os.environ.get("DLPIPE_NOTEBOOK_ROOT") or str(conf_dir.resolve().parent)
    more = shlex.split(os.environ.get("DLPIPE_NOTEBOOK_OVERRIDES", ""))
    cfg = load_config(env, [f"project.root={root}", *overrides, *more], conf_dir=conf_dir)
    setup_logging()
    _figures_as_images()
    return cfg, build_spark(cfg)


def _figures_as_images() -> None:
    """In a notebook, a cell whose value is a matplotlib Figure shows it as a PNG (our plots draw on the
    Agg backend, which the inline display would otherwise not pick up)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    from IPython.core.pylabtools import print_figure
    from matplotlib.figure import Figure

    shell.display_formatter.formatters["image/png"].for_type(Figure, lambda fig: print_figure(fig, "png"))


def run(spark: SparkSession, cfg: Config, force: bool = False):
    """The whole pipeline (unchanged stages are skipped); the PipelineResult."""
    from dlpipe.pipeline import run_pipeline

    return run_pipeline(spark, cfg, force=force)


def datasets(spark: SparkSession, cfg: Config) -> dict[str, DataFrame]:
    """Every dataset the pipeline has written, by name, as Spark DataFrames."""
    from dlpipe.storage import HadoopFS

    paths = dataset_paths(cfg)
    found = {
        "clean": paths.clean,
        "quarantine": paths.quarantine,
        "train": paths.split("train"),
        "val": paths.split("val"),
        "test": paths.split("test"),
        "predictions": paths.predictions,
    }
    fs = HadoopFS(spark)
    return {name: spark.read.parquet(uri) for name, uri in found.items() if fs.exists(uri)}


def quarantine_reasons(spark: SparkSession, cfg: Config) -> pd.DataFrame:
    """How many input rows were quarantined, by reason code."""
    q = datasets(spark, cfg)["quarantine"]
    return q.groupBy("reason_code").count().orderBy("count", ascending=False).toPandas()


FIGURES = ("rows_in", "rows_quarantined", "best_val_accuracy", "best_val_mae", "accuracy", "auc", "rmse", "seconds")


def runs(cfg: Config) -> pd.DataFrame:
    """The MLflow runs of this dataset, newest first: stage, status and the main figures."""
    import mlflow

    from dlpipe.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(cfg))
    df = mlflow.search_runs(
        experiment_names=[cfg.tracking.experiment],
        filter_string=f"tags.`dlpipe.dataset` = '{cfg.dataset.name}'",
        order_by=["attributes.start_time DESC"],
    )
    wanted = ["run_id", "tags.dlpipe.stage", "status", "start_time"] + [
        c for c in df.columns if c.startswith("metrics.") and c.split(".", 1)[1] in FIGURES
    ]
    return df[[c for c in wanted if c in df.columns]]


def last_run(cfg: Config, stage: str):
    """The newest MLflow run of a stage of this dataset."""
    from mlflow import MlflowClient

    from dlpipe.tracking import last_stage_run, tracking_uri

    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    found = last_stage_run(client, exp.experiment_id, stage, cfg.dataset.name) if exp is not None else None
    if found is None:
        raise LookupError(f"no {stage} run for dataset {cfg.dataset.name} yet: run the pipeline first")
    return found


def history(cfg: Config) -> list[dict[str, Any]]:
    """The last training run's per-epoch metrics, as the ranks recorded them."""
    from mlflow import MlflowClient

    from dlpipe.tracking import tracking_uri

    client = MlflowClient(tracking_uri(cfg))
    run_id = last_run(cfg, "train").info.run_id
    by_epoch: dict[int, dict[str, Any]] = {}
    for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "train_mae", "val_mae"):
        for m in client.get_metric_history(run_id, key):
            by_epoch.setdefault(m.step, {"epoch": m.step})[key] = m.value
    return [by_epoch[e] for e in sorted(by_epoch)]


def learning_curve(cfg: Config):
    """Loss and accuracy (or MAE) per epoch of the last training run."""
    from dlpipe.train.live import learning_curve as plot

    return plot(history(cfg))


def prediction_plot(spark: SparkSession, cfg: Config):
    """Classification: the confusion matrix of the test predictions; regression: predicted vs true."""
    from dlpipe.data.features import read_stats
    from dlpipe.model import evaluate

    preds = datasets(spark, cfg)["predictions"]
    stats = read_stats(spark, cfg)  # the task the predictions were made for, not the config's of now
    if stats.is_regression:
        return evaluate.plot_regression(preds)
    names = stats.class_names
    return evaluate.plot_confusion(evaluate.confusion_matrix(preds, len(names)), names)


def model_versions(cfg: Config) -> pd.DataFrame:
    """Every version of the registered model: its aliases, run and the test score its evaluation logged."""
    from mlflow import MlflowClient

    from dlpipe.tracking import tracking_uri

    client = MlflowClient(tracking_uri(cfg))
    rows = []
    for mv in client.search_model_versions(f"name = '{cfg.model_name}'"):
        rows.append(
            {
                "version": int(mv.version),
                "aliases": ", ".join(mv.aliases),
                "variant": mv.tags.get("dlpipe.variant", "fp32"),
                "run_id": mv.run_id,
                "promotion": mv.tags.get("dlpipe.promotion", ""),
                "created": pd.Timestamp(mv.creation_timestamp, unit="ms"),
            }
        )
    return pd.DataFrame(rows).sort_values("version").reset_index(drop=True)


def load_model(cfg: Config, alias: str = "production"):
    """The registered model under alias (the served form: probabilities or values), on the CPU."""
    from dlpipe.serve.scoring import load_model as load
    from dlpipe.tracking import tracking_uri

    return load(f"models:/{cfg.model_name}@{alias}", tracking_uri(cfg))


def sample_test_rows(spark: SparkSession, cfg: Config, n: int = 8) -> tuple[pd.DataFrame, Any]:
    """n test rows (key, label) and their features as one float32 array, ready for the model."""
    import numpy as np

    from dlpipe.data.features import read_stats
    from dlpipe.data.tensors import decode_cells

    stats = read_stats(spark, cfg)
    rows = datasets(spark, cfg)["test"].orderBy(stats.key).limit(n).toPandas()
    x = decode_cells(rows["features"].tolist(), np.float32, stats.feature_shape)
    return rows[[stats.key, "label"]], x


def sample_raw_records(spark: SparkSession, cfg: Config, n: int = 5) -> pd.DataFrame:
    """n test rows as a user would send them to the registered model: the key and the raw feature columns,
    as the clean dataset holds them (before any scaling or encoding)."""
    from dlpipe.data.features import read_stats
    from dlpipe.data.ingest import read_clean

    key = read_stats(spark, cfg).key
    test_keys = datasets(spark, cfg)["test"].select(key).orderBy(key).limit(n)
    clean = read_clean(spark, cfg).select(key, *[c.name for c in cfg.dataset.features])
    return clean.join(test_keys, key).orderBy(key).toPandas()


def score_in_memory(model, x) -> Any:
    """The model's answer for x, in this process (what the batch job computes per Arrow batch)."""
    from dlpipe.serve.scoring import predict_proba

    return predict_proba(model, x)


COMPARED = ("accuracy", "macro_f1", "auc", "log_loss", "rmse", "mae", "r2")


def baseline_comparison(cfg: Config) -> pd.DataFrame:
    """The last evaluation's test metrics of the network beside the tree baseline's (dlpipe.model.baseline)."""
    from dlpipe.model.baseline import PREFIX, beats

    metrics = last_run(cfg, "evaluate").data.metrics
    rows = [
        {
            "metric": m,
            "network": metrics[m],
            "tree baseline": metrics[PREFIX + m],
            "network better": beats(m, metrics[m], metrics[PREFIX + m]),
        }
        for m in COMPARED
        if m in metrics and PREFIX + m in metrics
    ]
    if not rows:
        raise LookupError("the last evaluate run has no tree baseline: run with evaluate.baseline.enabled=true")
    return pd.DataFrame(rows)


def baseline_plot(cfg: Config):
    """The network's and the tree baseline's test metrics side by side."""
    from dlpipe.model.baseline import plot_comparison

    table = baseline_comparison(cfg)
    network = dict(zip(table["metric"], table["network"], strict=True))
    return plot_comparison(network, dict(zip(table["metric"], table["tree baseline"], strict=True)), list(network))


def tuning(spark: SparkSession, cfg: Config) -> pd.DataFrame:
    """The last tune stage's trials (tune.enabled=true), best first: state, best validation loss, settings."""
    from dlpipe.storage import HadoopFS

    uri = f"{dataset_paths(cfg).tune}/trials.json"
    fs = HadoopFS(spark)
    if not fs.exists(uri):
        raise LookupError(f"no tune results at {uri}: run the pipeline with tune.enabled=true")
    trials = [
        {"trial": t["number"], "state": t["state"], "best_val_loss": t["value"], **t["params"]}
        for t in fs.read_json(uri)
    ]
    return pd.DataFrame(trials).sort_values("best_val_loss", na_position="last").reset_index(drop=True)


def tuning_plot(spark: SparkSession, cfg: Config):
    """Each finished trial's best validation loss by trial number, and the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = tuning(spark, cfg).query("state == 'complete'").sort_values("trial")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter(done["trial"], done["best_val_loss"], s=14, label="trial")
    ax.step(done["trial"], done["best_val_loss"].cummin(), where="post", color="C1", label="best so far")
    ax.set(xlabel="trial", ylabel="best validation loss", title="tuning: optimization history")
    ax.legend()
    fig.tight_layout()
    return fig


def variants(spark: SparkSession, cfg: Config) -> pd.DataFrame:
    """The compress stage's comparison of the candidate's variants (fp32, int8, onnx): quality delta, size,
    single-thread and Spark-scorer rows/s, and whether each is registered."""
    from dlpipe.model.compress import TABLE
    from dlpipe.storage import HadoopFS

    uri = f"{dataset_paths(cfg).variants}/{TABLE}"
    fs = HadoopFS(spark)
    if not fs.exists(uri):
        raise LookupError(f"no variants at {uri}: run the pipeline with a compress.* variant on")
    return pd.DataFrame(fs.read_json(uri))


def variants_plot(spark: SparkSession, cfg: Config):
    """Each variant's speedups, quality delta and size, side by side."""
    from dlpipe.model.compress import plot

    table = variants(spark, cfg)
    metric = "rmse" if "rmse" in table.columns else "accuracy"
    return plot(table.to_dict("records"), metric)


def score_generated(spark: SparkSession, cfg: Config, name: str, shift: float = 0.0, rows: int = 2000) -> dict:
    """Score new rows of the built-in generator (another seed; every number moved by `shift` standard
    deviations) with infer on new data, as a scoring run in production would: the drift watch counts them.
    Returns the infer stage's metrics (drift_* among them)."""
    from dlpipe.data.generate import generate
    from dlpipe.pipeline import run_stage

    if cfg.dataset.generator is None:
        raise ValueError(f"dataset {cfg.dataset.name} has no generator: score your own files with infer.source")
    source = (cfg.root / "data/new" / name).as_uri()
    g = cfg.dataset.generator
    gen = g.model_copy(update={"seed": g.seed + 1000, "rows": rows, "shift": shift})
    generate(cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"generator": gen})}), source, force=True)
    infer = cfg.infer.model_copy(update={"source": source, "output": f"data/new/{name}-scored"})
    return run_stage(spark, cfg.model_copy(update={"infer": infer}), "infer")


def drift_history(cfg: Config, model: str | None = None) -> pd.DataFrame:
    """Each scoring run of new data of a model (default: this dataset's), oldest first: when, the model
    version, the verdict and every drift figure (drift_psi_<feature>, ..., drift_prediction_psi)."""
    import mlflow

    from dlpipe.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(cfg))
    name = model or cfg.model_name
    df = mlflow.search_runs(
        experiment_names=[cfg.tracking.experiment],
        filter_string=f"tags.`dlpipe.drift_model` = '{name}'",
        order_by=["attributes.start_time ASC"],
    )
    if df.empty:
        raise LookupError(f"no scoring run of new data recorded drift for {name} yet: run infer with infer.source")
    figures = [c for c in df.columns if c.startswith("metrics.drift_")]
    out = df[["run_id", "start_time", "tags.dlpipe.model_version", "tags.dlpipe.drift", *figures]]
    return out.rename(columns=lambda c: c.removeprefix("metrics.").removeprefix("tags.dlpipe."))


def drift_plot(cfg: Config, model: str | None = None):
    """Each feature's PSI across the recorded scoring runs (and the predictions'), with the alert threshold."""
    import matplotlib.pyplot as plt

    h = drift_history(cfg, model)
    fig, ax = plt.subplots(figsize=(8, 4))
    runs = range(1, len(h) + 1)
    for col in sorted(c for c in h.columns if c.startswith("drift_psi_")):
        ax.plot(runs, h[col], marker="o", label=col.removeprefix("drift_psi_"))
    if "drift_prediction_psi" in h:
        ax.plot(runs, h["drift_prediction_psi"], marker="s", color="black", linestyle="--", label="(predictions)")
    ax.axhline(cfg.monitor.psi, color="grey", linestyle=":", label=f"monitor.psi {cfg.monitor.psi}")
    ax.set_xticks(list(runs), [f"{i}\nv{v}" for i, v in zip(runs, h["model_version"], strict=True)])
    ax.set_xlabel("scoring run (model version)")
    ax.set_ylabel("PSI vs the train split")
    ax.set_title(f"drift over time: {model or cfg.model_name}")
    ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    return fig
