"""The training pieces that need no full pipeline: rank plans, slot checks, exact shard loading."""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dlpipe.data.tensors import encode_rows
from dlpipe.train.launcher import SlotShortageError, check_slots, rank_plan, run_horovod, run_torch_distributor
from dlpipe.train.live import LiveTracker
from dlpipe.train.loader import ShardLoader, ShortEpochError


def test_rank_plan_groups_ranks_by_host():
    plan = rank_plan(["h1", "h2", "h1", "h2", "h1"])
    assert [s.rank for s in plan] == [0, 3, 1, 4, 2]
    assert [s.local_rank for s in plan] == [0, 0, 1, 1, 2]
    assert {s.size for s in plan} == {5}
    assert plan[1].local_size == 2 and plan[0].local_size == 3


@pytest.mark.parametrize("launch", [run_horovod, run_torch_distributor], ids=["horovod", "torch_distributor"])
def test_slot_shortage_fails_at_once(spark, launch):
    """Both launchers refuse before launching; the cluster test (one launcher) checks the wait for executors."""
    check_slots(spark.sparkContext, 2)
    with pytest.raises(SlotShortageError, match="needs 3 task slots.*has 2"):
        launch(spark, print, (), 3)


def _dataset(tmp_path, n, files=3, dim=4):
    x = np.arange(n * dim, dtype=np.float32).reshape(n, dim)
    for i, idx in enumerate(np.array_split(np.arange(n), files)):
        table = pa.table(
            {"features": pa.array(encode_rows(x[idx]), pa.binary()), "label": pa.array(idx.astype(np.int32))}
        )
        pq.write_table(table, tmp_path / f"part-{i}.parquet", row_group_size=7)
    (tmp_path / "_common_metadata").write_bytes(b"")
    return tmp_path.as_uri(), x


@pytest.mark.parametrize("n,size,batch", [(101, 2, 10), (100, 3, 7), (50, 2, 25), (64, 4, 8)])
def test_shards_cover_every_row_once_with_equal_steps(tmp_path, n, size, batch):
    uri, x = _dataset(tmp_path, n)
    loaders = [ShardLoader(uri, r, size, batch, (4,), shuffle=True, seed=3, expected_rows=n) for r in range(size)]
    assert len({ld.steps for ld in loaders}) == 1
    seen = []
    for ld in loaders:
        batches = list(ld.epoch(1))
        assert len(batches) == ld.steps and ld.rows_last_epoch == ld.local_rows
        for xb, yb in batches:
            np.testing.assert_array_equal(xb.numpy(), x[yb.numpy()])
            seen += yb.tolist()
    assert sorted(seen) == list(range(n))


def test_shuffle_changes_order_between_epochs(tmp_path):
    uri, _ = _dataset(tmp_path, 200)
    ld = ShardLoader(uri, 0, 1, 50, (4,), shuffle=True, seed=1)
    e1 = np.concatenate([y.numpy() for _, y in ld.epoch(1)])
    e2 = np.concatenate([y.numpy() for _, y in ld.epoch(2)])
    assert sorted(e1) == sorted(e2) and not np.array_equal(e1, e2)


def test_row_count_mismatch_is_an_error(tmp_path):
    uri, _ = _dataset(tmp_path, 30)
    with pytest.raises(ShortEpochError, match="holds 30 rows"):
        ShardLoader(uri, 0, 1, 8, (4,), shuffle=False, expected_rows=31)


def test_rank_logs_stream_to_the_driver_as_json(caplog):
    from dlpipe.train.logstream import LogReceiver, rank_logger

    caplog.set_level("INFO", logger="dlpipe.train")
    with LogReceiver("127.0.0.1") as receiver:
        log = rank_logger(3, receiver.address)
        log.info("epoch %d/%d loss %.2f", 1, 5, 0.25)
        for handler in log.handlers:
            handler.close()
        deadline = time.time() + 10
        while time.time() < deadline and not any(r.name == "dlpipe.train.rank3" for r in caplog.records):
            time.sleep(0.05)
    assert [(r.name, r.getMessage()) for r in caplog.records if r.name == "dlpipe.train.rank3"] == [
        ("dlpipe.train.rank3", "epoch 1/5 loss 0.25")
    ]


def test_live_tracking_that_cannot_reach_its_store_says_so_and_steps_aside(tmp_path):
    """Rank 0 on an executor that cannot open the driver's store: one warning, no failure, and False so
    the driver logs the epoch itself."""
    records: list[logging.LogRecord] = []
    log = logging.getLogger("test.live")
    log.addHandler(_ListHandler(records))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's folder should be")
    tracker = LiveTracker(f"sqlite:///{blocker}/mlflow.db", "0" * 32, log)
    record = {"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "train_accuracy": 0.5, "val_accuracy": 0.5}
    assert tracker.log_epoch(record, [record]) is False
    assert not tracker.active
    assert [r.getMessage().split(" (")[0] for r in records] == ["live MLflow logging off"]


class _ListHandler(logging.Handler):
    def __init__(self, records: list):
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
