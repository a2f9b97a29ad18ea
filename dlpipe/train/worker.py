"""Executor side: the training loop one Horovod rank runs. Imported and called inside a barrier task.

Everything here must be picklable and importable on executors; nothing here touches Spark or MLflow
(tests/test_worker_steps.py holds it to that).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dlpipe.config import Config, TrainConfig
from dlpipe.data.stats import FittedStats
from dlpipe.model import task as tasks
from dlpipe.model.objective import Objective
from dlpipe.model.task import label_numpy_type
from dlpipe.runtime import tune_gc
from dlpipe.storage import StorageSettings, dataset_paths, storage_settings
from dlpipe.tracking import Credentials
from dlpipe.train.checkpoints import CheckpointStore, ResumeState
from dlpipe.train.comm import GPU_ENV, HorovodComm, SoloComm, TorchComm, open_comm, optimizer_step
from dlpipe.train.live import LiveTracker
from dlpipe.train.loader import ShardLoader, ShortEpochError
from dlpipe.train.logstream import rank_logger
from dlpipe.train.models import build_model

Comm = HorovodComm | TorchComm | SoloComm


@dataclass(frozen=True)
class Teacher:
    """Knowledge distillation (the compress stage's student): the network whose soft targets the student
    learns from, as a train.model-style dict and its weights, and how its targets blend with the labels'."""

    model: dict[str, Any]
    state: bytes = field(repr=False)
    temperature: float = 4.0
    alpha: float = 0.7  # the soft targets' share of the loss

    def build(self, in_shape: tuple[int, ...], outputs: int, device: torch.device) -> nn.Module:
        """The teacher on this rank's device, frozen, in eval mode."""
        net = build_model(self.model, in_shape, outputs)
        net.load_state_dict(torch.load(io.BytesIO(self.state)))
        for p in net.parameters():
            p.requires_grad_(False)
        return net.to(device).eval()


@dataclass(frozen=True)
class TrainSpec:
    """What every rank needs, picklable and light (no Spark, no MLflow on the executors).

    The training settings are the config's own `train` section, carried whole: their defaults live in
    dlpipe.config only, and a new setting reaches the ranks without being copied here. The rest is what the
    data's statistics and the driver know. Build it with `from_config`."""

    train: TrainConfig
    train_uri: str
    val_uri: str
    train_rows: int
    val_rows: int
    feature_shape: tuple[int, ...]
    num_classes: int  # the network's output width: the classes, or 1 for regression
    checkpoint_uri: str  # "": none kept (a tuning trial)
    task: str = tasks.CLASSIFICATION  # or regression (dlpipe.model.task)
    label_mean: float = 0.0  # regression: targets are standardized with the train split's mean and std
    label_std: float = 1.0
    log_address: str | None = None  # the driver's LogReceiver
    storage: StorageSettings = field(default_factory=StorageSettings)
    use_gpu: bool = False  # tasks were given GPUs (spark.task.resource.gpu.amount)
    tracking_uri: str | None = None  # rank 0 logs each epoch to this MLflow run
    run_id: str | None = None
    tracking_credentials: Credentials | None = field(default=None, repr=False)  # for executors without them
    init_state: bytes | None = field(default=None, repr=False)  # train.init_from's tensors (dlpipe.train.transfer)
    teacher: Teacher | None = None  # distillation: the network whose soft targets the model also learns

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        stats: FittedStats,
        checkpoint_uri: str,
        *,
        use_gpu: bool = False,
        tracking_uri: str | None = None,
        run_id: str | None = None,
        tracking_credentials: Credentials | None = None,
    ) -> TrainSpec:
        """The spec of cfg's training on the data `stats` describes (dlpipe.data.features): settings from cfg,
        split locations from cfg's dataset, row counts, shapes and label scaling from stats."""
        paths = dataset_paths(cfg)
        return cls(
            train=cfg.train,
            train_uri=paths.split("train"),
            val_uri=paths.split("val"),
            train_rows=stats.rows["train"],
            val_rows=stats.rows["val"],
            feature_shape=stats.feature_shape,
            num_classes=stats.outputs,
            checkpoint_uri=checkpoint_uri,
            task=stats.task,
            label_mean=stats.label_mean,
            label_std=stats.label_std,
            storage=storage_settings(cfg),
            use_gpu=use_gpu,
            tracking_uri=tracking_uri,
            run_id=run_id,
            tracking_credentials=tracking_credentials,
        )

    @property
    def model(self) -> dict[str, Any]:
        """train.model as a plain dict: what build_model and a user's factory take."""
        return self.train.model.model_dump(mode="json")


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
    """Train as one rank of spec.train.launcher's job. Rank 0 returns the weights and history.

    Every epoch ends with a checkpoint (rank 0), and training starts from the newest checkpoint there
    is: the driver clears them before a fresh run (not with `train.resume`), so a checkpoint found here
    means Spark retried the barrier stage after a task died, or the user asked to resume.
    """
    tune_gc()
    device = pick_device(spec)
    comm = open_comm(spec.train.launcher, device)
    try:
        return _train(spec, comm)
    finally:
        comm.close()


def _train(spec: TrainSpec, comm: Comm) -> dict | None:
    """One rank's training, step by step: set up (resuming where a checkpoint left off), the epochs (each
    checkpointed; early stopping between them), the result."""
    run, state = set_up(spec, comm)
    patience = spec.train.early_stopping.patience
    for epoch in range(state.next_epoch, spec.train.epochs + 1):
        state = run_epoch(run, state, epoch)
        if state.should_stop(patience):
            run.log.info("early stopping after epoch %d: no better validation loss for %d epochs", epoch, patience)
            break
    return result(run, state)


@dataclass
class RankRun:
    """One rank's training once set up: what every epoch works with (set up once, by `set_up`)."""

    spec: TrainSpec
    comm: Comm
    log: logging.Logger
    model: nn.Module  # the plain model: its state_dict is what checkpoints and results hold
    forward: nn.Module  # what training calls: the model, or DDP's wrapper of it
    optimizer: Any  # Adam, wrapped by the framework's or host gradient averaging
    scaler: torch.amp.GradScaler | None  # fp16 loss scaling
    amp: torch.dtype | None  # autocast dtype, None: off
    objective: Objective
    train: ShardLoader
    val: ShardLoader
    store: CheckpointStore | None  # None: no checkpoints (a tuning trial: a stopped study reruns it)
    tracker: LiveTracker | None  # rank 0 of a tracked run only
    resumed_from: int  # the checkpoint's epoch, 0 in a fresh run
    warmup_steps: int
    started: float  # time.time() before the first epoch, for ETAs
    teacher: nn.Module | None = None  # distillation's teacher on this device (spec.teacher built)

    @property
    def first_epoch(self) -> int:
        return self.resumed_from + 1


def set_up_rank(spec: TrainSpec, rank: int) -> logging.Logger:
    """Threads and the seed before anything random happens (the initial weights are the seed's on every
    rank, run after run), and the log this rank writes to the driver."""
    log = rank_logger(rank, spec.log_address)
    torch.set_num_threads(spec.train.threads_per_rank)
    torch.manual_seed(spec.train.seed)
    return log


def restore(store: CheckpointStore, model: nn.Module, optimizer: torch.optim.Optimizer, log: Any) -> ResumeState:
    """Load the newest checkpoint into model and optimizer and return where training stands; a fresh state
    when there is none. Before the ranks share rank 0's weights, so every rank goes on from the checkpoint."""
    restored = store.restore()
    if restored is None:
        return ResumeState()
    model.load_state_dict(restored.model)
    optimizer.load_state_dict(restored.optimizer)
    log.info("resuming after epoch %d from %s", restored.state.epoch, store.uri)
    return restored.state


def host_averaging(allreduce: str, comm: Comm) -> bool:
    """Average gradients on host copies: when asked to, or (auto) when the framework cannot reduce this
    device's tensors itself (a GPU with a CPU-only Horovod)."""
    return allreduce == "host" or (allreduce == "auto" and comm.host_needed())


def build_loaders(spec: TrainSpec, rank: int, size: int) -> tuple[ShardLoader, ShardLoader]:
    """This rank's shards of the train and validation splits (dlpipe.train.loader.plan_shard says which rows):
    train reshuffled every epoch; validation in order, in 4x larger batches (no gradients to hold)."""
    label_dtype = label_numpy_type(spec.task)
    batch = spec.train.batch_size
    train = ShardLoader(
        spec.train_uri,
        rank,
        size,
        batch,
        spec.feature_shape,
        shuffle=True,
        seed=spec.train.seed,
        expected_rows=spec.train_rows,
        storage=spec.storage,
        label_dtype=label_dtype,
    )
    val = ShardLoader(
        spec.val_uri,
        rank,
        size,
        batch * 4,
        spec.feature_shape,
        shuffle=False,
        expected_rows=spec.val_rows,
        storage=spec.storage,
        label_dtype=label_dtype,
    )
    return train, val


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    """Steps of the learning rate's linear warm-up (at least one)."""
    return max(1, int(warmup_epochs * steps_per_epoch))


def scaled_lr(lr: float, size: int, epoch: int, step: int, steps_per_epoch: int, warmup: int) -> float:
    """lr x ranks for the ranks x larger effective batch, reached by a linear warm-up (Goyal et al.)."""
    progress = min(1.0, ((epoch - 1) * steps_per_epoch + step) / warmup)
    return lr * (1 + (size - 1) * progress)


def runtime_origin() -> str:
    """Which interpreter, torch and dlpipe this rank runs: on a cluster, the shipped environment's or an
    executor's own (what to look at first when executors misbehave)."""
    import dlpipe

    return (
        f"python {sys.prefix}, torch {torch.__version__} from {os.path.dirname(torch.__file__)}, "
        f"dlpipe from {os.path.dirname(dlpipe.__file__)}"
    )


def start_from(spec: TrainSpec, model: nn.Module) -> list[nn.Parameter]:
    """train.init_from's weights into model (a new head keeps its seeded initial weights) and train.freeze's
    parameters frozen; returns the parameters left to train (what the optimizer gets)."""
    if spec.init_state is not None:
        model.load_state_dict(torch.load(io.BytesIO(spec.init_state)), strict=False)
    for name, param in model.named_parameters():
        if any(name == f or name.startswith(f) for f in spec.train.freeze):
            param.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def set_up(spec: TrainSpec, comm: Comm) -> tuple[RankRun, ResumeState]:
    """Everything the epochs use, in the order that keeps runs reproducible and ranks in step: the seed
    before the initial weights, a checkpoint's weights before rank 0's are shared with every rank."""
    rank, size, device = comm.rank, comm.size, comm.device
    log = set_up_rank(spec, rank)
    log.info("%s", runtime_origin())
    amp = autocast_dtype(spec.train.mixed_precision, device)
    model = build_model(spec.model, spec.feature_shape, spec.num_classes)
    trainable = start_from(spec, model)
    optimizer = torch.optim.Adam(trainable, lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    store = CheckpointStore(spec.checkpoint_uri, spec.storage) if spec.checkpoint_uri else None
    state = restore(store, model, optimizer, log) if store is not None else ResumeState()
    host = host_averaging(spec.train.allreduce, comm)
    forward, optimizer = comm.prepare(model, optimizer, host)
    tracked = rank == 0 and spec.run_id is not None
    tracker = LiveTracker(spec.tracking_uri, spec.run_id, log, spec.tracking_credentials) if tracked else None
    if rank == 0:
        log.info(
            "device %s, mixed precision %s, gradients averaged %s, %d ranks",
            device,
            spec.train.mixed_precision,
            "on host copies" if host else f"by {spec.train.launcher}",
            size,
        )
    train, val = build_loaders(spec, rank, size)
    log.info(
        "%d train rows on this rank (%d in all), %d steps per epoch", train.local_rows, train.total_rows, train.steps
    )
    run = RankRun(
        spec=spec,
        comm=comm,
        log=log,
        model=model,
        forward=forward,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda") if amp == torch.float16 else None,
        amp=amp,
        objective=Objective(spec.task, spec.label_mean, spec.label_std),
        train=train,
        val=val,
        store=store,
        tracker=tracker,
        resumed_from=state.epoch,
        warmup_steps=warmup_steps(spec.train.warmup_epochs, train.steps),
        started=time.time(),
        teacher=spec.teacher.build(spec.feature_shape, spec.num_classes, device) if spec.teacher else None,
    )
    return run, state


def run_epoch(run: RankRun, state: ResumeState, epoch: int) -> ResumeState:
    """One epoch: train, validate, add up the ranks' numbers, keep the best weights, checkpoint (rank 0),
    and, in a fault-tolerance test, die where asked. Returns the state the next epoch starts from."""
    rows, loss_sum, correct, seconds = train_epoch(run, epoch)
    v_rows, v_loss, v_correct = validate(run, epoch)
    record = epoch_record(run, epoch, [rows, loss_sum, correct, v_rows, v_loss, v_correct], seconds)
    model = run.model
    state = state.after_epoch(
        record,
        run.spec.train.early_stopping.min_delta,
        lambda: {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    )
    if run.comm.rank == 0:
        checkpoint(run, state, record)
    inject_fault(run, epoch)
    return state


def train_epoch(run: RankRun, epoch: int) -> tuple[int, float, float, float]:
    """One pass over this rank's train shard: (rows, summed loss, hits, seconds), all of this rank."""
    spec, train, optimizer, device = run.spec, run.train, run.optimizer, run.comm.device
    t0 = time.time()
    run.model.train()
    # summed on the device: a float() per step would wait for the GPU every step
    loss_t = torch.zeros((), device=device)
    correct_t = torch.zeros((), device=device)
    for step, (x, y) in enumerate(train.epoch(epoch), 1):
        lr = scaled_lr(spec.train.lr, run.comm.size, epoch, step, train.steps, run.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad()
        with autocast(device, run.amp):
            logits = run.forward(x)
            loss = run.objective.loss(logits.float(), y)
            if run.teacher is not None:
                loss = distilled(run, x, logits.float(), loss)
        scaled = loss / len(y)
        (run.scaler.scale(scaled) if run.scaler else scaled).backward()
        optimizer_step(optimizer, run.scaler)
        loss_t += loss.detach()
        correct_t += run.objective.hits(logits, y)
        if run.comm.rank == 0 and step % 200 == 0:
            epochs, first = spec.train.epochs, run.first_epoch
            done = (step / train.steps + epoch - first) / (epochs - first + 1)
            run.log.info(
                "epoch %d/%d batch %d/%d loss %.4f ETA %.0fs",
                epoch,
                epochs,
                step,
                train.steps,
                float(loss_t) / train.rows_last_epoch,
                (time.time() - run.started) * (1 - done) / max(done, 1e-9),
            )
    loss_sum, correct = float(loss_t), float(correct_t)  # waits for the epoch's last GPU work
    return train.rows_last_epoch, loss_sum, correct, time.time() - t0


def distilled(run: RankRun, x: torch.Tensor, logits: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """The student's loss: the labels' (hard) blended with the teacher's soft targets on the same batch."""
    teacher = run.spec.teacher
    with torch.no_grad():
        target = run.teacher(x).float()
    return run.objective.distilled(hard, logits, target, teacher.temperature, teacher.alpha)


def validate(run: RankRun, epoch: int) -> tuple[int, float, float]:
    """This rank's validation shard under the epoch's weights: (rows, summed loss, hits)."""
    device = run.comm.device
    run.model.eval()
    v_loss, v_correct = 0.0, 0.0
    with torch.no_grad(), autocast(device, run.amp):
        for x, y in run.val.epoch(epoch):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = run.model(x)
            v_loss += float(run.objective.loss(logits.float(), y))
            v_correct += float(run.objective.hits(logits.float(), y))
    return run.val.rows_last_epoch, v_loss, v_correct


def epoch_record(run: RankRun, epoch: int, local: list[float], seconds: float) -> dict[str, Any]:
    """The epoch's numbers over all ranks (one allreduce), refused when the ranks did not read every row
    of both splits exactly once: training on partial data is never silent."""
    spec = run.spec
    rows, loss_sum, correct, v_rows, v_loss, v_correct = run.comm.allreduce_sum(local, f"epoch{epoch}")
    if int(rows) != spec.train_rows or int(v_rows) != spec.val_rows:
        raise ShortEpochError(
            f"epoch {epoch}: ranks read {int(rows)}/{spec.train_rows} train and {int(v_rows)}/{spec.val_rows} "
            "validation rows: refusing to train on partial data"
        )
    return {
        "epoch": epoch,
        **run.objective.record("train", loss_sum, correct, rows),
        **run.objective.record("val", v_loss, v_correct, v_rows),
        "samples_per_s_per_rank": run.train.rows_last_epoch / max(seconds, 1e-9),
        "epoch_seconds": seconds,
        "lr": run.optimizer.param_groups[0]["lr"],
    }


def checkpoint(run: RankRun, state: ResumeState, record: dict[str, Any]) -> None:
    """Rank 0, at the end of each epoch: the epoch to MLflow as it ends, then the checkpoint a retried or
    resumed run starts from, then the progress line."""
    spec, epoch = run.spec, record["epoch"]
    if run.tracker is not None:
        run.tracker.log_epoch(record, list(state.history))
    if run.store is not None:
        run.store.save_state(state, run.model.state_dict(), run.optimizer.state_dict())
    epochs = spec.train.epochs
    eta = (time.time() - run.started) / (epoch - run.first_epoch + 1) * (epochs - epoch)
    metric = run.objective.metric
    run.log.info(
        "epoch %d/%d train_loss %.4f val_loss %.4f val_%s %.4f %.0f samples/s/rank ETA %.0fs",
        epoch,
        epochs,
        record["train_loss"],
        record["val_loss"],
        metric,
        record[f"val_{metric}"],
        record["samples_per_s_per_rank"],
        eta,
    )


def inject_fault(run: RankRun, epoch: int) -> None:
    """train.fault_injection, for fault-tolerance tests: in a fresh run only, once `epoch`'s checkpoint is
    on the store, the chosen rank kills its own process (SIGKILL), as a lost executor would."""
    fault = run.spec.train.fault_injection
    if fault is None or run.resumed_from != 0 or epoch != fault.epoch:
        return
    run.comm.allreduce_sum([0.0], f"fault{epoch}")  # the checkpoint of this epoch is on the store
    if run.comm.rank == fault.rank:
        run.log.warning("fault injection: killing rank %d (pid %d) after epoch %d", fault.rank, os.getpid(), epoch)
        os.kill(os.getpid(), signal.SIGKILL)


def result(run: RankRun, state: ResumeState) -> dict | None:
    """What rank 0 returns to the driver: the best epoch's weights (serialized), the history and how the run
    went; the other ranks return None."""
    if run.comm.rank != 0:
        return None
    model = run.model.cpu()
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return {
        "state_dict": buf.getvalue(),
        "history": list(state.history),
        "ranks": run.comm.size,
        "resumed_from_epoch": run.resumed_from,
        "best_val_loss": state.best_loss,
        "live_epochs": sorted(run.tracker.logged) if run.tracker is not None else [],
        "device": str(run.comm.device),
    }
