"""Preprocess: clean rows -> deterministic train/val/test splits as Petastorm datasets, plus statistics.

Statistics (scaling, category vocabularies, class counts) are fitted on the training split only and saved
beside the datasets (`_dlpipe_stats.json`), so every later stage applies exactly the same transform.
Splits come from a hash of the key, so a row lands in the same split on every run and every cluster.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from dlpipe.config import Config
from dlpipe.ingest import AccountingError
from dlpipe.storage import HadoopFS, atomic_output, dataset_paths
from dlpipe.tensors import encode_rows

log = logging.getLogger(__name__)
# Petastorm 0.13.1 reads its metadata through pyarrow's legacy dataset API on purpose (the reason pyarrow is
# pinned to 14); its deprecation warnings say nothing a user can act on.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm\.")

SPLITS = ("train", "val", "test")
_BUCKETS = 1_000_000


def split_column(cfg: Config) -> Column:
    """'train' | 'val' | 'test' from a seeded 64-bit hash of the key: deterministic, no shuffle needed."""
    s = cfg.preprocess.split
    key = F.col(cfg.dataset.column("key").name).cast("string")
    bucket = F.pmod(F.xxhash64(F.lit(s.seed), key), F.lit(_BUCKETS)) / _BUCKETS
    return F.when(bucket < s.train, "train").when(bucket < s.train + s.val, "val").otherwise("test")


def fit_stats(train: DataFrame, cfg: Config) -> dict:
    """Feature statistics and class counts, from the training split only."""
    aggs = []
    for col in cfg.dataset.features:
        if col.effective_transform == "standardize":
            aggs += [F.avg(col.name).alias(f"{col.name}__mean"), F.stddev_pop(col.name).alias(f"{col.name}__std")]
    moments = train.agg(*aggs).first().asDict() if aggs else {}
    features, names = [], []
    for col in cfg.dataset.features:
        t = col.effective_transform
        if t == "standardize":
            std = moments[f"{col.name}__std"] or 0.0
            entry = {
                "name": col.name,
                "transform": t,
                "mean": moments[f"{col.name}__mean"] or 0.0,
                "std": std if std > 1e-12 else 1.0,
            }
            names.append(col.name)
        elif t == "onehot":
            vocab = sorted(r[0] for r in train.select(col.name).distinct().collect() if r[0] is not None)
            entry = {"name": col.name, "transform": t, "vocab": vocab}
            names += [f"{col.name}={v}" for v in vocab]
        else:
            entry = {"name": col.name, "transform": "none"}
            names.append(col.name)
        features.append(entry)
    label = cfg.dataset.column("label").name
    counts = dict(train.groupBy(label).count().collect())
    class_counts = [int(counts.get(k, 0)) for k in range(cfg.dataset.num_classes)]
    return {
        "features": features,
        "feature_names": names,
        "feature_dim": len(names),
        "num_classes": cfg.dataset.num_classes,
        "key": cfg.dataset.column("key").name,
        "label": label,
        "class_counts_train": class_counts,
        "majority_class": int(np.argmax(class_counts)),
    }


def feature_vector(stats: dict) -> Column:
    """array<float> of the transformed features, as fitted in stats."""
    parts: list[Column] = []
    for f in stats["features"]:
        c = F.col(f["name"])
        if f["transform"] == "standardize":
            parts.append(((c - F.lit(f["mean"])) / F.lit(f["std"])).cast("float"))
        elif f["transform"] == "onehot":
            parts += [F.when(c == F.lit(v), 1.0).otherwise(0.0).cast("float") for v in f["vocab"]]
        else:
            parts.append(c.cast("float"))
    return F.array(*parts)


_NP_SPARK = {
    "int": (np.int32, T.IntegerType()),
    "long": (np.int64, T.LongType()),
    "string": (np.str_, T.StringType()),
    "float": (np.float32, T.FloatType()),
    "double": (np.float64, T.DoubleType()),
}


def unischema(cfg: Config, stats: dict):
    """The Petastorm Unischema of a split: key, features (float32 tensor, NdarrayCodec), label."""
    from petastorm.codecs import NdarrayCodec, ScalarCodec
    from petastorm.unischema import Unischema, UnischemaField

    key = cfg.dataset.column("key")
    np_key, spark_key = _NP_SPARK[key.type]
    return Unischema(
        f"{cfg.dataset.name}_schema",
        [
            UnischemaField(key.name, np_key, (), ScalarCodec(spark_key), False),
            UnischemaField("features", np.float32, (stats["feature_dim"],), NdarrayCodec(), False),
            UnischemaField("label", np.int32, (), ScalarCodec(T.IntegerType()), False),
        ],
    )


def _encode_partitions(key: str):
    def encode(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            if len(pdf) == 0:
                continue
            feats = np.stack(pdf["features"].to_numpy()).astype(np.float32, copy=False)
            yield pd.DataFrame({key: pdf[key], "features": encode_rows(feats), "label": pdf["label"]})

    return encode


def transform(clean: DataFrame, cfg: Config, stats: dict) -> DataFrame:
    """Clean typed rows -> (key, features NdarrayCodec bytes, label int32), the Petastorm row layout."""
    key, label = stats["key"], stats["label"]
    schema = unischema(cfg, stats).as_spark_schema()
    arrays = clean.select(F.col(key), feature_vector(stats).alias("features"), F.col(label).cast("int").alias("label"))
    return arrays.mapInPandas(_encode_partitions(key), schema=schema)


def write_petastorm(spark: SparkSession, df: DataFrame, uri: str, cfg: Config, stats: dict) -> None:
    from petastorm.etl.dataset_metadata import materialize_dataset

    with materialize_dataset(spark, uri, unischema(cfg, stats), cfg.preprocess.row_group_size_mb):
        df.repartition(cfg.preprocess.num_files).write.mode("overwrite").option("compression", "snappy").parquet(uri)


def run(spark: SparkSession, cfg: Config) -> dict:
    """The preprocess stage. Returns metrics: rows per split and the feature dimension."""
    paths = dataset_paths(cfg)
    clean = spark.read.parquet(paths.clean).withColumn("_split", split_column(cfg)).cache()
    try:
        rows_in = clean.count()
        stats = fit_stats(clean.where(F.col("_split") == "train"), cfg)
        log.info("preprocess: %d rows, %d features after transform", rows_in, stats["feature_dim"])
        fs = HadoopFS(spark)
        with atomic_output(spark, paths.petastorm) as tmp:
            rows = {}
            for name in SPLITS:
                part = transform(clean.where(F.col("_split") == name), cfg, stats)
                write_petastorm(spark, part, f"{tmp}/{name}", cfg, stats)
                rows[name] = spark.read.parquet(f"{tmp}/{name}").count()
                log.info("preprocess: wrote %s split, %d rows", name, rows[name])
            if sum(rows.values()) != rows_in:
                raise AccountingError(
                    f"preprocess: {rows_in} clean rows in, {sum(rows.values())} rows in splits {rows}"
                )
            stats["rows"] = rows
            fs.write_json(f"{tmp}/_dlpipe_stats.json", stats)
    finally:
        clean.unpersist()
    return {"rows_in": rows_in, **{f"rows_{k}": v for k, v in rows.items()}, "feature_dim": stats["feature_dim"]}


def read_stats(spark: SparkSession, cfg: Config) -> dict:
    return HadoopFS(spark).read_json(dataset_paths(cfg).stats)
