"""Driver side: run a function as Horovod ranks, one per task of a Spark barrier stage.

`horovod.spark.run` is not barrier mode (plain tasks plus its own driver services), so a lost task can leave
the others waiting. Here every rank is a task of one barrier stage: Spark starts them all together or not
at all, and fails (and retries) them together. The Gloo rendezvous is set up from inside the stage: each
task knows every task's address from `BarrierTaskContext.getTaskInfos()`, so all compute the same rank
plan; rank 0 starts Horovod's rendezvous server on its own address and shares the port by `allGather`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # executors import this module (the barrier task): it must not need pyspark
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

from dlpipe.train.comm import GPU_ENV

log = logging.getLogger(__name__)


class SlotShortageError(RuntimeError):
    """The cluster cannot run all ranks at once; a barrier stage would wait for slots forever."""


def available_slots(sc: SparkContext) -> int:
    """Tasks the cluster can run at the same time now (what a barrier stage needs for all its ranks):
    the registered executors' cores over spark.task.cpus, as Spark's own barrier check counts them."""
    jsc = sc._jsc.sc()
    return int(jsc.maxNumConcurrentTasks(jsc.resourceProfileManager().defaultResourceProfile()))


def tasks_have_gpus(sc: SparkContext) -> bool:
    """Spark gives each task GPUs (spark.task.resource.gpu.amount): ranks then train on them."""
    return float(sc.getConf().get("spark.task.resource.gpu.amount", "0")) > 0


def check_slots(sc: SparkContext, num_proc: int, wait_s: float = 60.0, settle_s: float = 5.0) -> None:
    """Fail at once, with both numbers, when the cluster cannot run num_proc tasks together.

    A barrier stage with too few slots is not refused by Spark: it waits and retries for minutes. On a
    cluster, executors register a few seconds after the application starts, so this waits until there are
    enough slots, or until the count has not grown for settle_s (the cluster has given what it has), or
    wait_s without any executor at all.
    """
    started = last_change = time.monotonic()
    have = available_slots(sc)
    local = sc.master.startswith("local")
    while have < num_proc and not local:
        now = time.monotonic()
        if (have > 0 and now - last_change >= settle_s) or now - started >= wait_s:
            break
        time.sleep(0.5)
        now_have = available_slots(sc)
        if now_have != have:
            have, last_change = now_have, time.monotonic()
    if have < num_proc:
        task_cpus = sc.getConf().get("spark.task.cpus", "1")
        raise SlotShortageError(
            f"training needs {num_proc} task slots at once (train.num_proc={num_proc}), the cluster has {have} "
            f"(master {sc.master}, spark.task.cpus={task_cpus}, waited {time.monotonic() - started:.0f} s for "
            "executors): lower train.num_proc, or give the application more executors or cores"
        )
    log.info("train: %d task slots available for %d ranks", have, num_proc)


def interface_for(host: str) -> str | None:
    """The network interface that carries host's address (what Gloo must use), or None if not local."""
    import psutil

    try:
        ip = socket.gethostbyname(host)
    except OSError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


def rank_plan(hosts: list[str]) -> list[Any]:
    """Horovod SlotInfo for each task (indexed by partition id); ranks grouped by host as Horovod expects."""
    from horovod.runner.common.util.hosts import HostInfo, get_host_assignments

    order: list[str] = []
    for h in hosts:
        if h not in order:
            order.append(h)
    slots = get_host_assignments([HostInfo(h, hosts.count(h)) for h in order], len(hosts))
    by_host: dict[str, list[Any]] = {h: [s for s in slots if s.hostname == h] for h in order}
    return [by_host[h].pop(0) for h in hosts]


def horovod_env(
    plan: Sequence[Any], hosts: Sequence[str], pid: int, port: str, iface: str | None, cycle_ms: float | None
) -> dict[str, str]:
    """The environment task `pid` sets before hvd.init(): Gloo's rendezvous at rank 0's host and `port`,
    and this task's place in `plan` (rank_plan of `hosts`, the tasks' addresses by partition id).

    Pure (no I/O), so every task computes the same plan from the same addresses, and it can be checked."""
    slot = plan[pid]
    env = {
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": hosts[next(i for i, s in enumerate(plan) if s.rank == 0)],
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_HOSTNAME": slot.hostname,
        "HOROVOD_RANK": str(slot.rank),
        "HOROVOD_SIZE": str(slot.size),
        "HOROVOD_LOCAL_RANK": str(slot.local_rank),
        "HOROVOD_LOCAL_SIZE": str(slot.local_size),
        "HOROVOD_CROSS_RANK": str(slot.cross_rank),
        "HOROVOD_CROSS_SIZE": str(slot.cross_size),
    }
    if iface:
        env["HOROVOD_GLOO_IFACE"] = iface
    if cycle_ms is not None:
        env["HOROVOD_CYCLE_TIME"] = str(cycle_ms)
    return env


def gpu_env(addresses: Sequence[str] | None, nccl_built: bool) -> dict[str, str]:
    """With GPUs from Spark, the one the rank pins (GPU_ENV, read by the worker) and, when Horovod can
    reduce on the GPU, NCCL for its GPU operations; nothing without GPUs."""
    if not addresses:
        return {}
    env = {GPU_ENV: addresses[0]}
    if nccl_built:
        env["HOROVOD_GPU_OPERATIONS"] = "NCCL"
    return env


def _barrier_task(fn: Callable[..., Any], args: tuple, gloo_iface: str | None, cycle_ms: float | None = None):
    def task(_: Any):
        import threading

        from pyspark import BarrierTaskContext

        ctx = BarrierTaskContext.get()
        pid = ctx.partitionId()
        hosts = [info.address.rsplit(":", 1)[0] for info in ctx.getTaskInfos()]
        plan = rank_plan(hosts)
        slot = plan[pid]
        server = None
        if slot.rank == 0:
            from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

            server = RendezvousHTTPServer((hosts[pid], 0), RendezvousHandler, 0)
            server.init(plan)
            threading.Thread(target=server.serve_forever, daemon=True, name="hvd-rendezvous").start()
        ports = ctx.allGather(str(server.server_address[1]) if server else "")
        port = next(p for p in ports if p)
        os.environ.update(horovod_env(plan, hosts, pid, port, gloo_iface or interface_for(hosts[pid]), cycle_ms))
        import horovod.torch as hvd

        gpus = ctx.resources().get("gpu")
        os.environ.pop(GPU_ENV, None)  # a reused Python worker may have run a GPU task before
        os.environ.update(gpu_env(gpus.addresses if gpus is not None else None, bool(hvd.nccl_built())))
        hvd.init()
        try:
            result = fn(*args)
        finally:
            hvd.shutdown()
        ctx.barrier()  # nobody still needs the rendezvous server
        if server is not None:
            server.shutdown()
            server.server_close()
        yield slot.rank, result

    return task


def run_horovod(
    spark: SparkSession,
    fn: Callable[..., Any],
    args: tuple,
    num_proc: int,
    gloo_iface: str | None = None,
    slot_wait_s: float = 60.0,
    cycle_ms: float | None = None,
) -> list[Any]:
    """Run fn(*args) on num_proc Horovod ranks in one barrier stage; return the results ordered by rank.
    cycle_ms: Horovod's coordination cycle (HOROVOD_CYCLE_TIME), None for Horovod's default."""
    from dlpipe.session import job_description  # driver side only: executors import this module too

    sc = spark.sparkContext
    check_slots(sc, num_proc, slot_wait_s)
    log.info("train: launching %d Horovod ranks in a barrier stage (master %s)", num_proc, sc.master)
    task = _barrier_task(fn, args, gloo_iface, cycle_ms)
    with job_description(spark, f"train: {num_proc} Horovod ranks (barrier)", progress_every=None):
        ranks = sc.parallelize(range(num_proc), num_proc).barrier().mapPartitions(task)
        # Spark retries a failed barrier stage only when it is a shuffle-map stage ("Could not recover from a
        # failed barrier ResultStage"), so the ranks' results leave through a one-partition shuffle: a rank
        # that dies then costs a retry of the stage (from the last checkpoint), not the job.
        results = ranks.map(lambda r: (0, r)).partitionBy(1).values().collect()
    return [r for _, r in sorted(results, key=lambda r: r[0])]


def run_torch_distributor(
    spark: SparkSession, fn: Callable[..., Any], args: tuple, num_proc: int, slot_wait_s: float = 60.0
) -> list[Any]:
    """Run fn(*args) as num_proc PyTorch DDP processes with Spark's TorchDistributor (also a barrier
    stage, torchrun inside each task); return rank 0's result. A way off Horovod, which is no longer
    released, with the same training function."""
    from pyspark.ml.torch.distributor import TorchDistributor

    from dlpipe.session import job_description

    sc = spark.sparkContext
    check_slots(sc, num_proc, slot_wait_s)
    use_gpu = tasks_have_gpus(sc)
    log.info("train: launching %d PyTorch DDP processes with TorchDistributor (master %s)", num_proc, sc.master)
    with job_description(spark, f"train: {num_proc} DDP processes (TorchDistributor, barrier)", progress_every=None):
        return [TorchDistributor(num_processes=num_proc, local_mode=False, use_gpu=use_gpu).run(fn, *args)]
