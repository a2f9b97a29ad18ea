"""The steps of one training rank, without Spark or a JVM: which rows each rank reads, the environment a
rank sets up, the state a checkpoint resumes from, the spec built from the config, and one real rank (Gloo,
world size 1) training and resuming in this process. Seconds, not minutes."""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import socket
import subprocess
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dlpipe.config import EarlyStoppingConfig, ModelConfig, TrainConfig
from dlpipe.data.stats import FittedStats
from dlpipe.data.tensors import encode_rows
from dlpipe.train.checkpoints import CheckpointStore, ResumeState
from dlpipe.train.comm import GPU_ENV, gloo_env
from dlpipe.train.launcher import gpu_env, horovod_env, rank_plan
from dlpipe.train.loader import Piece, epoch_order, plan_shard
from dlpipe.train.worker import TrainSpec, scaled_lr, train_worker, warmup_steps
from tests.conftest import REPO, make_cfg

# --- the shard plan -------------------------------------------------------------------------------------

# two files: a.parquet with row groups of 7, 7 and 3 rows, b.parquet with 7 and 2 (26 rows)
GROUPS = [("a", 0, 7), ("a", 1, 7), ("a", 2, 3), ("b", 0, 7), ("b", 1, 2)]


def test_each_rank_reads_its_contiguous_slice_of_row_groups():
    plans = [plan_shard(GROUPS, rank, 3, batch_size=4) for rank in range(3)]
    # rows [0, 8), [8, 17), [17, 26): a slice may start or end inside a row group
    assert [p.pieces for p in plans] == [
        (Piece("a", 0, 0, 7), Piece("a", 1, 0, 1)),
        (Piece("a", 1, 1, 7), Piece("a", 2, 0, 3)),
        (Piece("b", 0, 0, 7), Piece("b", 1, 0, 2)),
    ]
    assert [p.local_rows for p in plans] == [8, 9, 9]
    assert {p.total_rows for p in plans} == {26}
    # every rank runs the largest shard's steps (ceil(9 / 4) = 3), its own rows split evenly over them
    assert [p.steps for p in plans] == [3, 3, 3]
    assert [p.batch_sizes() for p in plans] == [[3, 3, 2], [3, 3, 3], [3, 3, 3]]


@pytest.mark.parametrize("rows,size,batch", [(101, 2, 10), (100, 3, 7), (50, 2, 25), (64, 4, 8), (1000, 7, 33)])
def test_shards_cover_every_row_exactly_once(rows, size, batch):
    rng = np.random.default_rng(rows)
    sizes = rng.integers(1, 20, 200)
    sizes = sizes[np.cumsum(sizes) <= rows].tolist()
    sizes.append(rows - sum(sizes))
    groups = [(f"part-{i // 5}", i % 5, n) for i, n in enumerate(sizes) if n]
    starts = {(p, g): s for (p, g, _), s in zip(groups, np.cumsum([0] + [n for *_, n in groups]), strict=False)}
    plans = [plan_shard(groups, r, size, batch) for r in range(size)]
    covered = [int(starts[(pc.path, pc.row_group)]) + i for p in plans for pc in p.pieces for i in range(pc.lo, pc.hi)]
    assert covered == list(range(rows))  # each row once, rank by rank, in dataset order
    assert [p.local_rows for p in plans] == [(r + 1) * rows // size - r * rows // size for r in range(size)]
    assert len({p.steps for p in plans}) == 1
    for p in plans:
        assert sum(p.batch_sizes()) == p.local_rows and min(p.batch_sizes()) >= 1
        assert max(p.batch_sizes()) - min(p.batch_sizes()) <= 1


def test_each_epoch_reshuffles_pieces_and_rows_the_same_way_on_a_rerun():
    rows = [7, 7, 3, 7, 2, 5]

    def order(epoch: int, rank: int = 0) -> list[tuple[int, list[int]]]:
        return [(i, perm.tolist()) for i, perm in epoch_order(rows, 3, epoch, rank, shuffle=True)]

    e1, e2 = order(1), order(2)
    for e in (e1, e2):
        assert sorted(i for i, _ in e) == list(range(len(rows)))
        assert all(sorted(perm) == list(range(rows[i])) for i, perm in e)
    assert e1 != e2  # a new order every epoch
    assert order(1) == e1  # the same one when the epoch runs again (a resumed run)
    assert order(1, rank=1) != e1  # and its own on every rank
    assert list(epoch_order(rows, 3, 1, 0, shuffle=False)) == [(i, None) for i in range(len(rows))]


# --- the environment a rank sets up ---------------------------------------------------------------------


def test_horovod_env_of_each_task_places_it_in_the_same_rank_plan():
    hosts = ["10.0.0.2", "10.0.0.1", "10.0.0.2"]  # task (partition) i runs on hosts[i]
    plan = rank_plan(hosts)
    envs = [horovod_env(plan, hosts, pid, "4242", None, None) for pid in range(3)]
    assert [e["HOROVOD_RANK"] for e in envs] == ["0", "2", "1"]  # ranks grouped by host
    assert [e["HOROVOD_LOCAL_RANK"] for e in envs] == ["0", "0", "1"]
    assert [e["HOROVOD_LOCAL_SIZE"] for e in envs] == ["2", "1", "2"]
    assert [e["HOROVOD_CROSS_RANK"] for e in envs] == ["0", "1", "0"]
    assert [e["HOROVOD_HOSTNAME"] for e in envs] == hosts
    for e in envs:  # one rendezvous, at rank 0's host, over Gloo
        assert e["HOROVOD_GLOO_RENDEZVOUS_ADDR"] == "10.0.0.2"
        assert (e["HOROVOD_GLOO_RENDEZVOUS_PORT"], e["HOROVOD_SIZE"]) == ("4242", "3")
        assert (e["HOROVOD_CONTROLLER"], e["HOROVOD_CPU_OPERATIONS"]) == ("gloo", "gloo")
        assert "HOROVOD_GLOO_IFACE" not in e and "HOROVOD_CYCLE_TIME" not in e
    tuned = horovod_env(plan, hosts, 1, "4242", "eth1", 10.0)
    assert (tuned["HOROVOD_GLOO_IFACE"], tuned["HOROVOD_CYCLE_TIME"]) == ("eth1", "10.0")


def test_gpu_env_pins_the_tasks_first_gpu_and_nccl_only_where_horovod_has_it():
    assert gpu_env(None, nccl_built=True) == {}
    assert gpu_env([], nccl_built=True) == {}
    assert gpu_env(["3", "5"], nccl_built=False) == {GPU_ENV: "3"}
    assert gpu_env(["3"], nccl_built=True) == {GPU_ENV: "3", "HOROVOD_GPU_OPERATIONS": "NCCL"}


def test_torchrun_ranks_keep_gloo_on_loopback_in_a_local_run():
    assert gloo_env("127.0.0.1") == gloo_env("localhost") == {"GLOO_SOCKET_IFNAME": "lo"}
    assert gloo_env("10.1.2.3") == {} and gloo_env("") == {}


def test_learning_rate_warms_up_linearly_to_lr_times_ranks():
    steps = 10
    warmup = warmup_steps(1.5, steps)
    assert warmup == 15 and warmup_steps(0.0, steps) == 1
    assert scaled_lr(0.01, 4, 1, 1, steps, warmup) == pytest.approx(0.01 * (1 + 3 / 15))
    assert scaled_lr(0.01, 4, 2, 5, steps, warmup) == pytest.approx(0.04)  # step 15: warm
    assert scaled_lr(0.01, 4, 5, 1, steps, warmup) == pytest.approx(0.04)
    assert scaled_lr(0.01, 1, 1, 1, steps, warmup) == pytest.approx(0.01)  # one rank: no scaling


# --- the resume state -----------------------------------------------------------------------------------


def _record(epoch: int, val_loss: float) -> dict:
    return {"epoch": epoch, "train_loss": 1.0, "val_loss": val_loss, "val_accuracy": 0.5}


def test_resume_state_keeps_the_best_weights_and_counts_epochs_without_progress():
    calls = []

    def weights() -> dict:
        calls.append(1)
        return {"w": torch.full((2,), float(len(calls)))}

    s = ResumeState()
    assert (s.epoch, s.next_epoch, s.best_loss, s.bad_epochs) == (0, 1, math.inf, 0)
    s = s.after_epoch(_record(1, 0.9), 0.05, weights)
    assert (s.epoch, s.best_loss, s.bad_epochs, len(calls)) == (1, 0.9, 0, 1)
    s = s.after_epoch(_record(2, 0.88), 0.05, weights)  # better, but by less than min_delta
    assert (s.best_loss, s.bad_epochs, len(calls)) == (0.9, 1, 1)
    assert not s.should_stop(2)
    s = s.after_epoch(_record(3, 0.95), 0.05, weights)
    assert s.bad_epochs == 2 and s.should_stop(2) and not s.should_stop(0)  # patience 0: never stop
    s = s.after_epoch(_record(4, 0.5), 0.05, weights)
    assert (s.epoch, s.best_loss, s.bad_epochs, len(calls)) == (4, 0.5, 0, 2)
    assert torch.equal(s.best_state["w"], torch.full((2,), 2.0))
    assert [r["epoch"] for r in s.history] == [1, 2, 3, 4]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.epoch = 7


def test_resume_state_round_trips_through_a_checkpoint(tmp_path):
    store = CheckpointStore((tmp_path / "ckpt").as_uri())
    assert store.restore() is None
    state = ResumeState(
        epoch=3,
        history=(_record(1, 0.9), _record(2, 0.7), _record(3, 0.8)),
        best_loss=0.7,
        bad_epochs=1,
        best_state={"w": torch.arange(4.0)},
    )
    model, optimizer = {"w": torch.ones(4)}, {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    store.save_state(state, model, optimizer)
    restored = store.restore()
    back = restored.state
    assert back == state  # epoch, history, best loss, patience counter (weights compared below)
    assert torch.equal(back.best_state["w"], torch.arange(4.0))
    assert torch.equal(restored.model["w"], torch.ones(4)) and restored.optimizer == optimizer
    assert back.next_epoch == 4


def test_a_checkpoint_without_the_newer_keys_resumes_with_their_defaults():
    old = ResumeState.from_checkpoint({"epoch": 2, "model": {}, "optimizer": {}})
    assert (old.epoch, old.history, old.best_loss, old.bad_epochs, old.best_state) == (2, (), math.inf, 0, None)


# --- the spec, from the config --------------------------------------------------------------------------


_STATS = {
    "key": "id",
    "label": "label",
    "features": [{"name": "x", "transform": "standardize", "mean": 0.0, "std": 1.0}],
    "feature_shape": [4],
    "num_classes": 3,
    "rows": {"train": 60, "val": 21},
}
STATS = FittedStats.from_dict(_STATS)


def test_train_spec_carries_the_config_section_and_repeats_none_of_its_settings(tmp_path):
    cfg = make_cfg(
        tmp_path,
        "train.lr=0.02",
        "train.early_stopping.patience=5",
        "train.fault_injection.rank=1",
        "train.fault_injection.epoch=2",
    )
    spec = TrainSpec.from_config(cfg, STATS, "file:///ckpt", use_gpu=False)
    assert spec.train == cfg.train and spec.train.lr == 0.02 and spec.train.early_stopping.patience == 5
    assert spec.model == cfg.train.model.model_dump(mode="json")
    assert (spec.train_rows, spec.val_rows, spec.feature_shape, spec.num_classes) == (60, 21, (4,), 3)
    assert spec.train_uri.endswith("/train") and spec.val_uri.endswith("/val")
    # no setting of train: is a field of its own here, so none has a second default
    assert not {f.name for f in dataclasses.fields(TrainSpec)} & set(TrainConfig.model_fields)
    assert pickle.loads(pickle.dumps(spec)) == spec  # it travels to every rank
    regression = TrainSpec.from_config(
        cfg, FittedStats.from_dict({**_STATS, "task": "regression", "label_mean": 5.0, "label_std": 2.0}), "x"
    )
    assert (regression.task, regression.num_classes, regression.label_mean, regression.label_std) == (
        "regression",
        1,
        5.0,
        2.0,
    )
    assert (spec.task, spec.label_mean, spec.label_std) == ("classification", 0.0, 1.0)


def test_the_worker_module_needs_neither_spark_nor_mlflow():
    """Executors import it in every rank: pulling in pyspark or mlflow would cost each rank seconds, and
    TorchDistributor's processes should not need them at all."""
    code = "import sys, dlpipe.train.worker; print([m for m in sys.modules if m.split('.')[0] in ('pyspark','mlflow')])"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# --- one real rank: train, then resume ------------------------------------------------------------------


def _split(path, n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    x = (rng.normal(size=(n, 4)) + y[:, None]).astype(np.float32)
    path.mkdir()
    table = pa.table({"features": pa.array(encode_rows(x), pa.binary()), "label": pa.array(y)})
    pq.write_table(table, path / "part-0.parquet", row_group_size=16)
    return path.as_uri()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_rank_spec(tmp_path, train_rows: int, val_rows: int, checkpoint_uri: str, **train: Any) -> TrainSpec:
    """A one-rank torch_distributor spec: an MLP with 8 hidden units on 4-feature, 3-class splits of these
    sizes written under tmp_path; train: more TrainConfig settings (epochs, batch_size, lr)."""
    return TrainSpec(
        train=TrainConfig(
            launcher="torch_distributor",
            model=ModelConfig(factory="mlp", hidden=[8]),
            early_stopping=EarlyStoppingConfig(patience=0),
            **train,
        ),
        train_uri=_split(tmp_path / "train", train_rows, 1),
        val_uri=_split(tmp_path / "val", val_rows, 2),
        train_rows=train_rows,
        val_rows=val_rows,
        feature_shape=(4,),
        num_classes=3,
        checkpoint_uri=checkpoint_uri,
    )


@pytest.fixture
def one_rank(monkeypatch):
    """The environment torchrun gives a one-process job; torch's thread count put back afterwards."""
    for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    threads = torch.get_num_threads()

    def run(spec: TrainSpec) -> dict:
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
        return train_worker(spec)

    yield run
    torch.set_num_threads(threads)


def test_a_rank_resumes_at_the_epoch_after_its_checkpoint(tmp_path, one_rank):
    spec = _one_rank_spec(tmp_path, 60, 21, (tmp_path / "ckpt").as_uri(), epochs=2, batch_size=8)
    train = spec.train
    first = one_rank(spec)
    assert (first["resumed_from_epoch"], [h["epoch"] for h in first["history"]]) == (0, [1, 2])
    saved = CheckpointStore(spec.checkpoint_uri).restore().state
    assert (saved.epoch, saved.best_loss) == (2, first["best_val_loss"])

    more = dataclasses.replace(spec, train=train.model_copy(update={"epochs": 4}))
    second = one_rank(more)
    assert second["resumed_from_epoch"] == 2
    assert [h["epoch"] for h in second["history"]] == [1, 2, 3, 4]  # epochs 3 and 4 only were trained
    assert second["history"][:2] == first["history"]
    assert CheckpointStore(spec.checkpoint_uri).restore().state.epoch == 4


def test_a_distilled_student_follows_its_teacher_as_far_as_alpha_says(tmp_path, one_rank):
    """A teacher that always answers class 2: a student on its soft targets alone (alpha 1) learns to answer
    2 whatever the labels; on the labels alone (alpha 0) it learns the labels."""
    from dlpipe.train.models import build_mlp
    from dlpipe.train.transfer import serialized
    from dlpipe.train.worker import Teacher

    teacher = build_mlp((4,), 3, hidden=[4])
    with torch.no_grad():
        teacher[-1].weight.zero_()
        teacher[-1].bias.copy_(torch.tensor([0.0, 0.0, 8.0]))
    spec = _one_rank_spec(tmp_path, 300, 150, "", epochs=6, lr=0.03, batch_size=16)
    val_labels = pq.read_table(tmp_path / "val").column("label").to_numpy()
    accuracy = {}
    for alpha in (1.0, 0.0):
        who = Teacher({"factory": "mlp", "hidden": [4]}, serialized(teacher.state_dict()), temperature=2.0, alpha=alpha)
        accuracy[alpha] = one_rank(dataclasses.replace(spec, teacher=who))["history"][-1]["val_accuracy"]
    assert accuracy[1.0] == pytest.approx(float((val_labels == 2).mean()))  # the teacher's answer, every row
    assert accuracy[0.0] > accuracy[1.0] + 0.2, accuracy
