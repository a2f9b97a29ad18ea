"""A real Spark standalone cluster on this machine: one master and N workers, bound to 127.0.0.1.

For trying the pipeline the way it runs on a cluster (separate executor JVMs, a real scheduler, barrier
stages across workers) without one: `make cluster-up` / `make cluster-down`, and the tests that need the
distribution. Daemons are started with pyspark's own `spark-class` (no Spark install needed), each in its
own process group, and stopped by process id; their pids and URLs are kept in `<dir>/cluster.json` so a
later command can stop a cluster an earlier one started.

    python -m dlpipe.ops.cluster up [--workers 2 --cores 1 --memory 2g --dir .cache/cluster]
    python -m dlpipe.ops.cluster status
    python -m dlpipe.ops.cluster down
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyspark

from dlpipe.ops.processes import LOOPBACK, free_ports, pid_alive

STATE_FILE = "cluster.json"


class ClusterError(RuntimeError):
    """The cluster did not come up (the message holds the daemon's log tail) or is not there."""


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace").splitlines() if path.is_file() else ["(no log)"]
    return f"--- {path} ---\n" + "\n".join(text[-lines:])


@dataclass
class StandaloneCluster:
    """Master + workers; `start()` returns once every worker has registered with the master."""

    directory: Path
    workers: int = 2
    cores: int = 1
    memory: str = "2g"
    host: str = LOOPBACK
    master_port: int = 0
    master_ui_port: int = 0
    pids: list[int] = field(default_factory=list)  # master first

    @property
    def master_url(self) -> str:
        return f"spark://{self.host}:{self.master_port}"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.master_ui_port}"

    def _env(self) -> dict[str, str]:
        home = str(Path(pyspark.__file__).parent)
        return {
            **os.environ,
            "SPARK_HOME": home,
            "SPARK_LOCAL_IP": self.host,
            "SPARK_LOG_DIR": str(self.directory / "logs"),
            # executors run this interpreter (the project's venv) unless the application says otherwise
            "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable),
        }

    def _spawn(self, name: str, args: list[str]) -> int:
        spark_class = Path(pyspark.__file__).parent / "bin" / "spark-class"
        log_path = self.directory / "logs" / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [str(spark_class), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self.directory,
                start_new_session=True,  # its own group: stop() reaches the executors a worker forks too
            )
        self.pids.append(proc.pid)
        return proc.pid

    def status(self) -> dict:
        """The master's own view (its JSON endpoint): workers alive, cores, running applications."""
        with urllib.request.urlopen(f"{self.ui_url}/json/", timeout=5) as resp:
            return json.load(resp)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "master not answering yet"
        while time.monotonic() < deadline:
            dead = [pid for pid in self.pids if not pid_alive(pid)]
            if dead:
                break
            try:
                alive = [w for w in self.status().get("workers", []) if w.get("state") == "ALIVE"]
                if len(alive) >= self.workers:
                    return
                last = f"{len(alive)} of {self.workers} workers registered"
            except OSError as exc:
                last = f"master UI: {exc}"
            time.sleep(0.5)
        logs = "\n".join(_tail(p) for p in sorted((self.directory / "logs").glob("*.log")))
        self.stop()
        raise ClusterError(f"Spark standalone cluster not ready after {timeout:.0f} s ({last})\n{logs}")

    def start(self, timeout: float = 90.0) -> StandaloneCluster:
        self.directory = Path(self.directory).resolve()
        (self.directory / "logs").mkdir(parents=True, exist_ok=True)
        ports = free_ports(2 + 2 * self.workers, self.host)
        self.master_port, self.master_ui_port = ports[0], ports[1]
        self._spawn(
            "master",
            [
                "org.apache.spark.deploy.master.Master",
                *("--host", self.host, "--port", str(self.master_port), "--webui-port", str(self.master_ui_port)),
            ],
        )
        for i in range(self.workers):
            work = self.directory / f"worker-{i}"
            work.mkdir(exist_ok=True)
            self._spawn(
                f"worker-{i}",
                [
                    "org.apache.spark.deploy.worker.Worker",
                    *("--host", self.host, "--port", str(ports[2 + 2 * i]), "--webui-port", str(ports[3 + 2 * i])),
                    *("--cores", str(self.cores), "--memory", self.memory, "--work-dir", str(work)),
                    self.master_url,
                ],
            )
        self._wait_ready(timeout)
        self.save()
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM each daemon's process group (executors included), SIGKILL what is left after timeout."""
        for pid in reversed(self.pids):  # workers first, then the master
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass  # already gone
        deadline = time.monotonic() + timeout
        while any(pid_alive(p) for p in self.pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                os.waitpid(pid, os.WNOHANG)  # reap it if this process started it
            except ChildProcessError:
                pass
        state = self.directory / STATE_FILE
        if state.exists():
            state.unlink()

    def save(self) -> None:
        data = {**asdict(self), "directory": str(self.directory), "master_url": self.master_url}
        (self.directory / STATE_FILE).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> StandaloneCluster:
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise ClusterError(f"no cluster state at {path}: start one with `make cluster-up`")
        data = json.loads(path.read_text())
        data.pop("master_url", None)
        return cls(**{**data, "directory": Path(data["directory"])})

    def __enter__(self) -> StandaloneCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlpipe.ops.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--dir", default=".cache/cluster", help="state, logs and worker dirs (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cores", type=int, default=1, help="cores per worker")
    parser.add_argument("--memory", default="2g", help="memory per worker")
    args = parser.parse_args(argv)
    if args.action == "up":
        try:
            running = StandaloneCluster.load(args.dir)
        except ClusterError:
            running = None
        if running and all(pid_alive(p) for p in running.pids):
            print(f"already running: {running.master_url} (UI {running.ui_url})")
            return 0
        if running:
            running.stop()  # a half-dead one from before
        cluster = StandaloneCluster(Path(args.dir), args.workers, args.cores, args.memory).start()
        print(f"master {cluster.master_url}  UI {cluster.ui_url}  pids {cluster.pids}")
        print(f"use it: make run ARGS='spark.master={cluster.master_url}'")
        return 0
    try:
        cluster = StandaloneCluster.load(args.dir)
    except ClusterError as exc:
        print(exc, file=sys.stderr)
        return 0 if args.action == "down" else 1
    if args.action == "down":
        cluster.stop()
        left = [p for p in cluster.pids if pid_alive(p)]
        print(f"stopped {cluster.master_url} (pids {cluster.pids})" + (f"; still alive: {left}" if left else ""))
        return 1 if left else 0
    alive = {p: pid_alive(p) for p in cluster.pids}
    print(f"master {cluster.master_url}  UI {cluster.ui_url}  pids alive {alive}")
    if all(alive.values()):
        info = cluster.status()
        apps = len(info.get("activeapps", []))
        print(f"workers alive: {info.get('aliveworkers')}  cores: {info.get('cores')}  apps: {apps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
