"""The drift watch: does new data still look like the data the model learned from?

Two halves around one set of bins:
- **the reference**, fitted by preprocess on the train split and saved in the statistics (so it travels with
  every model): each number's deciles and the share of train values in each bin they make; each category's
  share of every vocabulary value (and of `__other__` for a top_k column); a regressor's label deciles
  and shares;
- **the watch**, counted by infer on new data in the same pass that scores and writes it (Spark
  `Observation`s: no second read, nothing held but the counts): the same bins over the valid rows, the
  missing values of each imputed feature, values a learned vocabulary never saw, and the predictions (each
  class; a regressor's values in the label's bins).

From the counts: the population stability index (PSI, sum of (new - train) x ln(new / train) over the bins)
of every feature and of the predictions, the share of unseen categories, of missing values and of
quarantined rows, each checked against `monitor.*`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pyspark.sql import Column, DataFrame, Observation
from pyspark.sql import functions as F

from dlpipe.config import Config, MonitorConfig
from dlpipe.data.stats import FeatureStats, FittedStats

NUMERIC = ("int", "long", "float", "double")
DECILES = [i / 10 for i in range(1, 10)]
SMALLEST_SHARE = 1e-4  # an empty bin counts as this share in the PSI (ln 0 is not a number)
REPORT_FILE = "_dlpipe_drift.json"  # beside the predictions (Spark and Parquet readers skip _ files)


# ---- the reference (preprocess, train split) ----


def _binned(features: Sequence[FeatureStats]) -> list[FeatureStats]:
    return [f for f in features if f.drift_edges is not None]


def _bin(c: Column, edges: Sequence[float]) -> Column:
    """The bin of each value: 0 below the first edge, k from edge k on (null stays null)."""
    return sum((F.when(c >= F.lit(e), 1).otherwise(0) for e in edges), F.lit(0))


def _counts(c: Column, edges: Sequence[float], alias: str, where: Column | None = None) -> list[Column]:
    b = _bin(c, edges)
    keep = c.isNotNull() if where is None else (c.isNotNull() & where)
    return [F.count_if(keep & (b == i)).alias(f"{alias}__b{i}") for i in range(len(edges) + 1)]


def _vocab_counts(c: Column, f: FeatureStats, alias: str, where: Column | None = None) -> list[Column]:
    keep = c.isNotNull() if where is None else (c.isNotNull() & where)
    vocab = list(f.vocab or ())
    out = [F.count_if(keep & (c == F.lit(v))).alias(f"{alias}__v{i}") for i, v in enumerate(vocab)]
    outside = keep & ~c.isin(vocab) if vocab else keep
    return [*out, F.count_if(outside).alias(f"{alias}__other")]


def _shares(row: Mapping[str, Any], alias: str, n: int) -> tuple[float, ...]:
    counts = [float(row[f"{alias}__b{i}"] or 0) for i in range(n)]
    total = sum(counts)
    return tuple(c / total if total else 0.0 for c in counts)


def _vocab_shares(row: Mapping[str, Any], f: FeatureStats, alias: str) -> tuple[float, ...]:
    """Each vocab value's share of the non-null values, then what is outside the vocabulary (a top_k column's
    __other__; a learned vocabulary: unseen values)."""
    counts = [float(row[f"{alias}__v{i}"] or 0) for i in range(len(f.vocab or ()))] + [float(row[f"{alias}__other"])]
    total = sum(counts)
    return tuple(c / total if total else 0.0 for c in counts)


def watched_numbers(cfg: Config, stats: FittedStats) -> list[FeatureStats]:
    """The numeric features the watch bins (standardized or passed through)."""
    types = {c.name: c.type for c in cfg.dataset.features}
    return [f for f in stats.features if f.transform in ("standardize", "none") and types.get(f.name) in NUMERIC]


def fit_reference(train: DataFrame, cfg: Config, stats: FittedStats) -> FittedStats:
    """stats with the drift reference of the train split: two aggregations (the deciles, then the share in
    each bin with every vocabulary's shares), each one row of numbers whatever the split's size."""
    if stats.is_image:
        return stats
    numbers = watched_numbers(cfg, stats)
    label = F.col(stats.label).cast("double")
    quantiles = [F.percentile_approx(F.col(f.name).cast("double"), DECILES, 10_000).alias(f.name) for f in numbers]
    if stats.is_regression:
        quantiles.append(F.percentile_approx(label, DECILES, 10_000).alias("__label"))
    deciles = train.agg(*quantiles).first().asDict() if quantiles else {}
    edges = {name: tuple(sorted(set(v or ()))) for name, v in deciles.items()}
    aggs: list[Column] = []
    for f in numbers:
        aggs += _counts(F.col(f.name).cast("double"), edges[f.name], f.name)
    vocabs = [f for f in stats.features if f.transform == "onehot"]
    for f in vocabs:
        aggs += _vocab_counts(F.col(f.name), f, f.name)
    if stats.is_regression:
        aggs += _counts(label, edges["__label"], "__label")
    if not aggs:
        return stats
    row = train.agg(*aggs).first().asDict()
    fitted = []
    for f in stats.features:
        if f in numbers:
            f = dataclasses.replace(
                f, drift_edges=edges[f.name], drift_shares=_shares(row, f.name, len(edges[f.name]) + 1)
            )
        elif f in vocabs:
            f = dataclasses.replace(f, drift_shares=_vocab_shares(row, f, f.name))
        fitted.append(f)
    out = dataclasses.replace(stats, features=tuple(fitted))
    if stats.is_regression:
        e = edges["__label"]
        out = dataclasses.replace(out, label_edges=e, label_shares=_shares(row, "__label", len(e) + 1))
    return out


# ---- the watch (infer, new data, counted in the scoring pass) ----


def watch_rows(rows: DataFrame, stats: FittedStats, valid: Column) -> tuple[DataFrame, Observation]:
    """rows (validated raw rows), observed on their way through: the valid rows, and of them each feature's
    counts in its reference bins or vocabulary, and its missing values."""
    obs = Observation("drift-features")
    aggs = [F.count_if(valid).alias("__valid")]
    for f in stats.features:
        c = F.col(f.name)
        if f.drift_edges is not None:
            aggs += _counts(c.cast("double"), f.drift_edges, f.name, valid)
        elif f.transform == "onehot" and f.drift_shares is not None:
            aggs += _vocab_counts(c, f, f.name, valid)
        if f.imputed:
            aggs.append(F.count_if(valid & c.isNull()).alias(f"{f.name}__missing"))
    return rows.observe(obs, *aggs), obs


def watch_predictions(scored: DataFrame, stats: FittedStats) -> tuple[DataFrame, Observation]:
    """scored rows observed on their way out: each class predicted (a regressor: its values in the label's
    reference bins)."""
    obs = Observation("drift-predictions")
    p = F.col("prediction")
    if stats.is_regression:
        aggs = _counts(p.cast("double"), stats.label_edges or (), "__pred")
    else:
        aggs = [F.count_if(p == k).alias(f"__pred__b{k}") for k in range(stats.num_classes or 0)]
    return scored.observe(obs, *aggs), obs


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """The population stability index of actual shares against expected ones (same bins). Rule of thumb:
    under 0.1 no shift, 0.1-0.25 some, over 0.25 a shift to act on."""
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, SMALLEST_SHARE), max(a, SMALLEST_SHARE)
        total += (a - e) * math.log(a / e)
    return total


def _train_prediction_shares(stats: FittedStats) -> tuple[float, ...] | None:
    if stats.is_regression:
        return stats.label_shares
    counts = stats.class_counts_train
    if not counts:
        return None
    total = sum(counts)
    return tuple(c / total for c in counts)


def report(
    features: Mapping[str, Any],
    predictions: Mapping[str, Any],
    stats: FittedStats,
    rows_in: int,
    rows_quarantined: int,
    monitor: MonitorConfig,
) -> dict[str, Any]:
    """The drift report of one scoring run: per feature PSI, unseen and missing shares (beside the train
    split's); the quarantined share; the predictions' PSI and shares; and the alerts, each naming what passed
    which `monitor.*` threshold."""
    valid = int(features["__valid"])
    per_feature: dict[str, dict[str, float]] = {}
    alerts: list[str] = []
    drifted: list[str] = []
    for f in stats.features:
        entry: dict[str, float] = {}
        if f.drift_shares is not None:
            if f.drift_edges is not None:
                now = _shares(features, f.name, len(f.drift_edges) + 1)
            else:
                now = _vocab_shares(features, f, f.name)
            entry["psi"] = psi(f.drift_shares, now)
            if f.transform == "onehot" and not f.other:  # a learned or declared vocabulary: the rest is unseen
                entry["unseen_share"] = now[-1]
        if f.imputed:
            entry["missing_share"] = int(features[f"{f.name}__missing"]) / valid if valid else 0.0
            entry["missing_share_train"] = float(f.missing_share_train or 0.0)
        if entry:
            per_feature[f.name] = entry
            found = _feature_alerts(f.name, entry, monitor)
            alerts += found
            if found:
                drifted.append(f.name)
    quarantined_share = rows_quarantined / rows_in if rows_in else 0.0
    if quarantined_share > monitor.quarantined_share:
        alerts.append(
            f"quarantined share {quarantined_share:.3f} > monitor.quarantined_share {monitor.quarantined_share}"
        )
    out: dict[str, Any] = {
        "rows_in": rows_in,
        "rows_valid": valid,
        "quarantined_share": quarantined_share,
        "features": per_feature,
    }
    expected = _train_prediction_shares(stats)
    if expected is not None and predictions:
        scored = _shares(predictions, "__pred", len(expected))
        out["prediction_shares"], out["prediction_shares_train"] = list(scored), list(expected)
        out["prediction_psi"] = psi(expected, scored)
        if out["prediction_psi"] > monitor.prediction_psi:
            alerts.append(
                f"predictions: psi {out['prediction_psi']:.3f} > monitor.prediction_psi {monitor.prediction_psi}"
            )
    out["alerts"] = alerts
    out["drifted_features"] = sorted(drifted)
    out["verdict"] = "alert" if alerts else "ok"
    return out


def _feature_alerts(name: str, entry: Mapping[str, float], monitor: MonitorConfig) -> list[str]:
    alerts = []
    if entry.get("psi", 0.0) > monitor.psi:
        alerts.append(f"{name}: psi {entry['psi']:.3f} > monitor.psi {monitor.psi}")
    if entry.get("unseen_share", 0.0) > monitor.unseen_share:
        alerts.append(
            f"{name}: unseen categories {entry['unseen_share']:.3f} > monitor.unseen_share {monitor.unseen_share}"
        )
    if "missing_share" in entry:
        rise = entry["missing_share"] - entry["missing_share_train"]
        if rise > monitor.missing_share_increase:
            alerts.append(
                f"{name}: missing share {entry['missing_share']:.3f} ({rise:+.3f} over train) > "
                f"monitor.missing_share_increase {monitor.missing_share_increase}"
            )
    return alerts


def metrics(rep: Mapping[str, Any]) -> dict[str, float]:
    """The report as MLflow metrics: drift_<what>_<feature>, drift_quarantined_share, drift_prediction_psi,
    drift_alerts."""
    out = {"drift_quarantined_share": rep["quarantined_share"], "drift_alerts": float(len(rep["alerts"]))}
    for name, entry in rep["features"].items():
        for key in ("psi", "unseen_share", "missing_share"):
            if key in entry:
                out[f"drift_{key}_{name}"] = entry[key]
    if "prediction_psi" in rep:
        out["drift_prediction_psi"] = rep["prediction_psi"]
    return out


def plot(rep: Mapping[str, Any], monitor: MonitorConfig, worst: int = 12):
    """The worst features by PSI (and the predictions), with the alert threshold: a Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(((n, e["psi"]) for n, e in rep["features"].items() if "psi" in e), key=lambda r: -r[1])[:worst]
    if "prediction_psi" in rep:
        rows.append(("(predictions)", rep["prediction_psi"]))
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.5))
    names = [r[0] for r in rows][::-1]
    values = [r[1] for r in rows][::-1]
    ax.barh(names, values, color=["tab:red" if v > monitor.psi else "tab:blue" for v in values])
    ax.axvline(monitor.psi, color="grey", linestyle=":", label=f"monitor.psi {monitor.psi}")
    ax.set_xlabel("population stability index vs the train split")
    ax.set_title(f"drift: {rep['verdict']} ({len(rep['alerts'])} alert(s))")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


class DriftAlert(RuntimeError):
    """New data passed a `monitor.*` threshold and monitor.fail_on_alert is set: the infer run fails."""
