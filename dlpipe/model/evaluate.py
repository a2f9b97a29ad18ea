"""Evaluate: metrics of the predictions on the test split, computed in Spark, and their plots.

Classification: accuracy, macro F1, log-loss, macro AUC, a confusion matrix and ROC curves. Regression:
RMSE, MAE, R² and a predicted-vs-true plot. The same for a gradient-boosted tree baseline trained on the same
split (dlpipe.model.baseline). Then the promotion gate against @production (and, if required, the baseline)."""

from __future__ import annotations

import logging
import re

import numpy as np
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from dlpipe.config import Config
from dlpipe.data.features import read_stats
from dlpipe.data.generate import read_manifest
from dlpipe.data.stats import FittedStats
from dlpipe.model.baseline import PREFIX
from dlpipe.stage import Plan, Stage, execute, require_input
from dlpipe.storage import dataset_paths, lineage, storage_settings

log = logging.getLogger(__name__)
METRIC_UNSAFE = re.compile(r"[^\w\-. /]")  # what MLflow does not allow in a metric name


def confusion_matrix(spark_df, k: int) -> np.ndarray:
    cm = np.zeros((k, k), dtype=np.int64)
    for r in spark_df.groupBy("label", "prediction").count().collect():
        cm[int(r["label"]), int(r["prediction"])] = r["count"]
    return cm


def per_class_f1(cm: np.ndarray) -> list[float]:
    tp = np.diag(cm).astype(float)
    precision = np.divide(tp, cm.sum(0), out=np.zeros_like(tp), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros_like(tp), where=cm.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    return [float(v) for v in f1]


def scores(cm: np.ndarray) -> dict:
    tp = np.diag(cm).astype(float)
    return {"accuracy": float(tp.sum() / cm.sum()), "macro_f1": float(np.mean(per_class_f1(cm)))}


def plot_confusion(cm: np.ndarray, names: list[str] | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    im = ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set(
        xlabel="predicted", ylabel="true", title="confusion matrix (test)", xticks=range(len(cm)), yticks=range(len(cm))
    )
    if names is not None:
        ax.set_xticklabels(names, rotation=45 if max(map(len, names)) > 3 else 0, ha="right")
        ax.set_yticklabels(names)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def class_histograms(preds, k: int, bins: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(positives, negatives), each (k, bins): for class c, how many rows of class c (and of the other
    classes) got a probability of c in each 1/bins bucket. One Spark aggregation, any number of rows."""
    exploded = preds.select("label", F.posexplode("probabilities").alias("c", "p"))
    rows = (
        exploded.select(
            "c",
            (F.col("label") == F.col("c")).cast("long").alias("pos"),
            F.least(F.floor(F.col("p") * bins), F.lit(bins - 1)).cast("int").alias("b"),
        )
        .groupBy("c", "b")
        .agg(F.sum("pos").alias("pos"), F.count("*").alias("n"))
        .collect()
    )
    pos = np.zeros((k, bins))
    neg = np.zeros((k, bins))
    for r in rows:
        pos[r["c"], r["b"]] += r["pos"]
        neg[r["c"], r["b"]] += r["n"] - r["pos"]
    return pos, neg


def class_aucs(pos: np.ndarray, neg: np.ndarray) -> list[float | None]:
    """One-vs-rest AUC of each class from its histograms (ties within a bucket count half, as ties do);
    None for a class absent from the rows (or present in all of them)."""
    aucs: list[float | None] = []
    for c in range(len(pos)):
        p_total, n_total = pos[c].sum(), neg[c].sum()
        if p_total == 0 or n_total == 0:
            aucs.append(None)
            continue
        higher_pos = np.cumsum(pos[c][::-1])[::-1] - pos[c]  # positives in strictly higher buckets
        aucs.append(float((neg[c] * (higher_pos + 0.5 * pos[c])).sum() / (p_total * n_total)))
    return aucs


def _mean_auc(aucs: list[float | None]) -> float:
    known = [a for a in aucs if a is not None]
    return float(np.mean(known)) if known else float("nan")


def macro_auc(preds, k: int, bins: int = 1000) -> float:
    """One-vs-rest AUC averaged over the classes present, from one Spark aggregation."""
    return _mean_auc(class_aucs(*class_histograms(preds, k, bins)))


def roc_curves(pos: np.ndarray, neg: np.ndarray) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per class, (false positive rate, true positive rate) at each bucket threshold, from 0 to 1."""
    curves = []
    for c in range(len(pos)):
        p_total, n_total = pos[c].sum(), neg[c].sum()
        if p_total == 0 or n_total == 0:
            curves.append(None)
            continue
        tpr = np.concatenate([[0.0], np.cumsum(pos[c][::-1]) / p_total])
        fpr = np.concatenate([[0.0], np.cumsum(neg[c][::-1]) / n_total])
        curves.append((fpr, tpr))
    return curves


def plot_roc(pos: np.ndarray, neg: np.ndarray, names: list[str] | None = None):
    """One-vs-rest ROC curve per class, with each class's AUC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    for c, (curve, auc) in enumerate(zip(roc_curves(pos, neg), class_aucs(pos, neg), strict=True)):
        if curve is not None:
            fpr, tpr = curve
            ax.plot(fpr, tpr, label=f"{names[c] if names else f'class {c}'} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, one vs rest (test)")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig


def classification_metrics(preds, k: int) -> tuple[dict, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Accuracy, macro F1, log-loss and macro AUC of scored rows (label, prediction, probabilities), the
    confusion matrix and the per-class probability histograms (for the ROC plot)."""
    cm = confusion_matrix(preds, k)
    metrics = scores(cm)
    p_true = F.element_at("probabilities", F.col("label") + 1)
    metrics["log_loss"] = preds.agg(F.avg(-F.log(F.greatest(p_true, F.lit(1e-7))))).first()[0]
    hist = class_histograms(preds, k)
    metrics["auc"] = _mean_auc(class_aucs(*hist))
    return metrics, cm, hist


def regression_metrics(preds, train_mean: float) -> dict:
    """RMSE, MAE, R² and the RMSE of always predicting the training mean, of scored rows (label,
    prediction), in one Spark aggregation."""
    err = F.col("prediction") - F.col("label")
    r = preds.agg(
        F.sqrt(F.avg(err * err)).alias("rmse"),
        F.avg(F.abs(err)).alias("mae"),
        F.sqrt(F.avg((F.col("label") - F.lit(train_mean)) ** 2)).alias("mean_baseline_rmse"),
        F.variance("label").alias("var"),
        F.count("*").alias("n"),
    ).first()
    var = r["var"] or 0.0
    return {
        "rmse": r["rmse"],
        "mae": r["mae"],
        "r2": 1 - r["rmse"] ** 2 / var if var > 0 else float("nan"),
        "mean_baseline_rmse": r["mean_baseline_rmse"],
        "predictions": int(r["n"]),
    }


def plot_regression(preds, sample_rows: int = 5000):
    """Predicted against true value (up to sample_rows scored rows), and the residuals' histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sample = preds.select("label", "prediction").limit(sample_rows).toPandas()
    y, p = sample["label"].to_numpy(), sample["prediction"].to_numpy()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4))
    ax1.scatter(y, p, s=4, alpha=0.4)
    lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
    ax1.plot([lo, hi], [lo, hi], color="grey", linestyle=":", linewidth=1)
    ax1.set(xlabel="true", ylabel="predicted", title=f"predicted vs true ({len(y)} test rows)")
    ax2.hist(p - y, bins=50)
    ax2.set(xlabel="prediction - true", ylabel="rows", title="residuals")
    fig.tight_layout()
    return fig


def gate_metrics(preds, stats: FittedStats) -> dict:
    """The metrics the gate compares, for either task."""
    if stats.is_regression:
        return regression_metrics(preds, stats.label_mean)
    return classification_metrics(preds, stats.outputs)[0]


def gate(spark: SparkSession, cfg: Config, stats: FittedStats, candidate: dict) -> dict:
    """Compare the candidate with @production on the same test rows; promote it if it passes."""
    from dlpipe import tracking
    from dlpipe.model import promotion
    from dlpipe.serve.infer import model_uri, score_rows

    mv = tracking.model_version_for(model_uri(cfg))
    if mv.name is None:
        log.info("evaluate: %s is not a registered model version; no promotion", model_uri(cfg))
        return {}
    metric = cfg.promote_metric
    prod = promotion.production_version(mv.name)
    if prod is not None and str(prod.version) == str(mv.version):
        log.info("evaluate: %s version %s is @production already", mv.name, mv.version)
        return {"promoted": 0.0}
    prod_score = None
    if prod is not None:
        prod_mv = tracking.model_version_for(f"models:/{mv.name}/{prod.version}")
        test = spark.read.parquet(dataset_paths(cfg).split("test"))
        prod_scored = score_rows(spark, cfg, test, stats, prod_mv).where(F.col("quarantine_reason").isNull())
        prod_score = gate_metrics(prod_scored, stats)[metric]
    baseline_score = candidate.get(PREFIX + metric) if cfg.evaluate.require_beat_baseline else None
    decision = promotion.decide(metric, candidate[metric], prod_score, cfg.evaluate.promote_margin, baseline_score)
    return promotion.record(mv.name, str(mv.version), decision, str(prod.version) if prod is not None else None)


class Evaluate(Stage):
    """Predictions of the test split -> metrics and plots on the stage's MLflow run, then the promotion gate
    (evaluate.promote). Always runs: it is cheap and its figures belong to this run."""

    name = "evaluate"

    def plan(self, spark: SparkSession, cfg: Config) -> Plan:
        from dlpipe.tracking import require_active_run

        require_active_run("evaluate")
        paths = dataset_paths(cfg)
        where = " (infer.output)" if cfg.infer.output else ""
        missing = f"evaluate: no predictions at {paths.predictions}{where}: run the infer stage first"
        require_input(spark, paths.predictions, missing)
        inputs = {uri: lineage.dataset_fingerprint(spark, uri) for uri in (paths.predictions, paths.petastorm)}
        return Plan(lineage.digest({"stage": "evaluate", "inputs": inputs}), inputs)

    def reuse(self, spark: SparkSession, cfg: Config, plan: Plan) -> dict | None:
        return None

    def compute(self, spark: SparkSession, cfg: Config, plan: Plan, tmp: dict[str, str]) -> dict:
        paths = dataset_paths(cfg)
        stats = read_stats(spark, cfg)
        key = stats.key
        preds = spark.read.parquet(paths.predictions)
        test = spark.read.parquet(paths.split("test")).select(key, "label")
        missing = test.join(preds.select(key), key, "left_anti").count()
        manifest = read_manifest(paths.raw, storage_settings(cfg)) if cfg.dataset.generator else None
        if stats.is_regression:
            metrics = _evaluate_regression(preds, stats, manifest)
        else:
            metrics = _evaluate_classification(preds, stats, manifest)
        metrics["test_rows"] = test.count()
        metrics["test_rows_without_prediction"] = missing
        log.info("evaluate: %d test rows, %d without prediction", metrics["test_rows"], missing)
        if cfg.evaluate.baseline.enabled and not stats.is_image:
            metrics.update(_evaluate_baseline(spark, cfg, stats, metrics))
        if cfg.evaluate.promote:
            metrics.update(gate(spark, cfg, stats, metrics))
        return metrics


def run(spark: SparkSession, cfg: Config, force: bool = False) -> dict:
    """The evaluate stage (see Evaluate)."""
    return execute(Evaluate(), spark, cfg, force)


def _log_figure(fig, name: str) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    mlflow.log_figure(fig, name)
    plt.close(fig)


def _log_classification_plots(cm: np.ndarray, hist, names: list[str], folder: str = "") -> None:
    """The confusion matrix (plot and JSON) and the ROC curves, under folder (the baseline's: baseline/)."""
    import mlflow

    _log_figure(plot_confusion(cm, names), f"{folder}confusion_matrix.png")
    matrix = {"labels": names, "indices": list(range(len(cm))), "matrix": cm.tolist()}
    mlflow.log_dict(matrix, f"{folder}confusion_matrix.json")
    _log_figure(plot_roc(*hist, names=names), f"{folder}roc.png")


def _evaluate_baseline(spark: SparkSession, cfg: Config, stats: FittedStats, network: dict) -> dict:
    """The tree baseline (dlpipe.model.baseline) trained on the same train/val split, its test metrics
    (prefixed baseline_) and plots (baseline/), a side-by-side plot, and its registration."""
    from dlpipe.model import baseline
    from dlpipe.model.rawmodel import raw_example

    model, booster, seconds = baseline.fit(spark, cfg, stats)
    preds = baseline.score_test(model, spark, cfg, stats)
    if stats.is_regression:
        measured = regression_metrics(preds, stats.label_mean)
        _log_figure(plot_regression(preds), "baseline/predicted_vs_true.png")
        shown = ["rmse", "mae", "r2"]
    else:
        measured, cm, hist = classification_metrics(preds, stats.outputs)
        _log_classification_plots(cm, hist, stats.class_names, folder="baseline/")
        shown = ["accuracy", "macro_f1", "auc", "log_loss"]
    _log_figure(baseline.plot_comparison(network, measured, shown), "baseline_comparison.png")
    metric = cfg.promote_metric
    out = {PREFIX + name: value for name, value in measured.items() if name != "predictions"}
    out.update(
        baseline_train_seconds=seconds,
        baseline_rounds=booster.num_boosted_rounds(),
        beats_baseline=float(baseline.beats(metric, network[metric], measured[metric])),
    )
    log.info(
        "evaluate: tree baseline %s %.4f, network %.4f (%s)",
        metric,
        measured[metric],
        network[metric],
        "the network beats it" if out["beats_baseline"] else "the network does not beat it",
    )
    if cfg.evaluate.baseline.register_model:
        out["baseline_model_version"] = float(baseline.register(cfg, stats, booster, raw_example(spark, cfg)))
    return out


def _evaluate_classification(preds, stats: FittedStats, manifest: dict | None) -> dict:
    k = stats.outputs
    metrics, cm, hist = classification_metrics(preds, k)
    metrics["majority_baseline_accuracy"] = float(cm[stats.majority_class].sum() / cm.sum())
    metrics["accuracy_over_baseline"] = metrics["accuracy"] - metrics["majority_baseline_accuracy"]
    metrics["predictions"] = int(cm.sum())
    if manifest and manifest.get("bayes_accuracy") is not None:
        metrics["bayes_accuracy"] = manifest["bayes_accuracy"]
    names = stats.class_names
    for name, f1 in zip(names, per_class_f1(cm), strict=True):
        metrics["f1_" + METRIC_UNSAFE.sub("_", name)] = f1
    _log_classification_plots(cm, hist, names)
    log.info(
        "evaluate: accuracy %.4f (majority baseline %.4f), macro F1 %.4f, log-loss %.4f, AUC %.4f",
        metrics["accuracy"],
        metrics["majority_baseline_accuracy"],
        metrics["macro_f1"],
        metrics["log_loss"],
        metrics["auc"],
    )
    return metrics


def _evaluate_regression(preds, stats: FittedStats, manifest: dict | None) -> dict:
    metrics = regression_metrics(preds, stats.label_mean)
    if manifest and manifest.get("bayes_rmse") is not None:
        metrics["bayes_rmse"] = manifest["bayes_rmse"]
    _log_figure(plot_regression(preds), "predicted_vs_true.png")
    log.info(
        "evaluate: RMSE %.4f (predicting the training mean: %.4f), MAE %.4f, R2 %.4f",
        metrics["rmse"],
        metrics["mean_baseline_rmse"],
        metrics["mae"],
        metrics["r2"],
    )
    return metrics
