"""Small helpers for the local daemons dlpipe starts (a Spark cluster, a model server) and its tests start
(S3, HDFS): free ports on loopback, and whether a process id is still alive."""

from __future__ import annotations

import os
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """`count` distinct free TCP ports on host (all held open together, so none repeats)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def pid_alive(pid: int) -> bool:
    """True while a process with this id exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # not Linux: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_group(proc, timeout: float = 20.0) -> None:
    """Stop a child started with start_new_session=True, and everything in its process group: SIGTERM, then
    SIGKILL after timeout seconds; a group already gone is fine. proc: its subprocess.Popen."""
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except ProcessLookupError:
        pass  # gone already
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
