"""Training: a DDP rank killed mid-training resumes from a checkpoint when the driver starts the job again,
`train.resume`, your own model factory, early stopping (the image CNN, and a Horovod rank killed and resumed
when Spark retries the barrier stage, are test_cluster.py's)."""

from __future__ import annotations

import mlflow
import pytest
import torch

from dlpipe import tracking
from dlpipe.pipeline import run_stage
from tests.conftest import KILL_RANK_1, make_cfg, prepare

pytestmark = pytest.mark.slow


def _train(spark, cfg) -> dict:
    with tracking.pipeline_run(cfg, "test-train"):
        return run_stage(spark, cfg, "train")


# TorchDistributor: its barrier stage cannot be retried, so the driver starts the job again (this test's own
# Spark will do). Horovod's killed rank is the cluster's (test_cluster.py): Spark retries its barrier stage, as
# a cluster allows task retries and the local session (local[2]) does not.
def test_a_killed_ddp_rank_resumes_from_its_checkpoint(spark, tmp_path, caplog):
    cfg = prepare(spark, tmp_path, rows=6000)
    caplog.set_level("INFO", logger="dlpipe")
    _train(spark, make_cfg(tmp_path, "train.launcher=torch_distributor", "train.epochs=6", *KILL_RANK_1, rows=6000))
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "train: attempt 1 of 3 failed" in said, said[-4000:]  # the driver started the job again
    assert "fault injection: killing rank 1" in said
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    run = client.search_runs(
        [client.get_experiment_by_name("dlpipe").experiment_id], filter_string="tags.`dlpipe.stage` = 'train'"
    )[0]
    m = run.data.metrics
    assert run.data.params["train.launcher"] == "torch_distributor"
    assert m["resumed_from_epoch"] == 2, "the retried run did not start from the saved epoch"
    assert m["epochs_run"] == 6
    assert [h.step for h in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2, 3, 4, 5, 6]
    assert m["final_val_accuracy"] > 0.85  # the quality of an uninterrupted run (Bayes rate 0.933)


# Resuming is the training function's, whichever launcher runs it: TorchDistributor resumes in the killed-rank
# test above, and its ranks' logs reach the driver in the host-copy test below.
def test_resume_continues_from_the_last_checkpoint(spark, tmp_path, caplog):
    use = "train.launcher=horovod"
    cfg = prepare(spark, tmp_path, "train.early_stopping.patience=0", "train.epochs=2", use, rows=3000)
    caplog.set_level("INFO", logger="dlpipe.train")
    first = _train(spark, cfg)
    # the ranks' progress reached the driver's own logging, named by rank
    streamed = {(r.name, r.getMessage().split(" train_loss")[0]) for r in caplog.records}
    assert ("dlpipe.train.rank0", "epoch 2/2") in streamed
    assert any(name == "dlpipe.train.rank1" for name, _ in streamed)
    assert (first["resumed_from_epoch"], first["epochs_run"], first["epochs_logged_live"]) == (0, 2, 2)
    more = make_cfg(tmp_path, "train.early_stopping.patience=0", "train.epochs=4", "train.resume=true", use, rows=3000)
    second = _train(spark, more)
    assert (second["resumed_from_epoch"], second["epochs_run"]) == (2, 4)
    # a new MLflow run: rank 0 logged epochs 3 and 4 as they ended, the driver 1 and 2 from the history
    assert second["epochs_logged_live"] == 2
    client = mlflow.MlflowClient(tracking.tracking_uri(more))
    run_id = client.get_model_version_by_alias(more.model_name, "candidate").run_id
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_loss")) == [1, 2, 3, 4]
    assert "learning_curve.png" in {a.path for a in client.list_artifacts(run_id)}
    assert second["final_val_loss"] < first["final_val_loss"]
    fresh = _train(spark, make_cfg(tmp_path, "train.early_stopping.patience=0", "train.epochs=1", use, rows=3000))
    assert fresh["resumed_from_epoch"] == 0  # without resume, old checkpoints are cleared, not used


def _val_loss_of_candidate(cfg) -> float:
    """Mean cross-entropy of the registered @candidate (it answers probabilities) on the validation split."""
    import numpy as np
    from petastorm import make_reader

    from dlpipe.model.rawmodel import network_of
    from dlpipe.storage import dataset_paths

    with make_reader(dataset_paths(cfg).split("val"), reader_pool_type="dummy", num_epochs=1) as reader:
        rows = list(reader)
    x = torch.from_numpy(np.stack([r.features for r in rows]))
    y = torch.tensor([int(r.label) for r in rows])
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    network = network_of(f"models:/{cfg.model_name}@candidate")  # the raw-record model's own network
    with torch.no_grad():
        probs = network(x)
    return float(-torch.log(probs[torch.arange(len(y)), y]).mean())


def test_own_model_factory_by_dotted_path_and_early_stopping(spark, tmp_path):
    cfg = prepare(
        spark,
        tmp_path,
        "train.model.factory=tests.model_factories:linear",
        "train.epochs=40",
        "train.early_stopping.patience=1",
        "train.lr=0.05",
        rows=1500,
    )
    m = _train(spark, cfg)
    assert m["epochs_run"] < 40, "patience 1 with a large learning rate should stop early"
    assert m["model_parameters"] == 12 * 3 + 3  # the linear model: 12 features x 3 classes + biases
    # the registered model is the best epoch's, not the last one's: its validation loss is the best
    assert m["final_val_loss"] != pytest.approx(m["best_val_loss"], rel=1e-3), "the run never got worse"
    assert _val_loss_of_candidate(cfg) == pytest.approx(m["best_val_loss"], rel=1e-4)
    with pytest.raises(ValueError, match="cannot be imported"):
        _train(spark, make_cfg(tmp_path, "train.model.factory=tests.nowhere:model", rows=1500))


@pytest.mark.parametrize("launcher", ["horovod", "torch_distributor"])
def test_gradients_averaged_on_host_copies_match_the_frameworks_own(spark, tmp_path, caplog, launcher):
    """`train.allreduce=host` is what a GPU rank uses when Horovod has no GPU operations; on CPU it must
    give the same training as Horovod's DistributedOptimizer or DDP (same seed, same data)."""
    same = ("train.early_stopping.patience=0", "train.epochs=2", f"train.launcher={launcher}")
    caplog.set_level("INFO", logger="dlpipe.train")
    framework = _train(spark, prepare(spark, tmp_path, *same, rows=3000))
    host = _train(spark, make_cfg(tmp_path, *same, "train.allreduce=host", rows=3000))
    assert any("gradients averaged on host copies" in r.getMessage() for r in caplog.records)
    # both ranks' progress reached the driver's own logging, named by rank, from either launcher
    said = {(r.name, r.getMessage().split(" train_loss")[0]) for r in caplog.records}
    assert ("dlpipe.train.rank0", "epoch 2/2") in said
    assert any(name == "dlpipe.train.rank1" for name, _ in said)
    assert host["final_train_loss"] == pytest.approx(framework["final_train_loss"], rel=1e-4)
    assert host["final_val_loss"] == pytest.approx(framework["final_val_loss"], rel=1e-4)


def test_bf16_mixed_precision_trains_and_fp16_asks_for_a_gpu(spark, tmp_path, caplog):
    caplog.set_level("INFO", logger="dlpipe.train")
    # the factory's model fails any training step whose logits are not bf16: autocast must have run
    checked = ("train.model.factory=tests.model_factories:mlp_trained_in", "train.model.params.dtype=bfloat16")
    cfg = prepare(spark, tmp_path, "train.mixed_precision=bf16", "train.epochs=4", *checked, rows=3000)
    m = _train(spark, cfg)
    assert any("mixed precision bf16" in r.getMessage() for r in caplog.records)
    assert m["best_val_accuracy"] > 0.8  # bf16 autocast still learns (Bayes rate 0.933)
    with pytest.raises(ValueError, match="fp16 needs GPUs"):
        _train(spark, make_cfg(tmp_path, "train.mixed_precision=fp16", rows=3000))
