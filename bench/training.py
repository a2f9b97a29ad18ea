"""Training group: data feeding and distributed training throughput, all measured in one run.

On synthetic datasets in the pipeline's own Petastorm layout (a list of float32 features per row + a
label), BENCH_TRAIN_ROWS rows (default 500,000) of 64 features:
- loader_vs_pyarrow: our ShardLoader (shuffled each epoch, exact shards) over a plain `pyarrow.dataset`
  batches -> torch tensors loop on the same files (no shuffle, no copy);
- scaling_efficiency_2: training samples/s with 2 Horovod ranks over twice that with 1 rank (one torch
  thread per rank either way), on a model and batch where computation dominates: an MLP of two 512-wide
  layers at batch 4096 (about 1.8 MFLOP a sample, 100 ms a step on one core, against about 3 ms for a Gloo
  allreduce of its 1.2 MB of gradients here), with train.horovod_cycle_ms=10 (on one core per rank,
  Horovod's coordination cycle takes CPU from training: see the README). `compute_share_2` says how much
  computation dominates: a plain single-thread PyTorch step's time over a 2-rank Horovod step's (1.0:
  every millisecond of the step is the model's own work). `scaling_efficiency_2_torch_distributor` is the
  same measure with the other launcher (PyTorch DDP). The figures for the pipeline's default model and
  batch (MLP 64-64, batch 128, where per-step overhead dominates: 0.7 ms of computation against a 2 ms
  allreduce) are printed with the suffix `_default_model`;
- horovod_vs_torch: 1-rank Horovod samples/s over a single-process PyTorch loop on the same data, model and
  batch.
Training rates come from epochs after the first (start-up and warm-up excluded).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

ROOT = Path("data/bench/training-root").resolve()
DIM, CLASSES, LOADER_BATCH = 64, 4, 1024


@dataclass(frozen=True)
class Setup:
    """A model and batch size to measure training at."""

    name: str
    hidden: tuple[int, ...]
    batch: int
    rows: int
    epochs: int
    cycle_ms: float | None = None  # train.horovod_cycle_ms


def _write_dataset(path: Path, rows: int, files: int = 8) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(DIM, CLASSES))
    for i, idx in enumerate(np.array_split(np.arange(rows), files)):
        x = rng.normal(size=(len(idx), DIM)).astype(np.float32)
        y = np.argmax(x @ w, axis=1).astype(np.int32)
        features = pa.ListArray.from_arrays(
            pa.array(np.arange(0, x.size + 1, DIM, dtype=np.int32)), pa.array(x.reshape(-1))
        )
        table = pa.table({"id": pa.array(idx.astype(np.int64)), "features": features, "label": pa.array(y)})
        pq.write_table(table, path / f"part-{i:05d}.parquet", row_group_size=32768)


def _pyarrow_loop(path: Path) -> float:
    started, rows, touched = time.perf_counter(), 0, 0.0
    dataset = pads.dataset(str(path), format="parquet")
    for batch in dataset.to_batches(columns=["features", "label"], batch_size=LOADER_BATCH):
        x = torch.from_numpy(batch.column(0).flatten().to_numpy().reshape(-1, DIM))
        y = torch.from_numpy(batch.column(1).to_numpy().astype(np.int64))
        rows, touched = rows + len(y), touched + float(x[:, 0].sum())
    return rows / (time.perf_counter() - started)


def _our_loader(path: Path, rows: int) -> float:
    from dlpipe.train.loader import ShardLoader

    loader = ShardLoader(path.as_uri(), 0, 1, LOADER_BATCH, (DIM,), shuffle=True, seed=1, expected_rows=rows)
    rates = []
    for epoch in range(4):  # the first one opens the files and is not counted
        started, rows_read, touched = time.perf_counter(), 0, 0.0
        for x, y in loader.epoch(epoch):
            rows_read, touched = rows_read + len(y), touched + float(x[:, 0].sum())
        rates.append(rows_read / (time.perf_counter() - started))
    return float(np.median(rates[1:]))


def _plain_torch(path: Path, setup: Setup) -> tuple[float, float]:
    """Single process, one thread, same loader, model, optimizer and batch: the ceiling without any
    framework. Returns samples/s and milliseconds per step."""
    from dlpipe.train.loader import ShardLoader
    from dlpipe.train.models import build_mlp

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_mlp((DIM,), CLASSES, list(setup.hidden))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    loader = ShardLoader(path.as_uri(), 0, 1, setup.batch, (DIM,), shuffle=True, seed=1, expected_rows=setup.rows)
    rates = []
    for epoch in range(1, setup.epochs + 1):
        started = time.perf_counter()
        for x, y in loader.epoch(epoch):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        rates.append(setup.rows / (time.perf_counter() - started))
    rate = float(np.mean(rates[1:]))
    return rate, 1000 * setup.batch / rate


def _horovod(spark, path: Path, setup: Setup, ranks: int, launcher: str = "horovod") -> float:
    """Samples/s per rank of dlpipe's own training worker under the Horovod barrier-stage launcher."""
    from dlpipe.config import EarlyStoppingConfig, ModelConfig, TrainConfig
    from dlpipe.train.launcher import run_horovod, run_torch_distributor
    from dlpipe.train.worker import TrainSpec, train_worker

    checkpoints = ROOT / f"checkpoints-{setup.name}-{ranks}-{launcher}"
    train = TrainConfig(
        model=ModelConfig(factory="mlp", hidden=list(setup.hidden)),
        epochs=setup.epochs,
        batch_size=setup.batch,
        lr=1e-3,
        seed=0,
        threads_per_rank=1,
        early_stopping=EarlyStoppingConfig(patience=0),
        launcher=launcher,
    )
    spec = TrainSpec(
        train=train,
        train_uri=path.as_uri(),
        val_uri=(ROOT / "val").as_uri(),
        train_rows=setup.rows,
        val_rows=VAL_ROWS,
        feature_shape=(DIM,),
        num_classes=CLASSES,
        checkpoint_uri=checkpoints.as_uri(),
    )
    shutil.rmtree(checkpoints, ignore_errors=True)
    if launcher == "horovod":
        result = run_horovod(spark, train_worker, (spec,), ranks, cycle_ms=setup.cycle_ms)[0]
    else:
        result = run_torch_distributor(spark, train_worker, (spec,), ranks)[0]
    history = result["history"]
    return float(np.mean([h["samples_per_s_per_rank"] for h in history[1:]]))


VAL_ROWS = 4096


def _scaling(spark, setup: Setup) -> dict[str, float]:
    data = ROOT / f"train-{setup.name}"
    _write_dataset(data, setup.rows)
    torch_rate, torch_step_ms = _plain_torch(data, setup)
    one = _horovod(spark, data, setup, 1)
    two = _horovod(spark, data, setup, 2)
    suffix = "" if setup.name == "compute" else f"_{setup.name}"
    ddp = {}
    if setup.name == "compute":  # the other launcher, same model and batch
        ddp_one = _horovod(spark, data, setup, 1, "torch_distributor")
        ddp_two = _horovod(spark, data, setup, 2, "torch_distributor")
        ddp = {"scaling_efficiency_2_torch_distributor": ddp_two / ddp_one}
    return {
        **ddp,
        f"torch_1proc_samples_per_s{suffix}": torch_rate,
        f"horovod_1rank_samples_per_s{suffix}": one,
        f"horovod_2rank_samples_per_s_per_rank{suffix}": two,
        f"scaling_efficiency_2{suffix}": (2 * two) / (2 * one),  # 2 ranks' total over twice one rank's
        f"horovod_vs_torch{suffix}": one / torch_rate,
        f"step_ms_torch_1thread{suffix}": torch_step_ms,
        f"step_ms_horovod_2ranks{suffix}": 1000 * setup.batch / two,
        f"compute_share_2{suffix}": torch_step_ms / (1000 * setup.batch / two),
    }


def run() -> dict[str, float]:
    from dlpipe.config import load_config
    from dlpipe.session import build_spark

    rows = int(os.environ.get("BENCH_TRAIN_ROWS", "500000"))
    epochs = int(os.environ.get("BENCH_TRAIN_EPOCHS", "3"))
    data = ROOT / "train"
    _write_dataset(data, rows)
    _write_dataset(ROOT / "val", VAL_ROWS, files=1)
    _pyarrow_loop(data)  # warm the page cache for both readers
    pyarrow_rate = float(np.median([_pyarrow_loop(data) for _ in range(3)]))
    loader_rate = _our_loader(data, rows)
    figures: dict[str, float] = {
        "rows": rows,
        "pyarrow_loop_rows_per_s": pyarrow_rate,
        "loader_rows_per_s": loader_rate,
        "loader_vs_pyarrow": loader_rate / pyarrow_rate,
    }
    setups = [
        Setup("compute", (512, 512), 4096, rows // 2, epochs, cycle_ms=10),
        Setup("default_model", (64, 64), 128, rows // 4, epochs),
    ]
    cfg = load_config("local", [f"project.root={ROOT}", "spark.conf.spark.ui.enabled=false"])
    spark = build_spark(cfg)
    try:
        for setup in setups:
            figures.update(_scaling(spark, setup))
    finally:
        spark.stop()
    return figures
