"""Preprocess: clean rows -> deterministic train/val/test splits as Petastorm datasets, plus statistics.

Statistics (scaling, category vocabularies, class counts) are fitted on the training split only and saved
beside the datasets (`_dlpipe_stats.json`), so every later stage applies exactly the same transform.
Splits come from a hash of the key, so a row lands in the same split on every run and every cluster.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import numpy as np
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from dlpipe import lineage
from dlpipe.config import Config
from dlpipe.ingest import AccountingError
from dlpipe.objective import label_spark_type
from dlpipe.storage import (
    FsspecFactory,
    HadoopFS,
    atomic_output,
    dataset_paths,
    register_s3a_paths_with_fsspec,
    storage_settings,
)
from dlpipe.tensors import decode_arrow, encode_arrow

log = logging.getLogger(__name__)
# Petastorm 0.13.1 reads its metadata through pyarrow's legacy dataset API on purpose (the reason pyarrow is
# pinned to 14); its deprecation warnings say nothing a user can act on.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm\.")

SPLITS = ("train", "val", "test")
_BUCKETS = 1_000_000


def split_column(cfg: Config) -> Column:
    """'train' | 'val' | 'test' from a seeded 64-bit hash of the split keys: deterministic, no shuffle needed."""
    s = cfg.dataset.split
    keys = [F.col(k).cast("string") for k in cfg.dataset.split_keys]
    bucket = F.pmod(F.xxhash64(F.lit(s.seed), *keys), F.lit(_BUCKETS)) / _BUCKETS
    return F.when(bucket < s.train, "train").when(bucket < s.train + s.val, "val").otherwise("test")


def _image_moments(shape: tuple[int, ...], image: str):
    """Pixel sum, sum of squares and count per partition, decoded like `_scale_images` decodes them."""

    def moments(batches):
        import pyarrow as pa

        total, total_sq, n = 0.0, 0.0, 0
        for batch in batches:
            x = decode_arrow(batch.column(image), np.uint8, shape).astype(np.float64) / 255.0
            total, total_sq, n = total + x.sum(), total_sq + (x * x).sum(), n + x.size
        yield pa.RecordBatch.from_pydict({"s": [total], "sq": [total_sq], "n": [n]})

    return moments


def fit_stats(train: DataFrame, cfg: Config) -> dict:
    """Feature statistics and class counts, from the training split only."""
    stats = _fit_image_stats(train, cfg) if cfg.dataset.source.format == "image" else _fit_tabular_stats(train, cfg)
    label = cfg.dataset.column("label").name
    stats.update(
        {
            "feature_dim": int(np.prod(stats["feature_shape"])),
            "task": cfg.dataset.task,
            "num_classes": cfg.dataset.num_classes,
            "key": cfg.dataset.column("key").name,
            "label": label,
        }
    )
    if cfg.dataset.task == "regression":  # targets are standardized while training (dlpipe.objective)
        m = train.agg(F.avg(label).alias("mean"), F.stddev_pop(label).alias("std")).first()
        std = float(m["std"] or 0.0)
        stats.update({"label_mean": float(m["mean"] or 0.0), "label_std": std if std > 1e-12 else 1.0})
        return stats
    counts = dict(train.groupBy(label).count().collect())
    class_counts = [int(counts.get(k, 0)) for k in range(cfg.dataset.num_classes)]
    stats.update({"class_counts_train": class_counts, "majority_class": int(np.argmax(class_counts))})
    return stats


def _fit_image_stats(train: DataFrame, cfg: Config) -> dict:
    col = cfg.dataset.image_column
    shape = tuple(col.shape or ())
    parts = train.select(col.name).mapInArrow(_image_moments(shape, col.name), "s double, sq double, n long").collect()
    total, total_sq, n = (sum(r[i] for r in parts) for i in range(3))
    mean = total / max(n, 1)
    std = max(float(np.sqrt(max(total_sq / max(n, 1) - mean * mean, 0.0))), 1e-6)
    h, w = shape[:2]
    channels = shape[2] if len(shape) == 3 else 1
    return {
        "features": [{"name": col.name, "transform": "scale", "mean": mean, "std": std, "shape": list(shape)}],
        "feature_names": [col.name],
        "feature_shape": [channels, h, w],
    }


def _fit_tabular_stats(train: DataFrame, cfg: Config) -> dict:
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
    return {"features": features, "feature_names": names, "feature_shape": [len(names)]}


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
    """The Petastorm Unischema of a split: key, features (float32 tensor, NdarrayCodec), label (int32 class
    or float32 value)."""
    from petastorm.codecs import NdarrayCodec, ScalarCodec
    from petastorm.unischema import Unischema, UnischemaField

    key = cfg.dataset.column("key")
    np_key, spark_key = _NP_SPARK[key.type]
    np_label, spark_label = _NP_SPARK[label_spark_type(cfg.dataset.task)]
    return Unischema(
        f"{cfg.dataset.name}_schema",
        [
            UnischemaField(key.name, np_key, (), ScalarCodec(spark_key), False),
            UnischemaField("features", np.float32, tuple(stats["feature_shape"]), NdarrayCodec(), False),
            UnischemaField("label", np_label, (), ScalarCodec(spark_label), False),
        ],
    )


def _petastorm_batch(batch, key: str, cells):
    """The Petastorm row layout of one Arrow batch: key, the features' NdarrayCodec cells, label."""
    import pyarrow as pa

    return pa.RecordBatch.from_arrays([batch.column(key), cells, batch.column("label")], [key, "features", "label"])


def _encode_batches(key: str, shape: tuple[int, ...]):
    """array<float> features -> NdarrayCodec cells, an Arrow batch at a time (no pandas, no loop per row)."""

    def encode(batches):
        for batch in batches:
            feats = batch.column("features")
            x = feats.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            yield _petastorm_batch(batch, key, encode_arrow(x.reshape(len(batch), *shape)))

    return encode


def _scale_images(key: str, image: str, shape: tuple[int, ...], mean: float, std: float, out_shape: tuple[int, ...]):
    """uint8 image cells -> float32 (C, H, W) cells scaled with the train split's pixel mean and std."""

    def scale(batches):
        for batch in batches:
            x = decode_arrow(batch.column(image), np.uint8, shape).astype(np.float32) / 255.0
            x = (x - mean) / std
            if len(shape) == 3:  # H, W, C -> C, H, W
                x = np.moveaxis(x, -1, 1)
            yield _petastorm_batch(batch, key, encode_arrow(np.ascontiguousarray(x).reshape(len(batch), *out_shape)))

    return scale


def transform(clean: DataFrame, cfg: Config, stats: dict, label_optional: bool = False) -> DataFrame:
    """Clean typed rows -> (key, features NdarrayCodec float32 tensor, label int32), the Petastorm layout.

    label_optional: new rows to score, whose label may be null (the schema then allows it)."""
    key, label = stats["key"], F.col(stats["label"]).cast(label_spark_type(cfg.dataset.task)).alias("label")
    schema = unischema(cfg, stats).as_spark_schema()
    if label_optional:
        schema = T.StructType([T.StructField(f.name, f.dataType, f.name == "label" or f.nullable) for f in schema])
    if cfg.dataset.source.format == "image":
        f = stats["features"][0]
        fn = _scale_images(key, f["name"], tuple(f["shape"]), f["mean"], f["std"], tuple(stats["feature_shape"]))
        return clean.select(key, f["name"], label).mapInArrow(fn, schema=schema)
    arrays = clean.select(F.col(key), feature_vector(stats).alias("features"), label)
    return arrays.mapInArrow(_encode_batches(key, tuple(stats["feature_shape"])), schema=schema)


def write_petastorm(spark: SparkSession, df: DataFrame, uri: str, cfg: Config, stats: dict) -> None:
    from petastorm.etl.dataset_metadata import materialize_dataset

    factory = None if uri.startswith("file:") else FsspecFactory(uri, storage_settings(cfg))
    if uri.startswith("s3"):
        register_s3a_paths_with_fsspec()
    with materialize_dataset(
        spark, uri, unischema(cfg, stats), cfg.preprocess.row_group_size_mb, filesystem_factory=factory
    ):
        df.repartition(cfg.preprocess.num_files).write.mode("overwrite").option("compression", "snappy").parquet(uri)


def fingerprint(spark: SparkSession, cfg: Config) -> tuple[str, dict[str, str]]:
    paths = dataset_paths(cfg)
    inputs = {paths.clean: lineage.dataset_fingerprint(spark, paths.clean)}
    spec = {
        "stage": "preprocess",
        "inputs": inputs,
        "split": cfg.dataset.split.model_dump(mode="json"),
        "columns": [c.model_dump(mode="json") for c in cfg.dataset.columns],
        "task": cfg.dataset.task,
        "num_classes": cfg.dataset.num_classes,
        "preprocess": cfg.preprocess.model_dump(mode="json"),
    }
    return lineage.digest(spec), inputs


def run(spark: SparkSession, cfg: Config, force: bool = False) -> dict:
    """The preprocess stage. Returns metrics: rows per split and the feature dimension."""
    paths = dataset_paths(cfg)
    if not HadoopFS(spark).exists(paths.clean):
        raise FileNotFoundError(f"preprocess: no clean dataset at {paths.clean}: run the ingest stage first")
    fp, inputs = fingerprint(spark, cfg)
    done = None if force else lineage.reusable(spark, paths.petastorm, fp)
    if done:
        log.info("preprocess: %s is up to date (fingerprint %s), skipping; use --force to redo", paths.petastorm, fp)
        lineage.log_lineage("preprocess", fp, inputs, [paths.petastorm], skipped=True)
        return {**done["metrics"], "skipped": 1}
    clean = spark.read.parquet(paths.clean).withColumn("_split", split_column(cfg)).cache()
    try:
        rows_in = clean.count()
        stats = fit_stats(clean.where(F.col("_split") == "train"), cfg)
        log.info("preprocess: %d rows, features of shape %s after transform", rows_in, stats["feature_shape"])
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
            metrics = {
                "rows_in": rows_in,
                **{f"rows_{k}": v for k, v in rows.items()},
                "feature_dim": stats["feature_dim"],
            }
            lineage.write_meta(spark, tmp, "preprocess", fp, inputs, metrics)
    finally:
        clean.unpersist()
    lineage.log_lineage("preprocess", fp, inputs, [paths.petastorm], skipped=False)
    return {**metrics, "skipped": 0}


def read_stats(spark: SparkSession, cfg: Config) -> dict:
    return HadoopFS(spark).read_json(dataset_paths(cfg).stats)


STATS_ARTIFACT = "preprocessing/stats.json"  # in the training run: the statistics its model was trained with


def model_stats(mv: dict, fallback: Callable[[], dict]) -> dict:
    """The statistics logged with the training run of model version mv (train logs them), so new rows are
    transformed exactly as its training rows were; fallback() for a model trained elsewhere, with a warning."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if mv.get("run_id"):
        try:
            return mlflow.artifacts.load_dict(f"runs:/{mv['run_id']}/{STATS_ARTIFACT}")
        except (MlflowException, OSError) as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    else:
        reason = "the model URI names no run"
    log.warning(
        "no %s in the model's training run (%s); transforming with the dataset's current statistics instead",
        STATS_ARTIFACT,
        reason,
    )
    return fallback()
