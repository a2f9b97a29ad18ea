"""Stage order and the end-to-end run: one MLflow parent run, a child run per stage."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pyspark.sql import SparkSession

from dlpipe import tracking
from dlpipe.config import Config
from dlpipe.session import resource_error
from dlpipe.stage import Plan, Stage, execute
from dlpipe.storage import configure_spark_storage, dataset_paths, lineage
from dlpipe.storage.runlock import dataset_lock

log = logging.getLogger(__name__)


class Generate(Stage):
    """The built-in datasets' raw files (dataset.generator); reused when the manifest has the same params."""

    name = "generate"

    def plan(self, spark: SparkSession, cfg: Config) -> Plan:
        from dlpipe.data.generate import params_of

        # the digest of the params, as `status` shows it from the manifest
        return Plan(lineage.digest(params_of(cfg)), {}, lineage_outputs=(dataset_paths(cfg).raw,))

    def reuse(self, spark: SparkSession, cfg: Config, plan: Plan) -> dict | None:
        from dlpipe.data.generate import already_generated, manifest_metrics

        existing = already_generated(cfg, dataset_paths(cfg).raw)
        return None if existing is None else manifest_metrics(existing)

    def compute(self, spark: SparkSession, cfg: Config, plan: Plan, tmp: dict[str, str]) -> dict:
        from dlpipe.data.generate import generate, manifest_metrics

        return manifest_metrics(generate(cfg, dataset_paths(cfg).raw, force=True))


# Every stage, in order: the module and class that implement it (imported when it runs, so the driver
# loads torch only for the stages that need it). A new stage is a Stage subclass and a line here.
STAGE_CLASSES = {
    "generate": "dlpipe.pipeline:Generate",
    "ingest": "dlpipe.data.ingest:Ingest",
    "preprocess": "dlpipe.data.features:Preprocess",
    "tune": "dlpipe.tune.stage:Tune",
    "train": "dlpipe.train.stage:Train",
    "compress": "dlpipe.model.compress:Compress",
    "infer": "dlpipe.serve.infer:Infer",
    "evaluate": "dlpipe.model.evaluate:Evaluate",
}
STAGES = tuple(STAGE_CLASSES)


def stage_for(name: str) -> Stage:
    """The stage called name."""
    if name not in STAGE_CLASSES:
        raise ValueError(f"unknown stage '{name}'; stages are: {', '.join(STAGES)}")
    module, _, cls = STAGE_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def run_stage(
    spark: SparkSession, cfg: Config, name: str, parent_run_id: str | None = None, force: bool = False
) -> dict:
    """Run one stage in its own MLflow child run and log its metrics there.

    Stages whose output was made from the same inputs and config skip their work unless force."""
    stage = stage_for(name)
    configure_spark_storage(spark, cfg)
    log.info("stage %s: start", name)
    started = time.time()
    with dataset_lock(spark, cfg, f"stage {name}"):
        cfg = stage.configure(spark, cfg)  # e.g. train with what tune found: its run's params show it
        with tracking.stage_run(cfg, name, parent_run_id):
            try:
                metrics = execute(stage, spark, cfg, force)
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
    """The stages of stages that apply to cfg: generate only for a dataset with a generator, tune only when
    tune.enabled, compress only with a variant to make (of a tabular model)."""
    off = {
        "generate": cfg.dataset.generator is None,
        "tune": not cfg.tune.enabled,
        "compress": not cfg.compress.enabled or cfg.dataset.source.format == "image",
    }
    return [s for s in stages if not off.get(s, False)]


def run_pipeline(
    spark: SparkSession, cfg: Config, stages: Sequence[str] = STAGES, force: bool = False
) -> PipelineResult:
    """Run the stages in order under one parent run; the parent also gets each stage's metrics."""
    configure_spark_storage(spark, cfg)  # the lock lives in the store
    with dataset_lock(spark, cfg, "pipeline run"), tracking.pipeline_run(cfg) as parent:
        result = PipelineResult(parent.info.run_id, tracking.tracking_uri(cfg), dataset_paths(cfg).infer_output)
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
