"""MLflow: one parent run per pipeline run, a child run per stage, the model registry.

The embedded default is a SQLite store in the project folder (MLflow 3 deprecates the file store) with
artifacts beside it; an http(s) tracking server works by changing `tracking.uri` alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dlpipe import redact
from dlpipe.config import Config

PARAM_PREFIXES = {
    "generate": ("dataset.",),
    "ingest": ("dataset.",),
    "preprocess": ("preprocess.",),
    "train": ("train.", "quantize."),
    "infer": ("infer.",),
    "evaluate": ("evaluate.",),
}


def tracking_uri(cfg: Config) -> str:
    """tracking.uri with a relative sqlite path made absolute under the project root."""
    uri = cfg.tracking.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = (cfg.root / uri[len(prefix) :]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return uri


@dataclass(frozen=True)
class Credentials:
    """What MLflow's client sends to an authenticated tracking server, read from the environment variables it
    reads itself. Picklable, so that executors that do not share the driver's environment (a cluster's) can
    log and load models too; never in a repr, a log line, a Spark setting or a command line."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)


CREDENTIAL_ENV = {
    "username": "MLFLOW_TRACKING_USERNAME",
    "password": "MLFLOW_TRACKING_PASSWORD",
    "token": "MLFLOW_TRACKING_TOKEN",
}


def credentials(uri: str | None) -> Credentials | None:
    """This process's MLflow credentials for an http(s) tracking URI (None for a local store, or none set);
    the secret parts are remembered by dlpipe.redact."""
    if not uri or not uri.startswith(("http://", "https://")):
        return None
    found = {name: os.environ.get(var) or None for name, var in CREDENTIAL_ENV.items()}
    if not any(found.values()):
        return None
    redact.remember(found["password"])
    redact.remember(found["token"])
    return Credentials(**found)


@contextmanager
def credentials_env(creds: Credentials | None) -> Iterator[None]:
    """creds in this process's environment (where MLflow's client reads them) for the block, where the
    environment has none of its own (an executor on another machine); put back as it was afterwards."""
    if creds is None or any(os.environ.get(var) for var in CREDENTIAL_ENV.values()):
        yield
        return
    added = {CREDENTIAL_ENV[f.name]: getattr(creds, f.name) for f in fields(creds) if getattr(creds, f.name)}
    os.environ.update(added)
    try:
        yield
    finally:
        for var in added:
            os.environ.pop(var, None)


def setup(cfg: Config) -> str:
    """Point MLflow at cfg's store and experiment; return the experiment id."""
    import mlflow

    uri = tracking_uri(cfg)
    credentials(uri)  # the password or token is masked in every log line and message from now on
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # inherited by Python workers in local mode
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        location = None
        if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
            artifacts = Path(cfg.tracking.artifact_location)
            location = (artifacts if artifacts.is_absolute() else cfg.root / artifacts).resolve().as_uri()
        exp_id = mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def require_active_run(stage: str) -> None:
    """Stages that log models or figures need the run they belong to (MLflow would otherwise open one
    in its default store, wherever the process happens to be)."""
    import mlflow

    if mlflow.active_run() is None:
        raise RuntimeError(
            f"the {stage} stage logs to MLflow: run it with dlpipe.pipeline.run_stage or inside stage_run"
        )


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def log_params(flat: Mapping[str, Any]) -> None:
    import mlflow

    mlflow.log_params({k: _param_value(v) for k, v in redact.mapping(flat).items()})


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the numeric, finite entries of metrics."""
    import mlflow

    clean = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    if clean:
        mlflow.log_metrics(clean, step=step)


@contextmanager
def pipeline_run(cfg: Config, run_name: str = "pipeline") -> Iterator[Any]:
    import mlflow

    setup(cfg)
    with mlflow.start_run(
        run_name=run_name, tags={"dlpipe.kind": "pipeline", "dlpipe.dataset": cfg.dataset.name}
    ) as run:
        log_params(cfg.flat())
        yield run


@contextmanager
def stage_run(cfg: Config, stage: str, parent_run_id: str | None = None) -> Iterator[Any]:
    """A child run for one stage: under the active pipeline run, or under parent_run_id when a job was
    started on its own (spark-submit, Airflow) as part of a pipeline run."""
    import mlflow

    setup(cfg)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(
        run_name=stage,
        nested=nested,
        parent_run_id=None if nested else parent_run_id,
        tags={"dlpipe.kind": "stage", "dlpipe.stage": stage, "dlpipe.dataset": cfg.dataset.name},
    ) as run:
        prefixes = PARAM_PREFIXES.get(stage, ())
        log_params({k: v for k, v in cfg.flat().items() if k.startswith(prefixes)} if prefixes else {})
        yield run


def last_stage_run(client: Any, experiment_id: str, stage: str, dataset: str):
    """The newest MLflow run of one stage for one dataset in the experiment, or None."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`dlpipe.stage` = '{stage}' and tags.`dlpipe.dataset` = '{dataset}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def pip_requirements() -> list[str]:
    """What a model needs to load elsewhere, honestly: the CPU build of torch comes from PyTorch's CPU
    index (PyPI's torch of the same version is a multi-GB CUDA build)."""
    import numpy
    import torch

    reqs = [f"torch=={torch.__version__}", f"numpy=={numpy.__version__}"]
    if "+cpu" in torch.__version__:
        reqs.insert(0, "--extra-index-url https://download.pytorch.org/whl/cpu")
    return reqs


@dataclass(frozen=True)
class ModelRef:
    """A model as the stages hand it on: its registered name and version (None for a runs:/ URI), the run
    that logged it, and where its files are."""

    name: str | None
    version: str | None
    run_id: str | None
    download_uri: str

    def lineage(self) -> str:
        """How lineage names it: name/version/run."""
        return f"{self.name}/{self.version}/{self.run_id}"


def model_version_for(model_uri: str) -> ModelRef:
    """Name, version and run id behind a models:/ URI (alias or version), or the run id of a runs:/ URI."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if model_uri.startswith("models:/"):
        ref = model_uri[len("models:/") :]
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = ref.split("/", 1)
            mv = client.get_model_version(name, version)
        return ModelRef(mv.name, str(mv.version), mv.run_id, client.get_model_version_download_uri(mv.name, mv.version))
    run_id = model_uri.split("/")[1] if model_uri.startswith("runs:/") else None
    return ModelRef(None, None, run_id, model_uri)
