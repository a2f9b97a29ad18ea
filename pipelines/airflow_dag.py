"""Airflow DAG `dlpipe`: one task per stage, each `python -m dlpipe submit <stage>` in the project's own .venv.

Airflow lives in its own virtualenv (.venv-airflow, tools/setup_airflow.sh) without dlpipe, pyspark or torch:
this file imports only Airflow and reads no config. Each task runs the main venv's `python -m dlpipe submit`,
which loads and validates the config as every dlpipe entry point does (conf/base.yaml, conf/<env>.yaml, the
overrides: dlpipe.config, the one place that layering exists), then replaces itself with
`spark-submit --master <spark.master, or the master param> jobs/<stage>.py ...` (a bad config fails the task
with dlpipe's own message, naming the file, the key and the fix). Where things are comes from the
environment of the Airflow processes, which the tasks inherit:

    DLPIPE_HOME          the project folder, the tasks' working folder (default: the folder above this file's)
    DLPIPE_PYTHON        the main venv's Python, also Spark's (default: $DLPIPE_HOME/.venv/bin/python)
    DLPIPE_SPARK_SUBMIT  spark-submit (default: the one beside DLPIPE_PYTHON; read by dlpipe)
    DLPIPE_CONF_DIR      the conf folder (default: $DLPIPE_HOME/conf; read by dlpipe)
    DLPIPE_ENV           the environment when a run's `env` param is null (default: local; read by dlpipe)
    DLPIPE_RETRY_DELAY_S seconds before a failed task's retry (default: 60; each task has 2 retries)

Params, per run (`airflow dags test dlpipe -c '{"overrides": ["train.epochs=5"]}'` or the trigger form):
`env` (conf/<env>.yaml; null: $DLPIPE_ENV, else local), `overrides` (key.path=value, as on dlpipe's command
line; one whose key names a secret goes to the job through its environment, never its command line, and is
masked in task logs), `master` (default: spark.master from conf and overrides), `force` (redo stages whose
inputs are unchanged), `parent_run_id` (attach the stage runs to an existing MLflow run).

Why a BashOperator and not SparkSubmitOperator: SparkSubmitOperator takes --master only from an Airflow
connection, read when its hook is built (which also decides how env vars are passed), so a master from
conf/ or a per-run param would mean overriding private hook methods. The command is the same spark-submit.

Retries are safe: every stage writes to a temporary folder and renames it into place, and skips its work
when its committed output has the same fingerprint of inputs and config, so a retried task either redoes a
stage that left nothing behind or finds it done and skips it (`force` makes every attempt redo it).
Runs of this DAG share one warehouse, hence max_active_runs=1; a task killed with its machine leaves the
dataset's run lock behind, which the retry takes over once it sees the holder's process is gone.

The command is built from the run's params when the task runs (a macro in its template); parsing reads no
file. The `generate` task skips itself when the run's dataset has no generator, `tune` when tune.enabled
is false and `compress` when no variant is on (`dlpipe submit` exits with SKIP_EXIT_CODE); the next task
runs after a skip.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shlex
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Param, chain

DAG_ID = "dlpipe"
# dlpipe.pipeline.STAGES, which this file cannot import: tests/test_airflow.py checks that the tasks are those.
STAGES = ("generate", "ingest", "preprocess", "tune", "train", "compress", "infer", "evaluate")
# a stage that may skip itself -> the one after it
SKIPPABLE = {"generate": "ingest", "tune": "train", "compress": "infer"}
SKIP_EXIT_CODE = 99  # `dlpipe submit --skip-exit-code`: the stage has nothing to do; skipped, not failed
RETRIES = 2
RETRY_DELAY = timedelta(seconds=float(os.environ.get("DLPIPE_RETRY_DELAY_S") or 60))

HOME = Path(os.environ.get("DLPIPE_HOME") or Path(__file__).resolve().parent.parent)
PYTHON = os.environ.get("DLPIPE_PYTHON") or str(HOME / ".venv" / "bin" / "python")
SECRET_OVERRIDES = "DLPIPE_SECRET_OVERRIDES"  # what dlpipe.cli reads them from: never a command line


@functools.cache
def _redaction_rule() -> ModuleType:
    """dlpipe's one redaction rule (dlpipe/redact.py, no imports beyond the standard library), loaded from
    its file when a task first needs it (dlpipe itself is not importable here, and parsing reads no file)."""
    spec = importlib.util.spec_from_file_location("dlpipe_redact_rule", HOME / "dlpipe" / "redact.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(overrides that may be shown, overrides whose key names a secret)."""
    public, secret = [], []
    for item in overrides:
        (secret if _redaction_rule().is_secret_key(item.partition("=")[0].strip()) else public).append(item)
    return public, secret


def stage_command(stage: str, params: Mapping[str, Any]) -> str:
    """The bash command of one stage for this run's params (the tasks' template calls it when they run). It
    holds the params as they are: `dlpipe submit` resolves the config, the master and whether to skip."""
    overrides, _ = split_overrides([str(o) for o in params.get("overrides") or []])  # secret ones: environment
    args = [PYTHON, "-m", "dlpipe", "submit", "--skip-exit-code", str(SKIP_EXIT_CODE)]
    if params.get("env"):
        args += ["--env", str(params["env"])]
    if params.get("master"):
        args += ["--master", str(params["master"])]
    if params.get("force"):
        args.append("--force")
    if params.get("parent_run_id"):
        args += ["--parent-run-id", str(params["parent_run_id"])]
    # Spark (and Gloo) bind loopback unless the worker says otherwise, as in the Makefile.
    return 'export SPARK_LOCAL_IP="${SPARK_LOCAL_IP:-127.0.0.1}"; exec ' + shlex.join([*args, stage, *overrides])


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
    description="dlpipe: generate, ingest, preprocess, tune, train, compress, infer, evaluate as spark-submit jobs",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    tags=["dlpipe", "spark"],
    default_args={"retries": RETRIES, "retry_delay": RETRY_DELAY},
    user_defined_macros={"dlpipe_command": stage_command, "dlpipe_secret_overrides": secret_overrides},
    params={
        "env": Param(
            None, type=["null", "string"], description="conf/<env>.yaml; default: $DLPIPE_ENV of the worker, else local"
        ),
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
                SECRET_OVERRIDES: "{{ dlpipe_secret_overrides(params) }}",
            },
            append_env=True,  # keep the worker's PATH, JAVA_HOME, SPARK_LOCAL_IP, AWS_*
            cwd=str(HOME),
            skip_on_exit_code=SKIP_EXIT_CODE if stage in SKIPPABLE else None,
            do_xcom_push=False,  # the last log line of a Spark job is nobody's result
            # ingest also runs after a skipped generate (a dataset without a generator), train after a skipped
            # tune (tune.enabled false), infer after a skipped compress; never after a failed one
            trigger_rule="none_failed" if stage in SKIPPABLE.values() else "all_success",
        )
        for stage in STAGES
    ]
    chain(*tasks)
