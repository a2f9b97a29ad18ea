"""A user's own data described by YAML alone: class labels as names, missing values, real example tables."""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pytest
import yaml

from dlpipe.config import ConfigError, load_config
from dlpipe.data import features, ingest
from dlpipe.pipeline import run_pipeline
from dlpipe.storage import dataset_paths
from tests.conftest import REPO


def _conf_with(tmp_path, name: str, spec: dict):
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf, dirs_exist_ok=True)
    (conf / "datasets" / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return conf


def _spec(label: dict, feature: dict | None = None, **more) -> dict:
    return {
        "name": "mine",
        "source": {"uri": "data/raw/mine", "format": "csv"},
        "columns": [
            {"name": "id", "type": "long", "role": "key"},
            feature or {"name": "x", "type": "double"},
            {"name": "y", "role": "label", **label},
        ],
        **more,
    }


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (_spec({"type": "int"}), "an integer label needs num_classes"),
        (_spec({"type": "string", "values": ["a", "b"]}, num_classes=3), "declares 2 values; remove num_classes"),
        (_spec({"type": "string", "values": ["a", "a"]}), "2 or more distinct class names"),
        (_spec({"type": "double"}), "a classification label is a string"),
        (_spec({"type": "string"}, {"name": "x", "type": "string", "impute": "median"}), "impute: median needs"),
        (_spec({"type": "string", "missing": "impute"}), "a label column's missing value is always quarantined"),
    ],
)
def test_label_and_missing_value_declarations_are_checked_with_the_fix(tmp_path, spec, expected):
    conf = _conf_with(tmp_path, "mine", spec)
    with pytest.raises(ConfigError, match=expected):
        load_config("local", ["dataset=mine", f"project.root={tmp_path}"], conf_dir=conf)


def test_string_labels_need_no_num_classes_and_int_labels_keep_their_indices(tmp_path):
    conf = _conf_with(tmp_path, "mine", _spec({"type": "string"}))
    cfg = load_config("local", ["dataset=mine", f"project.root={tmp_path}"], conf_dir=conf)
    assert cfg.dataset.declared_classes is None  # learned from the train split
    tab = load_config("local", conf_dir=REPO / "conf")
    assert tab.dataset.declared_classes == ["0", "1", "2"]


def _write_csv(path, rows) -> None:
    path.mkdir(parents=True)
    (path / "part-0.csv").write_text("id,x,y\n" + "".join(f"{i},{x},{y}\n" for i, x, y in rows))


def test_a_class_never_seen_in_train_is_quarantined_by_preprocess_with_its_reason(spark, tmp_path):
    conf = _conf_with(tmp_path, "mine", _spec({"type": "string"}, split={"train": 0.6, "val": 0.2, "test": 0.2}))
    cfg = load_config("local", ["dataset=mine", f"project.root={tmp_path}", "spark.master=local[2]"], conf_dir=conf)
    ids = spark.range(400).withColumn("_s", features.split_column(cfg))
    split_of = {r["id"]: r["_s"] for r in ids.collect()}
    rare = [i for i in range(400) if split_of[i] != "train"][:3]  # "c" appears in val/test only
    rows = [(i, i % 7, "c" if i in rare else ("a" if i % 2 else "b")) for i in range(400)]
    _write_csv(tmp_path / "data" / "raw" / "mine", rows)
    ingest.run(spark, cfg)
    m = features.run(spark, cfg)
    stats = features.read_stats(spark, cfg)
    assert stats.class_names == ["a", "b"] and stats.num_classes == 2
    assert m["rows_quarantined"] == 3 and m["rows_in"] == 400
    assert m["rows_train"] + m["rows_val"] + m["rows_test"] == 397
    paths = dataset_paths(cfg)
    q = spark.read.parquet(f"{paths.petastorm}/{features.QUARANTINE}").toPandas()
    assert sorted(q["id"]) == rare and set(q["reason_code"]) == {"label_value"}
    assert q["reason"].iloc[0] == "label is not a class learned from the train split ['a', 'b']: c"
    labels = spark.read.parquet(paths.split("val")).select("label").toPandas()["label"]
    assert set(labels) <= {0, 1}


@pytest.fixture(scope="module")
def penguins(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("penguins")
    # the tree baseline and int8 stay on (checked below); the ONNX variant is test_compress.py's
    overrides = ["dataset=penguins", f"project.root={root}", "spark.master=local[2]", "train.epochs=40"]
    overrides.append("compress.onnx=false")
    cfg = load_config("local", [*overrides, "train.batch_size=32", "train.model.hidden=[32]"], conf_dir=REPO / "conf")
    return cfg, run_pipeline(spark, cfg)


@pytest.mark.slow
def test_penguins_run_end_to_end_from_their_yaml_with_species_names_and_missing_values(spark, penguins):
    cfg, result = penguins
    ing, pre, ev = (result.metrics[s] for s in ("ingest", "preprocess", "evaluate"))
    # palmerpenguins ships 344 rows: 2 with every measurement NA, 11 without sex; nothing is quarantined
    assert (ing["rows_in"], ing["rows_kept"], ing["rows_quarantined"]) == (344, 344, 0)
    assert pre["imputed_share_bill_length_mm"] == pytest.approx(2 / 344)
    assert pre["imputed_share_sex"] == pytest.approx(11 / 344)
    stats = features.read_stats(spark, cfg)
    assert stats.class_names == ["Adelie", "Chinstrap", "Gentoo"]
    assert "bill_length_mm_missing" in stats.feature_names
    assert ev["accuracy"] > 0.9 and ev["accuracy"] > ev["majority_baseline_accuracy"] + 0.3
    assert {"f1_Adelie", "f1_Chinstrap", "f1_Gentoo"} <= set(ev)
    # the share imputed reaches MLflow with the preprocess run
    mlflow.set_tracking_uri(result.tracking_uri)
    assert mlflow.get_run(result.run_id).data.metrics["preprocess.imputed_share_sex"] == pytest.approx(11 / 344)
    # the confusion matrix is logged with the class names
    client = mlflow.MlflowClient()
    eval_runs = client.search_runs(
        [mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
        "tags.dlpipe.stage = 'evaluate'",
    )
    cm = mlflow.artifacts.load_dict(f"runs:/{eval_runs[0].info.run_id}/confusion_matrix.json")
    assert cm["labels"] == ["Adelie", "Chinstrap", "Gentoo"] and np.asarray(cm["matrix"]).sum() == ev["test_rows"]


@pytest.mark.slow
def test_a_missing_value_becomes_the_train_fill_and_the_indicator_says_so(spark, penguins):
    cfg, _ = penguins
    stats = features.read_stats(spark, cfg)
    names = stats.feature_names
    paths = dataset_paths(cfg)
    rows = spark.read.parquet(*(paths.split(s) for s in features.SPLITS)).where("id = 4").collect()  # all NA
    x = np.asarray(rows[0]["features"], dtype=np.float32)
    depth = stats.feature("bill_depth_mm")
    assert x[names.index("bill_depth_mm")] == pytest.approx((depth.fill - depth.mean) / depth.std, abs=1e-5)
    assert x[names.index("bill_length_mm_missing")] == 1.0
    assert x[names.index(f"sex={stats.feature('sex').fill}")] == 1.0
    full = spark.read.parquet(*(paths.split(s) for s in features.SPLITS)).where("id = 1").collect()
    assert np.asarray(full[0]["features"])[names.index("bill_length_mm_missing")] == 0.0


def test_the_breast_cancer_example_keeps_its_declared_class_order(spark, tmp_path):
    from dlpipe.data.generate import generate

    cfg = load_config(
        "local", ["dataset=breast_cancer", f"project.root={tmp_path}", "spark.master=local[2]"], conf_dir=REPO / "conf"
    )
    manifest = generate(cfg, dataset_paths(cfg).raw)
    assert manifest["rows_written"] == 569
    assert ingest.run(spark, cfg)["rows_kept"] == 569
    features.run(spark, cfg)
    stats = features.read_stats(spark, cfg)
    assert stats.class_names == ["benign", "malignant"]  # as declared in values:, not sorted or learned
    train = spark.read.parquet(dataset_paths(cfg).split("train")).groupBy("label").count().collect()
    assert {r["label"]: r["count"] for r in train} == dict(enumerate(stats.class_counts_train))
    assert stats.class_counts_train[0] > stats.class_counts_train[1]  # 357 benign, 212 malignant in all


def _raw_penguins(cfg):
    """The raw file's rows as pandas reads a CSV (NA -> NaN), the label left out."""
    import pandas as pd

    return pd.read_csv(dataset_paths(cfg).raw.removeprefix("file://") + "/penguins.csv")


@pytest.mark.slow
def test_the_registered_model_answers_raw_records_like_the_batch_job(spark, penguins, tmp_path):
    """One set of raw rows (with NA values and strings) through the batch infer job on new data, the loaded
    pyfunc, mlflow.pyfunc.spark_udf and the REST server: the same classes and probabilities."""
    from dlpipe.ops.processes import pid_alive
    from dlpipe.pipeline import run_stage
    from dlpipe.serve.serving import ModelServer

    cfg, result = penguins
    mlflow.set_tracking_uri(result.tracking_uri)
    raw = _raw_penguins(cfg)
    names = [c.name for c in cfg.dataset.features]
    src = tmp_path / "new"
    src.mkdir()
    raw.drop(columns=["species"]).to_csv(src / "new.csv", index=False, na_rep="NA")
    new_cfg = cfg.model_copy(deep=True)
    new_cfg.infer.source = str(src)
    m = run_stage(spark, new_cfg, "infer", force=True)
    assert m["rows_scored"] == len(raw) and m["rows_quarantined"] == 0
    batch = spark.read.parquet(dataset_paths(new_cfg).infer_output).toPandas().set_index("id").loc[raw["id"]]
    assert (batch["predicted_class"] == raw["species"].to_numpy()).mean() > 0.9
    uri = f"models:/{cfg.model_name}@candidate"
    model = mlflow.pyfunc.load_model(uri)
    assert [c.name for c in model.metadata.get_input_schema().inputs] == names  # the raw columns, as declared
    assert model.metadata.metadata["classes"] == ["Adelie", "Chinstrap", "Gentoo"]
    local = model.predict(raw[names])
    assert list(local["predicted_class"]) == list(batch["predicted_class"])
    assert list(local["prediction"]) == list(batch["prediction"])
    np.testing.assert_allclose(np.stack(local["probabilities"]), np.stack(batch["probabilities"]), atol=1e-5)
    result_type = "prediction int, predicted_class string, probabilities array<float>"
    udf = mlflow.pyfunc.spark_udf(spark, uri, result_type=result_type, env_manager="local")
    cols = raw[["id", *names]]
    frame = spark.createDataFrame(
        cols.astype(object).where(cols.notna(), None),
        "id long, "
        + ", ".join(f"{c.name} {'string' if c.type == 'string' else 'double'}" for c in cfg.dataset.features),
    )
    from_udf = frame.select("id", udf(*names).alias("p")).select("id", "p.*").toPandas().set_index("id")
    assert list(from_udf.loc[raw["id"], "predicted_class"]) == list(batch["predicted_class"])
    server = ModelServer(uri, result.tracking_uri, tmp_path / "serve.log")
    with server:
        served = server.predict(raw[names].head(40))
        bad = raw[names].head(4).copy()
        bad.loc[1, "sex"] = "unknown"  # sex declares its values; island's are learned (unknown: all zeros)
        bad.loc[2, "body_mass_g"] = -5.0
        bad.loc[3, "island"] = None

        def send(frame):
            return server.invoke({"dataframe_split": json.loads(frame.to_json(orient="split", index=False))})

        status, answer = send(bad)
        untyped = bad.astype(object)
        untyped.loc[0, "body_mass_g"] = "heavy"
        type_status, type_answer = send(untyped)
    assert not pid_alive(server.proc.pid)
    assert list(served["predicted_class"]) == list(batch["predicted_class"].head(40))
    assert status == 400, answer
    assert "3 of 4 records cannot be scored" in answer["message"]
    assert "record 1: not an allowed value of sex: unknown" in answer["message"]
    assert "record 2: out of range [0.0, None]: body_mass_g=-5.0" in answer["message"]
    assert "record 3: missing value: island" in answer["message"]
    # a value of the wrong type is refused by the signature before the model sees it: 400, naming the column
    assert type_status == 400 and "body_mass_g" in type_answer["message"], type_answer


def _answers(penguins, alias: str):
    """The raw penguins' answers from the registered model under alias, loaded as a user loads it."""
    cfg, result = penguins
    mlflow.set_tracking_uri(result.tracking_uri)
    raw = _raw_penguins(cfg)
    return mlflow.pyfunc.load_model(f"models:/{cfg.model_name}@{alias}").predict(
        raw[[c.name for c in cfg.dataset.features]]
    )


@pytest.mark.slow
def test_the_int8_variant_takes_raw_records_too(penguins):
    _, result = penguins
    assert result.metrics["train"].get("int8_registered") == 1.0, "the int8 gate refused the penguins model"
    int8, fp32 = _answers(penguins, "candidate-int8"), _answers(penguins, "candidate")
    assert set(int8["predicted_class"]) <= {"Adelie", "Chinstrap", "Gentoo"}
    assert (int8["predicted_class"] == fp32["predicted_class"]).mean() > 0.97


@pytest.mark.slow
def test_the_tree_baseline_answers_raw_penguin_records_by_species(penguins):
    """The tree baseline (on by default) learns the penguins too, and its registered version, like the
    network's, takes raw records with missing values and answers species by name."""
    ev = penguins[1].metrics["evaluate"]
    assert ev["baseline_accuracy"] > 0.9, ev
    tree, fp32 = _answers(penguins, "baseline"), _answers(penguins, "candidate")
    assert set(tree["predicted_class"]) <= {"Adelie", "Chinstrap", "Gentoo"}
    assert (tree["predicted_class"] == fp32["predicted_class"]).mean() > 0.9


def test_a_numeric_most_frequent_fill_is_the_train_splits_commonest_value(spark, tmp_path):
    """most_frequent on numbers comes from a bounded top-1 query (not an in-memory count of every value)."""
    feature = {"name": "x", "type": "double", "missing": "impute", "impute": "most_frequent"}
    conf = _conf_with(tmp_path, "mine", _spec({"type": "string", "values": ["a", "b"]}, feature))
    cfg = load_config("local", ["dataset=mine", f"project.root={tmp_path}", "spark.master=local[2]"], conf_dir=conf)
    ids = spark.range(300).withColumn("_s", features.split_column(cfg)).collect()
    train = [r["id"] for r in ids if r["_s"] == "train"]
    common = set(train[:40])  # 40 train rows hold 2.5; every other row a value of its own, or nothing
    rows = [(i, 2.5 if i in common else ("" if i % 10 == 0 else i + 0.25), "a" if i % 2 else "b") for i in range(300)]
    _write_csv(tmp_path / "data" / "raw" / "mine", rows)
    ingest.run(spark, cfg)
    features.run(spark, cfg)
    (x,) = features.read_stats(spark, cfg).features
    assert x.fill == 2.5 and x.missing_share_train > 0
