"""Training group: data feeding and distributed training throughput, all measured in one run.

On one synthetic Petastorm-layout dataset (BENCH_TRAIN_ROWS rows, default 500,000, of 64 float32
features as NdarrayCodec cells + a label):
- loader_vs_pyarrow: our ShardLoader (shuffled, exact shards) over a plain `pyarrow.dataset` batches ->
  torch tensors loop on the same files (given the same vectorized cell decoding, or it would be no
  baseline at all);
- scaling_efficiency_2: training samples/s with 2 Horovod ranks over twice that with 1 rank (one torch
  thread per rank either way);
- horovod_vs_torch: 1-rank Horovod samples/s over a single-process PyTorch loop on the same data and
  model.
Training rates come from epochs after the first (start-up and warm-up excluded).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from dlpipe.tensors import decode_arrow, encode_arrow

ROOT = Path("data/bench/training-root").resolve()
DIM, CLASSES, BATCH = 64, 4, 1024


def _write_dataset(path: Path, rows: int, files: int = 8) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(DIM, CLASSES))
    for i, idx in enumerate(np.array_split(np.arange(rows), files)):
        x = rng.normal(size=(len(idx), DIM)).astype(np.float32)
        y = np.argmax(x @ w, axis=1).astype(np.int32)
        table = pa.table({"id": pa.array(idx.astype(np.int64)), "features": encode_arrow(x), "label": pa.array(y)})
        pq.write_table(table, path / f"part-{i:05d}.parquet", row_group_size=16384)


def _pyarrow_loop(path: Path) -> float:
    started, rows, touched = time.perf_counter(), 0, 0.0
    for batch in pads.dataset(str(path), format="parquet").to_batches(columns=["features", "label"], batch_size=BATCH):
        x = torch.from_numpy(decode_arrow(batch.column(0), np.float32, (DIM,)))
        y = torch.from_numpy(batch.column(1).to_numpy().astype(np.int64))
        rows, touched = rows + len(y), touched + float(x[:, 0].sum())
    return rows / (time.perf_counter() - started)


def _our_loader(path: Path, rows: int) -> float:
    from dlpipe.train.loader import ShardLoader

    loader = ShardLoader(path.as_uri(), 0, 1, BATCH, (DIM,), shuffle=True, seed=1, expected_rows=rows)
    started, rows_read, touched = time.perf_counter(), 0, 0.0
    for x, y in loader.epoch(1):
        rows_read, touched = rows_read + len(y), touched + float(x[:, 0].sum())
    return rows_read / (time.perf_counter() - started)


def _plain_torch(path: Path, rows: int, epochs: int) -> float:
    """Single process, same loader, model, optimizer and batch: the ceiling without any framework."""
    from dlpipe.train.loader import ShardLoader
    from dlpipe.train.models import build_mlp

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_mlp((DIM,), CLASSES, [128, 128])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    loader = ShardLoader(path.as_uri(), 0, 1, BATCH, (DIM,), shuffle=True, seed=1, expected_rows=rows)
    rates = []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        for x, y in loader.epoch(epoch):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        rates.append(rows / (time.perf_counter() - started))
    return float(np.mean(rates[1:]))


def _horovod(spark, path: Path, rows: int, ranks: int, epochs: int) -> float:
    """Samples/s per rank of dlpipe's own training worker under the Horovod barrier-stage launcher."""
    from dlpipe.train.launcher import run_horovod
    from dlpipe.train.worker import TrainSpec, train_worker

    spec = TrainSpec(
        train_uri=path.as_uri(),
        val_uri=(path.parent / "val").as_uri(),
        train_rows=rows,
        val_rows=VAL_ROWS,
        feature_shape=(DIM,),
        num_classes=CLASSES,
        model={"factory": "mlp", "hidden": [128, 128]},
        epochs=epochs,
        batch_size=BATCH,
        lr=1e-3,
        seed=0,
        threads=1,
        patience=0,
        checkpoint_uri=(ROOT / f"checkpoints-{ranks}").as_uri(),
    )
    shutil.rmtree(ROOT / f"checkpoints-{ranks}", ignore_errors=True)
    history = run_horovod(spark, train_worker, (spec,), ranks)[0]["history"]
    return float(np.mean([h["samples_per_s_per_rank"] for h in history[1:]]))


VAL_ROWS = 4096


def run() -> dict[str, float]:
    from dlpipe.config import load_config
    from dlpipe.session import build_spark

    rows = int(os.environ.get("BENCH_TRAIN_ROWS", "500000"))
    epochs = int(os.environ.get("BENCH_TRAIN_EPOCHS", "3"))
    data = ROOT / "train"
    _write_dataset(data, rows)
    _write_dataset(ROOT / "val", VAL_ROWS, files=1)
    _pyarrow_loop(data)  # warm the page cache for both readers
    pyarrow_rate = _pyarrow_loop(data)
    loader_rate = _our_loader(data, rows)
    torch_rate = _plain_torch(data, rows, epochs)

    cfg = load_config("local", [f"project.root={ROOT}", "spark.conf.spark.ui.enabled=false"])
    spark = build_spark(cfg)
    try:
        one = _horovod(spark, data, rows, 1, epochs)
        two = _horovod(spark, data, rows, 2, epochs)
    finally:
        spark.stop()
    return {
        "rows": rows,
        "pyarrow_loop_rows_per_s": pyarrow_rate,
        "loader_rows_per_s": loader_rate,
        "loader_vs_pyarrow": loader_rate / pyarrow_rate,
        "torch_1proc_samples_per_s": torch_rate,
        "horovod_1rank_samples_per_s": one,
        "horovod_2rank_samples_per_s_per_rank": two,
        "scaling_efficiency_2": (2 * two) / (2 * one),  # 2 ranks' total over twice one rank's
        "horovod_vs_torch": one / torch_rate,
    }
