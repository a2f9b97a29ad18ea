"""Configuration: layering, overrides, and errors that name the key, the value and what is allowed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
import yaml

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


def _cli(kind: str):
    from dlpipe import cli
    from dlpipe.__main__ import _parser

    return _parser() if kind == "python -m dlpipe" else cli.parser("jobs/train.py", "a job")


@pytest.mark.parametrize(
    "kind,argv,force,overrides",
    [
        ("python -m dlpipe", ["stage", "train", "--force", "train.epochs=2"], True, ["train.epochs=2"]),
        ("python -m dlpipe", ["stage", "train", "a.b=1", "--force", "a.b=2"], True, ["a.b=1", "a.b=2"]),
        ("python -m dlpipe", ["run", "a.b=1", "--to", "train", "c.d=2"], False, ["a.b=1", "c.d=2"]),
        ("python -m dlpipe", ["submit", "--master", "local[1]", "train", "--force", "a.b=1"], True, ["a.b=1"]),
        ("a job", ["a.b=1", "--force", "a.b=2", "--env", "local", "c.d=3"], True, ["a.b=1", "a.b=2", "c.d=3"]),
    ],
)
def test_overrides_come_before_between_or_after_the_options_in_their_order(kind, argv, force, overrides):
    from dlpipe.cli import parse

    args = parse(_cli(kind), argv)
    assert (args.force, args.overrides) == (force, overrides)  # in order: the later a.b wins


@pytest.mark.parametrize(
    "argv,stray",
    [(["stage", "train", "--forse", "a.b=1"], "--forse"), (["stage", "train", "--force", "trian"], "trian")],
)
def test_an_unknown_option_or_a_word_that_is_no_override_is_still_refused(argv, stray, capsys):
    from dlpipe.cli import parse

    with pytest.raises(SystemExit) as exc:
        parse(_cli("python -m dlpipe"), argv)
    assert exc.value.code == 2
    assert f"error: unrecognized arguments: {stray}\n" in capsys.readouterr().err


def _with_feature(tmp_path, feature: dict, key: dict | None = None):
    """load_config of a dataset with one feature column as given (and optionally its key column)."""
    import shutil

    import yaml

    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf, dirs_exist_ok=True)
    spec = {
        "name": "mine",
        "source": {"uri": "data/raw/mine", "format": "csv"},
        "num_classes": 2,
        "columns": [
            key or {"name": "id", "type": "long", "role": "key"},
            feature,
            {"name": "y", "type": "int", "role": "label"},
        ],
    }
    (conf / "datasets" / "mine.yaml").write_text(yaml.safe_dump(spec))
    return load_config("local", ["dataset=mine", f"project.root={tmp_path}"], conf_dir=conf)


@pytest.mark.parametrize(
    ("feature", "expected"),
    [
        ({"name": "c", "type": "string", "top_k": 5, "values": ["a"]}, "column 'c': top_k learns the vocabulary"),
        ({"name": "c", "type": "double", "top_k": 5}, "column 'c': top_k is for one-hot string features"),
        ({"name": "c", "type": "string", "top_k": 0}, "greater than or equal to 1"),
        ({"name": "c", "type": "string", "transform": "hash"}, "column 'c': transform: hash needs buckets"),
        ({"name": "c", "type": "string", "buckets": 8}, "column 'c': buckets is for transform: hash"),
        ({"name": "c", "type": "long", "transform": "hash", "buckets": 8}, "hash is for string columns"),
        ({"name": "d", "type": "double", "format": "dd/MM/yyyy"}, "column 'd': format is for type: date"),
        ({"name": "d", "type": "date", "format": "dd/MMM/yyyy"}, "'MMM' is not supported; use yyyy"),
        ({"name": "d", "type": "date", "format": "dd/MM/yy"}, "'yy' is not supported"),
        ({"name": "d", "type": "date", "format": "'day'"}, "has no date or time fields"),
        ({"name": "d", "type": "date", "transform": "standardize"}, "column 'd': a date column becomes"),
        ({"name": "b", "type": "boolean", "transform": "onehot"}, "column 'b': a boolean column becomes one 0/1"),
        ({"name": "b", "type": "boolean", "min": 0}, "min/max are for numbers"),
        ({"name": "b", "type": "boolean", "impute": "mean"}, "is a boolean: impute: mean needs numbers"),
    ],
)
def test_feature_type_options_are_checked_with_the_column_and_the_fix(tmp_path, feature, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        _with_feature(tmp_path, feature)


def test_a_key_is_a_number_or_text_and_the_new_types_have_their_defaults(tmp_path):
    with pytest.raises(ConfigError, match="key column 'id' is date"):
        _with_feature(tmp_path, {"name": "x", "type": "double"}, key={"name": "id", "type": "date", "role": "key"})
    cfg = _with_feature(tmp_path, {"name": "b", "type": "boolean", "missing": "impute"})
    b = cfg.dataset.features[0]
    assert (b.effective_transform, b.impute_with, b.datetime_format) == ("none", "most_frequent", None)
    d = _with_feature(tmp_path, {"name": "d", "type": "timestamp"}).dataset.features[0]
    assert (d.effective_transform, d.datetime_format) == ("date", "yyyy-MM-dd HH:mm:ss")
    f = _with_feature(tmp_path, {"name": "d", "type": "date", "format": "d.M.yyyy"}).dataset.features[0]
    assert f.datetime_format == "d.M.yyyy"


def test_a_dataset_file_that_is_not_yaml_is_named_with_its_line(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "datasets" / "broken.yaml").write_text("name: broken\nsource: {uri: x, format: csv\ncolumns: []\n")
    with pytest.raises(ConfigError) as err:
        load_config("local", ["dataset=broken"], conf_dir=conf)
    message = str(err.value)
    assert str(conf / "datasets" / "broken.yaml") in message and "line 3" in message, message


def test_a_misspelt_key_in_a_dataset_file_names_that_file(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    spec = yaml.safe_load((conf / "datasets" / "tabular_example.yaml").read_text())
    spec["max_bad_fractoin"] = 0.2
    (conf / "datasets" / "typo.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as err:
        load_config("local", ["dataset=typo"], conf_dir=conf)
    message = str(err.value)
    assert f"unknown key 'dataset.max_bad_fractoin' in {conf / 'datasets' / 'typo.yaml'}" in message, message
    assert "conf/local.yaml" not in message.split("\n", 1)[1], message  # the fix is in the dataset file


# base.yaml documents every setting beside its comment; the model (dlpipe/config.py) is where each default
# is defined. The two must not drift apart: a value in base.yaml is the model's default, except where the
# model has none to give (the dataset is chosen there; spark.conf's entries are defined only there).
_DEFINED_ONLY_IN_BASE = {"dataset", "spark.conf"}


def _disagreements(model: type, layer: dict, prefix: str = "") -> list[str]:
    from pydantic import BaseModel

    found = []
    for key, value in layer.items():
        path = prefix + key
        field = model.model_fields.get(key)
        assert field is not None, f"conf/base.yaml: {path} is not a setting of {model.__name__}"
        if path in _DEFINED_ONLY_IN_BASE:
            continue
        if isinstance(value, dict) and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found += _disagreements(field.annotation, value, path + ".")
            continue
        default = field.get_default(call_default_factory=True)
        if default != value:
            found.append(f"{path}: base.yaml {value!r}, dlpipe/config.py {default!r}")
    return found


def test_base_yaml_holds_the_models_defaults_and_nothing_else():
    from dlpipe.config import Config

    base = yaml.safe_load((REPO / "conf" / "base.yaml").read_text())
    assert _disagreements(Config, base) == []
    # the check does catch a drift
    epochs = load_config("local", conf_dir=REPO / "conf").train.epochs
    drift = {"train": {"epochs": epochs + 1}}
    assert _disagreements(Config, drift) == [f"train.epochs: base.yaml {epochs + 1}, dlpipe/config.py {epochs}"]
