"""What `python -m dlpipe status` shows: for each stage, its committed output (fingerprint, when, row
counts, read from `_dlpipe_meta.json`) and its last MLflow run with a link to it.

Reads through Python filesystems and the MLflow client only: no Spark session, so it answers in seconds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from dlpipe.config import Config
from dlpipe.data.generate import MANIFEST
from dlpipe.storage import dataset_paths, python_fs, storage_settings
from dlpipe.storage.lineage import META, digest

MLFLOW_FIGURES = ("model_version", "epochs_run", "accuracy", "auc", "rmse", "mae", "promoted", "predictions")


@dataclass
class StageStatus:
    stage: str
    output: str | None  # None: the stage's result lives in MLflow only
    committed: bool = False
    fingerprint: str | None = None
    created_unix: float | None = None
    counts: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    run_status: str | None = None
    run_link: str | None = None


def _read_json(uri: str, cfg: Config) -> dict | None:
    fs, path = python_fs(uri, storage_settings(cfg))
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError):
        return None


def outputs(cfg: Config) -> dict[str, str]:
    paths = dataset_paths(cfg)
    return {
        "generate": paths.raw,
        "ingest": paths.clean,
        "preprocess": paths.petastorm,
        "tune": paths.tune,
        "compress": paths.variants,
        "infer": paths.infer_output,
    }


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page: on the tracking server, or in `make ui` for a local store."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def stage_status(cfg: Config, stages: list[str]) -> list[StageStatus]:
    from mlflow import MlflowClient

    from dlpipe.tracking import last_stage_run, tracking_uri

    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    out = outputs(cfg)
    result = []
    for stage in stages:
        st = StageStatus(stage, out.get(stage))
        if st.output:
            meta = _read_json(f"{st.output}/{MANIFEST if stage == 'generate' else META}", cfg)
            if meta:
                st.committed = True
                # generate's manifest holds its parameters, not a fingerprint
                st.fingerprint = meta.get("fingerprint") or digest(meta.get("params"))
                st.created_unix = meta.get("created_unix")
                metrics = meta.get("metrics", meta)
                st.counts = {k: v for k, v in metrics.items() if k.startswith("rows_") and isinstance(v, int | float)}
        if experiment is not None:
            r = last_stage_run(client, experiment.experiment_id, stage, cfg.dataset.name)
            if r is not None:
                st.run_id, st.run_status = r.info.run_id, r.info.status
                st.run_link = run_link(uri, experiment.experiment_id, r.info.run_id)
                if not st.output:
                    st.counts = {k: v for k, v in r.data.metrics.items() if k in MLFLOW_FIGURES}
        result.append(st)
    return result


def drift_verdicts(cfg: Config, newest: int = 200) -> list[dict]:
    """The last drift verdict of each model scored on new data (the newest infer runs tagged dlpipe.drift):
    model, version, verdict, the drifted features, when, and the run."""
    from mlflow import MlflowClient

    from dlpipe.tracking import tracking_uri

    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`dlpipe.drift` LIKE '%'",
        order_by=["attributes.start_time DESC"],
        max_results=newest,
    )
    last: dict[str, dict] = {}
    for r in runs:
        model = r.data.tags.get("dlpipe.drift_model", "")
        if model not in last:
            last[model] = {
                "model": model,
                "version": r.data.tags.get("dlpipe.model_version", "?"),
                "verdict": r.data.tags["dlpipe.drift"],
                "features": r.data.tags.get("dlpipe.drift_features", ""),
                "alerts": int(r.data.metrics.get("drift_alerts", 0)),
                "when": r.info.start_time / 1000,
                "run_id": r.info.run_id,
            }
    return list(last.values())


def render_drift(verdicts: list[dict]) -> str:
    lines = []
    for v in verdicts:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["when"]))
        drifted = f" drifted: {v['features']}" if v["features"] else ""
        lines.append(
            f"drift       {v['verdict']:<11} {when:<19} {v['model']} version {v['version']}, {v['alerts']} alert(s)"
            f"{drifted} (run {v['run_id']})"
        )
    return "\n".join(lines)


def render(statuses: list[StageStatus]) -> str:
    lines = []
    for st in statuses:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.created_unix)) if st.created_unix else "-"
        state = "committed" if st.committed else ("not run" if st.output else "mlflow only")
        counts = " ".join(f"{k}={int(v) if float(v).is_integer() else v}" for k, v in sorted(st.counts.items()))
        lines.append(f"{st.stage:<11} {state:<11} {when:<19} fingerprint={st.fingerprint or '-'} {counts}".rstrip())
        if st.output:
            lines.append(f"{'':<11} output {st.output}")
        if st.run_id:
            lines.append(f"{'':<11} last run {st.run_id} ({st.run_status}) {st.run_link}")
    return "\n".join(lines)
