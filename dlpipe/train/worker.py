"""Executor side: the training loop one Horovod rank runs. Imported and called inside a barrier task.

Everything here must be picklable and importable on executors; nothing here touches Spark or MLflow.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dlpipe.objective import Objective, label_numpy_type
from dlpipe.storage import StorageSettings
from dlpipe.tracking import Credentials
from dlpipe.train.checkpoints import CheckpointStore
from dlpipe.train.comm import open_comm, optimizer_step
from dlpipe.train.launcher import GPU_ENV
from dlpipe.train.live import LiveTracker
from dlpipe.train.loader import ShardLoader, ShortEpochError
from dlpipe.train.logstream import rank_logger
from dlpipe.train.models import build_model


@dataclass(frozen=True)
class TrainSpec:
    train_uri: str
    val_uri: str
    train_rows: int
    val_rows: int
    feature_shape: tuple[int, ...]
    num_classes: int  # the network's output width: the classes, or 1 for regression
    model: dict[str, Any]
    epochs: int
    batch_size: int
    lr: float
    seed: int
    threads: int
    checkpoint_uri: str
    warmup_epochs: float = 1.0
    patience: int = 3
    min_delta: float = 0.0
    fault: tuple[int, int] | None = None  # (rank, epoch): kill that rank after that epoch, in a fresh run only
    launcher: str = "horovod"
    log_address: str | None = None  # the driver's LogReceiver
    storage: StorageSettings = field(default_factory=StorageSettings)
    use_gpu: bool = False  # tasks were given GPUs (spark.task.resource.gpu.amount)
    mixed_precision: str = "off"  # off | bf16 | fp16
    allreduce: str = "auto"  # auto | framework | host
    tracking_uri: str | None = None  # rank 0 logs each epoch to this MLflow run
    run_id: str | None = None
    tracking_credentials: Credentials | None = field(default=None, repr=False)  # for executors without them
    task: str = "classification"  # or regression (dlpipe.objective)
    label_mean: float = 0.0  # regression: targets are standardized with the train split's mean and std
    label_std: float = 1.0


def pick_device(spec: TrainSpec) -> torch.device:
    """The GPU Spark assigned this task, or the CPU when tasks were given none.

    Horovod ranks get the address from the barrier task's resources (DLPIPE_GPU); TorchDistributor sets
    CUDA_VISIBLE_DEVICES to the task's GPUs itself, so there it is the process's local rank.
    """
    if not spec.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "Spark gave this task a GPU (spark.task.resource.gpu.amount) but torch sees no CUDA device: install a "
            "CUDA build of torch on the executors, or unset the GPU resource settings to train on CPU"
        )
    index = int(os.environ.get(GPU_ENV) or os.environ.get("LOCAL_RANK") or 0)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "off":
        return None
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("train.mixed_precision=fp16 needs a GPU; on CPU use bf16 (or off)")
    return torch.float16 if mode == "fp16" else torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train_worker(spec: TrainSpec) -> dict | None:
    """Train as one rank of spec.launcher's job. Rank 0 returns the weights and history.

    Every epoch ends with a checkpoint (rank 0), and training starts from the newest checkpoint there
    is: the driver clears them before a fresh run (not with `train.resume`), so a checkpoint found here
    means Spark retried the barrier stage after a task died, or the user asked to resume.
    """
    device = pick_device(spec)
    comm = open_comm(spec.launcher, device)
    try:
        return _train(spec, comm)
    finally:
        comm.close()


def _train(spec: TrainSpec, comm) -> dict | None:
    rank, size, device = comm.rank, comm.size, comm.device
    log = rank_logger(rank, spec.log_address)
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    amp = autocast_dtype(spec.mixed_precision, device)

    model = build_model(spec.model, spec.feature_shape, spec.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
    store = CheckpointStore(spec.checkpoint_uri, spec.storage)
    state: dict[str, Any] = {
        "history": [],
        "best_loss": math.inf,
        "bad_epochs": 0,
        "best_state": None,
    }
    start_epoch, resumed_from = 1, 0
    ckpt = store.latest()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = {k: ckpt.get(k, v) for k, v in state.items()}
        start_epoch = int(ckpt["epoch"]) + 1
        resumed_from = int(ckpt["epoch"])
        log.info("resuming after epoch %d from %s", resumed_from, store.uri)
    host = spec.allreduce == "host" or (spec.allreduce == "auto" and comm.host_needed())
    forward, optimizer = comm.prepare(model, optimizer, host)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    objective = Objective(spec.task, spec.label_mean, spec.label_std)
    tracker = LiveTracker(spec.tracking_uri, spec.run_id, log, spec.tracking_credentials) if rank == 0 else None
    if rank == 0:
        log.info(
            "device %s, mixed precision %s, gradients averaged %s, %d ranks",
            device,
            spec.mixed_precision,
            "on host copies" if host else f"by {spec.launcher}",
            size,
        )

    train = ShardLoader(
        spec.train_uri,
        rank,
        size,
        spec.batch_size,
        spec.feature_shape,
        shuffle=True,
        seed=spec.seed,
        expected_rows=spec.train_rows,
        storage=spec.storage,
        label_dtype=label_numpy_type(spec.task),
    )
    val = ShardLoader(
        spec.val_uri,
        rank,
        size,
        spec.batch_size * 4,
        spec.feature_shape,
        shuffle=False,
        expected_rows=spec.val_rows,
        storage=spec.storage,
        label_dtype=label_numpy_type(spec.task),
    )
    log.info(
        "%d train rows on this rank (%d in all), %d steps per epoch", train.local_rows, train.total_rows, train.steps
    )
    warmup_steps = max(1, int(spec.warmup_epochs * train.steps))

    history: list[dict] = state["history"]
    started = time.time()
    for epoch in range(start_epoch, spec.epochs + 1):
        t0 = time.time()
        model.train()
        # summed on the device: a float() per step would wait for the GPU every step
        loss_t = torch.zeros((), device=device)
        correct_t = torch.zeros((), device=device)
        for step, (x, y) in enumerate(train.epoch(epoch), 1):
            # lr x ranks for the ranks x larger effective batch, reached by a linear warm-up (Goyal et al.)
            progress = min(1.0, ((epoch - 1) * train.steps + step) / warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = spec.lr * (1 + (size - 1) * progress)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad()
            with autocast(device, amp):
                logits = forward(x)
                loss = objective.loss(logits.float(), y)
            scaled = loss / len(y)
            (scaler.scale(scaled) if scaler else scaled).backward()
            optimizer_step(optimizer, scaler)
            loss_t += loss.detach()
            correct_t += objective.hits(logits, y)
            if rank == 0 and step % 200 == 0:
                done = (step / train.steps + epoch - start_epoch) / (spec.epochs - start_epoch + 1)
                log.info(
                    "epoch %d/%d batch %d/%d loss %.4f ETA %.0fs",
                    epoch,
                    spec.epochs,
                    step,
                    train.steps,
                    float(loss_t) / train.rows_last_epoch,
                    (time.time() - started) * (1 - done) / max(done, 1e-9),
                )
        loss_sum, correct = float(loss_t), float(correct_t)  # waits for the epoch's last GPU work
        seconds = time.time() - t0
        model.eval()
        v_loss, v_correct = 0.0, 0.0
        with torch.no_grad(), autocast(device, amp):
            for x, y in val.epoch(epoch):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = model(x)
                v_loss += float(objective.loss(logits.float(), y))
                v_correct += float(objective.hits(logits.float(), y))
        rows, loss_sum, correct, v_rows, v_loss, v_correct = comm.allreduce_sum(
            [train.rows_last_epoch, loss_sum, correct, val.rows_last_epoch, v_loss, v_correct], f"epoch{epoch}"
        )
        if int(rows) != spec.train_rows or int(v_rows) != spec.val_rows:
            raise ShortEpochError(
                f"epoch {epoch}: ranks read {int(rows)}/{spec.train_rows} train and {int(v_rows)}/{spec.val_rows} "
                "validation rows: refusing to train on partial data"
            )
        record = {
            "epoch": epoch,
            **objective.record("train", loss_sum, correct, rows),
            **objective.record("val", v_loss, v_correct, v_rows),
            "samples_per_s_per_rank": train.rows_last_epoch / max(seconds, 1e-9),
            "epoch_seconds": seconds,
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(record)
        improved = record["val_loss"] < state["best_loss"] - spec.min_delta
        if improved:
            state["best_loss"], state["bad_epochs"] = record["val_loss"], 0
            state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        if rank == 0:
            if tracker is not None:
                tracker.log_epoch(record, history)
            store.save(epoch, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state})
            eta = (time.time() - started) / (epoch - start_epoch + 1) * (spec.epochs - epoch)
            log.info(
                "epoch %d/%d train_loss %.4f val_loss %.4f val_%s %.4f %.0f samples/s/rank ETA %.0fs",
                epoch,
                spec.epochs,
                record["train_loss"],
                record["val_loss"],
                objective.metric,
                record[f"val_{objective.metric}"],
                record["samples_per_s_per_rank"],
                eta,
            )
        if spec.fault and resumed_from == 0 and epoch == spec.fault[1]:
            comm.allreduce_sum([0.0], f"fault{epoch}")  # the checkpoint of this epoch is on the store
            if rank == spec.fault[0]:
                log.warning("fault injection: killing rank %d (pid %d) after epoch %d", rank, os.getpid(), epoch)
                os.kill(os.getpid(), signal.SIGKILL)
        if spec.patience and state["bad_epochs"] >= spec.patience:
            log.info("early stopping after epoch %d: no better validation loss for %d epochs", epoch, spec.patience)
            break
    if rank != 0:
        return None
    model.cpu()
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return {
        "state_dict": buf.getvalue(),
        "history": history,
        "ranks": size,
        "resumed_from_epoch": resumed_from,
        "best_val_loss": state["best_loss"],
        "live_epochs": sorted(tracker.logged) if tracker is not None else [],
        "device": str(device),
    }
