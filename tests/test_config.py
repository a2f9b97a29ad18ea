"""Configuration: layering, overrides, and errors that name the key, the value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from dlpipe.config import ConfigError, apply_override, load_config
from tests.conftest import REPO


def test_base_and_local_layering():
    cfg = load_config("local", conf_dir=REPO / "conf")
    assert cfg.spark.master == "local[2]"  # local.yaml over base.yaml's local[*]
    assert cfg.dataset.name == "tabular_example"
    assert cfg.root == REPO
    assert cfg.train.num_proc == 2


def test_env_variable_selects_environment(monkeypatch):
    monkeypatch.setenv("DLPIPE_ENV", "cluster")
    cfg = load_config(conf_dir=REPO / "conf")
    assert cfg.spark.master.startswith("spark://")


def test_overrides_are_typed_and_reach_free_form_spark_conf():
    cfg = load_config(
        "local",
        [
            "train.epochs=5",
            "train.model.hidden=[32, 16]",
            "spark.conf.spark.sql.shuffle.partitions=3",
            "infer.model_uri=models:/x@prod",
        ],
        conf_dir=REPO / "conf",
    )
    assert cfg.train.epochs == 5
    assert cfg.train.model.hidden == [32, 16]
    assert cfg.spark.conf["spark.sql.shuffle.partitions"] == 3
    assert cfg.infer.model_uri == "models:/x@prod"


def test_unknown_key_names_key_value_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config("local", ["train.epoch=3"], conf_dir=REPO / "conf")
    msg = str(err.value)
    assert "unknown key 'train.epoch'" in msg and "3" in msg
    assert "epochs" in msg and "batch_size" in msg  # the allowed keys


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        load_config("local", ["train.epochs=ten"], conf_dir=REPO / "conf")
    msg = str(err.value)
    assert "'train.epochs'" in msg and "'ten'" in msg and "integer" in msg


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config("local", ["train.launcher=mpi"], conf_dir=REPO / "conf")
    assert "'train.launcher'" in str(err.value) and "horovod" in str(err.value)


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ConfigError, match="dataset.split"):
        load_config("local", ["dataset.split.train=0.9"], conf_dir=REPO / "conf")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["dataset=tabular_regression", "dataset.num_classes=3"], "num_classes is for classification"),
        (["dataset.num_classes=null"], "needs num_classes"),
        (["dataset=tabular_regression", "evaluate.promote_metric=accuracy"], "use auto, or rmse or mae"),
        (["evaluate.promote_metric=rmse"], "use auto, or accuracy"),
        (["infer.partition_by=[label]"], "choose from ['model_version', 'prediction']"),
        (["dataset=tabular_regression", "infer.partition_by=[prediction]"], "use model_version"),
    ],
)
def test_task_specific_settings_must_fit_the_task(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_config("local", overrides, conf_dir=REPO / "conf")


def test_regression_defaults():
    cfg = load_config("local", ["dataset=tabular_regression"], conf_dir=REPO / "conf")
    assert cfg.dataset.task == "regression" and cfg.promote_metric == "rmse"
    assert cfg.model_name == "tabular_regression-regressor"
    assert load_config("local", conf_dir=REPO / "conf").promote_metric == "accuracy"


def test_missing_required_value(tmp_path):
    (tmp_path / "base.yaml").write_text("spark: {master: 'local[1]'}\n")
    (tmp_path / "local.yaml").write_text("{}\n")
    with pytest.raises(ConfigError) as err:
        load_config("local", conf_dir=tmp_path)
    assert "missing required key 'dataset'" in str(err.value)


def test_unknown_environment_lists_known_ones():
    with pytest.raises(ConfigError, match="environment 'nope'.*cluster.*local"):
        load_config("nope", conf_dir=REPO / "conf")


def test_malformed_override():
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_override({}, "train.epochs")


def test_job_exits_nonzero_on_bad_config_before_spark_starts():
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "jobs/ingest.py", "train.epoch=3"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "unknown key 'train.epoch'" in proc.stderr
    assert "SparkContext" not in proc.stderr
    assert time.time() - started < 30  # no JVM was started
