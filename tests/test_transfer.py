"""Transfer learning: train.init_from warm-starts from a registered model, train.freeze keeps layers."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch

from dlpipe import tracking
from dlpipe.config import ConfigError, load_config
from dlpipe.pipeline import run_pipeline
from dlpipe.train import transfer
from dlpipe.train.models import build_mlp, with_probabilities
from tests.conftest import REPO, make_cfg, prepare


def _served(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a registered classifier's network holds: the factory's model inside the probabilities wrapper."""
    return with_probabilities(model).state_dict()


def test_a_parent_of_other_classes_gives_all_but_a_new_head():
    torch.manual_seed(0)
    parent = build_mlp((12,), 3, hidden=(16, 8))
    child = build_mlp((12,), 5, hidden=(16, 8))
    taken, fresh = transfer.warm_start(child, _served(parent))
    assert fresh == ["5.weight", "5.bias"]  # the head: 3 classes there, 5 here
    assert sorted(taken) == ["1.bias", "1.weight", "3.bias", "3.weight"]
    assert torch.equal(taken["1.weight"], parent.state_dict()["1.weight"])
    same = build_mlp((12,), 3, hidden=(16, 8))
    taken, fresh = transfer.warm_start(same, parent.state_dict())  # a plain state dict: no prefix to find
    assert fresh == [] and len(taken) == 6


def test_another_architecture_or_a_freeze_typo_is_named():
    parent = build_mlp((12,), 3, hidden=(16, 8))
    with pytest.raises(ValueError, match=r"parameter 1\.weight is \(16, 12\) in the parent model but \(32, 12\) here"):
        transfer.warm_start(build_mlp((12,), 3, hidden=(32, 8)), _served(parent))
    with pytest.raises(ValueError, match=r"train\.freeze: '9\.' names no parameter; the model's are \['1\.weight'"):
        transfer.check_freeze(parent, ["1.", "9."])
    with pytest.raises(ConfigError, match=r"init_from 'nowhere': give models:/<name>@<alias>"):
        load_config("local", ["train.init_from=nowhere"], conf_dir=REPO / "conf")
    with pytest.raises(ConfigError, match="freeze keeps layers as init_from gave them: set train.init_from too"):
        load_config("local", ["train.freeze=['1.']"], conf_dir=REPO / "conf")


SHIFTED = (  # the same problem under a covariate shift, and few rows of it
    "dataset.name=tabular_shifted",
    "dataset.source.uri=data/raw/tabular_shifted",
    "dataset.generator.shift=1.0",
)


@pytest.mark.slow
def test_fine_tuning_a_small_shifted_dataset_beats_training_it_from_scratch(spark, tmp_path):
    """A model trained on the built-in example, then 500 rows of the same problem shifted: 4 epochs from its
    weights (the first layer frozen) score better on their test split than 4 epochs from scratch."""
    base = prepare(spark, tmp_path, "train.epochs=6", rows=6000)
    run_pipeline(spark, base, stages=["train"])
    few = ("train.epochs=4", "train.early_stopping.patience=0", *SHIFTED)
    scratch_cfg = prepare(spark, tmp_path, *few, rows=500)
    scratch = run_pipeline(spark, scratch_cfg, stages=["train", "infer", "evaluate"]).metrics
    parent = f"models:/{base.model_name}@candidate"
    tuned_cfg = make_cfg(tmp_path, *few, f"train.init_from={parent}", "train.freeze=['1.']", rows=500)
    tuned = run_pipeline(spark, tuned_cfg, stages=["train", "infer", "evaluate"]).metrics
    assert tuned["train"]["skipped"] == 0 and tuned["train"]["model_version"] == 2  # not scratch's model reused
    assert tuned["evaluate"]["accuracy"] > scratch["evaluate"]["accuracy"], (tuned["evaluate"], scratch["evaluate"])

    client = mlflow.MlflowClient(tracking.tracking_uri(tuned_cfg))
    run = client.get_run(client.get_model_version(tuned_cfg.model_name, "2").run_id)
    assert run.data.tags["dlpipe.parent_model"] == f"models:/{base.model_name}/1"
    assert run.data.params["train.init_from"] == parent
    record = json.loads(open(client.download_artifacts(run.info.run_id, "lineage.json")).read())
    assert f"models:/{base.model_name}/1" in record["inputs"]  # lineage names the parent model
    # the frozen first layer is the parent's, the rest moved on (network_of reads the store run_pipeline set)
    from dlpipe.model.rawmodel import network_of

    mine = network_of(f"models:/{tuned_cfg.model_name}/2").state_dict()
    theirs = network_of(f"models:/{base.model_name}/1").state_dict()
    assert torch.equal(mine["0.1.weight"], theirs["0.1.weight"])
    assert not torch.equal(mine["0.3.weight"], theirs["0.3.weight"])
