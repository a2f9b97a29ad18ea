"""Airflow DAG `dlpipe`: one task per stage, each a `spark-submit jobs/<stage>.py` in the project's own .venv.

Airflow lives in its own virtualenv (.venv-airflow, tools/setup_airflow.sh) without dlpipe, pyspark or torch:
this file imports only Airflow, and the tasks call the main venv's spark-submit with that venv's Python as
PYSPARK_PYTHON / PYSPARK_DRIVER_PYTHON. Where things are comes from the environment of the Airflow processes:

    DLPIPE_HOME          the project folder (default: the folder above this file's)
    DLPIPE_PYTHON        the main venv's Python (default: $DLPIPE_HOME/.venv/bin/python)
    DLPIPE_SPARK_SUBMIT  spark-submit (default: the one beside DLPIPE_PYTHON)
    DLPIPE_CONF_DIR      the conf folder (default: $DLPIPE_HOME/conf)
    DLPIPE_ENV           the default of the `env` param (default: local)
    DLPIPE_RETRY_DELAY_S seconds before a failed task's retry (default: 60; each task has 2 retries)

Params, per run (`airflow dags test dlpipe -c '{"overrides": ["train.epochs=5"]}'` or the trigger form):
`env` (conf/<env>.yaml), `overrides` (key.path=value, as on dlpipe's command line; one whose key names a
secret goes to the job through its environment, never its command line, and is masked in task logs), `master` (default:
spark.master from conf and overrides), `force` (redo stages whose inputs are unchanged), `parent_run_id`
(attach the stage runs to an existing MLflow run). The jobs validate the config themselves.

Why a BashOperator and not SparkSubmitOperator: SparkSubmitOperator takes --master only from an Airflow
connection, read when its hook is built (which also decides how env vars are passed), so a master from
conf/ or a per-run param would mean overriding private hook methods. The command is the same spark-submit.

Retries are safe: every stage writes to a temporary folder and renames it into place, and skips its work
when its committed output has the same fingerprint of inputs and config, so a retried task either redoes a
stage that left nothing behind or finds it done and skips it (`force` makes every attempt redo it).
Runs of this DAG share one warehouse, hence max_active_runs=1; a task killed with its machine leaves the
dataset's run lock behind, which the retry takes over once it sees the holder's process is gone.

The command is built when the task runs (a macro in its template), not at parse time: parsing reads no
file, and which master to use and whether the dataset has a generator follow the run's params. The
`generate` task skips itself (exit 99) when the run's dataset has no generator; ingest runs after a skip.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shlex
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Param, chain

DAG_ID = "dlpipe"
STAGES = ("generate", "ingest", "preprocess", "train", "infer", "evaluate")  # dlpipe.pipeline.STAGES
SKIP_EXIT_CODE = 99  # generate's "no generator": skipped, not failed
RETRIES = 2
RETRY_DELAY = timedelta(seconds=float(os.environ.get("DLPIPE_RETRY_DELAY_S") or 60))

HOME = Path(os.environ.get("DLPIPE_HOME") or Path(__file__).resolve().parent.parent)
PYTHON = os.environ.get("DLPIPE_PYTHON") or str(HOME / ".venv" / "bin" / "python")
SPARK_SUBMIT = os.environ.get("DLPIPE_SPARK_SUBMIT") or str(Path(PYTHON).parent / "spark-submit")
CONF_DIR = Path(os.environ.get("DLPIPE_CONF_DIR") or HOME / "conf")
# Free-form mappings whose keys contain dots, as in dlpipe.config.
_FREE_FORM = ("spark.conf", "storage.s3.hadoop")
SECRET_OVERRIDES = "DLPIPE_SECRET_OVERRIDES"  # what dlpipe.cli reads them from: never a command line


def _redaction_rule():
    """dlpipe's one redaction rule (dlpipe/redact.py, no imports beyond the standard library), loaded from
    its file: dlpipe itself is not importable here."""
    spec = importlib.util.spec_from_file_location("dlpipe_redact_rule", HOME / "dlpipe" / "redact.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_redact = _redaction_rule()


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(overrides that may be shown, overrides whose key names a secret)."""
    public, secret = [], []
    for item in overrides:
        (secret if _redact.is_secret_key(item.partition("=")[0].strip()) else public).append(item)
    return public, secret


# --- what a run needs from conf/: plain YAML with dlpipe.config's layering (dlpipe itself is not importable here)
def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml") if p.stem not in ("base", "credentials"))
        raise ValueError(f"dlpipe: no {path} (known: {', '.join(known) or 'none'})")
    return yaml.safe_load(path.read_text()) or {}


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _layer(data: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """Overlay a conf layer; `dataset: NAME` in it means conf/datasets/NAME.yaml."""
    if isinstance(layer.get("dataset"), str):
        data = {**data, "dataset": _dataset(layer["dataset"])}
        layer = {k: v for k, v in layer.items() if k != "dataset"}
    return _merge(data, layer)


def _dataset(name: str) -> dict[str, Any]:
    return {"name": name, **_read_yaml(CONF_DIR / "datasets" / f"{name}.yaml")}


def resolve_conf(env: str, overrides: list[str]) -> dict[str, Any]:
    """base.yaml, then <env>.yaml, then key.path=value overrides (values parsed as YAML), like dlpipe."""
    import yaml

    data = _layer(_layer({}, _read_yaml(CONF_DIR / "base.yaml")), _read_yaml(CONF_DIR / f"{env}.yaml"))
    for item in overrides:
        key, _, raw = item.partition("=")
        key = key.strip()
        if key == "dataset":
            data["dataset"] = _dataset(raw.strip())
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        for prefix in _FREE_FORM:
            if key.startswith(prefix + "."):
                parts = [*prefix.split("."), key[len(prefix) + 1 :]]
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}  # a value in the way: the job itself reports that override as an error
            node = node[part]
        node[parts[-1]] = value
    return data


def stage_command(stage: str, params: Mapping[str, Any]) -> str:
    """The bash command of one stage for this run's params (the tasks' template calls it when they run)."""
    env = str(params.get("env") or os.environ.get("DLPIPE_ENV") or "local")
    everything = [str(o) for o in params.get("overrides") or []]
    conf = resolve_conf(env, everything)
    overrides, _ = split_overrides(everything)  # secret ones reach the job through its environment
    dataset = conf.get("dataset") or {}
    if stage == "generate" and dataset.get("generator") is None:  # as dlpipe.pipeline.stages_for
        note = f"dlpipe: dataset {dataset.get('name')} has no generator: nothing to generate"
        return f"echo {shlex.quote(note)}; exit {SKIP_EXIT_CODE}"
    master = params.get("master") or (conf.get("spark") or {}).get("master") or "local[*]"
    args = [SPARK_SUBMIT, "--master", str(master), str(HOME / "jobs" / f"{stage}.py")]
    args += ["--env", env, "--conf-dir", str(CONF_DIR)]
    if params.get("force"):
        args.append("--force")
    if params.get("parent_run_id"):
        args += ["--parent-run-id", str(params["parent_run_id"])]
    # Spark (and Gloo) bind loopback unless the worker says otherwise, as in the Makefile.
    return 'export SPARK_LOCAL_IP="${SPARK_LOCAL_IP:-127.0.0.1}"; exec ' + shlex.join([*args, *overrides])


def secret_overrides(params: Mapping[str, Any]) -> str:
    """The run's secret overrides as JSON, for the task's environment (SECRET_OVERRIDES); each value is
    handed to Airflow's secrets masker too, so a task log that quotes one shows it masked."""
    from airflow.sdk.log import mask_secret

    _, secret = split_overrides([str(o) for o in params.get("overrides") or []])
    for item in secret:
        mask_secret(item.partition("=")[2])
    return json.dumps(secret)


with DAG(
    dag_id=DAG_ID,
    description="dlpipe: generate, ingest, preprocess, train, infer, evaluate as spark-submit jobs",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    tags=["dlpipe", "spark"],
    default_args={"retries": RETRIES, "retry_delay": RETRY_DELAY},
    user_defined_macros={"dlpipe_command": stage_command, "dlpipe_secret_overrides": secret_overrides},
    params={
        "env": Param(os.environ.get("DLPIPE_ENV") or "local", type="string", description="conf/<env>.yaml"),
        "overrides": Param(
            [], type="array", items={"type": "string"}, description="key.path=value, e.g. train.epochs=5"
        ),
        "master": Param(None, type=["null", "string"], description="Spark master; default: spark.master of conf"),
        "force": Param(False, type="boolean", description="redo stages whose inputs and config are unchanged"),
        "parent_run_id": Param(None, type=["null", "string"], description="MLflow run to attach the stages to"),
    },
) as dag:
    tasks = [
        BashOperator(
            task_id=stage,
            bash_command=f"{{{{ dlpipe_command({stage!r}, params) }}}}",
            env={
                "PYSPARK_PYTHON": PYTHON,
                "PYSPARK_DRIVER_PYTHON": PYTHON,
                "DLPIPE_CONF_DIR": str(CONF_DIR),
                SECRET_OVERRIDES: "{{ dlpipe_secret_overrides(params) }}",
            },
            append_env=True,  # keep the worker's PATH, JAVA_HOME, SPARK_LOCAL_IP, AWS_*
            cwd=str(HOME),
            skip_on_exit_code=SKIP_EXIT_CODE if stage == "generate" else None,
            do_xcom_push=False,  # the last log line of a Spark job is nobody's result
            # ingest also runs after a skipped generate (a dataset without a generator), never after a failed one
            trigger_rule="none_failed" if stage == "ingest" else "all_success",
        )
        for stage in STAGES
    ]
    chain(*tasks)
