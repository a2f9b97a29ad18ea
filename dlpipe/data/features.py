"""Preprocess: clean rows -> deterministic train/val/test splits as Petastorm datasets, plus statistics.

Statistics (scaling, category vocabularies, class counts) are fitted on the training split only and saved
beside the datasets (`_dlpipe_stats.json`), so every later stage applies exactly the same transform.
Splits come from a hash of the key, so a row lands in the same split on every run and every cluster.

Two passes over the clean data, nothing cached: one aggregation fits the statistics, then one write
transforms every row and sends it to its split (dlpipe.storage.parquet_io). Tabular features are computed inside
the JVM and stored as a Parquet list of float32 (a fixed-shape tensor per row: Petastorm reads it as an
ndarray field with no codec); images stay NdarrayCodec cells, scaled on the executors. Each split gets
Petastorm's metadata (its Unischema and row groups per file, in `_common_metadata`), from the footers of
what was written, so Petastorm's `make_reader` / `make_batch_reader` read it as they read their own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from dlpipe.config import ColumnSpec, Config
from dlpipe.data.drift import fit_reference
from dlpipe.data.ingest import read_clean
from dlpipe.data.stats import FeatureStats, FittedStats
from dlpipe.data.tensors import decode_arrow, encode_arrow
from dlpipe.model.names import STATS_ARTIFACT
from dlpipe.model.task import label_spark_type
from dlpipe.session import job_description
from dlpipe.stage import Plan, Stage, execute, require_input
from dlpipe.storage import STATS_FILE, HadoopFS, dataset_paths, lineage, storage_settings
from dlpipe.storage.parquet_io import Output, PartFile, write_routed
from dlpipe.tracking import ModelRef

log = logging.getLogger(__name__)
# Petastorm 0.13.1 reads its metadata through pyarrow's legacy dataset API on purpose (the reason pyarrow is
# pinned to 14); its deprecation warnings say nothing a user can act on.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm\.")

SPLITS = ("train", "val", "test")
SPLIT = "_split"
_BUCKETS = 1_000_000
# A one-hot column without declared `values` learns its vocabulary from the train split, up to this many.
MAX_LEARNED_VOCAB = 1000


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


def _label_aggregates(cfg: Config) -> list[Column]:
    """Class counts (classification, where the YAML fixes the classes) or the target's mean and std
    (regression), for the statistics' one aggregation over the train split."""
    label = F.col(cfg.dataset.column("label").name)
    if cfg.dataset.task == "regression":  # targets are standardized while training (dlpipe.model.objective)
        return [F.avg(label).alias("__label_mean"), F.stddev_pop(label).alias("__label_std")]
    classes = cfg.dataset.declared_classes or []
    named = cfg.dataset.column("label").type == "string"
    return [F.count_if(label == F.lit(name if named else k)).alias(f"__class_{k}") for k, name in enumerate(classes)]


def fit_stats(train: DataFrame, cfg: Config) -> FittedStats:
    """Feature statistics and class counts, from the training split only: one aggregation (tabular), plus
    a bounded distinct for a category column (or string label) whose values are not declared."""
    if cfg.dataset.source.format == "image":
        feats, names, shape = _fit_image_stats(train, cfg)
        row = train.agg(*_label_aggregates(cfg)).first().asDict()
    else:
        (feats, names, shape), row = _fit_tabular_stats(train, cfg, _label_aggregates(cfg))
    label = cfg.dataset.column("label")
    common = {
        "key": cfg.dataset.column("key").name,
        "label": label.name,
        "label_type": label.type,
        "task": cfg.dataset.task,
        "features": tuple(feats),
        "feature_names": tuple(names),
        "feature_shape": tuple(shape),
    }
    if cfg.dataset.task == "regression":
        std = float(row["__label_std"] or 0.0)
        return FittedStats(
            **common, label_mean=float(row["__label_mean"] or 0.0), label_std=std if std > 1e-12 else 1.0
        )
    classes = cfg.dataset.declared_classes
    if classes is not None:
        class_counts = [int(row[f"__class_{k}"]) for k in range(len(classes))]
    else:
        classes, class_counts = _learned_classes(train, label.name)
    return FittedStats(
        **common,
        classes=tuple(classes),
        num_classes=len(classes),
        class_counts_train=tuple(class_counts),
        majority_class=int(np.argmax(class_counts)),
    )


def _learned_classes(train: DataFrame, label: str) -> tuple[list[str], list[int]]:
    """A string label's classes (sorted) and their counts in the train split: one small aggregation."""
    rows = train.groupBy(label).count().where(F.col(label).isNotNull()).limit(MAX_LEARNED_VOCAB + 1).collect()
    if len(rows) > MAX_LEARNED_VOCAB:
        raise ValueError(
            f"preprocess: label column '{label}' has more than {MAX_LEARNED_VOCAB} values in the train split: "
            "is it really the class? Declare its classes with `values:` in the dataset's YAML"
        )
    if len(rows) < 2:
        raise ValueError(
            f"preprocess: label column '{label}' has {len(rows)} class(es) in the train split; a classifier needs 2 "
            "or more: check the data, or declare the classes with `values:` in the dataset's YAML"
        )
    counts = dict(sorted((str(r[0]), int(r[1])) for r in rows))
    return list(counts), list(counts.values())


def label_index(stats: FittedStats, column: str) -> Column:
    """The class index of a label column as read (a class name, or an index for integer labels); null for a
    value that is not one of the model's classes."""
    c = F.col(column)
    if stats.is_regression:
        return c.cast("float")
    if stats.label_type != "string":
        k = stats.num_classes
        return F.when((c >= 0) & (c < k), c.cast("int"))
    position = F.call_function("array_position", F.array(*[F.lit(v) for v in stats.class_names]), c)
    return F.when(position > 0, (position - 1).cast("int"))


# fitted features: each input column's statistics, the names of the numbers they become, one row's shape
_Fitted = tuple[list[FeatureStats], list[str], list[int]]


def _fit_image_stats(train: DataFrame, cfg: Config) -> _Fitted:
    col = cfg.dataset.image_column
    shape = tuple(col.shape or ())
    parts = train.select(col.name).mapInArrow(_image_moments(shape, col.name), "s double, sq double, n long").collect()
    total, total_sq, n = (sum(r[i] for r in parts) for i in range(3))
    mean = total / max(n, 1)
    std = max(float(np.sqrt(max(total_sq / max(n, 1) - mean * mean, 0.0))), 1e-6)
    h, w = shape[:2]
    channels = shape[2] if len(shape) == 3 else 1
    return [FeatureStats(col.name, "scale", mean=mean, std=std, shape=shape)], [col.name], [channels, h, w]


def _learned_vocab(train: DataFrame, name: str) -> list[str]:
    seen = [
        r[0]
        for r in train.select(name).where(F.col(name).isNotNull()).distinct().limit(MAX_LEARNED_VOCAB + 1).collect()
    ]
    if len(seen) > MAX_LEARNED_VOCAB:
        raise ValueError(
            f"preprocess: one-hot column '{name}' has more than {MAX_LEARNED_VOCAB} values in the train split; "
            "declare its `values:` in the dataset's YAML (others are quarantined), or give it transform: none"
        )
    return sorted(seen)


def _most_frequent(train: DataFrame, name: str, k: int) -> list:
    """The k most frequent non-null values of a column in the train split, most frequent first (ties: the
    smaller value first): a groupBy and count, then Spark's top k (a bounded sort), k rows collected."""
    counts = train.where(F.col(name).isNotNull()).groupBy(name).count()
    return [r[0] for r in counts.orderBy(F.desc("count"), F.asc(name)).limit(k).collect()]


def _fill_in_aggregation(col: ColumnSpec) -> bool:
    """Whether the one statistics aggregation can fit col's fill value. Spark's mode holds a count per
    distinct value in memory, so it is used only where the values are few by declaration (a closed list,
    booleans); any other most frequent value (numbers, learned, top_k or hashed strings, dates) comes from
    a bounded top-1 query (`_most_frequent`)."""
    if col.impute_with != "most_frequent":
        return True
    return (col.values is not None and col.top_k is None) or col.type == "boolean"


DATE_PARTS = ("year", "month_sin", "month_cos", "dow_sin", "dow_cos", "doy")
TIME_PARTS = ("hour_sin", "hour_cos")


def date_feature_names(name: str, kind: str) -> list[str]:
    """The features a date (or timestamp: also the hour of the day) becomes, in order."""
    return [f"{name}_{p}" for p in (*DATE_PARTS, *(TIME_PARTS if kind == "timestamp" else ()))]


def _json_value(value):
    """A fill value as JSON keeps it: dates and timestamps as ISO text (yyyy-MM-dd[ HH:mm:ss[.ffffff]])."""
    import datetime as dt

    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def _fill_aggregate(col: ColumnSpec, alias: str) -> Column:
    """What replaces a missing value of col, fitted on the train split: mean, approximate median (bounded
    memory), or the most frequent value."""
    how = col.impute_with
    if how == "mean":
        return F.avg(col.name).alias(alias)
    if how == "median":
        return F.percentile_approx(col.name, 0.5, 10_000).alias(alias)
    return F.mode(col.name).alias(alias)


def _fit_tabular_stats(train: DataFrame, cfg: Config, more: Sequence[Column] = ()) -> tuple[_Fitted, dict]:
    aggs = list(more)
    for col in cfg.dataset.features:
        t = col.effective_transform
        if t == "standardize":
            aggs += [F.avg(col.name).alias(f"{col.name}__mean"), F.stddev_pop(col.name).alias(f"{col.name}__std")]
        elif t == "onehot" and col.values is not None:  # which declared values the train split holds
            aggs += [F.count_if(F.col(col.name) == v).alias(f"{col.name}__n{i}") for i, v in enumerate(col.values)]
        elif t == "date":  # the year is standardized; the rest are cycles (see feature_vector)
            year = F.year(F.col(col.name))
            aggs += [F.avg(year).alias(f"{col.name}__year_mean"), F.stddev_pop(year).alias(f"{col.name}__year_std")]
        if col.missing_policy != "quarantine":
            nulls = F.count_if(F.col(col.name).isNull()).alias(f"{col.name}__nulls")
            if _fill_in_aggregation(col):
                aggs.append(_fill_aggregate(col, f"{col.name}__fill"))
            aggs.append(nulls)
    if any(c.missing_policy != "quarantine" for c in cfg.dataset.features):
        aggs.append(F.count(F.lit(1)).alias("__rows"))
    row = train.agg(*aggs).first().asDict() if aggs else {}
    features: list[FeatureStats] = []
    names: list[str] = []
    for col in cfg.dataset.features:
        t = col.effective_transform
        if t == "standardize":
            std = row[f"{col.name}__std"] or 0.0
            entry: dict = {"mean": row[f"{col.name}__mean"] or 0.0, "std": std if std > 1e-12 else 1.0}
            names.append(col.name)
        elif t == "onehot":
            if col.top_k is not None:  # the k most frequent values of the train split; the rest are __other__
                top = _most_frequent(train, col.name, col.top_k)
                entry = {"vocab": tuple(sorted(top)), "other": True}
                names += [f"{col.name}={v}" for v in entry["vocab"]] + [f"{col.name}={OTHER}"]
                if col.missing_policy != "quarantine":
                    row[f"{col.name}__fill"] = top[0] if top else None
            else:
                if col.values is not None:
                    vocab = sorted(v for i, v in enumerate(col.values) if row[f"{col.name}__n{i}"])
                else:
                    vocab = _learned_vocab(train, col.name)
                entry = {"vocab": tuple(vocab)}
                names += [f"{col.name}={v}" for v in vocab]
        elif t == "hash":
            entry = {"buckets": col.buckets, "hash": HASH}
            names += [f"{col.name}#{b}" for b in range(col.buckets)]
        elif t == "date":
            std = row[f"{col.name}__year_std"] or 0.0
            entry = {
                "kind": col.type,
                "year_mean": row[f"{col.name}__year_mean"] or 0.0,
                "year_std": std if std > 1e-12 else 1.0,
            }
            names += date_feature_names(col.name, col.type)
        else:
            t, entry = "none", {}
            names.append(col.name)
        if col.missing_policy != "quarantine":
            if f"{col.name}__fill" not in row:  # most frequent of many possible values: a bounded query
                top = _most_frequent(train, col.name, 1)
                row[f"{col.name}__fill"] = top[0] if top else None
            fill = row[f"{col.name}__fill"]
            if fill is None:  # not one value in the train split: nothing to learn from
                raise ValueError(
                    f"preprocess: feature '{col.name}' is missing in every row of the train split; there is nothing "
                    "to impute it with: drop it (role: ignore) or fix the data"
                )
            entry["fill"] = _json_value(fill)
            entry["missing_share_train"] = row[f"{col.name}__nulls"] / max(row["__rows"], 1)
            if col.missing_policy == "indicator":
                entry["indicator"] = True
                names.append(f"{col.name}_missing")
        features.append(FeatureStats(col.name, t, **entry))
    return (features, names, [len(names)]), row


OTHER = "__other__"  # the one-hot column of a top_k feature's values outside its vocabulary
HASH = "crc32_utf8"  # a hashed value's bucket: pmod(crc32(its UTF-8 bytes), buckets); zlib.crc32 in Python


def hash_bucket(c: Column, buckets: int) -> Column:
    """The bucket of a string value: crc32 of its UTF-8 bytes (an unsigned 32-bit number) mod buckets, the
    same as `zlib.crc32(value.encode("utf-8")) % buckets` (dlpipe.model.rawmodel)."""
    return F.pmod(F.crc32(F.encode(c, "UTF-8")), F.lit(buckets))


def _one_hot(index: Column, size: int) -> Column:
    """array<float> of `size` with 1.0 at the 0-based index (none where index is null or out of range):
    one higher-order function, not one expression per column, so a thousand columns stay one expression."""
    i = F.coalesce(index, F.lit(-1))
    return F.transform(F.sequence(F.lit(0), F.lit(size - 1)), lambda b: (b == i).cast("float"))


def _date_parts(c: Column, f: FeatureStats) -> list[Column]:
    """A date (or timestamp) as numbers: the year standardized with the train split's mean and std; the
    month, the day of the week (Monday = 0) and, for timestamps, the hour of the day (hour + minute/60 +
    second/3600) as the sine and cosine of their angle on their cycle; the day of the year as (day - 1)/366."""
    two_pi = 2.0 * np.pi

    def cycle(value: Column, period: float) -> list[Column]:
        angle = value.cast("double") * F.lit(two_pi / period)
        return [F.sin(angle), F.cos(angle)]

    parts = [(F.year(c) - F.lit(f.year_mean)) / F.lit(f.year_std)]
    parts += cycle(F.month(c) - 1, 12.0) + cycle(F.call_function("weekday", c), 7.0)
    parts.append((F.dayofyear(c) - 1) / F.lit(366.0))
    if f.kind == "timestamp":
        parts += cycle(F.hour(c) + F.minute(c) / 60.0 + F.second(c) / 3600.0, 24.0)
    return [p.cast("float") for p in parts]


def feature_vector(stats: FittedStats) -> Column:
    """array<float> of the transformed features, as fitted in stats: a missing value (null) imputed with
    the train split's fill, and a 0/1 `<name>_missing` feature after the column's own where asked."""
    pieces: list[Column] = []  # array<float> columns, concatenated in order
    parts: list[Column] = []  # scalar features not yet in a piece

    def flush() -> None:
        if parts:
            pieces.append(F.array(*parts))
            parts.clear()

    for f in stats.features:
        raw = F.col(f.name)
        fill = F.lit(f.fill)
        if f.transform == "date":  # the fill is ISO text
            fill = fill.cast("date" if f.kind == "date" else "timestamp_ntz")
        c = F.coalesce(raw, fill) if f.imputed else raw
        vocab = f.vocab or ()
        if f.transform == "standardize":
            parts.append(((c - F.lit(f.mean)) / F.lit(f.std)).cast("float"))
        elif f.transform == "onehot" and f.other:
            words = F.array(*[F.lit(v) for v in vocab]) if vocab else F.array().cast("array<string>")
            position = F.coalesce(F.call_function("array_position", words, c), F.lit(0))  # 0: not in vocab
            flush()
            pieces.append(_one_hot(position - 1, len(vocab)) if vocab else F.array().cast("array<float>"))
            parts.append((position == 0).cast("float"))
        elif f.transform == "onehot":
            parts += [F.when(c == F.lit(v), 1.0).otherwise(0.0).cast("float") for v in vocab]
        elif f.transform == "hash":
            flush()
            pieces.append(_one_hot(hash_bucket(c, f.buckets), f.buckets))
        elif f.transform == "date":
            parts += _date_parts(c, f)
        else:
            parts.append(c.cast("float"))
        if f.indicator:
            parts.append(raw.isNull().cast("float"))
    if not pieces:
        return F.array(*parts)
    flush()
    return pieces[0] if len(pieces) == 1 else F.concat(*pieces)


_NP_SPARK = {
    "int": (np.int32, T.IntegerType()),
    "long": (np.int64, T.LongType()),
    "string": (np.str_, T.StringType()),
    "float": (np.float32, T.FloatType()),
    "double": (np.float64, T.DoubleType()),
}


def unischema(cfg: Config, stats: FittedStats):
    """The Petastorm Unischema of a split: key, features (a float32 tensor: NdarrayCodec cells for images, a
    plain Parquet list of floats for tabular rows), label (int32 class or float32 value)."""
    from petastorm.codecs import NdarrayCodec, ScalarCodec
    from petastorm.unischema import Unischema, UnischemaField

    key = cfg.dataset.column("key")  # for its type: the statistics keep the key's name only
    np_key, spark_key = _NP_SPARK[key.type]
    np_label, spark_label = _NP_SPARK[label_spark_type(stats.task)]
    codec = NdarrayCodec() if stats.is_image else None
    return Unischema(
        f"{cfg.dataset.name}_schema",
        [
            UnischemaField(key.name, np_key, (), ScalarCodec(spark_key), False),
            UnischemaField("features", np.float32, stats.feature_shape, codec, False),
            UnischemaField("label", np_label, (), ScalarCodec(spark_label), False),
        ],
    )


def petastorm_metadata(schema, files: Sequence[PartFile]) -> dict[bytes, bytes]:
    """What Petastorm's materialize_dataset stores in `_common_metadata`: the pickled Unischema and the
    number of row groups in each file (its readers plan their work from these)."""
    from petastorm.etl.dataset_metadata import ROW_GROUPS_PER_FILE_KEY, UNISCHEMA_KEY

    groups = {f.path: f.row_groups for f in files}
    return {UNISCHEMA_KEY: pickle.dumps(schema), ROW_GROUPS_PER_FILE_KEY: json.dumps(groups).encode()}


def _scale_images(key: str, image: str, shape: tuple[int, ...], mean: float, std: float, out_shape: tuple[int, ...]):
    """uint8 image cells -> float32 (C, H, W) cells scaled with the train split's pixel mean and std."""
    import pyarrow as pa

    def scale(batches):
        for batch in batches:
            column = batch.column(image)
            valid = column.is_valid().to_numpy(zero_copy_only=False)  # new rows that failed validation: null
            x = decode_arrow(column.filter(pa.array(valid)), np.uint8, shape).astype(np.float32) / 255.0
            x = (x - mean) / std
            if len(shape) == 3:  # H, W, C -> C, H, W
                x = np.moveaxis(x, -1, 1)
            cells = encode_arrow(np.ascontiguousarray(x).reshape(len(x), *out_shape))
            if not valid.all():
                it = iter(cells.to_pylist())
                cells = pa.array([next(it) if ok else None for ok in valid], pa.binary())
            carried = [n for n in batch.schema.names if n not in (key, image)]
            yield pa.RecordBatch.from_arrays(
                [batch.column(key), cells, *(batch.column(n) for n in carried)], [key, "features", *carried]
            )

    return scale


def transform(
    clean: DataFrame, cfg: Config, stats: FittedStats, label_optional: bool = False, carry: Sequence[str] = ()
) -> DataFrame:
    """Clean typed rows -> (key, features float32 tensor, label, *carry), the Petastorm layout.

    label_optional: new rows to score, whose label may be null (the schema then allows it)."""
    key = stats.key
    label = label_index(stats, stats.label).cast(label_spark_type(stats.task)).alias("label")
    if not stats.is_image:
        return clean.select(F.col(key), feature_vector(stats).alias("features"), label, *carry)
    f = stats.features[0]
    fn = _scale_images(key, f.name, f.shape or (), f.mean, f.std, stats.feature_shape)
    rows = clean.select(key, f.name, label, *carry)
    fields = {fl.name: fl for fl in rows.schema.fields}
    schema = T.StructType(
        [
            fields[key],
            T.StructField("features", T.BinaryType(), False),
            T.StructField("label", fields["label"].dataType, label_optional or fields["label"].nullable),
            *(fields[c] for c in carry),
        ]
    )
    return rows.mapInArrow(fn, schema=schema)


class Preprocess(Stage):
    """Clean -> Petastorm train/val/test splits (+ rows with a label the train split never taught), with
    statistics fitted on the train split only and saved beside the splits."""

    name = "preprocess"
    accounting = ("rows_in", ("rows_train", "rows_val", "rows_test", "rows_quarantined"))

    def plan(self, spark: SparkSession, cfg: Config) -> Plan:
        paths = dataset_paths(cfg)
        require_input(spark, paths.clean, f"preprocess: no clean dataset at {paths.clean}: run the ingest stage first")
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
        return Plan(lineage.digest(spec), inputs, {"petastorm": paths.petastorm})

    def compute(self, spark: SparkSession, cfg: Config, plan: Plan, tmp: dict[str, str]) -> dict:
        clean = read_clean(spark, cfg, dataset_paths(cfg).clean).withColumn(SPLIT, split_column(cfg))
        with job_description(spark, "preprocess: fit statistics on the train split"):
            stats = fit_stats(clean.where(F.col(SPLIT) == "train"), cfg)
        with job_description(spark, "preprocess: the drift watch's reference, from the train split"):
            stats = fit_reference(clean.where(F.col(SPLIT) == "train"), cfg, stats)
        log.info("preprocess: statistics fitted on the train split; features of shape %s", list(stats.feature_shape))
        seen = Observation("preprocess")
        rows = _route_unknown_labels(clean, stats).observe(seen, *_observed(stats))
        out = tmp["petastorm"]
        with job_description(spark, "preprocess: transform and write the splits"):
            written = write_splits(spark, cfg, transform(rows, cfg, stats, carry=[SPLIT, *REASON_COLUMNS]), stats, out)
        counts = seen.get
        rows_in, quarantined = int(counts["rows"]), written.pop(QUARANTINE)
        stats = dataclasses.replace(stats, rows=written)
        save_stats(spark, stats, out)
        if quarantined:
            log.warning(
                "preprocess: %d rows have a label that is not among the classes learned from the train split %s; "
                "they are in %s/%s",
                quarantined,
                stats.class_names,
                plan.outputs["petastorm"],
                QUARANTINE,
            )
        return {
            "rows_in": rows_in,
            **{f"rows_{split}": written.get(split, 0) for split in SPLITS},
            "rows_quarantined": quarantined,
            "feature_dim": stats.input_width,
            **{f"imputed_share_{f.name}": counts[f"nulls_{f.name}"] / max(rows_in, 1) for f in stats.imputed},
        }


def run(spark: SparkSession, cfg: Config, force: bool = False) -> dict:
    """The preprocess stage. Returns metrics: rows per split and the feature dimension."""
    return execute(Preprocess(), spark, cfg, force)


QUARANTINE = "quarantine"  # beside the splits: rows whose label is not a class the train split taught
REASON_COLUMNS = ("reason", "reason_code")


def _observed(stats: FittedStats) -> list[Column]:
    """Counted on the way through the write: the rows, and the missing values of each imputed feature."""
    nulls = [F.count_if(F.col(f.name).isNull()).alias(f"nulls_{f.name}") for f in stats.imputed]
    return [F.count(F.lit(1)).alias("rows"), *nulls]


def _route_unknown_labels(clean: DataFrame, stats: FittedStats) -> DataFrame:
    """A row whose label is not one of the classes (a string label learned from the train split, met again
    in val or test with a class train never had) goes to the quarantine, with its reason."""
    if stats.is_regression:
        unknown = F.lit(False)
    else:
        unknown = label_index(stats, stats.label).isNull()
    text = F.coalesce(F.col(stats.label).cast("string"), F.lit(""))
    reason = F.concat(F.lit(f"label is not a class learned from the train split {stats.class_names}: "), text)
    return clean.select(
        "*",
        F.when(unknown, reason).alias("reason"),
        F.when(unknown, F.lit("label_value")).alias("reason_code"),
    ).withColumn(SPLIT, F.when(unknown, F.lit(QUARANTINE)).otherwise(F.col(SPLIT)))


def write_splits(spark: SparkSession, cfg: Config, rows: DataFrame, stats: FittedStats, out: str) -> dict[str, int]:
    """rows (key, features, label, _split, reason, reason_code) -> one Petastorm dataset per split under out
    (and the rows _split calls quarantine, with their reason), in one write. Returns the rows of each (from
    the footers)."""
    schema = unischema(cfg, stats)
    metadata: Callable[[Sequence[PartFile]], dict[bytes, bytes]] = lambda files: petastorm_metadata(schema, files)  # noqa: E731
    key = stats.key
    outputs = {name: Output(f"{out}/{name}", [key, "features", "label"], metadata) for name in SPLITS}
    outputs[QUARANTINE] = Output(f"{out}/{QUARANTINE}", [key, *REASON_COLUMNS])
    written = write_routed(
        spark,
        rows,
        SPLIT,
        outputs,
        staging=f"{out}-routing",
        settings=storage_settings(cfg),
        row_group_mb=cfg.preprocess.row_group_size_mb,
        options={"parquet.enable.dictionary": "false"},  # random floats: a dictionary only costs time
    )
    rows_per_split = {name: sum(f.rows for f in files) for name, files in written.items()}
    for name in SPLITS:
        log.info("preprocess: wrote %s split, %d rows", name, rows_per_split[name])
    return rows_per_split


def save_stats(spark: SparkSession, stats: FittedStats, petastorm: str) -> None:
    """The one writer of the statistics file, beside the splits in the folder petastorm (the temporary
    folder preprocess renames into place)."""
    HadoopFS(spark).write_bytes(f"{petastorm.rstrip('/')}/{STATS_FILE}", stats.to_json().encode())


def read_stats(spark: SparkSession, cfg: Config) -> FittedStats:
    """The statistics preprocess fitted for cfg's dataset (any version's file)."""
    return FittedStats.from_json(HadoopFS(spark).read_bytes(dataset_paths(cfg).stats))


def model_stats(mv: ModelRef, fallback: Callable[[], FittedStats]) -> FittedStats:
    """The statistics logged with the training run of model version mv (train logs them), so new rows are
    transformed exactly as its training rows were; fallback() for a model trained elsewhere, with a warning."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if mv.run_id:
        try:
            return FittedStats.from_dict(mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/{STATS_ARTIFACT}"))
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
