"""One test per stage on tiny data, each stage fed by the real outputs of the stages before it."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest

from dlpipe import tracking
from dlpipe.data import features, ingest
from dlpipe.data.generate import MALFORMED_KINDS, generate
from dlpipe.data.ingest import SchemaMismatchError
from dlpipe.model import evaluate
from dlpipe.serve import infer
from dlpipe.storage import configure_spark_storage, dataset_paths, local_path
from dlpipe.train import stage as train_stage
from tests.conftest import cfg_overrides, kill_once_it_writes, make_cfg, quantized_layers

# ingest reason code <- the generator's kind of malformed line
CODE_OF_KIND = {
    "wrong_field_count": "malformed",
    "bad_number": "type",
    "missing_label": "missing",
    "bad_label": "label_range",
}


def _in_run(cfg, name, fn, spark):
    with tracking.pipeline_run(cfg, f"test-{name}"), tracking.stage_run(cfg, name):
        return fn(spark, cfg)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="module")
def cfg(root):
    return make_cfg(root, "quantize.enabled=true")  # the int8 variant has its test here


@pytest.fixture(scope="module")
def generated(cfg):
    return generate(cfg, dataset_paths(cfg).raw)


@pytest.fixture(scope="module")
def ingested(spark, cfg, generated):
    return ingest.run(spark, cfg)


@pytest.fixture(scope="module")
def preprocessed(spark, cfg, ingested):
    return features.run(spark, cfg)


@pytest.fixture(scope="module")
def trained(spark, cfg, preprocessed):
    return _in_run(cfg, "train", train_stage.run, spark)


@pytest.fixture(scope="module")
def inferred(spark, cfg, trained):
    return _in_run(cfg, "infer", infer.run, spark)


def test_generate_writes_known_malformed_lines(cfg, generated):
    raw = local_path(dataset_paths(cfg).raw)
    lines = sum(len(p.read_text().splitlines()) - 1 for p in raw.glob("part-*.csv"))
    assert lines == generated["rows_written"] == 1500
    assert generated["malformed_total"] == round(1500 * 0.03) == sum(generated["malformed"].values())
    assert set(generated["malformed"]) == set(MALFORMED_KINDS)
    assert 0.9 < generated["bayes_accuracy"] < 1
    again = generate(cfg, dataset_paths(cfg).raw)
    assert again["skipped"] and again["malformed"] == generated["malformed"]


def test_ingest_quarantines_every_malformed_line_with_its_reason(spark, cfg, generated, ingested):
    assert ingested["rows_in"] == generated["rows_written"]
    assert ingested["rows_kept"] == generated["valid_rows"]
    assert ingested["rows_in"] == ingested["rows_kept"] + ingested["rows_quarantined"]
    for kind, n in generated["malformed"].items():
        assert ingested[f"quarantined_{CODE_OF_KIND[kind]}"] == n, kind
    q = spark.read.parquet(dataset_paths(cfg).quarantine)
    assert q.where("reason is null or raw_line is null or source_file is null").count() == 0
    clean = spark.read.parquet(dataset_paths(cfg).clean)
    assert dict(clean.dtypes)["x0"] == "double" and dict(clean.dtypes)["label"] == "int"
    assert clean.where("label < 0 or label > 2 or x0 is null").count() == 0


def test_ingest_missing_path_and_wrong_header_fail_clearly(spark, cfg, tmp_path):
    missing = cfg.model_copy(
        update={
            "dataset": cfg.dataset.model_copy(
                update={"source": cfg.dataset.source.model_copy(update={"uri": str(tmp_path / "nope")})}
            )
        }
    )
    with pytest.raises(FileNotFoundError, match="nope"):
        ingest.run(spark, missing)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.csv").write_text("id,x0,x1,x2,x3,x4,x5,x6,x7,segment,target\n1,0,0,0,0,0,0,0,0,a,1\n")
    # a project of its own: its clean and quarantine folders are where a wrong ingest would write
    wrong = make_cfg(tmp_path / "wrong", f"dataset.source.uri={bad.as_uri()}")
    with pytest.raises(SchemaMismatchError, match=r"no file has the column\(s\) \['label'\].*'target'"):
        ingest.run(spark, wrong)
    folder = local_path(dataset_paths(wrong).clean).parent  # clean, quarantine and their temporary folders
    assert not folder.exists() or list(folder.iterdir()) == [], "a failed ingest wrote into the warehouse"


def test_preprocess_splits_deterministically_with_train_only_stats(spark, cfg, ingested, preprocessed):
    assert preprocessed["rows_in"] == ingested["rows_kept"]
    assert sum(preprocessed[f"rows_{s}"] for s in features.SPLITS) == ingested["rows_kept"]
    assert 0.6 < preprocessed["rows_train"] / preprocessed["rows_in"] < 0.8
    assert preprocessed["feature_dim"] == 8 + 4  # 8 standardized numbers + one-hot of 4 segments
    paths = dataset_paths(cfg)
    stats = features.read_stats(spark, cfg)
    clean = spark.read.parquet(paths.clean).withColumn("_split", features.split_column(cfg))
    train_mean = clean.where("_split = 'train'").agg({"x0": "avg"}).first()[0]
    all_mean = clean.agg({"x0": "avg"}).first()[0]
    assert stats.feature("x0").mean == pytest.approx(train_mean) and train_mean != pytest.approx(all_mean, abs=1e-9)
    # the split of a key is a pure function of the key: same ids on a second computation
    test_ids = {r[0] for r in spark.read.parquet(paths.split("test")).select("id").collect()}
    again = {r[0] for r in clean.where("_split = 'test'").select("id").collect()}
    assert test_ids == again
    from petastorm import make_reader

    with make_reader(paths.split("val"), reader_pool_type="dummy", num_epochs=1) as reader:
        rows = list(reader)
    assert len(rows) == preprocessed["rows_val"]
    assert rows[0].features.shape == (12,) and rows[0].features.dtype == np.float32


def test_train_registers_a_candidate_model(cfg, trained):
    assert trained["ranks"] == 2
    assert trained["final_val_accuracy"] > 0.6
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    mv = client.get_model_version_by_alias(cfg.model_name, "candidate")
    assert int(mv.version) == trained["model_version"]
    run = client.get_run(mv.run_id)
    assert run.data.tags["dlpipe.stage"] == "train"
    history = client.get_metric_history(mv.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2, 3]


def test_infer_scores_every_test_row(spark, cfg, preprocessed, inferred):
    assert inferred["rows_scored"] == inferred["rows_in"] == preprocessed["rows_test"]
    preds = spark.read.parquet(dataset_paths(cfg).predictions)
    row = preds.first()
    assert len(row.probabilities) == 3 and abs(sum(row.probabilities) - 1) < 1e-4
    assert row.prediction == int(np.argmax(row.probabilities))
    assert row.model_name == cfg.model_name and row.model_version == 1
    out = local_path(dataset_paths(cfg).predictions)
    assert [p.name for p in out.glob("model_version=*")] == ["model_version=1"]  # infer.partition_by
    # the split's files (one per preprocess task) were scored by one task, the model loaded once: one file out
    assert len(list(local_path(dataset_paths(cfg).split("test")).glob("part-*.parquet"))) == 2
    assert len(list(out.glob("model_version=1/part-*.parquet"))) == 1


def test_a_small_input_is_scored_in_as_few_tasks_as_its_bytes_need():
    assert infer.scoring_tasks(0, 4096) == infer.scoring_tasks(1, 4096) == infer.scoring_tasks(4096, 4096) == 1
    assert infer.scoring_tasks(4097, 4096) == 2
    assert infer.scoring_tasks(10 * 2**30, 4 * 2**20) == 2560  # 10 GiB: more than Spark's own split, a no-op


def test_evaluate_reports_metrics_and_coverage(spark, cfg, inferred):
    with tracking.pipeline_run(cfg, "test-evaluate"), tracking.stage_run(cfg, "evaluate") as run:
        m = evaluate.run(spark, cfg)
    assert m["test_rows_without_prediction"] == 0
    assert m["predictions"] == m["test_rows"] == inferred["rows_in"]
    labels = spark.read.parquet(dataset_paths(cfg).split("test")).groupBy("label").count().collect()
    assert m["majority_baseline_accuracy"] == pytest.approx(max(r["count"] for r in labels) / m["test_rows"])
    assert m["accuracy"] > m["majority_baseline_accuracy"]
    assert m["log_loss"] > 0
    artifacts = {a.path for a in mlflow.MlflowClient(tracking.tracking_uri(cfg)).list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "roc.png"} <= artifacts


def test_every_reader_honours_infer_output(spark, cfg, inferred, tmp_path):
    """infer.output moves the test split's predictions: infer writes there, and evaluate, the end-of-run
    summary, `status` and the notebook helpers read there. The default folder is moved away meanwhile, so a
    reader that still looked there would fail."""
    from dlpipe import notebook
    from dlpipe.ops import status
    from dlpipe.pipeline import run_pipeline, summary

    out = tmp_path / "elsewhere"
    ocfg = make_cfg(cfg.root, f"infer.output={out.as_uri()}", "infer.partition_by=[]")
    default = local_path(dataset_paths(cfg).predictions)
    aside = default.with_name("predictions-aside")
    default.rename(aside)
    try:
        result = run_pipeline(spark, ocfg, stages=("infer", "evaluate"))
        assert not default.exists() and out.is_dir()
        assert result.metrics["infer"]["rows_scored"] == inferred["rows_scored"]
        assert result.metrics["evaluate"]["predictions"] == inferred["rows_scored"]
        assert result.metrics["evaluate"]["test_rows_without_prediction"] == 0
        assert f"predictions: {out.as_uri()}" in summary(result).splitlines()
        [st] = status.stage_status(ocfg, ["infer"])
        assert st.output == out.as_uri() and st.committed and st.counts["rows_scored"] == inferred["rows_scored"]
        assert notebook.datasets(spark, ocfg)["predictions"].count() == inferred["rows_scored"]
    finally:
        aside.rename(default)


def test_the_pandas_udf_form_scores_exactly_like_the_arrow_scorer(spark, cfg, preprocessed, inferred):
    from udfs.score import score_column

    stats = features.read_stats(spark, cfg)
    mv = tracking.model_version_for(infer.model_uri(cfg))
    test = spark.read.parquet(dataset_paths(cfg).split("test"))
    key = stats.key
    via_udf = test.select(
        key,
        score_column(test["features"], mv.download_uri, stats.feature_shape, tracking.tracking_uri(cfg)).alias("s"),
    )
    a = {r[key]: (r["s"]["prediction"], r["s"]["probabilities"]) for r in via_udf.collect()}
    b = {
        r[key]: (r["prediction"], r["probabilities"])
        for r in spark.read.parquet(dataset_paths(cfg).predictions).collect()
    }
    assert a.keys() == b.keys() and len(a) > 0
    for k, (pred, probs) in a.items():
        assert pred == b[k][0]
        np.testing.assert_allclose(probs, b[k][1], rtol=1e-6)


def test_a_scoring_worker_loads_the_model_from_its_files_alone(cfg, trained, tmp_path):
    """What a scoring worker does with the version's artifact URI (dlpipe.serve.scoring.load_model), in a fresh
    interpreter with no tracking URI: the model loads from its files, and MLflow's tracking store is never
    opened (its SQLAlchemy module not imported, no default store made in the working folder)."""
    mv = tracking.model_version_for(infer.model_uri(cfg))
    code = (
        "import sys\nfrom dlpipe.serve.scoring import load_model\nmodel = load_model(sys.argv[1])\n"
        "print(model(__import__('torch').zeros(2, 12)).shape, 'mlflow.store.tracking.sqlalchemy_store' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    argv = [sys.executable, "-c", code, mv.download_uri]
    out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["torch.Size([2,", "3])", "False"], out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a tracking store was made in the working folder"


@pytest.mark.slow
def test_the_served_model_answers_what_the_batch_job_predicted(spark, cfg, inferred, tmp_path):
    """`mlflow models serve` on 127.0.0.1 (started here, stopped by pid) for the candidate version, fed the
    raw records of the same test rows: the same classes and probabilities as the batch predictions."""
    from dlpipe.ops.processes import pid_alive
    from dlpipe.serve.serving import ModelServer

    stats = features.read_stats(spark, cfg)
    key = stats.key
    test_keys = spark.read.parquet(dataset_paths(cfg).split("test")).select(key).limit(50)
    rows = ingest.read_clean(spark, cfg).join(test_keys, key).orderBy(key).toPandas()
    batch = {r[key]: r for r in spark.read.parquet(dataset_paths(cfg).predictions).collect()}
    server = ModelServer(infer.model_uri(cfg), tracking.tracking_uri(cfg), tmp_path / "serve.log")
    with server:
        served = server.predict(rows[[c.name for c in cfg.dataset.features]])
    assert not pid_alive(server.proc.pid)
    expected = np.array([batch[k].probabilities for k in rows[key]], dtype=np.float32)
    assert np.stack(served["probabilities"]).shape == expected.shape == (len(rows), stats.num_classes)
    np.testing.assert_allclose(np.stack(served["probabilities"]), expected, rtol=1e-5, atol=1e-6)
    assert list(served["predicted_class"]) == [batch[k].predicted_class for k in rows[key]]


def test_rows_that_cannot_be_scored_are_quarantined_with_their_reason(spark, cfg, trained):
    from dlpipe.data.tensors import encode_rows
    from udfs.score import score_frame

    stats = features.read_stats(spark, cfg)
    shape = stats.feature_shape
    good = np.random.default_rng(0).normal(size=(4, *shape)).astype(np.float32)
    nan = good[:1].copy()
    nan[0, 0] = np.nan
    cells = [*encode_rows(good), encode_rows(nan)[0], None, b"not a tensor", encode_rows(good.astype(np.float64))[0]]
    df = spark.createDataFrame([(i, c) for i, c in enumerate(cells)], "id long, features binary")
    mv = tracking.model_version_for(infer.model_uri(cfg))
    rows = {r.id: r for r in score_frame(df, mv.download_uri, shape, ["id"], tracking.tracking_uri(cfg)).collect()}
    assert len(rows) == len(cells)  # rows in = scored + quarantined
    assert [rows[i].quarantine_reason for i in range(4)] == [None] * 4
    assert all(rows[i].prediction is not None and len(rows[i].probabilities) == 3 for i in range(4))
    assert rows[4].quarantine_reason == "features not finite (NaN or inf)"
    assert rows[5].quarantine_reason == "features missing"
    assert rows[6].quarantine_reason.startswith("features cell of the wrong size")
    assert rows[7].quarantine_reason.startswith("features cell of the wrong size")  # float64: twice the bytes
    assert all(rows[i].prediction is None and rows[i].probabilities is None for i in range(4, 8))


@pytest.mark.slow
def test_new_raw_data_is_validated_transformed_with_the_models_statistics_and_scored(spark, cfg, inferred, tmp_path):
    """infer.source: raw CSV without a label column, some lines bad. Every line is scored or quarantined
    with its reason, and rows equal to test rows get exactly the test split's predictions (the same
    training statistics were applied, read from the model's own run)."""
    stats = features.read_stats(spark, cfg)
    key = stats.key
    mv = tracking.model_version_for(infer.model_uri(cfg))
    assert features.model_stats(mv, fallback=lambda: pytest.fail("no statistics logged with the model")) == stats
    test_keys = spark.read.parquet(dataset_paths(cfg).split("test")).select(key)
    clean = spark.read.parquet(dataset_paths(cfg).clean).join(test_keys, key).drop("label").orderBy(key).toPandas()
    header = ",".join(clean.columns)
    lines = [",".join(str(v) for v in row) for row in clean.itertuples(index=False)]
    bad = [
        "999001,1.0,abc,0,0,0,0,0,0,a",  # not a double
        "999002,1.0,2.0,0,0,0,0,0,0,z",  # not an allowed category
        "999003,1.0,2.0,3.0",  # wrong number of fields
        "999004,1.0,2.0,0,0,0,0,0,500,b",  # out of range
    ]
    new = tmp_path / "new"
    new.mkdir()
    (new / "part-0.csv").write_text("\n".join([header, *lines, *bad]) + "\n")
    out = tmp_path / "scored"
    ncfg = make_cfg(cfg.root, f"infer.source={new.as_uri()}", f"infer.output={out.as_uri()}", "infer.partition_by=[]")
    m = _in_run(ncfg, "infer", infer.run, spark)
    assert m["rows_in"] == len(lines) + len(bad) == m["rows_scored"] + m["rows_quarantined"]
    assert m["rows_scored"] == len(lines) and m["quarantined_type"] == m["quarantined_value"] == 1
    assert m["quarantined_malformed"] == m["quarantined_range"] == 1
    q = {r[key]: r for r in spark.read.parquet(dataset_paths(ncfg).infer_quarantine).collect()}
    assert q[999001].reason == "not a double: x1=abc" and q[999001].model_version == int(mv.version)
    assert q[999002].reason == "not an allowed value of segment: z"
    assert q[999004].reason == "out of range [-50.0, 50.0]: x7=500.0" and q[999004].raw_line.endswith(",500.0,b")
    scored = {r[key]: r for r in spark.read.parquet(out.as_uri()).collect()}
    expected = {r[key]: r for r in spark.read.parquet(dataset_paths(cfg).predictions).collect()}
    assert scored.keys() == expected.keys()
    for k, r in scored.items():
        assert r.label is None and r.prediction == expected[k].prediction
        np.testing.assert_allclose(r.probabilities, expected[k].probabilities, rtol=1e-5, atol=1e-6)
    again = _in_run(ncfg, "infer", infer.run, spark)
    assert again["skipped"] == 1 and again["rows_scored"] == m["rows_scored"]


def test_new_data_on_any_store_is_scored_onto_the_same_store(spark, cfg, inferred, store, tmp_path):
    """infer.source and infer.output on file://, s3a:// and hdfs://: the generator's raw CSV (labels and
    all, with its broken lines) scored by the registered model, whose statistics come from MLflow, not
    from the warehouse (which, on S3 and HDFS, holds no dataset at all)."""
    from dlpipe.data.generate import generate

    base = store.base or tmp_path.as_uri()
    scfg = make_cfg(cfg.root, *store.overrides, f"infer.source={base}/new", f"infer.output={base}/scored")
    configure_spark_storage(spark, scfg)
    manifest = generate(scfg, f"{base}/new")
    m = _in_run(scfg, "infer", infer.run, spark)
    # scoring ignores labels: only the lines broken in their features are quarantined
    broken = manifest["malformed"]["wrong_field_count"] + manifest["malformed"]["bad_number"]
    assert m["rows_in"] == manifest["rows_written"] == m["rows_scored"] + m["rows_quarantined"]
    assert m["rows_quarantined"] == broken == m["quarantined_malformed"] + m["quarantined_type"]
    key = features.read_stats(spark, cfg).key
    expected = {r[key]: r.prediction for r in spark.read.parquet(dataset_paths(cfg).predictions).collect()}
    scored = {r[key]: r.prediction for r in spark.read.parquet(f"{base}/scored").collect()}
    assert len(scored) == m["rows_scored"] and set(expected) <= set(scored)
    assert all(scored[k] == p for k, p in expected.items())
    assert spark.read.parquet(dataset_paths(scfg).infer_quarantine).count() == broken


@pytest.mark.slow
def test_a_killed_infer_leaves_nothing_readable_and_a_rerun_is_correct(spark, cfg, inferred, tmp_path):
    """jobs/infer.py on new raw data, killed once it writes: no predictions or quarantine under their final
    names (a reader finds nothing, not half of them); the rerun clears the leftovers and scores every line."""
    new, out = tmp_path / "new", tmp_path / "scored"
    overrides = [f"infer.source={new.as_uri()}", f"infer.output={out.as_uri()}", "infer.partition_by=[]"]
    ncfg = make_cfg(cfg.root, *overrides, rows=40_000)
    manifest = generate(ncfg, new.as_uri())
    argv = [sys.executable, "jobs/infer.py", *cfg_overrides(cfg.root, *overrides, rows=40_000)]
    kill_once_it_writes(argv, tmp_path, "scored*.tmp-*/**/*.parquet", log=tmp_path / "infer.log", timeout=300)
    quarantine = local_path(dataset_paths(ncfg).infer_quarantine)
    assert not out.exists() and not quarantine.exists(), "a killed infer left output"
    assert list(tmp_path.glob("scored*.tmp-*")), "expected the killed run's temporary folders"

    m = _in_run(ncfg, "infer", infer.run, spark)
    broken = manifest["malformed"]["wrong_field_count"] + manifest["malformed"]["bad_number"]
    assert m.get("skipped", 0) == 0
    assert m["rows_in"] == manifest["rows_written"] == m["rows_scored"] + m["rows_quarantined"]
    assert m["rows_quarantined"] == broken
    assert not list(tmp_path.glob("scored*.tmp-*")), "the rerun did not clear the stale temporary folders"
    assert spark.read.parquet(out.as_uri()).count() == m["rows_scored"]


@pytest.mark.slow
def test_an_int8_variant_is_measured_registered_and_scores_like_fp32(spark, cfg, trained, inferred):
    """quantize.enabled (the default; tests turn it on where they check it): the dynamically quantized
    model, its accuracy delta and speed, its own version under @candidate-int8, and infer.variant=int8
    scoring every test row with it."""
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    assert trained["int8_registered"] == 1.0
    assert trained["int8_accuracy_delta"] == pytest.approx(trained["int8_val_accuracy"] - trained["fp32_val_accuracy"])
    assert trained["int8_rows_per_s"] > 0 and trained["fp32_rows_per_s"] > 0
    mv = client.get_model_version_by_alias(cfg.model_name, "candidate-int8")
    assert int(mv.version) == trained["int8_model_version"] != trained["model_version"]
    assert mv.tags["dlpipe.variant"] == "int8"
    # what is registered is really quantized: an fp32 copy would pass every comparison with fp32 below
    assert quantized_layers(f"models:/{cfg.model_name}/{mv.version}", tracking.tracking_uri(cfg))
    key = features.read_stats(spark, cfg).key
    fp32 = {r[key]: r.prediction for r in spark.read.parquet(dataset_paths(cfg).predictions).collect()}
    # (this replaces the fp32 predictions on disk: the module's last test)
    m = _in_run(make_cfg(cfg.root, "infer.variant=int8"), "infer", infer.run, spark)
    assert m["rows_scored"] == m["rows_in"] == inferred["rows_in"] and m["rows_quarantined"] == 0
    preds = spark.read.parquet(dataset_paths(cfg).predictions).collect()
    assert {r.model_version for r in preds} == {int(mv.version)}
    agree = np.mean([fp32[r[key]] == r.prediction for r in preds])
    assert agree > 0.97, f"int8 and fp32 agree on only {agree:.3f} of the test rows"
