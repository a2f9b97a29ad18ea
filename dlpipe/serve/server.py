"""Serving a registered model to many users: `python -m dlpipe.serving`.

Our own small HTTP server (Starlette under uvicorn) rather than `mlflow models serve`, for what operating a
model needs:
- **several workers**: `--workers N` uvicorn processes, each with its own socket on the same port of
  127.0.0.1 (SO_REUSEPORT: the kernel spreads the connections over them); each loads the model once and
  scores on one torch thread, so N workers use N cores; one that dies is started again;
- **health**: `GET /health` answers the model's name, version and alias, its run, and the worker's pid;
- **bad records get a 4xx**: a body that is not JSON, records with missing columns, values of the wrong type
  or out of range are answered 400 with the reason of each bad record (dlpipe.model.rawmodel's checks),
  never 500;
- **a model change without downtime**: each worker checks the alias it serves every `--poll-seconds`, and at
  once on `POST /reload`. A new version is loaded beside the old one and swapped in with one assignment:
  requests under way finish on the old model, the next ones get the new one, none is dropped. Every answer
  carries the version that made it (`X-Model-Version`);
- **clean shutdown**: SIGTERM to the server (by process id; `Server.stop` signals its process group) stops
  its workers, each finishing the requests under way, with no stray children.

The request format is MLflow's (`dataframe_split` or `dataframe_records`), and so is the answer
(`{"predictions": [...]}`), so clients of `mlflow models serve` work unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SETTINGS_ENV = "DLPIPE_SERVING"  # the workers' settings (JSON), set by main() before uvicorn starts them


@dataclass(frozen=True)
class Settings:
    model_uri: str  # models:/name@alias (followed as the alias moves) or models:/name/version
    tracking_uri: str
    poll_seconds: float = 10.0
    threads: int = 1  # torch threads per worker

    @property
    def alias(self) -> str | None:
        ref = self.model_uri.removeprefix("models:/")
        return ref.split("@", 1)[1] if "@" in ref else None


@dataclass(frozen=True)
class Loaded:
    """One loaded model version and who it is."""

    model: Any  # the pyfunc model
    name: str | None
    version: str | None
    run_id: str | None
    loaded_at: float


class BadRequest(ValueError):
    """What the client sent cannot be scored; the message says why (answered 400)."""


def load(settings: Settings, version: str | None = None) -> Loaded:
    """The model settings.model_uri names (or that name's given version), loaded."""
    import mlflow

    from dlpipe.tracking import model_version_for

    mlflow.set_tracking_uri(settings.tracking_uri)
    ref = model_version_for(settings.model_uri if version is None else _version_uri(settings, version))
    model = mlflow.pyfunc.load_model(f"models:/{ref.name}/{ref.version}" if ref.name else settings.model_uri)
    return Loaded(model, ref.name, ref.version, ref.run_id, time.time())


def _version_uri(settings: Settings, version: str) -> str:
    name = settings.model_uri.removeprefix("models:/").split("@", 1)[0].split("/", 1)[0]
    return f"models:/{name}/{version}"


class Holder:
    """The model a worker serves now, swapped whole when the alias moves (readers never see half a swap)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.current = load(settings)
        self._lock = threading.Lock()  # one reload at a time

    def current_version(self) -> str | None:
        """The version the alias points at now (the registry's answer; None for a fixed version)."""
        if self.settings.alias is None:
            return self.current.version
        from mlflow import MlflowClient

        name = self.current.name
        return str(
            MlflowClient(self.settings.tracking_uri).get_model_version_by_alias(name, self.settings.alias).version
        )

    def refresh(self) -> bool:
        """Load and swap in the alias's version if it moved; whether it did."""
        with self._lock:
            version = self.current_version()
            if version == self.current.version:
                return False
            new = load(self.settings, version)
            old, self.current = self.current, new  # the swap: one assignment
            log.warning(
                "serving: pid %d now serves %s version %s (was %s)", os.getpid(), new.name, new.version, old.version
            )
            return True

    def watch(self) -> None:
        """Poll the alias in a daemon thread; a failed check (registry down) is logged and retried."""

        def loop() -> None:
            while True:
                time.sleep(self.settings.poll_seconds)
                try:
                    self.refresh()
                except Exception as exc:  # the registry or the store is unreachable: keep serving what we have
                    log.warning("serving: cannot check %s: %s", self.settings.model_uri, exc)

        if self.settings.alias is not None and self.settings.poll_seconds > 0:
            threading.Thread(target=loop, daemon=True, name="dlpipe-model-watch").start()


def records_of(body: bytes) -> Any:
    """The request body as a DataFrame of raw records, or BadRequest saying what is wrong with it."""
    import pandas as pd

    try:
        payload = json.loads(body or b"null")
    except ValueError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest(
            'send a JSON object: {"dataframe_split": {"columns": [...], "data": [[...]]}} or '
            '{"dataframe_records": [{...}]}'
        )
    try:
        if "dataframe_split" in payload:
            split = payload["dataframe_split"]
            return pd.DataFrame(split["data"], columns=split["columns"])
        if "dataframe_records" in payload:
            return pd.DataFrame.from_records(payload["dataframe_records"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(f"the records cannot be read as a table: {exc}") from None
    raise BadRequest(f"no dataframe_split or dataframe_records in the request (keys: {sorted(payload)[:5]})")


def predict(loaded: Loaded, frame) -> list[dict]:
    """The model's answers as JSON-ready records; BadRequest with the checks' reasons for bad records."""
    from mlflow.exceptions import MlflowException

    if len(frame) == 0:
        raise BadRequest("no records to score")
    try:
        out = loaded.model.predict(frame)
    except MlflowException as exc:  # the raw-record checks and MLflow's schema enforcement: the client's input
        raise BadRequest(exc.message) from None
    return json.loads(out.to_json(orient="records"))


def create_app():
    """The ASGI app of one worker (uvicorn calls this in each worker process)."""
    import torch
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    settings = Settings(**json.loads(os.environ[SETTINGS_ENV]))
    torch.set_num_threads(settings.threads)
    holder = Holder(settings)
    holder.watch()

    def identity() -> dict[str, Any]:
        m = holder.current
        return {
            "status": "ok",
            "model_name": m.name,
            "model_version": m.version,
            "alias": settings.alias,
            "model_uri": settings.model_uri,
            "run_id": m.run_id,
            "pid": os.getpid(),
            "loaded_at": m.loaded_at,
        }

    async def health(request):
        return JSONResponse(identity())

    async def invocations(request):
        loaded = holder.current  # this request's model, whatever a reload does meanwhile
        headers = {"X-Model-Version": str(loaded.version)}
        try:
            predictions = predict(loaded, records_of(await request.body()))
        except BadRequest as exc:
            return JSONResponse({"error_code": "BAD_REQUEST", "message": str(exc)}, 400, headers=headers)
        return JSONResponse({"predictions": predictions}, headers=headers)

    async def reload(request):
        changed = holder.refresh()
        return JSONResponse({**identity(), "reloaded": changed})

    routes = [
        Route("/health", health),
        Route("/ping", health),
        Route("/invocations", invocations, methods=["POST"]),
        Route("/reload", reload, methods=["POST"]),
    ]
    return Starlette(routes=routes)


def serve(settings: Settings, host: str, port: int, workers: int) -> None:
    """Serve until SIGTERM or Ctrl-C: one uvicorn process, or `workers` of them each with its own listening
    socket on the same port (SO_REUSEPORT: the kernel spreads new connections evenly over the workers, where
    one shared socket lets whichever worker wakes first take a burst of them all). A worker that dies is
    started again."""
    import signal

    os.environ[SETTINGS_ENV] = json.dumps(dataclasses.asdict(settings))
    if workers == 1:
        _run_worker(host, port, reuse_port=False)
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    stopping = threading.Event()

    def stop(signum, frame) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def start():
        p = ctx.Process(target=_run_worker, args=(host, port, True), name="dlpipe-serving-worker")
        p.start()
        return p

    procs = [start() for _ in range(workers)]
    while not stopping.wait(1.0):
        for i, p in enumerate(procs):
            if not p.is_alive():
                log.warning("serving: worker pid %s exited (%s); starting another", p.pid, p.exitcode)
                procs[i] = start()
    for p in procs:
        if p.is_alive():
            p.terminate()  # SIGTERM: uvicorn finishes the requests under way, then exits
    for p in procs:
        p.join(15)
        if p.is_alive():
            p.kill()
            p.join(5)


def _run_worker(host: str, port: int, reuse_port: bool) -> None:
    import socket

    import uvicorn

    config = uvicorn.Config(
        "dlpipe.serve.server:create_app",
        factory=True,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    if not reuse_port:
        uvicorn.Server(config).run()
        return
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY on accepted connections only for sockets that say so, and
    # without it each response (headers, then body) waits ~40 ms on the client's delayed ACK (Nagle)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    uvicorn.Server(config).run(sockets=[sock])


class Server:
    """`python -m dlpipe.serving` as a child process in its own process group, for tests, benchmarks and
    scripts: started on a free port of 127.0.0.1, ready when every worker has answered /health (a new
    connection each time: the kernel spreads them), stopped by process id."""

    def __init__(
        self, overrides: list[str], log_path, workers: int = 1, model_uri: str | None = None, poll: float = 10
    ):
        from dlpipe.ops.processes import free_ports

        self.overrides, self.log_path, self.workers = overrides, log_path, workers
        self.model_uri, self.poll = model_uri, poll
        self.port = free_ports(1, "127.0.0.1")[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 120.0) -> Server:
        import subprocess
        import sys
        import urllib.request

        argv = [sys.executable, "-m", "dlpipe.serving", *([self.model_uri] if self.model_uri else [])]
        argv += ["--workers", str(self.workers), "--port", str(self.port), "--poll-seconds", str(self.poll)]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [*argv, *self.overrides],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        answered: set[int] = set()  # ready when every worker has answered (each loads the model on its own)
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    answered.add(json.load(resp)["pid"])
                    if len(answered) >= self.workers:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        tail = open(self.log_path, errors="replace").read()[-3000:]
        raise RuntimeError(f"dlpipe.serving did not come up on {self.url}:\n{tail}")

    def processes(self) -> list[int]:
        """The server's process and every descendant (uvicorn's workers), by pid."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the process group (the server and its workers), SIGKILL after timeout."""
        from dlpipe.ops.processes import stop_group

        if self.proc is not None:
            stop_group(self.proc, timeout)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
