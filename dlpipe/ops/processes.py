"""Small helpers for the local daemons dlpipe starts (a Spark cluster, a model server) and its tests start
(S3, HDFS): free ports on loopback, and whether a process id is still alive."""

from __future__ import annotations

import contextlib
import os
import socket
import time
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


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group (Linux /proc; [] elsewhere)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _ppid, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except OSError:
            continue  # gone while we looked
        if int(group) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def _group_gone(pgid: int, until: float) -> bool:
    """Wait (until the monotonic time `until`) for every member of the process group to be gone."""
    while group_members(pgid):
        if time.monotonic() >= until:
            return False
        time.sleep(0.05)
    return True


def stop_group(proc, timeout: float = 20.0) -> None:
    """Stop a child started with start_new_session=True, and everything in its process group: SIGTERM, then
    SIGKILL for whatever is left after timeout seconds; a group already gone is fine. Returns once every
    member is gone, not only the leader: a busy machine can leave a worker finishing its shutdown after the
    supervisor has exited. proc: its subprocess.Popen."""
    import signal
    import subprocess

    deadline = time.monotonic() + timeout
    with contextlib.suppress(ProcessLookupError):  # gone already
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(max(deadline - time.monotonic(), 0.1))
    if proc.poll() is not None and _group_gone(proc.pid, deadline):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    _group_gone(proc.pid, time.monotonic() + 10)
