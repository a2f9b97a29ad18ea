"""The collective operations a training rank needs, from Horovod or from torch.distributed (DDP).

The training function asks for `open_comm(launcher)` and never imports either framework itself, so the
same function runs under both launchers (train.launcher: horovod | torch_distributor).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn


class HorovodComm:
    """Horovod, already initialized by the barrier-stage launcher."""

    def __init__(self) -> None:
        import horovod.torch as hvd

        self._hvd = hvd
        self.rank, self.size = hvd.rank(), hvd.size()

    def allreduce_sum(self, values: list[float], name: str) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        return self._hvd.allreduce(t, op=self._hvd.Sum, name=name).tolist()

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """Rank 0's weights and optimizer state everywhere; gradients averaged by the optimizer."""
        self._hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        self._hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        return model, self._hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())

    def close(self) -> None:
        """The launcher shuts Horovod down."""


class TorchComm:
    """torch.distributed over Gloo, in a process torchrun started (TorchDistributor)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        if os.environ.get("MASTER_ADDR", "").startswith("127.") or os.environ.get("MASTER_ADDR") == "localhost":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # on loopback, as everything else here
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def allreduce_sum(self, values: list[float], name: str) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM)
        return t.tolist()

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """DDP broadcasts rank 0's weights when it wraps the model and averages gradients in backward.
        Optimizer state needs no broadcast: every rank starts empty or loads the same checkpoint."""
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model), optimizer

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


def open_comm(launcher: str) -> HorovodComm | TorchComm:
    return HorovodComm() if launcher == "horovod" else TorchComm()
