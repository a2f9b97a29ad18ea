"""Rank logs streamed to the driver, so training progress shows in the driver's log on any cluster.

On a cluster, a Python worker's stderr stays on its executor. The driver runs a small TCP receiver for the
duration of the training stage; each rank sends its log records as JSON lines (no pickle: nothing
executable crosses the wire), and the driver re-emits them through its own logging as
`dlpipe.train.rank<N>`. Without a receiver (a rank run by hand) records go to stderr.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import sys
import threading


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn line from a rank that died mid-write carries nothing to show
            logger = logging.getLogger(f"dlpipe.train.rank{int(rec.get('rank', -1))}")
            logger.log(int(rec.get("level", logging.INFO)), "%s", rec.get("msg", ""))


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class LogReceiver:
    """Driver side: receives rank log records until stopped."""

    def __init__(self, host: str):
        self._server = _Server((host, 0), _Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="dlpipe-rank-logs")

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def __enter__(self) -> LogReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


class JsonSocketHandler(logging.Handler):
    """Rank side: one JSON line per record to the driver's receiver; stderr if it cannot be reached."""

    def __init__(self, address: str, rank: int):
        super().__init__()
        self._rank = rank
        host, _, port = address.rpartition(":")
        self._address = (host, int(port))
        self._sock: socket.socket | None = None

    def emit(self, record: logging.LogRecord) -> None:
        line = json.dumps({"rank": self._rank, "level": record.levelno, "msg": record.getMessage()}) + "\n"
        try:
            if self._sock is None:
                self._sock = socket.create_connection(self._address, timeout=5)
            self._sock.sendall(line.encode())
        except OSError:
            self._sock = None
            sys.stderr.write(f"{record.name}: {record.getMessage()}\n")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        super().close()


def rank_logger(rank: int, address: str | None) -> logging.Logger:
    """The logger a rank writes progress to: streamed to the driver (which logs it as
    `dlpipe.train.rank<N>`) when the launcher set one up."""
    log = logging.getLogger(f"dlpipe.worker.rank{rank}")
    for old in list(log.handlers):  # a reused Python worker may have served another rank before
        log.removeHandler(old)
        old.close()
    if address:
        log.addHandler(JsonSocketHandler(address, rank))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s [train rank {rank}] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return log
