"""Real servers on 127.0.0.1 for the tests: SeaweedFS (S3), Hadoop 2.7.3 HDFS (NameNode + DataNode), and an MLflow
tracking server with basic authentication and its artifacts on that S3.

They run from what tools/provision_servers.sh put under CACHE_DIR/servers. Plain classes, no pytest, so that fixtures
and ad-hoc scripts share them. Every process binds 127.0.0.1 only (this machine's other address is unreachable), on
free ports (two runs must not collide), in its own process group (stop() kills the group, so nothing is orphaned),
with its data and logs in the given workdir.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from xml.sax.saxutils import escape

from dlpipe.ops.processes import LOOPBACK, free_ports, group_members, stop_group

S3A_JARS = ("hadoop-aws-3.3.1.jar", "aws-java-sdk-bundle-1.11.901.jar")
# Each component directory that tools/provision_servers.sh completes carries this marker.
_COMPONENTS = ("seaweedfs", "jars/s3a", "hadoop2", "jersey1")


class ServerError(RuntimeError):
    """A server did not start (the message carries the tail of its log)."""


def servers_dir(cache_dir: str | os.PathLike[str]) -> Path:
    """Absolute: the servers run with their workdir as current directory."""
    return Path(cache_dir).resolve() / "servers"


def missing_components(cache_dir: str | os.PathLike[str]) -> list[str]:
    """Components tools/provision_servers.sh has not (completely) provisioned; empty when all are there."""
    root = servers_dir(cache_dir)
    return [name for name in _COMPONENTS if not (root / name / ".provisioned").is_file()]


def spark_jars(cache_dir: str | os.PathLike[str]) -> list[str]:
    """Paths of the s3a jars for `spark.jars`, or [] when they were not provisioned (s3a:// then is unavailable)."""
    paths = [servers_dir(cache_dir) / "jars" / "s3a" / name for name in S3A_JARS]
    return [str(p) for p in paths] if all(p.is_file() for p in paths) else []


def s3a_hadoop_conf(endpoint: str, access_key: str, secret_key: str) -> dict[str, str]:
    """Hadoop settings (without the `spark.hadoop.` prefix) for s3a:// against a local S3 server over plain HTTP.

    Retries and timeouts are cut down so that a bad credential fails in seconds instead of retrying for minutes.
    """
    return {
        "fs.s3a.endpoint": endpoint,
        "fs.s3a.path.style.access": "true",
        "fs.s3a.connection.ssl.enabled": "false",
        "fs.s3a.aws.credentials.provider": "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider",
        "fs.s3a.access.key": access_key,
        "fs.s3a.secret.key": secret_key,
        "fs.s3a.attempts.maximum": "1",
        "fs.s3a.retry.limit": "1",
        "fs.s3a.retry.interval": "100ms",
        "fs.s3a.retry.throttle.limit": "1",
        "fs.s3a.connection.establish.timeout": "5000",
        "fs.s3a.connection.timeout": "20000",
    }


def _free_port_pair(offset: int, exclude: Sequence[int]) -> tuple[int, int]:
    """Free ports P and P + offset (for a client in weed that ignores the configured port and dials P + 10000)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as low:
            low.bind((LOOPBACK, 0))
            port = low.getsockname()[1]
            if port in exclude or port + offset in exclude or port + offset > 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as high:
                try:
                    high.bind((LOOPBACK, port + offset))
                except OSError:
                    continue
                return port, port + offset
    raise ServerError(f"no pair of free ports {offset} apart on {LOOPBACK}")


# Looked up in the parent: nothing but the call itself may run in the forked child before exec.
_PRCTL = getattr(ctypes.CDLL(None), "prctl", None)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the thread that started it (the test run) dies, so a crashed or
    killed run leaves no server behind (Linux prctl; elsewhere stop() is the only cleanup)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((LOOPBACK, port)) == 0


def _tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"(no log at {path})"
    text = path.read_text(errors="replace").splitlines()
    return f"--- last {min(lines, len(text))} lines of {path} ---\n" + "\n".join(text[-lines:])


class _Process:
    """One daemon in its own process group (so that stop() reaches anything it spawns), output to a log file."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self._stopped = False

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def failure(self) -> str | None:
        """Why the process is not running (None while it runs)."""
        if self.popen is None:
            return f"{self.name} was never started"
        rc = self.popen.poll()
        return None if rc is None else f"{self.name} exited with status {rc}"

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group, SIGKILL what lingers, and return once the whole group is gone (once; later
        calls do nothing)."""
        if self.popen is None or self._stopped:
            return
        self._stopped = True
        stop_group(self.popen, timeout)


def _wait_until(
    check: Callable[[], str | None], what: str, timeout: float, procs: Sequence[_Process], logs: Sequence[Path]
) -> None:
    """Poll check() (None = ready, else the reason it is not) until ready; raise with the logs' tails otherwise."""
    deadline = time.monotonic() + timeout
    reason = "not checked yet"
    while True:
        for proc in procs:
            failed = proc.failure()
            if failed:
                tails = "\n".join(_tail(p) for p in logs)
                raise ServerError(f"{failed} while waiting for {what}\n{tails}")
        reason = check()
        if reason is None:
            return
        if time.monotonic() > deadline:
            tails = "\n".join(_tail(p) for p in logs)
            raise ServerError(f"{what} not ready after {timeout:.0f} s (last: {reason})\n{tails}")
        time.sleep(0.25)


class S3Server:
    """SeaweedFS `weed mini` (master, volume, filer, S3 gateway in one process) with one signed-key identity.

    The S3 gateway checks SigV4 signatures against AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY given in its environment,
    so a wrong key or secret is rejected as on AWS (moto would accept anything).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        workdir: str | os.PathLike[str],
        access_key: str,
        secret_key: str,
        startup_timeout: float = 60.0,
    ) -> None:
        self.weed = servers_dir(cache_dir) / "seaweedfs" / "weed"
        self.workdir = Path(workdir).resolve()
        self.access_key = access_key
        self.secret_key = secret_key
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self._tmp_sockets: list[Path] = []
        self._proc: _Process | None = None

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise ServerError("S3Server is not started")
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "weed.log"

    def start(self) -> S3Server:
        if not os.access(self.weed, os.X_OK):
            raise ServerError(f"{self.weed} missing: run tools/provision_servers.sh (make setup)")
        if self._proc is not None:
            raise ServerError("S3Server already started")
        data, logs = self.workdir / "data", self.workdir / "logs"
        data.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        # Every listening port weed mini opens is chosen here; its defaults (8333, 9333, ... and +10000 for gRPC)
        # would collide between two runs.
        (s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc) = ports = free_ports(8)
        # weed's maintenance worker dials the admin gRPC port as admin port + 10000 whatever -admin.port.grpc says.
        admin, admin_grpc = _free_port_pair(10000, exclude=ports)
        grpc = {"s3": s3_grpc, "master": master_grpc, "volume": volume_grpc, "filer": filer_grpc, "admin": admin_grpc}
        self._tmp_sockets = [Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock") for name, port in grpc.items()]
        argv = [
            self.weed,
            f"-logdir={logs}",
            "mini",
            f"-dir={data}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin_grpc}",
        ]
        # Unix sockets default to /tmp/seaweedfs-*-PORT.sock; keep them in the workdir when the path fits.
        if len(str(self.workdir / "filer.sock")) < 100:
            argv += [f"-s3.localSocket={self.workdir / 's3.sock'}", f"-filer.localSocket={self.workdir / 'filer.sock'}"]
        else:
            self._tmp_sockets += [Path(f"/tmp/seaweedfs-s3-{s3}.sock"), Path(f"/tmp/seaweedfs-filer-{filer}.sock")]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        self.port = s3
        self._proc = _Process("weed mini", argv, self.log_path, env=env, cwd=self.workdir)
        self._proc.start()
        try:
            _wait_until(self._ready, f"S3 at {self.endpoint}", self.startup_timeout, [self._proc], [self.log_path])
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> str | None:
        """Ready once a request signed with our key lists the buckets."""
        assert self.port is not None
        if not _port_open(self.port):
            return f"port {self.port} closed"
        from pyarrow import fs

        s3 = fs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            endpoint_override=f"{LOOPBACK}:{self.port}",
            scheme="http",
            region="us-east-1",
            connect_timeout=2,
            request_timeout=5,
            retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=1),
        )
        try:
            s3.get_file_info(fs.FileSelector("/"))
        except OSError as exc:
            return f"list buckets: {exc}"
        return None

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.stop()
        # weed names its gRPC unix sockets /tmp/seaweedfs-NAME-grpc-PORT.sock whatever the flags say, and leaves
        # some behind: remove those of our ports (ours alone while the process ran).
        for sock in self._tmp_sockets:
            if sock.is_socket():
                sock.unlink()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_HDFS_WEBAPPS = ("hdfs", "datanode", "secondary", "journal")
_LOG4J = """\
log4j.rootLogger=INFO,console
log4j.appender.console=org.apache.log4j.ConsoleAppender
log4j.appender.console.target=System.err
log4j.appender.console.layout=org.apache.log4j.PatternLayout
log4j.appender.console.layout.ConversionPattern=%d{HH:mm:ss,SSS} %p %c{2}: %m%n
log4j.logger.org.apache.hadoop.hdfs.server.namenode.FSNamesystem.audit=WARN
log4j.logger.org.apache.hadoop.hdfs.StateChange=WARN
log4j.logger.org.apache.hadoop.hdfs.server.datanode.DataNode.clienttrace=WARN
"""


def _site_xml(props: dict[str, str]) -> str:
    body = "".join(
        f"  <property><name>{escape(k)}</name><value>{escape(v)}</value></property>\n" for k, v in props.items()
    )
    return f'<?xml version="1.0"?>\n<configuration>\n{body}</configuration>\n'


class HdfsCluster:
    """A one-DataNode HDFS: Hadoop 2.7.3 NameNode + DataNode on Java 17, WebHDFS on, permissions off.

    Hadoop 2.7.3 because pyspark 2.4.8's sdist is the only registry artifact that carries server-side HDFS jars;
    Spark 3.5's Hadoop 3.3 client speaks its RPC and data-transfer protocols fine.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        workdir: str | os.PathLike[str],
        heap_mb: int = 256,
        startup_timeout: float = 120.0,
    ) -> None:
        root = servers_dir(cache_dir)
        self.hadoop_lib = root / "hadoop2" / "lib"
        self.jersey_lib = root / "jersey1"
        self.workdir = Path(workdir).resolve()
        self.heap_mb = heap_mb
        self.startup_timeout = startup_timeout
        self.ports: dict[str, int] = {}
        self._namenode: _Process | None = None
        self._datanode: _Process | None = None

    @property
    def namenode_uri(self) -> str:
        return f"hdfs://{LOOPBACK}:{self._port('rpc')}"

    @property
    def webhdfs_url(self) -> str:
        return f"http://{LOOPBACK}:{self._port('http')}"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in (self._namenode, self._datanode) if p is not None and p.pid is not None]

    def _port(self, name: str) -> int:
        if name not in self.ports:
            raise ServerError("HdfsCluster is not started")
        return self.ports[name]

    def _log(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def _java(self) -> str:
        java_home = os.environ.get("JAVA_HOME")
        java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
        if not java or not os.access(java, os.X_OK):
            raise ServerError("java not found (set JAVA_HOME or put java on PATH)")
        return java

    def _write_config(self) -> Path:
        """core-site.xml, hdfs-site.xml, log4j.properties and the (empty) webapps the HTTP servers look up."""
        conf = self.workdir / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        for sub in ("name", "data", "logs", "tmp"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        for app in _HDFS_WEBAPPS:
            web_inf = self.workdir / "webapps" / app / "WEB-INF"
            web_inf.mkdir(parents=True, exist_ok=True)
            (web_inf / "web.xml").write_text("<web-app/>\n")
        (conf / "core-site.xml").write_text(
            _site_xml({"fs.defaultFS": self.namenode_uri, "hadoop.tmp.dir": str(self.workdir / "tmp")})
        )
        p = self.ports
        (conf / "hdfs-site.xml").write_text(
            _site_xml(
                {
                    "dfs.namenode.name.dir": (self.workdir / "name").as_uri(),
                    "dfs.datanode.data.dir": (self.workdir / "data").as_uri(),
                    "dfs.replication": "1",
                    "dfs.permissions.enabled": "false",
                    "dfs.webhdfs.enabled": "true",
                    "dfs.namenode.rpc-address": f"{LOOPBACK}:{p['rpc']}",
                    "dfs.namenode.http-address": f"{LOOPBACK}:{p['http']}",
                    "dfs.namenode.https-address": f"{LOOPBACK}:0",
                    "dfs.namenode.secondary.http-address": f"{LOOPBACK}:0",
                    "dfs.namenode.secondary.https-address": f"{LOOPBACK}:0",
                    "dfs.datanode.address": f"{LOOPBACK}:{p['dn_data']}",
                    "dfs.datanode.ipc.address": f"{LOOPBACK}:{p['dn_ipc']}",
                    "dfs.datanode.http.address": f"{LOOPBACK}:{p['dn_http']}",
                    "dfs.datanode.https.address": f"{LOOPBACK}:0",
                    # WebHDFS redirects reads and writes to the DataNode by this name: it must be reachable.
                    "dfs.datanode.hostname": LOOPBACK,
                    "dfs.namenode.datanode.registration.ip-hostname-check": "false",
                    "dfs.namenode.safemode.extension": "0",
                    "dfs.heartbeat.interval": "1",
                    "dfs.namenode.handler.count": "4",
                    "dfs.datanode.handler.count": "4",
                    "dfs.client.block.write.replace-datanode-on-failure.enable": "false",
                }
            )
        )
        (conf / "log4j.properties").write_text(_LOG4J)
        return conf

    def _argv(self, conf: Path, main_class: str, *args: str) -> list[str]:
        classpath = os.pathsep.join([str(conf), str(self.workdir), f"{self.hadoop_lib}/*", f"{self.jersey_lib}/*"])
        return [
            self._java(),
            f"-Xmx{self.heap_mb}m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.net.preferIPv4Stack=true",
            f"-Djava.io.tmpdir={self.workdir / 'tmp'}",
            f"-Dhadoop.home.dir={self.workdir}",
            f"-Dhadoop.log.dir={self.workdir / 'logs'}",
            "-cp",
            classpath,
            main_class,
            *args,
        ]

    def start(self) -> HdfsCluster:
        for lib in (self.hadoop_lib, self.jersey_lib):
            if not any(lib.glob("*.jar")):
                raise ServerError(f"no jars in {lib}: run tools/provision_servers.sh (make setup)")
        if self._namenode is not None:
            raise ServerError("HdfsCluster already started")
        self.ports = dict(zip(("rpc", "http", "dn_data", "dn_ipc", "dn_http"), free_ports(5), strict=True))
        conf = self._write_config()
        namenode = "org.apache.hadoop.hdfs.server.namenode.NameNode"
        fmt_log = self._log("format")
        with open(fmt_log, "wb") as log:
            try:
                rc = subprocess.run(
                    self._argv(conf, namenode, "-format", "-force", "-nonInteractive"),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    timeout=self.startup_timeout,
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired as exc:
                raise ServerError(f"NameNode -format ran over {self.startup_timeout:.0f} s\n{_tail(fmt_log)}") from exc
        if rc != 0:
            raise ServerError(f"NameNode -format exited with status {rc}\n{_tail(fmt_log)}")
        logs = [self._log("namenode"), self._log("datanode")]
        try:
            self._namenode = _Process("NameNode", self._argv(conf, namenode), logs[0], cwd=self.workdir)
            self._namenode.start()
            self._datanode = _Process(
                "DataNode",
                self._argv(conf, "org.apache.hadoop.hdfs.server.datanode.DataNode"),
                logs[1],
                cwd=self.workdir,
            )
            self._datanode.start()
            procs = [self._namenode, self._datanode]
            _wait_until(self._live, "HDFS NameNode with a live DataNode", self.startup_timeout, procs, logs)
            _wait_until(self._round_trip, "a WebHDFS write and read", self.startup_timeout, procs, logs)
        except BaseException:
            self.stop()
            raise
        return self

    def _jmx(self, bean: str) -> dict[str, object]:
        url = f"{self.webhdfs_url}/jmx?qry=Hadoop:service=NameNode,name={bean}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            beans = json.load(resp)["beans"]
        return beans[0] if beans else {}

    def _live(self) -> str | None:
        """Out of safe mode, one live DataNode that has reported free space."""
        try:
            info = self._jmx("NameNodeInfo")
            state = self._jmx("FSNamesystemState")
        except (OSError, ValueError, KeyError) as exc:
            return f"NameNode JMX: {exc}"
        if info.get("Safemode"):
            return f"safe mode: {info['Safemode']}"
        if state.get("NumLiveDataNodes", 0) < 1:
            return "no live DataNode"
        if state.get("CapacityRemaining", 0) <= 0:
            return "DataNode has not reported its storage"
        return None

    def _round_trip(self) -> str | None:
        """Write and read a file through WebHDFS (NameNode redirect to the DataNode's HTTP address)."""
        from hdfs import HdfsError, InsecureClient

        client = InsecureClient(self.webhdfs_url, user="dlpipe-probe", timeout=10)
        path = "/tmp/.dlpipe-ready"
        try:
            client.write(path, data=b"ready", overwrite=True)
            with client.read(path) as reader:
                data = reader.read()
            client.delete(path)
        except (HdfsError, OSError) as exc:
            return f"WebHDFS round trip: {exc}"
        return None if data == b"ready" else f"read back {data!r}"

    def stop(self) -> None:
        """DataNode first, then NameNode; each process group is killed and reaped."""
        for proc in (self._datanode, self._namenode):
            if proc is not None:
                proc.stop()

    def __enter__(self) -> HdfsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_AUTH_INI = """\
[mlflow]
default_permission = {default_permission}
database_uri = {database_uri}
admin_username = {admin_username}
admin_password = {admin_password}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# a password check is a deliberately slow hash (about 0.25 s of CPU here): remember a good one for a minute
auth_cache_ttl_seconds = 60
"""


class MlflowServer:
    """`mlflow server` with MLflow's basic-auth app: runs and the registry in SQLite, artifacts proxied by the
    server to an S3 bucket (the test S3 server), every API call refused without a user and password.

    The admin user and password go into the auth app's ini file (MLFLOW_AUTH_CONFIG_PATH, in the workdir), the
    S3 credentials into the server's environment: none of them on its command line. MLflow starts worker
    processes (uvicorn, multiprocessing) and, with job_execution, a job runner and seven job consumers
    (huey_consumer) under the server; all share its process group, which stop() kills. dlpipe uses no server
    jobs (they run GenAI scorers and trace archival), so they are off by default: eight Python processes less
    to start on a small machine.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        artifacts_destination: str,
        s3_endpoint: str,
        s3_access_key: str,
        s3_secret_key: str,
        admin_username: str,
        admin_password: str,
        default_permission: str = "READ",
        workers: int = 2,
        job_execution: bool = False,
        startup_timeout: float = 120.0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.artifacts_destination = artifacts_destination
        self.s3_endpoint, self.s3_access_key, self.s3_secret_key = s3_endpoint, s3_access_key, s3_secret_key
        self.admin_username, self.admin_password = admin_username, admin_password
        self.default_permission = default_permission
        self.workers = workers
        self.job_execution = job_execution
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self._proc: _Process | None = None

    @property
    def uri(self) -> str:
        if self.port is None:
            raise ServerError("MlflowServer is not started")
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "mlflow-server.log"

    def processes(self) -> list[int]:
        """The server's live processes: the leader and everything in its group (workers, job consumers)."""
        return [] if self.pid is None else group_members(self.pid)

    def _env(self, auth_ini: Path) -> dict[str, str]:
        # nothing of the test run's own MLflow or AWS settings leaks into the server
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
        # the server execs uvicorn and huey_consumer by name: this environment's bin first on PATH
        bin_dir = str(Path(sys.executable).parent)
        env.update(
            PATH=os.pathsep.join([bin_dir, env.get("PATH", "")]),
            MLFLOW_AUTH_CONFIG_PATH=str(auth_ini),
            MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),  # the auth app's CSRF key
            MLFLOW_S3_ENDPOINT_URL=self.s3_endpoint,
            AWS_ACCESS_KEY_ID=self.s3_access_key,
            AWS_SECRET_ACCESS_KEY=self.s3_secret_key,
            AWS_DEFAULT_REGION="us-east-1",
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION=str(self.job_execution).lower(),
        )
        return env

    def start(self) -> MlflowServer:
        if self._proc is not None:
            raise ServerError("MlflowServer already started")
        # the basic-auth app exits at start without Flask-WTF, the S3 artifact store fails at the first upload
        # without boto3: say so here, not in a log tail (both are dev dependencies: make setup)
        missing = [name for name in ("flask_wtf", "boto3") if importlib.util.find_spec(name) is None]
        if missing:
            raise ServerError(f"{', '.join(missing)} not installed in {sys.prefix}: run `make setup`")
        self.workdir.mkdir(parents=True, exist_ok=True)
        auth_ini = self.workdir / "basic_auth.ini"
        auth_ini.write_text(
            _AUTH_INI.format(
                default_permission=self.default_permission,
                database_uri=f"sqlite:///{self.workdir / 'auth.db'}",
                admin_username=self.admin_username,
                admin_password=self.admin_password,
            )
        )
        auth_ini.chmod(0o600)
        (self.port,) = free_ports(1)
        argv = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--app-name",
            "basic-auth",
            "--backend-store-uri",
            f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--artifacts-destination",
            self.artifacts_destination,
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]
        self._proc = _Process("mlflow server", argv, self.log_path, env=self._env(auth_ini), cwd=self.workdir)
        self._proc.start()
        try:
            _wait_until(self._ready, f"MLflow at {self.uri}", self.startup_timeout, [self._proc], [self.log_path])
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> str | None:
        """Ready once /health answers; then the API must refuse a request without credentials (auth is on)."""
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                if resp.status != 200:
                    return f"/health answered {resp.status}"
        except OSError as exc:  # URLError, connection refused, reset while starting
            return f"/health: {exc}"
        try:
            with urllib.request.urlopen(f"{self.uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=5):
                raise ServerError(f"{self.uri} answered an API call without credentials: basic auth is off")
        except urllib.error.HTTPError as err:
            if err.code != 401:
                return f"API without credentials answered {err.code}, not 401"
        return None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
