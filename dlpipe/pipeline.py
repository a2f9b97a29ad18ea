"""Stage order and the end-to-end run: one MLflow parent run, a child run per stage."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pyspark.sql import SparkSession

from dlpipe import tracking
from dlpipe.config import Config
from dlpipe.runlock import dataset_lock
from dlpipe.session import resource_error
from dlpipe.storage import configure_spark_storage, dataset_paths

log = logging.getLogger(__name__)

STAGES = ("generate", "ingest", "preprocess", "train", "infer", "evaluate")


def _generate(spark: SparkSession, cfg: Config, force: bool = False) -> dict:
    from dlpipe.generate import generate

    m = generate(cfg, dataset_paths(cfg).raw, force=force)
    keys = ("rows_written", "valid_rows", "malformed_total", "bayes_accuracy", "majority_fraction", "bayes_rmse")
    out = {k: m[k] for k in keys if m.get(k) is not None}  # each generator knows its own ceiling
    out.update({f"malformed_{kind}": n for kind, n in m["malformed"].items()})
    out["skipped"] = int(m["skipped"])
    return out


def stage_function(name: str) -> Callable[..., dict]:
    """The stage's `run(spark, cfg, force=False) -> metrics`."""
    if name == "generate":
        return _generate
    if name == "ingest":
        from dlpipe.ingest import run
    elif name == "preprocess":
        from dlpipe.features import run
    elif name == "train":
        from dlpipe.train.stage import run
    elif name == "infer":
        from dlpipe.infer import run
    elif name == "evaluate":
        from dlpipe.evaluate import run
    else:
        raise ValueError(f"unknown stage '{name}'; stages are: {', '.join(STAGES)}")
    return run


def run_stage(
    spark: SparkSession, cfg: Config, name: str, parent_run_id: str | None = None, force: bool = False
) -> dict:
    """Run one stage in its own MLflow child run and log its metrics there.

    Stages whose output was made from the same inputs and config skip their work unless force."""
    fn = stage_function(name)
    configure_spark_storage(spark, cfg)
    log.info("stage %s: start", name)
    started = time.time()
    with dataset_lock(spark, cfg, f"stage {name}"), tracking.stage_run(cfg, name, parent_run_id):
        try:
            metrics = fn(spark, cfg, force=force)
        except Exception as exc:
            clear = resource_error(exc, name, spark)
            if clear is not None:
                raise clear from exc
            raise
        metrics["seconds"] = round(time.time() - started, 3)
        tracking.log_metrics(metrics)
    log.info("stage %s: done in %.1fs %s", name, metrics["seconds"], metrics)
    return metrics


@dataclass
class PipelineResult:
    run_id: str
    tracking_uri: str
    predictions: str
    metrics: dict[str, dict] = field(default_factory=dict)


def stages_for(cfg: Config, stages: Sequence[str] = STAGES) -> list[str]:
    return [s for s in stages if not (s == "generate" and cfg.dataset.generator is None)]


def run_pipeline(
    spark: SparkSession, cfg: Config, stages: Sequence[str] = STAGES, force: bool = False
) -> PipelineResult:
    """Run the stages in order under one parent run; the parent also gets each stage's metrics."""
    configure_spark_storage(spark, cfg)  # the lock lives in the store
    with dataset_lock(spark, cfg, "pipeline run"), tracking.pipeline_run(cfg) as parent:
        result = PipelineResult(parent.info.run_id, tracking.tracking_uri(cfg), dataset_paths(cfg).predictions)
        todo = stages_for(cfg, stages)
        for i, name in enumerate(todo, 1):
            log.info("pipeline: stage %d/%d: %s", i, len(todo), name)
            result.metrics[name] = run_stage(spark, cfg, name, force=force)
            tracking.log_metrics({f"{name}.{k}": v for k, v in result.metrics[name].items()})
    return result


def summary(result: PipelineResult) -> str:
    """What a run ends by printing: the test score, where the predictions are, the MLflow run."""
    ev = result.metrics.get("evaluate", {})
    lines = []
    if "accuracy" in ev:
        lines.append(f"test accuracy: {ev['accuracy']:.4f} (majority baseline {ev['majority_baseline_accuracy']:.4f})")
    elif "rmse" in ev:
        lines.append(f"test RMSE: {ev['rmse']:.4f} (predicting the training mean {ev['mean_baseline_rmse']:.4f})")
    if "infer" in result.metrics:
        lines.append(f"predictions: {result.predictions}")
    lines += [
        f"tracking_uri: {result.tracking_uri}",
        f"run_id: {result.run_id}",
    ]
    return "\n".join(lines)
