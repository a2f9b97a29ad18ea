"""The train stage (driver side): launch the ranks, then log, register and alias the model."""

from __future__ import annotations

import dataclasses
import io
import logging

import numpy as np
import torch
from pyspark.sql import SparkSession

from dlpipe.config import Config, QuantizeConfig
from dlpipe.data.features import read_stats
from dlpipe.data.stats import FittedStats
from dlpipe.model import objective, task
from dlpipe.model.names import CANDIDATE, INT8_ALIAS, STATS_ARTIFACT
from dlpipe.stage import Plan, Stage, execute
from dlpipe.storage import dataset_paths, lineage, resolve_uri, storage_settings
from dlpipe.tracking import ModelRef
from dlpipe.train.checkpoints import CheckpointStore
from dlpipe.train.launcher import run_horovod, run_torch_distributor, tasks_have_gpus
from dlpipe.train.live import epoch_metrics, learning_curve, logged_epochs
from dlpipe.train.loader import ShardLoader
from dlpipe.train.logstream import LogReceiver
from dlpipe.train.models import build_model, resolve_factory
from dlpipe.train.worker import TrainSpec, train_worker

log = logging.getLogger(__name__)


def checkpoint_uri(spark: SparkSession, cfg: Config) -> str:
    """Checkpoints of one training setup: same data and the settings that shape the model's path (not
    epochs, early stopping or the number of ranks, so `train.resume=true epochs=20` continues a run)."""
    paths = dataset_paths(cfg)
    t = cfg.train
    key = lineage.digest(
        {
            "data": lineage.dataset_fingerprint(spark, paths.petastorm),
            "train": t.model_dump(mode="json", include={"model", "lr", "batch_size", "seed", "warmup_epochs"}),
        }
    )
    base = (
        resolve_uri(cfg.root, t.checkpoint_dir)
        if t.checkpoint_dir
        else paths.petastorm.rsplit("/", 1)[0] + "/checkpoints"
    )
    return f"{base.rstrip('/')}/{key}"


def launch(spark: SparkSession, cfg: Config, spec: TrainSpec) -> dict:
    """Run the ranks with the configured launcher; their logs stream to this driver meanwhile.

    Horovod's barrier stage is retried by Spark itself when a task dies. TorchDistributor's is not (a
    barrier result stage cannot be), so a failed run is started again here, up to train.max_attempts,
    and resumes from the last checkpoint like a retried stage.
    """
    host = spark.sparkContext.getConf().get("spark.driver.host", "127.0.0.1")
    with LogReceiver(host) as logs:
        spec = dataclasses.replace(spec, log_address=logs.address)
        if cfg.train.launcher == "horovod":
            t = cfg.train
            return run_horovod(
                spark, train_worker, (spec,), t.num_proc, t.gloo_iface, t.slot_wait_seconds, t.horovod_cycle_ms
            )[0]
        for attempt in range(1, cfg.train.max_attempts + 1):
            try:
                return run_torch_distributor(
                    spark, train_worker, (spec,), cfg.train.num_proc, cfg.train.slot_wait_seconds
                )[0]
            except Exception as exc:  # a failed Spark job: a rank died, a task was lost
                if (
                    attempt == cfg.train.max_attempts
                    or not spec.checkpoint_uri
                    or CheckpointStore(spec.checkpoint_uri, spec.storage).latest() is None
                ):
                    raise
                log.warning(
                    "train: attempt %d of %d failed (%s); resuming from the last checkpoint",
                    attempt,
                    cfg.train.max_attempts,
                    str(exc).splitlines()[0][:200],
                )
    raise AssertionError("unreachable")


def make_spec(
    cfg: Config, stats: FittedStats, checkpoints: str, use_gpu: bool = False, run_id: str | None = None
) -> TrainSpec:
    """What every rank needs, picklable; rank 0 logs live to run_id on this process's tracking URI (with this
    process's MLflow credentials, which executors on other machines do not have in their environment)."""
    import mlflow

    from dlpipe import tracking

    uri = mlflow.get_tracking_uri() if run_id else None
    return TrainSpec.from_config(
        cfg,
        stats,
        checkpoints,
        use_gpu=use_gpu,
        tracking_uri=uri,
        run_id=run_id,
        tracking_credentials=tracking.credentials(uri),
    )


def fingerprint(spark: SparkSession, cfg: Config) -> tuple[str, dict[str, str]]:
    """The data and every setting that changes the model (not resume, fault injection or slot waiting)."""
    paths = dataset_paths(cfg)
    inputs = {paths.petastorm: lineage.dataset_fingerprint(spark, paths.petastorm)}
    spec = {
        "stage": "train",
        "inputs": inputs,
        "train": cfg.train.model_dump(mode="json", exclude={"resume", "fault_injection", "slot_wait_seconds"}),
        "quantize": cfg.quantize.model_dump(mode="json"),
        "model_name": cfg.model_name,
    }
    return lineage.digest(spec), inputs


def reusable_model(cfg: Config, fp: str) -> dict | None:
    """The metrics of the @candidate version's training run when it finished training on exactly this
    data and config (so there is nothing new to learn), else None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(cfg.model_name, CANDIDATE)
    except MlflowException:
        return None
    run = client.get_run(mv.run_id)
    if run.info.status != "FINISHED" or run.data.tags.get("dlpipe.fingerprint") != fp:
        return None
    return {**run.data.metrics, "model_version": int(mv.version)}


@dataclasses.dataclass
class Trained:
    """What the ranks hand back, as the driver uses it."""

    model: torch.nn.Module  # the trained weights loaded into the factory's model
    history: list[dict]
    result: dict


class Train(Stage):
    """Petastorm splits -> a new registered model version (alias candidate) and its int8 variant. Reused
    when @candidate was trained on the same data with the same config; force, resume or fault injection
    always train. Its output is a model version, not a folder: nothing for the runner to commit."""

    name = "train"

    def configure(self, spark: SparkSession, cfg: Config) -> Config:
        """With tune.enabled, the best trial's settings over `train.*` (dlpipe.tune.stage.tuned)."""
        if not cfg.tune.enabled:
            return cfg
        from dlpipe.tune.stage import tuned

        return tuned(spark, cfg)

    def plan(self, spark: SparkSession, cfg: Config) -> Plan:
        from dlpipe import tracking

        tracking.require_active_run("train")
        fp, inputs = fingerprint(spark, cfg)
        parent = None
        if cfg.train.init_from:  # lineage and the fingerprint: the parent model as resolved now (an alias moves)
            from dlpipe.tracking import model_version_for

            parent = model_version_for(cfg.train.init_from)
            named = f"models:/{parent.name}/{parent.version}" if parent.name else parent.download_uri
            inputs = {**inputs, named: parent.lineage()}
            fp = lineage.digest({"train": fp, "parent": parent.lineage()})
        if cfg.tune.enabled:  # lineage: the settings came from the tune stage's output
            tune_out = dataset_paths(cfg).tune
            inputs = {**inputs, tune_out: lineage.dataset_fingerprint(spark, tune_out)}
        return Plan(fp, inputs, context={"parent": parent})

    def reuse(self, spark: SparkSession, cfg: Config, plan: Plan) -> dict | None:
        if cfg.train.resume or cfg.train.fault_injection:
            return None
        done = reusable_model(cfg, plan.fingerprint)
        if done is None:
            return None
        log.info(
            "train: %s version %s was trained on the same data with the same config (fingerprint %s), "
            "skipping; use --force to train again",
            cfg.model_name,
            done["model_version"],
            plan.fingerprint,
        )
        return {**done, "_outputs": [f"models:/{cfg.model_name}/{done['model_version']}"]}

    def compute(self, spark: SparkSession, cfg: Config, plan: Plan, tmp: dict[str, str]) -> dict:
        import mlflow

        mlflow.set_tag("dlpipe.fingerprint", plan.fingerprint)  # what reusable_model matches, once FINISHED
        if cfg.tune.enabled:
            log_tuning(spark, cfg)
        stats = read_stats(spark, cfg)
        spec, model = prepare(spark, cfg, stats, plan.context.get("parent"))
        trained = train_ranks(spark, cfg, spec, model)
        version, quantized = register(spark, cfg, spec, trained.model, stats)
        return {
            **train_metrics(spec, trained),
            "model_version": int(version),
            **quantized,
            "_outputs": [f"models:/{cfg.model_name}/{version}"],
        }


def log_tuning(spark: SparkSession, cfg: Config) -> None:
    """Which study and trial the settings came from, and the settings, on the train run."""
    import mlflow

    from dlpipe.tune.stage import read_best

    best = read_best(spark, cfg)
    mlflow.set_tags({"dlpipe.tune_study": best["study"], "dlpipe.tune_trial": str(best["trial"])})
    mlflow.log_dict(best, "tuned_settings.json")
    log.info("train: settings of tune trial %d of %s: %s", best["trial"], best["study"], best["values"])


def run(spark: SparkSession, cfg: Config, force: bool = False) -> dict:
    """The train stage: a new model version, unless @candidate was trained on the same data with the same
    config (then it is skipped, like any unchanged stage; force, resume or fault injection always train)."""
    return execute(Train(), spark, cfg, force)


def prepare(
    spark: SparkSession, cfg: Config, stats: dict, parent: ModelRef | None = None
) -> tuple[TrainSpec, torch.nn.Module]:
    """The ranks' spec and the driver's copy of the model. A wrong factory or size fails here, at once, not
    on every rank of every retried stage attempt; the same model then receives the trained weights."""
    import mlflow

    checkpoints = checkpoint_uri(spark, cfg)
    if not cfg.train.resume:
        CheckpointStore(checkpoints, storage_settings(cfg)).clear()  # a retried stage resumes this run only
    use_gpu = tasks_have_gpus(spark.sparkContext)
    if cfg.train.mixed_precision == "fp16" and not use_gpu:
        raise ValueError(
            "train.mixed_precision=fp16 needs GPUs (spark.task.resource.gpu.amount); on CPU use "
            "train.mixed_precision=bf16 or off"
        )
    spec = make_spec(cfg, stats, checkpoints, use_gpu, mlflow.active_run().info.run_id)
    factory = resolve_factory(spec.model["factory"], spec.feature_shape)
    model = build_model(spec.model, spec.feature_shape, spec.num_classes)
    mlflow.set_tag("dlpipe.model_factory", f"{factory.__module__}:{factory.__name__}")
    mlflow.set_tag("dlpipe.checkpoints", checkpoints)
    mlflow.log_dict(stats.to_dict(), STATS_ARTIFACT)  # what new rows must be transformed with to be scored by it
    if parent is not None:
        spec = dataclasses.replace(spec, init_state=warm_start_state(cfg, model, parent))
    return spec, model


def warm_start_state(cfg: Config, model: torch.nn.Module, ref: ModelRef) -> bytes:
    """The weights of train.init_from's model as plan resolved it (ref: the version the fingerprint holds,
    even if the alias moved since), matched to model (a head of another width starts fresh), checked against
    train.freeze; the parent is tagged on the run (lineage names it as an input too)."""
    import mlflow

    from dlpipe.train import transfer

    parent = transfer.parent_weights(ref)
    taken, fresh = transfer.warm_start(model, parent)
    transfer.check_freeze(model, cfg.train.freeze)
    parent_name = f"models:/{ref.name}/{ref.version}" if ref.name else ref.download_uri
    mlflow.set_tags({"dlpipe.parent_model": parent_name, "dlpipe.parent_run_id": ref.run_id or ""})
    log.info(
        "train: starting from %s (%s): %d parameters taken%s%s",
        cfg.train.init_from,
        parent_name,
        len(taken),
        f", new head {fresh}" if fresh else "",
        f", frozen {cfg.train.freeze}" if cfg.train.freeze else "",
    )
    return transfer.serialized(taken)


def train_ranks(spark: SparkSession, cfg: Config, spec: TrainSpec, model: torch.nn.Module) -> Trained:
    """Launch the ranks; log the epochs rank 0 could not log as it went, and the learning curve."""
    import matplotlib.pyplot as plt
    import mlflow

    from dlpipe import tracking

    result = launch(spark, cfg, spec)
    history = result["history"]
    logged = logged_epochs(mlflow.MlflowClient(), mlflow.active_run().info.run_id)
    for record in history:
        if record["epoch"] not in logged:
            tracking.log_metrics(epoch_metrics(record), step=record["epoch"])
    fig = learning_curve(history)
    mlflow.log_figure(fig, "learning_curve.png")
    plt.close(fig)
    mlflow.set_tag("dlpipe.train_device", result["device"])
    model.load_state_dict(torch.load(io.BytesIO(result["state_dict"])))
    return Trained(model, history, result)


def register(
    spark: SparkSession, cfg: Config, spec: TrainSpec, model: torch.nn.Module, stats: dict
) -> tuple[str, dict]:
    """Register the served model (raw records in, labels' units out) as @candidate, then its int8 variant
    when quantize.enabled; returns (version, the int8 metrics)."""
    import mlflow

    from dlpipe.model.rawmodel import model_metadata, raw_example

    served = objective.served(model, stats).eval()
    example_loader = ShardLoader(spec.val_uri, 0, 1, 5, spec.feature_shape, shuffle=False, storage=spec.storage)
    example = next(iter(example_loader.epoch(0)))[0].numpy()[:5]
    with torch.no_grad():
        example_out = served(torch.from_numpy(example)).numpy()
    name = cfg.model_name
    meta = model_metadata(stats)
    records = raw_example(spark, cfg)
    version = log_registered(served, "model", name, example, example_out, stats, cfg, records, metadata=meta)
    mlflow.MlflowClient().set_registered_model_alias(name, CANDIDATE, version)
    mlflow.set_tags({"dlpipe.model_name": name, "dlpipe.model_version": version})
    quantized = (
        register_int8(cfg, spec, served, example, example_out, stats, records, meta) if cfg.quantize.enabled else {}
    )
    log.info("train: registered %s version %s as @%s", name, version, CANDIDATE)
    return version, quantized


def train_metrics(spec: TrainSpec, trained: Trained) -> dict:
    """The stage's figures from the ranks' history: final and best epoch, throughput, resume point."""
    history, result = trained.history, trained.result
    last = history[-1]
    metric = task.epoch_metric(spec.task)
    return {
        "final_train_loss": last["train_loss"],
        "final_val_loss": last["val_loss"],
        f"final_val_{metric}": last[f"val_{metric}"],
        f"best_val_{metric}": task.best(metric, [h[f"val_{metric}"] for h in history]),
        "ranks": result["ranks"],
        "samples_per_s_per_rank": float(np.mean([h["samples_per_s_per_rank"] for h in history])),
        "epochs_run": len(history),
        "model_parameters": sum(p.numel() for p in trained.model.parameters()),
        "best_val_loss": result["best_val_loss"],
        "resumed_from_epoch": result["resumed_from_epoch"],
        "epochs_logged_live": len(set(result["live_epochs"])),
    }


def log_registered(
    model: torch.nn.Module,
    artifact: str,
    name: str,
    example,
    example_out,
    stats: FittedStats,
    cfg: Config,
    records=None,
    **kwargs,
) -> str:
    """Log model to the active run as a new version of the registered model `name`; returns the version.
    A tabular model is wrapped to take raw records (dlpipe.model.rawmodel); an image model takes tensors. Either
    way with a signature, an input example and honest pip requirements."""
    import mlflow
    from mlflow.models import infer_signature

    from dlpipe import tracking
    from dlpipe.model.rawmodel import input_columns, log_raw_model

    if records is not None:
        return log_raw_model(
            model,
            stats,
            input_columns(cfg),
            artifact,
            name,
            records,
            example,
            tracking.pip_requirements(),
            metadata=kwargs.get("metadata"),
            serialization_format=kwargs.get("serialization_format"),
        )
    info = mlflow.pytorch.log_model(
        model,
        name=artifact,
        signature=infer_signature(example, example_out),
        input_example=example,
        pip_requirements=tracking.pip_requirements(),
        registered_model_name=name,
        **kwargs,
    )
    return str(info.registered_model_version)


def int8_gate(task_name: str, measured: dict, limits: QuantizeConfig) -> tuple[bool, str]:
    """(register the int8 variant?, why): its accuracy drop (regression: relative RMSE increase) against
    fp32 on the same validation rows, within quantize's limit."""
    if task_name == task.REGRESSION:
        change, limit = measured["int8_rmse_increase"], limits.max_rmse_increase
        what = f"RMSE {change:+.2%}"
    else:
        change, limit = -measured["int8_accuracy_delta"], limits.max_accuracy_drop
        what = f"accuracy {measured['int8_accuracy_delta']:+.4f}"
    passed = change <= limit
    outcome = "registered" if passed else f"not registered: beyond the limit {limit}"
    return passed, f"{what} vs fp32, {measured['int8_speedup']:.2f}x the rows/s ({outcome})"


def register_int8(
    cfg: Config,
    spec: TrainSpec,
    served: torch.nn.Module,
    example,
    example_out,
    stats: FittedStats,
    records=None,
    metadata: dict | None = None,
) -> dict:
    """The int8 variant: compared with fp32 on the validation rows, registered (alias candidate-int8)
    when its accuracy drop (regression: relative RMSE increase) is within quantize's limit."""
    import mlflow

    from dlpipe.model import quantize

    int8 = quantize.quantize_dynamic(served)
    loader = ShardLoader(
        spec.val_uri,
        0,
        1,
        4096,
        spec.feature_shape,
        shuffle=False,
        storage=spec.storage,
        label_dtype=task.label_numpy_type(spec.task),
    )
    m = quantize.compare(served, int8, ((x.numpy(), y.numpy()) for x, y in loader.epoch(0)), spec.task)
    passed, verdict = int8_gate(spec.task, m, cfg.quantize)
    m["int8_registered"] = float(passed)
    log.info("train: int8 variant: %s", verdict)
    if passed:
        name = cfg.model_name
        # TorchScript (pickle format): torch.export cannot trace the quantized kernels
        version = log_registered(
            int8,
            "model_int8",
            name,
            example,
            example_out,
            stats,
            cfg,
            records,
            serialization_format="pickle",
            metadata=metadata,
        )
        client = mlflow.MlflowClient()
        client.set_model_version_tag(name, version, "dlpipe.variant", "int8")
        client.set_registered_model_alias(name, INT8_ALIAS, version)
        mlflow.set_tag("dlpipe.int8_model_version", version)
        m["int8_model_version"] = float(version)
    return m
