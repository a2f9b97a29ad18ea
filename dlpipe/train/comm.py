"""The collective operations a training rank needs, from Horovod or from torch.distributed (DDP).

The training function asks for `open_comm(launcher, device)` and never imports either framework itself, so
the same function runs under both launchers (train.launcher: horovod | torch_distributor), on CPU or GPU.

Gradients are averaged by the framework (Horovod's DistributedOptimizer over NCCL or Gloo, DDP's buckets),
or, with `host`, on one flat CPU copy per step (`HostAveraging`): what a GPU needs when Horovod was built
without GPU operations (the wheel `make setup` builds is CPU-only). Initial weights and optimizer state
are broadcast from rank 0 while still on the CPU, so that works with any build.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

GPU_ENV = "DLPIPE_GPU"  # the GPU a rank pins: set by the launcher from Spark's resources, read by pick_device


def to_device(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Move the model and any optimizer state there (in place: the optimizer keeps its parameters).
    Adam's `step` counters stay on the CPU, where non-capturable optimizers expect them."""
    if device.type == "cpu":
        return
    model.to(device)
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                state[key] = value.to(device)


class HostAveraging:
    """An optimizer whose step() first averages all gradients across ranks, on one flat CPU buffer (one
    allreduce per step). Like Horovod's DistributedOptimizer it offers synchronize() and
    skip_synchronize(), so loss scaling can unscale averaged gradients (every rank then skips the same
    steps)."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, comm: HorovodComm | TorchComm | SoloComm):
        self._opt, self._comm = optimizer, comm
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._synced = False
        self._skip = False

    def __getattr__(self, name: str) -> Any:  # param_groups, state, state_dict, zero_grad, ...
        return getattr(self._opt, name)

    def synchronize(self) -> None:
        if self._synced:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        flat = torch.cat([g.detach().reshape(-1).to("cpu", torch.float32) for g in grads])
        self._comm.allreduce_mean_(flat)
        offset = 0
        for p, g in zip(self._params, grads, strict=True):
            n = g.numel()
            averaged = flat[offset : offset + n].view_as(g).to(g.device, g.dtype)
            if p.grad is None:
                p.grad = averaged
            else:
                p.grad.copy_(averaged)
            offset += n
        self._synced = True

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        self._skip = True
        try:
            yield
        finally:
            self._skip = False

    def step(self, closure: Any = None) -> Any:
        if not self._skip:
            self.synchronize()
        self._synced = False
        return self._opt.step(closure)


class HorovodComm:
    """Horovod, already initialized by the barrier-stage launcher."""

    def __init__(self, device: torch.device) -> None:
        import horovod.torch as hvd

        self._hvd = hvd
        self.device = device
        self.rank, self.size = hvd.rank(), hvd.size()
        self.gpu_ops = bool(hvd.nccl_built() or hvd.cuda_built())  # can Horovod reduce CUDA tensors itself?

    def host_needed(self) -> bool:
        return self.device.type == "cuda" and not self.gpu_ops

    def allreduce_sum(self, values: list[float], name: str) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        return self._hvd.allreduce(t, op=self._hvd.Sum, name=name).tolist()

    def allreduce_mean_(self, flat: torch.Tensor) -> None:
        self._hvd.allreduce_(flat, op=self._hvd.Average, name="dlpipe.host_grads")

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, host: bool) -> tuple[nn.Module, Any]:
        """Rank 0's weights and optimizer state everywhere; gradients averaged by the optimizer.

        DistributedOptimizer is a new optimizer over the same parameters, with empty state: it takes over
        the wrapped one's state (a resumed run's Adam moments) before the broadcast, as Horovod's docs
        order it (wrap, then broadcast), so both averaging paths start from the same state."""
        hvd = self._hvd
        if not host:
            trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # not train.freeze's
            wrapped = hvd.DistributedOptimizer(optimizer, named_parameters=trained)
            wrapped.load_state_dict(optimizer.state_dict())
            optimizer = wrapped
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        to_device(model, optimizer, self.device)
        return model, (HostAveraging(optimizer, model, self) if host else optimizer)

    def close(self) -> None:
        """The launcher shuts Horovod down."""


def gloo_env(master_addr: str) -> dict[str, str]:
    """What a torchrun process adds to its environment before Gloo starts: with the rendezvous on a
    loopback address (a local run), Gloo's sockets on loopback too, as everything else here; else nothing
    (Gloo picks the interface of the host's name)."""
    if master_addr.startswith("127.") or master_addr == "localhost":
        return {"GLOO_SOCKET_IFNAME": "lo"}
    return {}


class TorchComm:
    """torch.distributed in a process torchrun started (TorchDistributor): NCCL on GPU, else Gloo."""

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.device = device
        for key, value in gloo_env(os.environ.get("MASTER_ADDR", "")).items():
            os.environ.setdefault(key, value)  # what the user set wins
        if not dist.is_initialized():
            nccl = device.type == "cuda" and dist.is_nccl_available()
            dist.init_process_group("nccl" if nccl else "gloo")
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def host_needed(self) -> bool:
        return False  # NCCL, or Gloo's own CUDA staging

    def allreduce_sum(self, values: list[float], name: str) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def allreduce_mean_(self, flat: torch.Tensor) -> None:
        t = flat.to(self._collective_device())
        self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM)
        flat.copy_(t.cpu() / self.size)

    def _collective_device(self) -> torch.device:
        return self.device if self._dist.get_backend() == "nccl" else torch.device("cpu")

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, host: bool) -> tuple[nn.Module, Any]:
        """DDP broadcasts rank 0's weights when it wraps the model and averages gradients in backward.
        Optimizer state needs no broadcast: every rank starts empty or loads the same checkpoint."""
        from torch.nn.parallel import DistributedDataParallel

        if host:
            for value in model.state_dict().values():
                t = value.to(self._collective_device())
                self._dist.broadcast(t, src=0)
                value.copy_(t.cpu())
            to_device(model, optimizer, self.device)
            return model, HostAveraging(optimizer, model, self)
        to_device(model, optimizer, self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids), optimizer

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


class SoloComm:
    """One process training alone (a tuning trial): every collective is the identity, nothing is wrapped."""

    rank, size = 0, 1

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def host_needed(self) -> bool:
        return False

    def allreduce_sum(self, values: list[float], name: str) -> list[float]:
        return list(values)

    def allreduce_mean_(self, flat: torch.Tensor) -> None:
        """The mean over one rank is the tensor itself."""

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, host: bool) -> tuple[nn.Module, Any]:
        to_device(model, optimizer, self.device)
        return model, optimizer

    def close(self) -> None:
        """Nothing was opened."""


def open_comm(launcher: str, device: torch.device) -> HorovodComm | TorchComm | SoloComm:
    if launcher == "solo":
        return SoloComm(device)
    return HorovodComm(device) if launcher == "horovod" else TorchComm(device)


def optimizer_step(optimizer: Any, scaler: torch.amp.GradScaler | None) -> None:
    """One step; with fp16 loss scaling, gradients are averaged before unscaling (Horovod's documented
    order), so every rank sees the same inf/nan and skips the same steps."""
    if scaler is None:
        optimizer.step()
        return
    if hasattr(optimizer, "synchronize"):
        optimizer.synchronize()
        scaler.unscale_(optimizer)
        with optimizer.skip_synchronize():
            scaler.step(optimizer)
    else:  # DDP: averaged in backward already
        scaler.step(optimizer)
    scaler.update()
