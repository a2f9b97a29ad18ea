"""One run at a time per dataset and warehouse: a lock file in the store, recovered when its holder died.

Two runs on the same dataset would delete each other's temporary outputs (a stage clears the `*.tmp-*`
folders an interrupted run left) and race on the committed ones. So a pipeline run, or a stage run on its
own, holds `<warehouse>/<dataset>/_dlpipe_lock.json` for its whole length: created exclusively, naming
the holder (host, pid, start) and refreshed every HEARTBEAT_S. A second run waits up to
`storage.lock_wait_seconds` (default: not at all) and then fails with a message naming the holder. A lock
whose holder is gone is taken over with a warning: same host and the pid is not running, or (another
host) no heartbeat for STALE_S. The lock is re-entrant within one process (a pipeline run's stages).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from pyspark.sql import SparkSession

from dlpipe.config import Config
from dlpipe.ops.processes import pid_alive
from dlpipe.storage import HadoopFS, dataset_base

log = logging.getLogger(__name__)

LOCK = "_dlpipe_lock.json"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # a holder on another host that has not refreshed its lock for this long is gone
_held: dict[str, int] = {}  # lock URI -> how many times this process holds it
_held_lock = threading.Lock()


class RunLockedError(RuntimeError):
    """Another run is at work on the same dataset and warehouse."""


def lock_uri(cfg: Config) -> str:
    return f"{dataset_base(cfg)}/{LOCK}"


def _stale(holder: dict, now: float) -> str | None:
    """Why the holder is gone, or None while it may still be at work."""
    if holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", -1))):
        return f"process {holder.get('pid')} on this host is not running"
    if now - float(holder.get("heartbeat", holder.get("started", now))) > STALE_S:
        return f"no heartbeat for more than {STALE_S:.0f}s"
    return None


def _read(fs: HadoopFS, uri: str) -> dict | None:
    """The holder's record; {} while it is being written; None if the lock is gone meanwhile."""
    from py4j.protocol import Py4JJavaError

    try:
        text = fs.read_bytes(uri).decode()
    except Py4JJavaError as exc:  # FileNotFoundException: released between our create and this read
        if not fs.exists(uri):
            return None
        raise RunLockedError(f"cannot read the run lock {uri}: {exc}") from None
    return json.loads(text) if text.strip() else {}


@contextmanager
def dataset_lock(spark: SparkSession, cfg: Config, what: str) -> Iterator[None]:
    """Hold the dataset's run lock for the duration (see the module's docstring)."""
    uri = lock_uri(cfg)
    with _held_lock:
        if _held.get(uri):
            _held[uri] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_lock:
                _held[uri] -= 1
        return
    fs = HadoopFS(spark)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "what": what, "started": time.time()}
    me["token"] = uuid.uuid4().hex
    deadline = time.monotonic() + cfg.storage.lock_wait_seconds
    announced = False
    while True:
        me["heartbeat"] = time.time()
        if fs.create_new(uri, json.dumps(me).encode()):
            break
        holder = _read(fs, uri)
        if holder is None:
            continue  # released meanwhile: try again at once
        gone = _stale(holder, time.time()) if holder else None
        if gone:
            log.warning("run lock %s: taking over from %s (%s)", uri, _describe(holder), gone)
            fs.delete(uri)
            continue
        if time.monotonic() >= deadline:
            raise RunLockedError(
                f"another dlpipe run is at work on dataset {cfg.dataset.name} in this warehouse: "
                f"{_describe(holder)}; its lock is {uri}. Wait for it to finish (or set storage.lock_wait_seconds "
                "to wait); if that run is gone on another host, delete the lock file"
            )
        if not announced:
            wait = cfg.storage.lock_wait_seconds
            log.info("run lock %s: held by %s; waiting up to %.0fs", uri, _describe(holder), wait)
            announced = True
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
    with _held_lock:
        _held[uri] = 1
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            me["heartbeat"] = time.time()
            fs.write_bytes(uri, json.dumps(me).encode())

    heart = threading.Thread(target=beat, name="dlpipe-run-lock", daemon=True)
    heart.start()
    log.info("run lock %s: held (%s)", uri, what)
    try:
        yield
    finally:
        stop.set()
        heart.join()
        with _held_lock:
            _held.pop(uri, None)
        current = _read(fs, uri)
        if current is not None and current.get("token") == me["token"]:
            fs.delete(uri)


def _describe(holder: dict) -> str:
    if not holder:
        return "a run that is just starting"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return f"{holder.get('what', 'a run')} (pid {holder.get('pid')} on {holder.get('host')}, since {started})"
