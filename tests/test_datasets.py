"""The data layer on local storage: image and tabular datasets, every source format, every quarantine
reason, the bad-row limit, fingerprints and skipping, a killed stage, and a new dataset by YAML alone."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dlpipe import tracking
from dlpipe.config import load_config
from dlpipe.data import features, ingest
from dlpipe.data.generate import generate
from dlpipe.data.ingest import BadDataError, SchemaMismatchError
from dlpipe.pipeline import run_pipeline, run_stage
from dlpipe.storage import dataset_paths, local_path, storage_settings
from dlpipe.train.loader import ShardLoader
from tests.conftest import REPO, cfg_overrides, kill_once_it_writes, make_cfg


def _with_source(cfg, **source):
    ds = cfg.dataset.model_copy(update={"source": cfg.dataset.source.model_copy(update=source)})
    return cfg.model_copy(update={"dataset": ds})


def test_image_dataset_decodes_quarantines_and_becomes_tensors(spark, tmp_path):
    cfg = make_cfg(tmp_path, dataset="digits_images", rows=300)
    gen = generate(cfg, dataset_paths(cfg).raw)
    assert sum(gen["malformed"].values()) == gen["malformed_total"] == 6
    m = ingest.run(spark, cfg)
    assert m["rows_in"] == 300 and m["rows_kept"] == gen["valid_rows"] == 294
    assert m["quarantined_image"] == gen["malformed"]["corrupt_file"] + gen["malformed"]["wrong_shape"]
    assert m["quarantined_missing"] == gen["malformed"]["unlabeled"]
    reasons = {r.reason for r in spark.read.parquet(dataset_paths(cfg).quarantine).collect()}
    assert any(r.startswith("not a decodable image") for r in reasons)
    assert "image shape 9x9 is not the declared 8x8" in reasons and "missing value: label" in reasons

    p = features.run(spark, cfg)
    assert p["rows_train"] + p["rows_val"] + p["rows_test"] == 294
    stats = features.read_stats(spark, cfg)
    assert stats.feature_shape == (1, 8, 8) and stats.num_classes == 10 and stats.is_image
    from petastorm import make_reader

    with make_reader(dataset_paths(cfg).split("train"), reader_pool_type="dummy", num_epochs=1) as reader:
        rows = list(reader)
    assert len(rows) == p["rows_train"]
    x = np.stack([r.features for r in rows])
    assert x.shape == (p["rows_train"], 1, 8, 8) and x.dtype == np.float32
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05  # scaled with train statistics
    assert {int(r.label) for r in rows} <= set(range(10))
    loader = ShardLoader(dataset_paths(cfg).split("train"), 0, 1, 32, (1, 8, 8), shuffle=True)
    xb, yb = next(iter(loader.epoch(1)))
    assert tuple(xb.shape[1:]) == (1, 8, 8) and 16 <= len(xb) <= 32 and not yb.dtype.is_floating_point


COLS = ["id", *[f"x{i}" for i in range(8)], "segment", "label"]


def _good(i: int) -> dict:
    return {"id": i, **{f"x{j}": round(0.1 * j - 0.3, 3) for j in range(8)}, "segment": "abcd"[i % 4], "label": i % 3}


def test_jsonl_source_quarantines_each_kind_of_bad_row(spark, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = [json.dumps(_good(i)) for i in range(100)]
    lines += [
        json.dumps({**_good(100), "x0": "abc"}),  # type
        json.dumps({**_good(101), "x1": "NaN"}),  # not finite
        json.dumps({**_good(102), "x2": 1e9}),  # range
        json.dumps({**_good(103), "segment": "z"}),  # value
        json.dumps({k: v for k, v in _good(104).items() if k != "label"}),  # missing
        json.dumps({**_good(105), "label": 7}),  # label_range
        '{"id": 106, "x0": ',  # malformed
    ]
    (raw / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    cfg = _with_source(make_cfg(tmp_path), uri=str(raw), format="jsonl", options={})
    m = ingest.run(spark, cfg)
    assert m["rows_in"] == 107 and m["rows_kept"] == 100 and m["rows_quarantined"] == 7
    for code in ("type", "not_finite", "range", "value", "missing", "label_range", "malformed"):
        assert m[f"quarantined_{code}"] == 1, code
    clean = spark.read.parquet(dataset_paths(cfg).clean)
    assert dict(clean.dtypes)["x0"] == "double" and clean.count() == 100


def test_parquet_source_is_checked_and_a_missing_column_named(spark, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    df = pd.DataFrame([_good(i) for i in range(60)])
    df.loc[3, "x4"] = float("inf")
    df.loc[4, "x5"] = -99.0
    df["label"] = df["label"].astype("float")
    df.loc[5, "label"] = None
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), raw / "part-0.parquet")
    cfg = _with_source(make_cfg(tmp_path), uri=str(raw), format="parquet", options={})
    m = ingest.run(spark, cfg)
    assert (m["rows_in"], m["rows_kept"]) == (60, 57)
    assert m["quarantined_not_finite"] == m["quarantined_range"] == m["quarantined_missing"] == 1

    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(pa.Table.from_pandas(df.drop(columns=["segment"]), preserve_index=False), other / "p.parquet")
    with pytest.raises(SchemaMismatchError, match=r"(?s)other.*segment"):
        ingest.run(spark, _with_source(cfg, uri=str(other)))


def test_too_many_bad_rows_fail_with_a_clear_message_and_write_nothing(spark, tmp_path):
    cfg = make_cfg(tmp_path, "dataset.generator.malformed_fraction=0.3", rows=400)
    generate(cfg, dataset_paths(cfg).raw)
    with pytest.raises(BadDataError, match=r"120 of 400 rows \(30.0%\).*max_bad_fraction=0.1") as err:
        ingest.run(spark, cfg)
    assert "Nothing was written" in str(err.value)
    warehouse = local_path(dataset_paths(cfg).clean).parent
    assert not warehouse.exists() or not any(warehouse.iterdir())
    m = ingest.run(
        spark, make_cfg(tmp_path, "dataset.generator.malformed_fraction=0.3", "dataset.max_bad_fraction=0.5", rows=400)
    )
    assert m["rows_quarantined"] == 120


def test_empty_input_and_missing_path_name_the_path(spark, tmp_path):
    raw = tmp_path / "empty"
    raw.mkdir()
    (raw / "a.csv").write_text(",".join(COLS) + "\n")
    with pytest.raises(ValueError, match=f"no rows in .*{raw}"):
        ingest.run(spark, _with_source(make_cfg(tmp_path), uri=str(raw)))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        features.run(spark, _with_source(make_cfg(tmp_path / "nowhere"), uri=str(raw)))


def test_unchanged_stages_are_skipped_and_changes_or_force_redo_them(spark, tmp_path):
    cfg = make_cfg(tmp_path, rows=600)
    paths = dataset_paths(cfg)
    generate(cfg, paths.raw)
    first = ingest.run(spark, cfg)
    again = ingest.run(spark, cfg)
    assert (first["skipped"], again["skipped"]) == (0, 1)
    assert {k: v for k, v in again.items() if k != "skipped"} == {k: v for k, v in first.items() if k != "skipped"}
    assert ingest.run(spark, cfg, force=True)["skipped"] == 0
    assert ingest.run(spark, make_cfg(tmp_path, "dataset.max_bad_fraction=0.2", rows=600))["skipped"] == 0
    p1 = features.run(spark, cfg)
    assert p1["skipped"] == 0 and features.run(spark, cfg)["skipped"] == 1
    assert features.run(spark, make_cfg(tmp_path, "preprocess.row_group_size_mb=4", rows=600))["skipped"] == 0
    # new raw data -> new ingest fingerprint -> preprocess must redo too
    part = next(local_path(paths.raw).glob("part-*.csv"))
    part.write_text(part.read_text() + "99999,0,0,0,0,0,0,0,0,a,1\n")
    assert ingest.run(spark, cfg)["rows_in"] == first["rows_in"] + 1
    p2 = features.run(spark, cfg)
    assert p2["skipped"] == 0 and p2["rows_in"] == p1["rows_in"] + 1
    meta = json.loads((local_path(paths.petastorm) / "_dlpipe_meta.json").read_text())
    assert meta["stage"] == "preprocess" and paths.clean in meta["inputs"]


@pytest.mark.slow
def test_killed_preprocess_leaves_no_partial_dataset_and_a_rerun_is_correct(spark, tmp_path):
    overrides = cfg_overrides(tmp_path, rows=20000)
    cfg = make_cfg(tmp_path, rows=20000)
    paths = dataset_paths(cfg)
    generate(cfg, paths.raw)
    kept = ingest.run(spark, cfg)["rows_kept"]
    warehouse = local_path(paths.petastorm).parent
    kill_once_it_writes(
        [sys.executable, "jobs/preprocess.py", *overrides], warehouse, "petastorm.tmp-*/train/*.parquet", timeout=180
    )
    assert not (warehouse / "petastorm").exists(), "a killed preprocess left a dataset under the final name"
    assert list(warehouse.glob("petastorm.tmp-*")), "expected the killed run's temporary folder"

    m = features.run(spark, cfg)
    assert m["skipped"] == 0 and m["rows_train"] + m["rows_val"] + m["rows_test"] == kept
    assert not list(warehouse.glob("petastorm.tmp-*")), "the rerun did not clear the stale temporary folder"
    assert spark.read.parquet(paths.split("train")).count() == m["rows_train"]


@pytest.mark.slow
def test_a_new_csv_dataset_runs_end_to_end_from_a_yaml_file_alone(spark, tmp_path):
    from sklearn.datasets import load_breast_cancer

    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    data = load_breast_cancer()
    raw = tmp_path / "raw" / "bc"
    raw.mkdir(parents=True)
    names = [f"f{i}" for i in range(data.data.shape[1])]
    frame = pd.DataFrame(data.data, columns=names)
    frame.insert(0, "sample_id", np.arange(len(frame)))
    frame["diagnosis"] = data.target_names[data.target]  # malignant / benign, as the class names
    text = frame.to_csv(index=False)
    text += "9001,oops\n9002," + ",".join(["1.0"] * 30) + ",unsure\n"  # two broken lines
    (raw / "bc.csv").write_text(text)
    columns = [{"name": "sample_id", "type": "long", "role": "key"}]
    columns += [{"name": n, "type": "double", "min": 0} for n in names]
    columns += [{"name": "diagnosis", "type": "string", "role": "label", "values": ["benign", "malignant"]}]
    spec = {
        "name": "breast_cancer",
        "source": {"uri": str(raw), "format": "csv"},
        "columns": columns,
        "split": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 1},
    }
    import yaml

    (conf / "datasets" / "breast_cancer.yaml").write_text(yaml.safe_dump(spec))
    cfg = load_config(
        "local",
        [
            "dataset=breast_cancer",
            f"project.root={tmp_path}",
            "train.epochs=15",
            "train.batch_size=32",
            "compress.onnx=false",  # test_compress.py's, and the int8 variant test_stages.py's; the tree
            "quantize.enabled=false",  # baseline stays on (checked below)
        ],
        conf_dir=conf,
    )
    result = run_pipeline(spark, cfg)
    assert "generate" not in result.metrics
    ing, ev = result.metrics["ingest"], result.metrics["evaluate"]
    assert (ing["rows_in"], ing["rows_kept"], ing["rows_quarantined"]) == (571, 569, 2)
    assert (ing["quarantined_malformed"], ing["quarantined_label_value"]) == (1, 1)
    assert ev["test_rows_without_prediction"] == 0
    assert ev["accuracy"] > 0.85 and ev["accuracy"] > ev["majority_baseline_accuracy"] + 0.2
    assert {"f1_benign", "f1_malignant"} <= set(ev)
    # the tree baseline (on by default) on a binary task: a booster with one output, widened to both classes
    assert ev["baseline_accuracy"] > 0.85 and {"baseline_auc", "baseline_log_loss", "beats_baseline"} <= set(ev)
    # predictions carry the class by name, in the declared order, with a probability per named class
    paths = dataset_paths(cfg)
    preds = spark.read.parquet(paths.predictions).toPandas()
    names = np.array(["benign", "malignant"])
    assert (preds["predicted_class"] == names[preds["prediction"]]).all()
    for by_name, probs in zip(preds["class_probabilities"], preds["probabilities"], strict=True):
        assert [dict(by_name)[n] for n in names] == list(probs)
    truth = dict(zip(frame["sample_id"], frame["diagnosis"], strict=True))
    assert (names[preds["label"]] == preds["sample_id"].map(truth)).all()  # the index means the class named
    quarantine = spark.read.parquet(paths.quarantine).toPandas().set_index("sample_id")
    assert quarantine.loc[9002, "reason"] == "label is not a declared class of diagnosis: unsure"


def test_credentials_come_from_env_or_file_and_are_never_logged(spark, tmp_path, monkeypatch, caplog):
    secret = "s3cr3t-do-not-log-7f3a"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    cfg = make_cfg(tmp_path, "storage.s3.endpoint=http://127.0.0.1:9", "storage.s3.path_style_access=true", rows=300)
    settings = storage_settings(cfg)
    assert settings.secret_key == secret and secret not in repr(settings)
    # our own and MLflow's logs at their most verbose (py4j's DEBUG trace echoes every JVM call, values and
    # all; the CLI keeps py4j at WARNING)
    caplog.set_level("DEBUG", logger="dlpipe")
    caplog.set_level("DEBUG", logger="mlflow")
    with tracking.pipeline_run(cfg) as parent:
        for stage in ("generate", "ingest"):
            run_stage(spark, cfg, stage)
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    runs = client.search_runs([parent.info.experiment_id])
    assert len(runs) == 3
    for run in runs:
        assert not any(secret in str(v) for v in run.data.params.values())
        assert not any(secret in str(v) for v in run.data.tags.values())
    assert secret not in caplog.text
    assert spark.sparkContext._jsc.hadoopConfiguration().get("fs.s3a.secret.key") == secret  # reached Spark

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "credentials.yaml").write_text("s3: {access_key: FILEKEY, secret_key: filesecret}\n")
    from_file = storage_settings(cfg)
    assert (from_file.access_key, from_file.secret_key) == ("FILEKEY", "filesecret")
    assert "conf/credentials.yaml" in (REPO / ".gitignore").read_text()


def test_names_and_values_reach_spark_sql_intact(spark):
    """ingest builds its checks as Spark SQL text: quotes, backslashes and backticks survive it."""
    from dlpipe.data.ingest import q, sql_str

    for text in ["plain", "it's", 'say "hi"', "back\\slash", "tick`s", "new\nline", "%_*"]:
        row = spark.sql(f"SELECT {sql_str(text)} AS {q(text)}").first()
        assert row[0] == text and row.__fields__ == [text]
