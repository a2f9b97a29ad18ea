"""The Airflow DAG (pipelines/airflow_dag.py), run by Airflow itself from its own venv (.venv-airflow).

Airflow is not in .venv, so everything Airflow does here runs in a subprocess with .venv-airflow's Python,
an AIRFLOW_HOME in a temp folder and SQLite; what the pipeline made is checked from .venv (MLflow, files).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from dlpipe import cli
from dlpipe.config import load_config
from dlpipe.data import features, ingest
from dlpipe.data.generate import generate
from dlpipe.pipeline import STAGES
from dlpipe.storage import dataset_paths
from tests.conftest import AIRFLOW_VENV, REPO, airflow_missing, cfg_overrides, job_env, make_cfg

AIRFLOW_PY = AIRFLOW_VENV / "bin" / "python"
AIRFLOW = AIRFLOW_VENV / "bin" / "airflow"
DAG_FILE = REPO / "pipelines" / "airflow_dag.py"

pytestmark = [
    pytest.mark.airflow,
    pytest.mark.skipif(bool(airflow_missing(AIRFLOW_VENV)), reason=str(airflow_missing(AIRFLOW_VENV))),
]

# Runs in .venv-airflow: parse the DAG the way Airflow's DAG processor does, and say what it found.
PARSE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag

bag = DagBag(dag_folder=sys.argv[1])
OTHER = json.loads(sys.argv[2])
found = {
    "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
    "heavy_modules": sorted(
        {m.split(".")[0] for m in sys.modules} & {"pyspark", "torch", "dlpipe", "mlflow", "dlpipe_redact_rule"}
    ),
    "dag_ids": sorted(bag.dags),
}
dag = bag.dags.get("dlpipe")
if dag is not None:
    command = dag.user_defined_macros["dlpipe_command"]  # what each task's template calls when it runs
    found.update(
        tasks=[
            {"id": t.task_id, "upstream": sorted(t.upstream_task_ids), "retries": t.retries,
             "retry_delay": t.retry_delay.total_seconds(), "trigger_rule": str(t.trigger_rule.value)}
            for t in dag.tasks
        ],
        max_active_runs=dag.max_active_runs,
        params=sorted(dag.params),
        train=command("train", {"env": "local", "overrides": ["train.epochs=2"]}),
        train_master=command("train", {"overrides": ["spark.master=local[1]"], "force": True}),
        train_secret=command(
            "train", {"overrides": ["spark.conf.spark.hadoop.fs.s3a.secret.key=ParseSecret-42", "train.epochs=3"]}
        ),
        task_env=sorted(dag.get_task("train").env),
        skip_exit_code=dag.get_task("generate").skip_on_exit_code,
        # for test_each_task_resolves_its_config_with_dlpipe: runs whose overrides change the master and dataset
        resolved={
            name: command(stage, params)
            for name, stage, params in [
                ("train_other_dataset", "train", {"overrides": OTHER}),
                ("train_master_param", "train", {"master": "local[3]", "env": "local", "force": True}),
                ("generate_other_dataset", "generate", {"overrides": ["dataset=tabular_regression"]}),
                ("generate_none", "generate", {"overrides": ["dataset=tabular_regression", "dataset.generator=null"]}),
                ("train_misspelt_key", "train", {"overrides": ["dataset.colunms=1"]}),
                ("train_no_such_dataset", "train", {"overrides": ["dataset=nope"]}),
            ]
        },
    )
print(json.dumps(found))
"""


OTHER = ["dataset=tabular_regression", "spark.master=local[1]"]  # overrides of another dataset and master


def airflow_env(home: Path) -> dict[str, str]:
    """The environment of an Airflow CLI run: its own home and SQLite DB, only our DAG, nothing from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "DLPIPE_")) and k != "VIRTUAL_ENV"}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(DAG_FILE.parent),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db",
        SPARK_LOCAL_IP="127.0.0.1",
    )
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run cmd; if it overruns, kill it and every process under it first (BashOperator starts spark-submit in
    a session of its own, so a process-group kill would leave the JVM and its Python workers running)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(tree, timeout=30)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:4])} did not finish in {timeout:.0f}s; its output ended:\n{out[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def json_rows(output: str) -> list[dict]:
    """The JSON table an Airflow CLI command printed with `-o json` (its log lines come before it)."""
    return json.loads(next(line for line in reversed(output.splitlines()) if line.startswith("[")))


@pytest.fixture(scope="module")
def parsed(tmp_path_factory) -> dict:
    """What PARSE found: the DAG parsed once, in the Airflow venv, for the tests below."""
    argv = [str(AIRFLOW_PY), "-c", PARSE, str(DAG_FILE.parent), json.dumps(OTHER)]
    proc = run(argv, airflow_env(tmp_path_factory.mktemp("airflow")), timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dag_parses_in_the_airflow_venv_without_heavy_imports(parsed):
    """DagBag finds one DAG, stages chained in dlpipe's order with retries; parsing imports no pyspark/torch/dlpipe
    and reads no file (not even dlpipe's redaction rule, loaded when a task needs it)."""
    found = parsed
    assert found["import_errors"] == {}
    assert found["heavy_modules"] == []
    assert found["dag_ids"] == ["dlpipe"]
    assert [t["id"] for t in found["tasks"]] == list(STAGES)
    for before, task in zip([None, *STAGES[:-1]], found["tasks"], strict=True):
        assert task["upstream"] == ([before] if before else []), task
        assert task["retries"] >= 1 and task["retry_delay"] > 0, task
    # ingest runs after a skipped generate, train after a skipped tune, infer after a skipped compress
    rules = {t["id"]: t["trigger_rule"] for t in found["tasks"]}
    assert rules["ingest"] == rules["train"] == rules["infer"] == "none_failed"
    assert rules["preprocess"] == rules["evaluate"] == "all_success"
    assert found["max_active_runs"] == 1  # runs share one warehouse
    assert {"env", "overrides", "master", "force", "parent_run_id"} <= set(found["params"])
    # The command each task runs: the main venv's `python -m dlpipe submit`, with the run's params as they are
    # (dlpipe resolves the config: test_each_task_resolves_its_config_with_dlpipe).
    python = str(REPO / ".venv" / "bin" / "python")
    assert f"exec {python} -m dlpipe submit --skip-exit-code 99 --env local train train.epochs=2" in found["train"]
    assert found["train_master"].endswith("--force train 'spark.master=local[1]'"), found["train_master"]
    assert found["skip_exit_code"] == [99]
    # an override whose key names a secret stays off the command line: the job reads it from its environment,
    # under the name dlpipe.cli reads
    assert "ParseSecret-42" not in found["train_secret"] and found["train_secret"].endswith("train.epochs=3")
    assert cli.SECRET_OVERRIDES in found["task_env"]


def test_each_task_resolves_its_config_with_dlpipe(parsed, tmp_path):
    """The DAG holds no copy of dlpipe's config layering: each task's command, run as its task would run it
    (with spark-submit replaced by a program that prints its arguments), gets its master and whether to skip
    from dlpipe's own load_config, and a bad override fails the task with dlpipe's own message."""
    spark_submit = tmp_path / "spark-submit"
    spark_submit.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    spark_submit.chmod(0o755)
    env = {k: v for k, v in job_env().items() if not k.startswith("DLPIPE_")}
    env.update(DLPIPE_SPARK_SUBMIT=str(spark_submit), DLPIPE_SECRET_OVERRIDES="[]")

    def task(name: str) -> subprocess.CompletedProcess[str]:
        command = parsed["resolved"][name]
        return subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    # the commands carry the params as given: the master and the skip come from dlpipe when the task runs
    assert "--master" not in parsed["resolved"]["generate_other_dataset"]
    assert "; exit" not in parsed["resolved"]["generate_none"]
    jobs = REPO / "jobs"
    for name, expected in [
        ("train_other_dataset", ["--master", load_config(None, OTHER).spark.master, f"{jobs}/train.py", *OTHER]),
        ("train_master_param", ["--master", "local[3]", f"{jobs}/train.py", "--env", "local", "--force"]),
        (
            "generate_other_dataset",
            ["--master", load_config(None, []).spark.master, f"{jobs}/generate.py", "dataset=tabular_regression"],
        ),
    ]:
        proc = task(name)
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
        assert proc.stdout.splitlines() == expected, (name, proc.stdout)
    assert load_config(None, OTHER).spark.master == "local[1]" != load_config(None, []).spark.master

    # a dataset without a generator (the run's overrides say so): dlpipe's skip, which Airflow shows as skipped
    assert load_config(None, ["dataset=tabular_regression", "dataset.generator=null"]).dataset.generator is None
    skipped = task("generate_none")
    assert [skipped.returncode] == parsed["skip_exit_code"] == [99], skipped.stderr[-3000:]
    assert "tabular_regression has no generator" in skipped.stderr and skipped.stdout == ""

    # a bad override: dlpipe's message (the file, the key, what is allowed), exit 2, spark-submit never run
    misspelt = task("train_misspelt_key")
    dataset_file = REPO / "conf" / "datasets" / "tabular_example.yaml"
    assert misspelt.returncode == 2 and misspelt.stdout == "", misspelt.stderr[-3000:]
    assert f"unknown key 'dataset.colunms' in {dataset_file}" in misspelt.stderr, misspelt.stderr
    assert "allowed keys here: columns," in misspelt.stderr
    missing = task("train_no_such_dataset")
    assert missing.returncode == 2 and missing.stdout == "", missing.stderr[-3000:]
    assert "dataset 'nope' has no file" in missing.stderr and "known datasets: breast_cancer," in missing.stderr


def _kill_the_first_ingest(root: Path, found: dict, timeout: float = 400) -> None:
    """Kill the ingest task's Python driver (SIGKILL: no clean-up runs) once it holds the dataset's run lock,
    as a machine dying under a task would; its lock stays behind."""
    lock = root / "data/warehouse/tabular_example/_dlpipe_lock.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            holder = json.loads(lock.read_text())
        except (OSError, ValueError):
            holder = {}
        if holder.get("what") == "stage ingest":
            proc = psutil.Process(holder["pid"])
            found["cmdline"] = " ".join(proc.cmdline())
            proc.kill()
            found["pid"] = holder["pid"]
            return
        time.sleep(0.05)


def _same_rows(spark, a: str, b: str) -> None:
    """The same rows in both (the quarantine's source_file compared by file name: the roots differ)."""
    from pyspark.sql import functions as F

    def read(uri: str):
        df = spark.read.parquet(uri)
        if "source_file" in df.columns:
            df = df.withColumn("source_file", F.regexp_extract("source_file", "[^/]+$", 0))
        return df

    left, right = read(a), read(b)
    assert left.count() == right.count() > 0, (a, b)
    assert left.exceptAll(right).count() == 0 == right.exceptAll(left).count(), (a, b)


def test_airflow_dags_test_runs_every_stage_and_a_killed_task_retries_to_a_clean_runs_outputs(spark, tmp_path):
    """`airflow dags test dlpipe` on a tiny config rooted in a temp folder, its ingest task killed once: Airflow
    retries it, the retry takes over the dead run's lock, every task succeeds, the data outputs equal those of
    a clean run of the same config, the predictions are written and MLflow has one finished run per stage."""
    root, home = tmp_path / "project", tmp_path / "airflow"
    root.mkdir()
    home.mkdir()
    env = {**airflow_env(home), "DLPIPE_RETRY_DELAY_S": "2"}
    migrate = run([str(AIRFLOW), "db", "migrate"], env, timeout=240)
    assert migrate.returncode == 0, migrate.stdout[-4000:]

    secret = "AirflowOverrideSecret-6e5d4c"  # a secret given as an override: kept out of logs and MLflow
    overrides = cfg_overrides(
        root,
        "train.epochs=2",
        "spark.conf.spark.ui.enabled=false",
        "quantize.enabled=false",
        f"spark.conf.spark.hadoop.fs.s3a.secret.key={secret}",
        rows=1500,
    )
    conf = json.dumps({"env": "local", "overrides": overrides})
    killed: dict = {}
    killer = threading.Thread(target=_kill_the_first_ingest, args=(root, killed), daemon=True)
    killer.start()
    dags_test = run([str(AIRFLOW), "dags", "test", "dlpipe", "-f", str(DAG_FILE), "-c", conf], env, timeout=480)
    log = dags_test.stdout
    killer.join(timeout=5)
    assert "jobs/ingest.py" in killed.get("cmdline", ""), f"the ingest task was never caught running\n{log[-4000:]}"

    listed = run([str(AIRFLOW), "dags", "list-runs", "dlpipe", "-o", "json"], env, timeout=120)
    assert listed.returncode == 0, listed.stdout[-2000:]
    runs = json_rows(listed.stdout)
    assert len(runs) == 1, runs
    states = run(
        [str(AIRFLOW), "tasks", "states-for-dag-run", "dlpipe", runs[0]["run_id"], "-o", "json"], env, timeout=120
    )
    assert states.returncode == 0, states.stdout[-2000:]
    task_states = {t["task_id"]: t["state"] for t in json_rows(states.stdout)}
    # tune.enabled and compress.onnx are false here: those tasks skip themselves (dlpipe's exit code) and the
    # next ones run after them
    expected = {**dict.fromkeys(STAGES, "success"), "tune": "skipped", "compress": "skipped"}
    assert task_states == expected, f"{task_states}\n{log[-8000:]}"
    assert runs[0]["state"] == "success" and dags_test.returncode == 0, log[-8000:]

    # the retry found the killed attempt's lock, saw its process gone and took it over
    assert f"taking over from stage ingest (pid {killed['pid']}" in log, log[-8000:]
    # ... and made what a clean run of the same config makes
    clean_root = tmp_path / "clean"
    same = [o for o in overrides[1:] if secret not in o]  # the secret would reach this test's own Spark
    cfg = make_cfg(clean_root, *same, rows=1500)
    paths, retried = dataset_paths(cfg), dataset_paths(make_cfg(root, *same, rows=1500))
    generate(cfg, paths.raw)
    ingest.run(spark, cfg)
    features.run(spark, cfg)
    for name in ("clean", "quarantine"):
        _same_rows(spark, getattr(retried, name), getattr(paths, name))
    for split in ("train", "val", "test"):
        _same_rows(spark, retried.split(split), paths.split(split))

    predictions = root / "data/warehouse/tabular_example/predictions"
    assert list(predictions.rglob("*.parquet")), f"no predictions under {predictions}"
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    stage_runs = client.search_runs([client.get_experiment_by_name("dlpipe").experiment_id])
    assert sorted((r.data.tags.get("dlpipe.stage"), r.info.status) for r in stage_runs) == sorted(
        (s, "FINISHED") for s in STAGES if s not in ("tune", "compress")
    )
    # `dags test` runs the tasks in its own process: their logs (commands run, the jobs' output) are its output
    assert "-m dlpipe submit" in log and "stage train: done" in log, log[-4000:]
    task_logs = "\n".join(p.read_text(errors="replace") for p in home.rglob("*.log") if p.is_file())
    mlflow_files = [p for p in (root / "mlruns").rglob("*") if p.is_file()]
    assert root / "mlruns" / "mlflow.db" in mlflow_files
    for where, text in [
        ("the dags test output", log),
        ("the log files under AIRFLOW_HOME", task_logs),
        *((str(p), p.read_bytes().decode(errors="replace")) for p in mlflow_files),
    ]:
        assert secret not in text, f"the override's secret leaked into {where}"
