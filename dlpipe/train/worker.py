"""Executor side: the training loop one Horovod rank runs. Imported and called inside a barrier task.

Everything here must be picklable and importable on executors; nothing here touches Spark or MLflow.
"""

from __future__ import annotations

import io
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dlpipe.storage import StorageSettings
from dlpipe.train.checkpoints import CheckpointStore
from dlpipe.train.comm import open_comm
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
    num_classes: int
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


def train_worker(spec: TrainSpec) -> dict | None:
    """Train as one rank of spec.launcher's job. Rank 0 returns the weights and history.

    Every epoch ends with a checkpoint (rank 0), and training starts from the newest checkpoint there
    is: the driver clears them before a fresh run (not with `train.resume`), so a checkpoint found here
    means Spark retried the barrier stage after a task died, or the user asked to resume.
    """
    comm = open_comm(spec.launcher)
    try:
        return _train(spec, comm)
    finally:
        comm.close()


def _train(spec: TrainSpec, comm) -> dict | None:
    rank, size = comm.rank, comm.size
    log = rank_logger(rank, spec.log_address)
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)

    model = build_model(spec.model, spec.feature_shape, spec.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
    store = CheckpointStore(spec.checkpoint_uri, spec.storage)
    state: dict[str, Any] = {"history": [], "best_loss": math.inf, "bad_epochs": 0, "best_state": None}
    start_epoch, resumed_from = 1, 0
    ckpt = store.latest()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = {k: ckpt[k] for k in state}
        start_epoch = int(ckpt["epoch"]) + 1
        resumed_from = int(ckpt["epoch"])
        log.info("resuming after epoch %d from %s", resumed_from, store.uri)
    forward, optimizer = comm.prepare(model, optimizer)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

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
        loss_sum, correct = 0.0, 0.0
        for step, (x, y) in enumerate(train.epoch(epoch), 1):
            # lr x ranks for the ranks x larger effective batch, reached by a linear warm-up (Goyal et al.)
            progress = min(1.0, ((epoch - 1) * train.steps + step) / warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = spec.lr * (1 + (size - 1) * progress)
            optimizer.zero_grad()
            logits = forward(x)
            loss = loss_fn(logits, y)
            (loss / len(y)).backward()
            optimizer.step()
            loss_sum += float(loss.detach())
            correct += float((logits.argmax(1) == y).sum())
            if rank == 0 and step % 200 == 0:
                log.info(
                    "epoch %d/%d batch %d/%d loss %.4f",
                    epoch,
                    spec.epochs,
                    step,
                    train.steps,
                    loss_sum / train.rows_last_epoch,
                )
        seconds = time.time() - t0
        model.eval()
        v_loss, v_correct = 0.0, 0.0
        with torch.no_grad():
            for x, y in val.epoch(epoch):
                logits = model(x)
                v_loss += float(loss_fn(logits, y))
                v_correct += float((logits.argmax(1) == y).sum())
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
            "train_loss": loss_sum / rows,
            "train_accuracy": correct / rows,
            "val_loss": v_loss / v_rows,
            "val_accuracy": v_correct / v_rows,
            "samples_per_s_per_rank": train.rows_last_epoch / max(seconds, 1e-9),
            "epoch_seconds": seconds,
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(record)
        improved = record["val_loss"] < state["best_loss"] - spec.min_delta
        if improved:
            state["best_loss"], state["bad_epochs"] = record["val_loss"], 0
            state["best_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        if rank == 0:
            store.save(epoch, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state})
            eta = (time.time() - started) / (epoch - start_epoch + 1) * (spec.epochs - epoch)
            log.info(
                "epoch %d/%d train_loss %.4f val_loss %.4f val_acc %.4f %.0f samples/s/rank ETA %.0fs",
                epoch,
                spec.epochs,
                record["train_loss"],
                record["val_loss"],
                record["val_accuracy"],
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
    }
