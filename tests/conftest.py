"""Shared fixtures: one real local Spark for the session, configs rooted in temp folders, tiny data."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dlpipe.ops.processes import group_members, pid_alive
from dlpipe.runtime import tune_gc
from tests.jvm_archive import spark_class_archive
from tests.require_all import (  # noqa: F401  (hooks: DLPIPE_REQUIRE_ALL=1 fails a session with skips)
    pytest_configure,
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)
from tests.servers import HdfsCluster, MlflowServer, S3Server, missing_components, spark_jars

REPO = Path(__file__).resolve().parent.parent
# What tools/provision_servers.sh fills (`make setup`): the S3 and HDFS servers and the s3a jars.
SERVERS_CACHE = REPO / ".cache"
AIRFLOW_VENV = REPO / ".venv-airflow"  # what `make airflow-setup` makes

# Tiers by what a test uses, whatever its module says: these fixtures start server processes or a cluster.
SERVER_FIXTURES = frozenset({"servers_cache", "s3_server", "hdfs_cluster", "mlflow_server"})
CLUSTER_FIXTURES = frozenset({"standalone_cluster"})


def servers_missing(cache: Path) -> str | None:
    """Why the storage-server tests cannot run (naming the make target that provides them), or None."""
    missing = missing_components(cache)
    if not missing:
        return None
    return (
        f"storage servers not provisioned ({', '.join(missing)} missing under {cache / 'servers'}): "
        "run `make setup` (it calls tools/provision_servers.sh)"
    )


def airflow_missing(venv: Path) -> str | None:
    """Why the Airflow tests cannot run (naming the make target that provides them), or None."""
    if (venv / "bin" / "airflow").exists():
        return None
    return f"no Airflow in {venv}: run `make airflow-setup` (tools/setup_airflow.sh; CI does) to test the DAG"


def no_gpu() -> str | None:
    """Why the gpu tests cannot run here, or None when torch sees a CUDA device."""
    import torch

    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"no CUDA device (torch {torch.__version__}, {build}): run `make test-gpu` on a machine with a GPU"


# Modules longest first, as a full run with `make test`'s three workers measured them (worker-seconds; those of
# test_training.py and test_runlock.py less the tests that moved to test_cluster.py or into the session): each
# free worker (pytest-xdist, a module to a worker) takes the longest module left, so the run ends on short
# ones and no worker waits long for the others. Left in file-name order, test_tracking_server.py (a server
# start and a whole pipeline) came last of all; unlisted modules take under 20 s each.
LONGEST_FIRST = (
    "test_cluster.py",  # 465
    "test_airflow.py",  # 363
    "test_training.py",  # 283
    "test_notebooks.py",  # 258
    "test_datasets.py",  # 256
    "test_stages.py",  # 243
    "test_scale.py",  # 212
    "test_runlock.py",  # 212
    "test_your_data.py",  # 209
    "test_tracking_server.py",  # 204
    "test_storage_kinds.py",  # 170
    "test_compress.py",  # 154
    "test_pipeline.py",  # 153
    "test_bad_input.py",  # 116
    "test_serving.py",  # 108
    "test_transfer.py",  # 76
    "test_feature_types.py",  # 70
    "test_faults.py",  # 60
    "test_regression.py",  # 57
    "test_promotion.py",  # 52
    "test_secrets.py",  # 47
    "test_baseline.py",  # 35
    "test_drift.py",  # 34
    "test_sources.py",  # 29
    "test_preflight.py",  # 28
    "test_tune.py",  # 16
    "test_servers.py",  # 10
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests `servers`/`cluster` by the fixtures they use (the `store` fixture by its parameter), skip
    `gpu` tests with the reason where there is no GPU, and run the longest modules first."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    gpu_reason: str | None = None
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if used & SERVER_FIXTURES or params.get("store", "file") != "file":
            item.add_marker(pytest.mark.servers)
        if used & CLUSTER_FIXTURES:
            item.add_marker(pytest.mark.cluster)
        if item.get_closest_marker("gpu") is not None:
            gpu_reason = gpu_reason if gpu_reason is not None else (no_gpu() or "")
            if gpu_reason:
                item.add_marker(pytest.mark.skip(reason=gpu_reason))


# The pytest workers are the drivers of the in-process tests: the collector as dlpipe's own processes set it.
tune_gc()

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
# Every JVM the tests start (Spark drivers and executors, the cluster's and HDFS's daemons) lives seconds to
# minutes on tiny data: C2's optimising compiles never pay back. C1 alone cut the CPU of the stage tests by
# a fifth (90 s against 111-138 s, measured). Spark's classes come from an archive made once (a quarter of
# a small application's CPU: tests/jvm_archive.py). test_scale.py, whose data is large, runs without either.
if "JAVA_TOOL_OPTIONS" not in os.environ:
    _jvm = ["-XX:TieredStopAtLevel=1"]
    _archive = spark_class_archive(REPO / ".cache")
    if _archive is not None:  # a JVM that cannot use it (another class path) says nothing and runs without
        _jvm += [f"-XX:SharedArchiveFile={_archive}", "-Xlog:cds=off", "-Xlog:cds+dynamic=off"]
    os.environ["JAVA_TOOL_OPTIONS"] = " ".join(_jvm)


def _mlflow_template() -> Path:
    """An empty MLflow SQLite store with every schema migration applied, made once per MLflow version
    (under .cache, atomically: parallel test workers may race to make it)."""
    import mlflow

    template = REPO / ".cache" / f"mlflow-empty-store-{mlflow.__version__}.db"
    if not template.is_file():
        import sqlalchemy
        from mlflow.store.db.utils import _initialize_tables

        template.parent.mkdir(parents=True, exist_ok=True)
        partial = template.with_name(f"{template.name}.{os.getpid()}.tmp")
        engine = sqlalchemy.create_engine(f"sqlite:///{partial}")
        try:
            _initialize_tables(engine)  # what MLflow runs on an empty database, and nothing else
        finally:
            engine.dispose()
        partial.replace(template)
    return template


def seed_tracking_store(root: Path) -> None:
    """Give root the embedded tracking store (conf: sqlite:///mlruns/mlflow.db) as MLflow would first make
    it: a copy of a migrated empty store. MLflow's 68 migrations cost about 3 s of CPU per new store, and
    dozens of tests each start one; tests of a first run from nothing (notebooks, `make run`) don't come here."""
    db = root / "mlruns" / "mlflow.db"
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_mlflow_template(), db)


# The int8 variant (measured for rows/s, both models, after every training), the compress stage's variants
# and the tree baseline (XGBoost on Spark, in every evaluate): only the tests that check them want them.
UNCHECKED_WORK = ("quantize.enabled=false", "compress.onnx=false", "evaluate.baseline.enabled=false")

# The killed-rank tests' fault (test_training.py: TorchDistributor; test_cluster.py: Horovod): rank 1 kills its
# own process (SIGKILL) right after the epoch-2 checkpoint, in the first attempt only; no early stop, so every
# epoch runs.
KILL_RANK_1 = ("train.early_stopping.patience=0", "train.fault_injection.rank=1", "train.fault_injection.epoch=2")


def cfg_overrides(root: Path, *overrides: str, rows: int = 1500, dataset: str | None = None) -> list[str]:
    """The override list of a test config (also what a test passes to a job on the command line)."""
    if not any(o.startswith("tracking.uri=") for o in overrides):
        seed_tracking_store(Path(root))
    return [
        *([f"dataset={dataset}"] if dataset else []),
        f"project.root={root}",
        f"dataset.generator.rows={rows}",
        "spark.master=local[2]",
        "train.epochs=3",
        *UNCHECKED_WORK,
        *overrides,
    ]


def make_cfg(root: Path, *overrides: str, rows: int = 1500, dataset: str | None = None):
    """A config rooted in root (data, warehouse and the MLflow SQLite store all live there)."""
    from dlpipe.config import load_config

    return load_config("local", cfg_overrides(root, *overrides, rows=rows, dataset=dataset), conf_dir=REPO / "conf")


# Where prepare() makes each distinct dataset once per test session, shared by the xdist workers (their temp
# folders' parent is the session's): set by the _prepared_datasets fixture.
_PREPARED: Path | None = None


@pytest.fixture(scope="session", autouse=True)
def _prepared_datasets(tmp_path_factory) -> None:
    global _PREPARED
    base = tmp_path_factory.getbasetemp()
    _PREPARED = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "prepared-datasets"
    _PREPARED.mkdir(parents=True, exist_ok=True)


def _data_key(cfg, root: Path) -> str | None:
    """What a prepared dataset depends on (the dataset's, preprocessing's and storage's settings, the root
    left out), or None where its data would not live under root/data (another store, another folder)."""
    import hashlib
    import json

    from dlpipe.storage import dataset_paths

    paths = dataset_paths(cfg)
    data = (Path(root).resolve() / "data").as_uri() + "/"  # what prepare copies
    if not (paths.raw.startswith(data) and paths.clean.startswith(data)):
        return None
    settings = cfg.model_dump(mode="json", include={"dataset", "preprocess", "storage"})
    text = json.dumps(settings, sort_keys=True).replace(str(Path(root).resolve()), "<root>")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare(spark, root: Path, *overrides: str, rows: int, dataset: str | None = None):
    """A config rooted in root whose dataset is generated, ingested and preprocessed: ready to train.

    Tests only read (or copy and change) what this makes, so each distinct dataset is made once per session,
    in a folder of its own by these same stage functions, and its data/ folder copied into root."""
    import fcntl

    cfg = make_cfg(root, *overrides, rows=rows, dataset=dataset)
    key = _data_key(cfg, root) if _PREPARED is not None else None
    if key is None:
        _make_dataset(spark, cfg)
        return cfg
    made = _PREPARED / key
    with open(_PREPARED / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker making the same dataset: wait for it
        if not (made / "complete").is_file():
            shutil.rmtree(made, ignore_errors=True)
            _make_dataset(spark, make_cfg(made, *overrides, rows=rows, dataset=dataset))
            (made / "complete").touch()
    shutil.copytree(made / "data", Path(root) / "data", dirs_exist_ok=True)
    return cfg


def _make_dataset(spark, cfg) -> None:
    from dlpipe.data import features, ingest
    from dlpipe.data.generate import generate
    from dlpipe.storage import dataset_paths

    generate(cfg, dataset_paths(cfg).raw)
    ingest.run(spark, cfg)
    features.run(spark, cfg)


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    """A real Spark in local mode (2 cores), UI off, warehouse and scratch in temp folders, warm Python workers
    (tests/warm_daemon.py)."""
    from pyspark.sql import SparkSession

    tmp = tmp_path_factory.mktemp("spark")
    builder = (
        SparkSession.builder.master("local[2]")
        .appName("dlpipe-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.default.parallelism", "2")
        .config("spark.sql.warehouse.dir", str(tmp / "warehouse"))
        .config("spark.local.dir", str(tmp / "local"))
        .config("spark.sql.session.timeZone", "UTC")
        # its Python workers fork from a daemon that has imported torch, MLflow and the executor code once
        .config("spark.python.daemon.module", "tests.warm_daemon")
        .config("spark.executorEnv.PYTHONPATH", str(REPO))  # where that daemon's module is, whatever the cwd
    )
    # s3a:// needs hadoop-aws + the AWS SDK bundle, which pyspark lacks (tools/provision_servers.sh fetches them).
    jars = spark_jars(SERVERS_CACHE)
    if jars:
        builder = builder.config("spark.jars", ",".join(jars))
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(autouse=True)
def _no_dangling_mlflow_run():
    yield
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run("FAILED")


# --- real storage servers on 127.0.0.1 (tests/servers.py), started once per session ---------------------------------
@pytest.fixture(scope="session")
def servers_cache() -> Path:
    """The provisioned server cache; tests that need a storage server skip (with the reason) without it."""
    why = servers_missing(SERVERS_CACHE)
    if why:
        pytest.skip(why)
    return SERVERS_CACHE


@dataclass(frozen=True)
class S3Endpoint:
    """A running S3 server, the one identity it accepts, and a bucket that exists."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    pid: int


@pytest.fixture(scope="session")
def s3_server(servers_cache, tmp_path_factory) -> Iterator[S3Endpoint]:
    """SeaweedFS S3 on a free 127.0.0.1 port, checking signatures, with the bucket `dlpipe-test`."""
    from pyarrow import fs

    server = S3Server(servers_cache, tmp_path_factory.mktemp("s3"), "dlpipe-test-key", "dlpipe-test-secret-0123")
    server.start()
    assert server.pid is not None
    try:
        s3 = fs.S3FileSystem(
            access_key=server.access_key,
            secret_key=server.secret_key,
            endpoint_override=server.endpoint,
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        )
        s3.create_dir("dlpipe-test")
        yield S3Endpoint(server.endpoint, server.access_key, server.secret_key, "dlpipe-test", server.pid)
    finally:
        server.stop()
    assert not pid_alive(server.pid), f"S3 server (pid {server.pid}) still running after stop()"


@pytest.fixture(scope="session")
def hdfs_cluster(servers_cache, tmp_path_factory) -> Iterator[HdfsCluster]:
    """A Hadoop 2.7.3 NameNode + DataNode on free 127.0.0.1 ports (WebHDFS on, permissions off)."""
    cluster = HdfsCluster(servers_cache, tmp_path_factory.mktemp("hdfs"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
    alive = [pid for pid in cluster.pids if pid_alive(pid)]
    assert not alive, f"HDFS daemons {alive} still running after stop()"


@dataclass(frozen=True)
class MlflowEndpoint:
    """A running MLflow tracking server with basic auth: its URI, a non-admin user the pipeline runs as, the
    admin, and where its artifacts go on the test S3 server."""

    uri: str
    username: str
    password: str
    admin_username: str
    admin_password: str
    artifacts_bucket: str
    artifacts_prefix: str
    pid: int


def _create_mlflow_user(uri: str, admin: tuple[str, str], user: tuple[str, str]) -> None:
    """The auth app's REST call (what `mlflow.server.get_app_client("basic-auth").create_user` sends), as admin."""
    import base64
    import json
    import urllib.request

    token = base64.b64encode(f"{admin[0]}:{admin[1]}".encode()).decode()
    req = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/users/create",
        data=json.dumps({"username": user[0], "password": user[1]}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200, resp.read()


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory) -> Iterator[MlflowEndpoint]:
    """`mlflow server --app-name basic-auth` on a free 127.0.0.1 port: SQLite backend, artifacts proxied to
    s3://dlpipe-test/mlflow-<id> on the test S3 server, a user `dlpipe-ci` (not an admin) besides the admin.
    Stopped by process id: afterwards no process of its group may be left (uvicorn workers and all)."""
    prefix = f"mlflow-{uuid.uuid4().hex[:8]}"
    admin = ("mlflow-admin", f"AdminPw-{uuid.uuid4().hex[:12]}")
    user = ("dlpipe-ci", f"TrackingPw-{uuid.uuid4().hex[:12]}")
    workdir = tmp_path_factory.mktemp("mlflow-server")
    shutil.copyfile(_mlflow_template(), workdir / "mlflow.db")  # its backend store, migrated once
    server = MlflowServer(
        workdir,
        f"s3://{s3_server.bucket}/{prefix}",
        s3_server.endpoint,
        s3_server.access_key,
        s3_server.secret_key,
        *admin,
    )
    server.start()
    assert server.pid is not None
    started = []
    try:
        _create_mlflow_user(server.uri, admin, user)
        started = server.processes()
        yield MlflowEndpoint(server.uri, *user, *admin, s3_server.bucket, prefix, server.pid)
    finally:
        started = started or server.processes()
        server.stop()
    assert len(started) > 1, f"expected the server's workers in its process group, saw only {started}"
    alive = [pid for pid in started if pid_alive(pid)] + group_members(server.pid)
    assert not alive, f"MLflow server processes {sorted(set(alive))} still running after stop()"


# --- a real Spark standalone cluster on 127.0.0.1 (dlpipe/ops/cluster.py, what `make cluster-up` runs) ---
@pytest.fixture(scope="session")
def standalone_cluster(tmp_path_factory):
    """A master and two 1-core workers, started with the `make cluster-up` command and stopped by process id
    with `make cluster-down`'s. Two slots in all: exactly the 2 ranks the training tests ask for."""
    import subprocess

    from dlpipe.ops.cluster import StandaloneCluster

    directory = tmp_path_factory.mktemp("cluster")
    cli = [sys.executable, "-m", "dlpipe.ops.cluster"]
    up = subprocess.run(
        [*cli, "up", "--dir", str(directory), "--workers", "2", "--cores", "1", "--memory", "2g"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert up.returncode == 0, up.stdout + up.stderr
    cluster = StandaloneCluster.load(directory)
    try:
        yield cluster
    finally:
        down = subprocess.run([*cli, "down", "--dir", str(directory)], capture_output=True, text=True, timeout=120)
        alive = [pid for pid in cluster.pids if pid_alive(pid)]
        assert down.returncode == 0 and not alive, f"cluster daemons {alive} still running: {down.stdout}{down.stderr}"


FAIL_FAST_S3 = [  # a bad credential should fail in seconds, not retry for minutes
    "storage.s3.hadoop.fs.s3a.attempts.maximum=1",
    "storage.s3.hadoop.fs.s3a.retry.limit=1",
    "storage.s3.hadoop.fs.s3a.retry.interval=100ms",
]


@dataclass
class Store:
    kind: str
    overrides: list[str]
    base: str | None = None  # a fresh folder URI on the store (None: file://, use a temp folder)


@pytest.fixture(params=["file", "s3a", "hdfs"])
def store(request, monkeypatch) -> Store:
    """Overrides that put the warehouse and the raw data on file://, s3a:// or hdfs:// (real servers)."""
    run = uuid.uuid4().hex[:8]
    if request.param == "file":
        return Store("file", [])
    if request.param == "s3a":
        s3 = request.getfixturevalue("s3_server")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
        base = f"s3a://{s3.bucket}/{run}"
        return Store(
            "s3a",
            base=base,
            overrides=[
                f"storage.warehouse={base}/warehouse",
                f"storage.s3.endpoint={s3.endpoint}",
                "storage.s3.path_style_access=true",
                *FAIL_FAST_S3,
                f"dataset.source.uri={base}/raw",
            ],
        )
    hdfs = request.getfixturevalue("hdfs_cluster")
    base = f"{hdfs.namenode_uri}/{run}"
    return Store(
        "hdfs",
        base=base,
        overrides=[
            f"storage.warehouse={base}/warehouse",
            f"storage.hdfs.webhdfs_url={hdfs.webhdfs_url}",
            f"dataset.source.uri={base}/raw",
        ],
    )


def command_lines() -> list[str]:
    """Every process's command line on this machine (Linux /proc)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
    return out


class CommandLines:
    """Every command line on the machine, sampled every 0.2 s while the block runs."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._done.is_set():
            self.seen.update(command_lines())
            self._done.wait(0.2)

    def __enter__(self) -> CommandLines:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def job_env() -> dict[str, str]:
    """This environment, for a job run as a subprocess: its Python as Spark's, Spark on loopback."""
    return {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}


def run_dlpipe(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`python -m dlpipe ARGS` from the project folder, its output captured."""
    argv = [sys.executable, "-m", "dlpipe", *args]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def kill_once_it_writes(
    argv: list[str], where: Path, pattern: str, log: Path | None = None, timeout: float = 240
) -> None:
    """Run a job (argv, from the project folder, in a session of its own) and SIGKILL its whole process group
    as soon as a file matching pattern (a glob under where) appears: a job killed mid-write, with no
    chance to clean up. Fails if the job ends before, or never writes; log keeps its output."""
    env = job_env()
    out = log.open("w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, written = time.time() + timeout, []
        while time.time() < deadline and proc.poll() is None and not written:
            written = [p for p in where.glob(pattern) if p.is_file()]
            time.sleep(0.05)
        said = f": {log.read_text()[-3000:]}" if log else ""
        assert proc.poll() is None, f"{argv[1]} finished before it could be killed{said}"
        assert written, f"{argv[1]} never started writing"
    finally:
        with contextlib.suppress(ProcessLookupError):  # it ended on its own: the assertion above says so
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        if log:
            out.close()


def quantized_layers(model_uri: str, tracking_uri: str) -> list[str]:
    """The dynamically quantized Linear layers of the registered model at model_uri (its network, as scoring
    loads it): none means an fp32 copy was registered as the int8 variant."""
    from dlpipe import tracking
    from dlpipe.serve.scoring import load_model

    network = load_model(tracking.model_version_for(model_uri).download_uri, tracking_uri)
    return [n for n, mod in network.named_modules() if getattr(mod, "original_name", "") == "LinearPackedParams"]
