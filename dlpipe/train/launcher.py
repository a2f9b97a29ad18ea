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
import re
import socket
from collections.abc import Callable
from typing import Any

from pyspark import SparkContext
from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


class SlotShortageError(RuntimeError):
    """The cluster cannot run all ranks at once; a barrier stage would wait for slots forever."""


def available_slots(sc: SparkContext) -> int:
    """Tasks the cluster can run at the same time now (what a barrier stage needs for all its ranks)."""
    master = sc.master
    m = re.fullmatch(r"local(?:\[(\*|\d+)(?:\s*,\s*\d+)?\])?", master)
    if m:
        n = m.group(1)
        if n is None:
            return 1
        return (os.cpu_count() or 1) if n == "*" else int(n)
    jsc = sc._jsc.sc()
    return int(jsc.maxNumConcurrentTasks(jsc.resourceProfileManager().defaultResourceProfile()))


def check_slots(sc: SparkContext, num_proc: int) -> None:
    have = available_slots(sc)
    if have < num_proc:
        raise SlotShortageError(
            f"training needs {num_proc} task slots at once (train.num_proc), the cluster has {have} "
            f"(master {sc.master}): lower train.num_proc or add executors/cores"
        )


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


def _barrier_task(fn: Callable[..., Any], args: tuple, gloo_iface: str | None):
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
        addr = hosts[next(i for i, s in enumerate(plan) if s.rank == 0)]
        iface = gloo_iface or interface_for(hosts[pid])
        os.environ.update(
            {
                "HOROVOD_GLOO_RENDEZVOUS_ADDR": addr,
                "HOROVOD_GLOO_RENDEZVOUS_PORT": port,
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
        )
        if iface:
            os.environ["HOROVOD_GLOO_IFACE"] = iface
        import horovod.torch as hvd

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
    spark: SparkSession, fn: Callable[..., Any], args: tuple, num_proc: int, gloo_iface: str | None = None
) -> list[Any]:
    """Run fn(*args) on num_proc Horovod ranks in one barrier stage; return the results ordered by rank."""
    sc = spark.sparkContext
    check_slots(sc, num_proc)
    log.info("train: launching %d Horovod ranks in a barrier stage (master %s)", num_proc, sc.master)
    sc.setJobDescription(f"dlpipe train: {num_proc} Horovod ranks (barrier)")
    ranks = sc.parallelize(range(num_proc), num_proc).barrier().mapPartitions(_barrier_task(fn, args, gloo_iface))
    # Spark retries a failed barrier stage only when it is a shuffle-map stage ("Could not recover from a
    # failed barrier ResultStage"), so the ranks' results leave through a one-partition shuffle: a rank
    # that dies then costs a retry of the stage (from the last checkpoint), not the job.
    results = ranks.map(lambda r: (0, r)).partitionBy(1).values().collect()
    return [r for _, r in sorted(results, key=lambda r: r[0])]


def run_torch_distributor(spark: SparkSession, fn: Callable[..., Any], args: tuple, num_proc: int) -> list[Any]:
    """Run fn(*args) as num_proc PyTorch DDP processes with Spark's TorchDistributor (also a barrier
    stage, torchrun inside each task); return rank 0's result. A way off Horovod, which is no longer
    released, with the same training function."""
    from pyspark.ml.torch.distributor import TorchDistributor

    sc = spark.sparkContext
    check_slots(sc, num_proc)
    use_gpu = float(sc.getConf().get("spark.task.resource.gpu.amount", "0")) > 0
    log.info("train: launching %d PyTorch DDP processes with TorchDistributor (master %s)", num_proc, sc.master)
    sc.setJobDescription(f"dlpipe train: {num_proc} DDP processes (TorchDistributor, barrier)")
    return [TorchDistributor(num_processes=num_proc, local_mode=False, use_gpu=use_gpu).run(fn, *args)]
