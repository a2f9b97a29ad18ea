"""Ingest and preprocess, for both example datasets, on file://, s3a:// (a real SeaweedFS S3 server) and
hdfs:// (a real NameNode + DataNode), all on 127.0.0.1. The same code; only the URIs and settings differ."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from dlpipe.data import features, ingest
from dlpipe.data.generate import generate
from dlpipe.storage import HadoopFS, StorageError, configure_spark_storage, dataset_paths, python_fs, storage_settings
from dlpipe.train.loader import ShardLoader
from tests.conftest import FAIL_FAST_S3, make_cfg


@pytest.mark.parametrize("dataset,rows", [("tabular_example", 600), ("digits_images", 150)])
def test_ingest_and_preprocess_on_every_storage(spark, tmp_path, store, dataset, rows):
    cfg = make_cfg(tmp_path, *store.overrides, rows=rows, dataset=dataset)
    paths = dataset_paths(cfg)
    assert paths.raw.startswith(store.kind + ":")
    configure_spark_storage(spark, cfg)
    gen = generate(cfg, paths.raw)

    m = ingest.run(spark, cfg)
    assert m["rows_in"] == rows == m["rows_kept"] + m["rows_quarantined"]
    assert m["rows_kept"] == gen["valid_rows"] and m["rows_quarantined"] == gen["malformed_total"]
    assert ingest.run(spark, cfg)["skipped"] == 1  # fingerprints work on this store too

    p = features.run(spark, cfg)
    assert p["rows_train"] + p["rows_val"] + p["rows_test"] == m["rows_kept"]
    stats = features.read_stats(spark, cfg)
    # the training loader reads the split straight from the store, from Python
    loader = ShardLoader(
        paths.split("train"),
        0,
        1,
        64,
        stats.feature_shape,
        shuffle=False,
        expected_rows=p["rows_train"],
        storage=storage_settings(cfg),
    )
    labels = np.concatenate([y.numpy() for _, y in loader.epoch(1)])
    assert len(labels) == p["rows_train"] and set(labels.tolist()) <= set(range(cfg.dataset.num_classes))
    fs, root = python_fs(paths.petastorm, storage_settings(cfg))
    assert fs.get_file_info(f"{root}/_dlpipe_meta.json").is_file


def test_a_wrong_s3_secret_is_a_clear_error_and_fixing_it_works_in_the_same_session(
    spark, tmp_path, s3_server, monkeypatch
):
    """With Hadoop's FileSystem cache on (its default): the bucket is first reached with the right key, then
    a wrong one is refused (the cached client is not reused), then the fixed key works again."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    run = uuid.uuid4().hex[:8]
    overrides = (
        f"storage.warehouse=s3a://{s3_server.bucket}/{run}/warehouse",
        f"dataset.source.uri=s3a://{s3_server.bucket}/{run}/raw",
        f"storage.s3.endpoint={s3_server.endpoint}",
        "storage.s3.path_style_access=true",
        *FAIL_FAST_S3,
    )
    good = make_cfg(tmp_path, *overrides)
    configure_spark_storage(spark, good)
    manifest = generate(good, dataset_paths(good).raw)
    assert HadoopFS(spark).exists(dataset_paths(good).raw)  # Hadoop caches the bucket's client, right key

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    cfg = make_cfg(tmp_path, *overrides)
    configure_spark_storage(spark, cfg)
    with pytest.raises(StorageError) as err:
        ingest.run(spark, cfg)
    msg = str(err.value)
    assert f"s3a://{s3_server.bucket}/{run}/raw" in msg
    assert "403" in msg or "AccessDenied" in msg or "InvalidAccessKeyId" in msg or "SignatureDoesNotMatch" in msg
    assert "AWS_SECRET_ACCESS_KEY" in msg and "not-the-secret" not in msg
    with pytest.raises(OSError, match="(?i)access|denied|forbidden|signature|403"):
        generate(cfg, dataset_paths(cfg).raw, force=True)

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)  # fixed, in the same session
    fixed = make_cfg(tmp_path, *overrides)
    configure_spark_storage(spark, fixed)
    m = ingest.run(spark, fixed)
    assert m["rows_in"] == manifest["rows_written"] == m["rows_kept"] + m["rows_quarantined"]
