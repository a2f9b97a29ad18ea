"""Typed configuration: conf/base.yaml, overlaid by conf/<env>.yaml, overlaid by key.path=value overrides.

Everything else in dlpipe takes a `Config`; nothing reads YAML itself. Loading validates the whole tree
before any Spark starts, so a typo fails in a second with the key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dlpipe import redact

DEFAULT_ENV = "local"
# Free-form mappings whose keys themselves contain dots (`spark.conf.spark.sql.shuffle.partitions=4`).
_FREE_FORM = ("spark.conf", "storage.s3.hadoop", "tune.space")


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __repr__(self) -> str:
        """With secrets masked (dlpipe.redact): a config shown in a notebook or a log line keeps them."""
        return f"{type(self).__name__}({redact.tree(self.model_dump(mode='json'))!r})"

    __str__ = __repr__


class ProjectConfig(_Strict):
    root: str = Field(".", description="Project folder; relative paths elsewhere resolve against it.")


class SparkConfig(_Strict):
    master: str = "local[*]"
    app_name: str = "dlpipe"
    log_level: Literal["ALL", "DEBUG", "INFO", "WARN", "ERROR", "FATAL", "OFF"] = "WARN"
    conf: dict[str, str | int | float | bool] = Field(default_factory=dict)


class S3Config(_Strict):
    endpoint: str | None = Field(None, description="S3-compatible endpoint (http://host:port); None = AWS.")
    path_style_access: bool = False
    region: str | None = None
    credentials_file: str | None = Field(
        "conf/credentials.yaml",
        description="git-ignored YAML {s3: {access_key, secret_key}}; AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY win.",
    )
    jars: list[str] | None = Field(None, description="hadoop-aws + AWS SDK jars; default: .cache/servers/jars/s3a")
    hadoop: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="More fs.s3a.* settings for Spark, e.g. fs.s3a.retry.limit"
    )


class HdfsConfig(_Strict):
    webhdfs_url: str | None = Field(None, description="NameNode WebHDFS URL for Python-side access.")
    user: str | None = None


class StorageConfig(_Strict):
    warehouse: str = "data/warehouse"
    lock_wait_seconds: float = Field(
        0.0,
        ge=0,
        description="A run finding another one at work on the same dataset and warehouse waits this long for it "
        "to finish, then fails; 0: fails at once",
    )
    s3: S3Config = Field(default_factory=S3Config)
    hdfs: HdfsConfig = Field(default_factory=HdfsConfig)


class TrackingConfig(_Strict):
    uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_location: str = "mlruns/artifacts"
    experiment: str = "dlpipe"
    registered_model: str | None = Field(None, description="Default: <dataset.name>-classifier")


ColumnType = Literal["int", "long", "float", "double", "string", "boolean", "date", "timestamp", "image"]
NUMERIC_TYPES = ("int", "long", "float", "double")
DATETIME_TYPES = ("date", "timestamp")
# The default `format` of a date or timestamp column (a Spark datetime pattern).
DEFAULT_DATETIME_FORMATS = {"date": "yyyy-MM-dd", "timestamp": "yyyy-MM-dd HH:mm:ss"}
# The letters a `format` may use: each parses the same in Spark SQL and in the registered model's Python
# (dlpipe.model.rawmodel), by a regular expression of its exact shape and strptime. Longest first.
DATETIME_TOKENS = ("yyyy", "SSS", "MM", "dd", "HH", "mm", "ss", "M", "d", "H", "m", "s")


def datetime_pattern_parts(pattern: str) -> list[tuple[str, str]]:
    """A Spark datetime pattern as (kind, text) parts: ("token", "dd") or ("literal", "/"). Quoted text
    ('T') is a literal. A ValueError names a letter outside DATETIME_TOKENS."""
    parts: list[tuple[str, str]] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "'":
            end = pattern.find("'", i + 1)
            if end < 0:
                raise ValueError(f"format {pattern!r} has an unclosed quote")
            parts.append(("literal", pattern[i + 1 : end] if end > i + 1 else "'"))
            i = end + 1
        elif ch.isalpha():
            token = next((t for t in DATETIME_TOKENS if pattern.startswith(t, i)), None)
            run = len(pattern[i:]) - len(pattern[i:].lstrip(ch))
            if token is None or run != len(token):
                raise ValueError(
                    f"format {pattern!r}: {pattern[i : i + run]!r} is not supported; use yyyy, MM or M, dd or d, "
                    "HH or H, mm or m, ss or s, SSS, and literal separators (quote letters: 'T')"
                )
            parts.append(("token", token))
            i += len(token)
        else:
            parts.append(("literal", ch))
            i += 1
    if not any(kind == "token" for kind, _ in parts):
        raise ValueError(f"format {pattern!r} has no date or time fields (e.g. dd/MM/yyyy)")
    return parts


_DATETIME_DIGITS = {"yyyy": "[0-9]{4}", "SSS": "[0-9]{3}", "M": "[0-9]{1,2}", "d": "[0-9]{1,2}", "H": "[0-9]{1,2}"}


def datetime_regex(pattern: str) -> str:
    """The exact shape of text a pattern parses, as a regular expression that Java (Spark's rlike) and Python
    read alike: digits only where the pattern has fields, its literals elsewhere. Spark's parser sees only
    text of this shape (other text throws SparkUpgradeException in Spark 3.5, even in try_to_timestamp)."""
    out = []
    for kind, text in datetime_pattern_parts(pattern):
        if kind == "token":
            out.append(_DATETIME_DIGITS.get(text, "[0-9]{1,2}" if len(text) == 1 else "[0-9]{2}"))
        else:
            out.append("".join("\\" + ch if ch in ".+*?()|{}$[]^\\" else ch for ch in text))
    return "^" + "".join(out) + "$"


class ColumnSpec(_Strict):
    name: str
    type: ColumnType
    role: Literal["key", "feature", "label", "ignore"] = "feature"
    required: bool = True
    transform: Literal["standardize", "onehot", "hash", "scale", "none"] | None = Field(
        None,
        description="Feature transform; default: standardize numbers, one-hot strings, scale images, 0/1 for "
        "booleans, the date expansion for dates and timestamps. hash: a string's bucket of `buckets`, one-hot.",
    )
    top_k: int | None = Field(
        None, ge=1, description="one-hot strings: the k most frequent values of the train split, others -> __other__"
    )
    buckets: int | None = Field(None, ge=2, description="transform: hash: how many buckets (one 0/1 feature each)")
    format: str | None = Field(
        None, description="date/timestamp text: a Spark datetime pattern; default yyyy-MM-dd (HH:mm:ss)"
    )
    min: float | None = Field(None, description="Smallest valid value; smaller values are quarantined.")
    max: float | None = Field(None, description="Largest valid value; larger values are quarantined.")
    values: list[str] | None = Field(
        None, description="Allowed values of a string column; of a string label: its classes, in this order."
    )
    shape: list[int] | None = Field(None, description="Image columns: [height, width] or [height, width, channels].")
    missing: Literal["quarantine", "impute", "indicator"] | None = Field(
        None,
        description="A missing value of a feature: quarantine the row (default), impute it (fitted on the train "
        "split), or impute it and add a 0/1 feature `<name>_missing`. `required: false` means impute.",
    )
    impute: Literal["mean", "median", "most_frequent"] | None = Field(
        None, description="What replaces a missing value; default: mean for numbers, most_frequent for strings."
    )
    path: str | None = Field(None, description="jsonl: dotted path of a nested field; default: the name")

    @property
    def effective_transform(self) -> str:
        if self.transform is not None:
            return self.transform
        defaults = {"string": "onehot", "image": "scale", "boolean": "none", "date": "date", "timestamp": "date"}
        return defaults.get(self.type, "standardize")

    @property
    def datetime_format(self) -> str | None:
        """The Spark datetime pattern of a date or timestamp column's text (None for other types)."""
        if self.type not in DATETIME_TYPES:
            return None
        return self.format or DEFAULT_DATETIME_FORMATS[self.type]

    @property
    def missing_policy(self) -> str:
        """quarantine | impute | indicator: what a missing value in this column leads to."""
        if self.missing is not None:
            return self.missing
        return "impute" if self.role == "feature" and not self.required else "quarantine"

    @property
    def impute_with(self) -> str:
        return self.impute or ("mean" if self.type in NUMERIC_TYPES else "most_frequent")

    @field_validator("path")
    @classmethod
    def _dotted(cls, path: str | None) -> str | None:
        if path is not None and (not path or any(not part.strip() for part in path.split("."))):
            raise ValueError(f"path '{path}' is not a dotted path of field names, e.g. patient.age")
        return path

    @model_validator(mode="after")
    def _image_shape(self) -> ColumnSpec:
        if self.type == "image" and (not self.shape or len(self.shape) not in (2, 3)):
            raise ValueError(f"image column '{self.name}' needs shape: [height, width] or [height, width, channels]")
        return self

    @model_validator(mode="after")
    def _missing(self) -> ColumnSpec:
        where = f"column '{self.name}'"
        if self.missing in ("impute", "indicator") or self.impute is not None:
            if self.role != "feature" or self.type == "image":
                raise ValueError(
                    f"{where}: missing: {self.missing or 'impute'} is for tabular features; a {self.role} column's "
                    "missing value is always quarantined (remove missing/impute)"
                )
        if self.impute in ("mean", "median") and self.type not in NUMERIC_TYPES:
            raise ValueError(f"{where} is a {self.type}: impute: {self.impute} needs numbers; use most_frequent")
        return self

    @model_validator(mode="after")
    def _feature_types(self) -> ColumnSpec:
        """The options of booleans, dates and many-valued strings, each with the column and the fix."""
        where = f"column '{self.name}'"
        if self.format is not None:
            if self.type not in DATETIME_TYPES:
                raise ValueError(f"{where}: format is for type: date or timestamp (this is {self.type}); remove it")
            datetime_pattern_parts(self.format)
        if self.type in ("boolean", *DATETIME_TYPES) and self.transform is not None:
            becomes = "one 0/1 feature" if self.type == "boolean" else "year, month, day of week, ... features"
            raise ValueError(f"{where}: a {self.type} column becomes {becomes}; remove transform: {self.transform}")
        if self.type in ("boolean", *DATETIME_TYPES) and (self.min is not None or self.max is not None):
            raise ValueError(f"{where}: min/max are for numbers; remove them from this {self.type} column")
        if self.top_k is not None:
            if self.type != "string" or self.effective_transform != "onehot":
                raise ValueError(
                    f"{where}: top_k is for one-hot string features (this is a {self.type} with transform "
                    f"{self.effective_transform}); remove top_k"
                )
            if self.values is not None:
                raise ValueError(
                    f"{where}: top_k learns the vocabulary and values: declares it; keep one (values: for a short "
                    "closed list, whose other values are quarantined; top_k: for many values, others -> __other__)"
                )
        if self.transform == "hash":
            if self.type != "string":
                raise ValueError(f"{where}: transform: hash is for string columns (this is {self.type})")
            if self.buckets is None:
                raise ValueError(f"{where}: transform: hash needs buckets: <int> (how many, e.g. 64)")
            if self.values is not None:
                raise ValueError(f"{where}: transform: hash takes any value; remove values: (or use one-hot)")
        elif self.buckets is not None:
            raise ValueError(f"{where}: buckets is for transform: hash; add transform: hash or remove buckets")
        return self


class SourceConfig(_Strict):
    uri: str = Field(..., description="file://, hdfs://, s3a:// (s3:// means s3a://) or a path under the project")
    format: Literal["csv", "jsonl", "parquet", "image"] = "csv"
    options: dict[str, str | int | float | bool] = Field(default_factory=dict, description="Spark reader options")
    label_from_path: str | None = Field(None, description="image: regex whose first group in the path is the label")


class GeneratorConfig(_Strict):
    kind: Literal["tabular", "regression", "digits", "penguins", "breast_cancer"] = Field(
        "tabular",
        description="tabular, regression, digits: made up (rows, files, ... apply); penguins, breast_cancer: real "
        "tables that installed packages carry (palmerpenguins, scikit-learn), written as they are, plus an id",
    )
    rows: int = Field(30000, gt=0)
    files: int = Field(4, gt=0)
    num_numeric: int = Field(8, gt=0)
    categories: list[str] = Field(default_factory=lambda: ["a", "b", "c", "d"], min_length=1)
    label_noise: float = Field(
        0.1, ge=0, le=1, description="tabular: share of random labels; regression: std of the target's noise"
    )
    malformed_fraction: float = Field(0.03, ge=0, lt=1)
    shift: float = Field(
        0.0,
        description="tabular, regression: added to every numeric feature (the same problem under a covariate shift)",
    )
    seed: int = 7


class SplitConfig(_Strict):
    keys: list[str] | None = Field(None, description="Columns hashed to choose the split; default: the key column")
    train: float = Field(0.7, gt=0, lt=1)
    val: float = Field(0.15, gt=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:g}")
        return self


class DatasetConfig(_Strict):
    name: str
    source: SourceConfig
    task: Literal["classification", "regression"] = Field(
        "classification",
        description="classification: a class name (string label) or index in [0, num_classes); regression: a number",
    )
    num_classes: int | None = Field(
        None, ge=2, description="integer labels only: how many classes (string labels: from their values or data)"
    )
    columns: list[ColumnSpec] = Field(..., min_length=2)
    split: SplitConfig = Field(default_factory=SplitConfig)
    max_bad_fraction: float = Field(0.1, ge=0, le=1, description="Ingest fails above this share of bad rows.")
    duplicates: Literal["keep_all", "keep_first", "quarantine"] = Field(
        "keep_all",
        description="Valid rows that share a key: keep_all keeps them (the default); keep_first keeps the first "
        "(by input file, then line) and quarantines the others (reason_code duplicate_key); quarantine "
        "quarantines every row of such a key. Ingest always reports duplicate_keys and duplicate_rows.",
    )
    generator: GeneratorConfig | None = None

    @model_validator(mode="after")
    def _roles(self) -> DatasetConfig:
        roles = [c.role for c in self.columns]
        if roles.count("key") != 1 or roles.count("label") != 1:
            raise ValueError("dataset.columns needs exactly one column with role 'key' and one with role 'label'")
        if "feature" not in roles:
            raise ValueError("dataset.columns needs at least one column with role 'feature'")
        names = [c.name for c in self.columns]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"dataset.columns has duplicate names {dupes}")
        key = self.column("key")
        if key.type not in ("int", "long", "string"):
            raise ValueError(f"key column '{key.name}' is {key.type}; a key is an int, long or string")
        unknown = sorted(set(self.split.keys or []) - set(names))
        if unknown:
            raise ValueError(f"dataset.split.keys {unknown} are not columns of the dataset")
        self._check_paths()
        images = [c for c in self.columns if c.type == "image"]
        if self.source.format == "image":
            if len(images) != 1 or images[0].role != "feature" or len(self.features) != 1:
                raise ValueError("an image dataset has exactly one feature column, of type image")
            if not self.source.label_from_path:
                raise ValueError("an image dataset needs source.label_from_path (a regex capturing the label)")
            if self.duplicates != "keep_all":
                raise ValueError(
                    f"duplicates: {self.duplicates}: an image dataset's key is each file's path, which no two rows "
                    "share; remove duplicates (it applies to tabular sources, whose key column can repeat)"
                )
        elif images:
            raise ValueError("image columns need source.format: image")
        label = self.column("label")
        if self.task == "classification":
            if label.type not in ("int", "long", "string"):
                raise ValueError(
                    f"a classification label is a string (a class name) or an int (a class index); "
                    f"label column '{label.name}' is {label.type}"
                )
            if label.type == "string" and label.values is not None:
                if len(label.values) < 2 or len(set(label.values)) != len(label.values):
                    raise ValueError(f"label column '{label.name}': values needs 2 or more distinct class names")
                if self.num_classes is not None and self.num_classes != len(label.values):
                    raise ValueError(
                        f"num_classes is {self.num_classes} but label column '{label.name}' declares "
                        f"{len(label.values)} values; remove num_classes (it follows from the values)"
                    )
            if label.type != "string" and self.num_classes is None:
                raise ValueError(
                    f"an integer label needs num_classes (2 or more): its classes are 0 .. num_classes-1; "
                    f"or declare label column '{label.name}' as type: string with its values"
                )
        else:
            if self.num_classes is not None:
                raise ValueError("num_classes is for classification; remove it, or set task: classification")
            if label.type not in ("int", "long", "float", "double"):
                raise ValueError(f"a regression label is a number; label column '{label.name}' is {label.type}")
        return self

    def _check_paths(self) -> None:
        """`path` addresses a field nested in a JSON line; no path may lie inside another (one JSON value
        cannot be both a field and an object holding fields)."""
        with_path = [c.name for c in self.columns if c.path is not None]
        if with_path and self.source.format != "jsonl":
            raise ValueError(
                f"columns {with_path} have a path, which is for source.format: jsonl (this source is "
                f"{self.source.format}); remove path, or name the column as it is in the files"
            )
        paths = {c.name: (c.path.split(".") if c.path else [c.name]) for c in self.columns}
        for a, pa in paths.items():
            for b, pb in paths.items():
                if a != b and len(pa) < len(pb) and pb[: len(pa)] == pa:
                    raise ValueError(
                        f"column '{a}' (path {'.'.join(pa)}) holds column '{b}' (path {'.'.join(pb)}): "
                        "a JSON value cannot be both a field and an object of fields"
                    )

    def column(self, role: str) -> ColumnSpec:
        return next(c for c in self.columns if c.role == role)

    @property
    def declared_classes(self) -> list[str] | None:
        """Class names in index order where the YAML fixes them: a string label's values, or 0..k-1 for an
        integer label. None: a string label without values, whose classes preprocess learns (train split)."""
        if self.task != "classification":
            return None
        label = self.column("label")
        if label.type == "string":
            return list(label.values) if label.values is not None else None
        return [str(k) for k in range(self.num_classes or 0)]

    @property
    def features(self) -> list[ColumnSpec]:
        return [c for c in self.columns if c.role == "feature"]

    @property
    def image_column(self) -> ColumnSpec:
        """The image column of an image dataset (validation guarantees exactly one)."""
        return next(c for c in self.columns if c.type == "image")

    @property
    def split_keys(self) -> list[str]:
        return self.split.keys or [self.column("key").name]


class PreprocessConfig(_Strict):
    row_group_size_mb: int = Field(
        8, gt=0, description="Parquet row group size of the Petastorm splits (the unit readers load and shuffle)"
    )


class ModelConfig(_Strict):
    factory: str = Field(
        "auto", description="mlp | cnn | auto (cnn for images, else mlp) | package.module:function of yours"
    )
    hidden: list[int] = Field(default_factory=lambda: [64, 64], description="widths of the dense layers")
    channels: list[int] = Field(default_factory=lambda: [16, 32], description="cnn: channels of the conv layers")
    dropout: float = Field(0.0, ge=0, lt=1)
    params: dict[str, Any] = Field(default_factory=dict, description="more keyword arguments for your factory")


class EarlyStoppingConfig(_Strict):
    patience: int = Field(3, ge=0, description="epochs without a better validation loss before stopping; 0 = off")
    min_delta: float = Field(0.0, ge=0)


class FaultInjectionConfig(_Strict):
    """For fault-tolerance tests: kill this rank's process at the end of this epoch, first attempt only."""

    rank: int = Field(..., ge=0)
    epoch: int = Field(..., ge=1)


class TrainConfig(_Strict):
    launcher: Literal["horovod", "torch_distributor"] = "horovod"
    max_attempts: int = Field(
        3, ge=1, description="torch_distributor: runs of the job, each resuming from the last checkpoint"
    )
    num_proc: int = Field(2, gt=0)
    epochs: int = Field(12, gt=0)
    batch_size: int = Field(128, gt=1)
    lr: float = Field(0.003, gt=0, description="learning rate of one rank; scaled by the number of ranks")
    weight_decay: float = Field(0.0, ge=0, description="Adam's L2 penalty on the weights")
    warmup_epochs: float = Field(1.0, ge=0, description="epochs of linear warm-up from lr to lr x ranks")
    model: ModelConfig = Field(default_factory=ModelConfig)
    init_from: str | None = Field(
        None,
        description="warm start: a registered model (models:/name@alias, models:/name/version) or a run's "
        "(runs:/<run id>/<path>) whose weights this training starts from; a head of another width starts fresh",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="parameters kept as init_from gave them: names or prefixes, as model.named_parameters() "
        "names them (the MLP's first layer: '1.')",
    )
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    checkpoint_dir: str | None = Field(None, description="default: <warehouse>/<dataset>/checkpoints")
    resume: bool = Field(False, description="continue from the last checkpoint of the same data and config")
    fault_injection: FaultInjectionConfig | None = None
    seed: int = 42
    threads_per_rank: int = Field(1, gt=0)
    gloo_iface: str | None = Field(
        None, description="Network interface for Gloo; default: the one of the task's address."
    )
    horovod_cycle_ms: float | None = Field(
        None,
        gt=0,
        description="Horovod's coordination cycle (HOROVOD_CYCLE_TIME, ms); null: Horovod's default. Every cycle "
        "costs each rank CPU: with one core per rank and steps of tens of ms, about 10 leaves it to training",
    )
    slot_wait_seconds: float = Field(
        60.0, ge=0, description="how long to wait for executors to register before failing for lack of slots"
    )
    mixed_precision: Literal["off", "bf16", "fp16"] = Field(
        "off", description="autocast dtype: bf16 on CPU or GPU; fp16 on GPU only (with loss scaling)"
    )
    allreduce: Literal["auto", "framework", "host"] = Field(
        "auto",
        description="gradient averaging: the framework's own (NCCL/Gloo), or on host copies (host), which a GPU "
        "needs when Horovod was built without GPU operations; auto picks",
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads a bare `off` as false

    @model_validator(mode="after")
    def _warm_start(self) -> TrainConfig:
        if self.init_from is not None and not self.init_from.startswith(("models:/", "runs:/")):
            raise ValueError(
                f"init_from '{self.init_from}': give models:/<name>@<alias>, models:/<name>/<version> or "
                "runs:/<run id>/<path>"
            )
        if self.freeze and self.init_from is None:
            raise ValueError("freeze keeps layers as init_from gave them: set train.init_from too")
        return self


class ParamRange(_Strict):
    """One dimension of the search space: a range (low..high, log-scaled or stepped), a list of choices, or
    (for `train.model.hidden`) a number of layers and a range of widths, each layer's width its own."""

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: list[Any] | None = None
    layers: tuple[int, int] | None = Field(None, description="hidden layers: [fewest, most]")
    width: tuple[int, int] | None = Field(None, description="hidden layers: [narrowest, widest], log-scaled")

    @model_validator(mode="after")
    def _one_kind(self) -> ParamRange:
        ranged, chosen, layered = self.low is not None or self.high is not None, self.choices, self.layers
        if sum(bool(k) for k in (ranged, chosen, layered)) != 1:
            raise ValueError(
                "give low and high, or choices, or layers and width (e.g. {low: 0.0003, high: 0.03, log: true})"
            )
        if ranged and (self.low is None or self.high is None or self.low >= self.high):
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if ranged and self.log and self.low <= 0:
            raise ValueError("a log-scaled range needs low > 0")
        if layered and (
            self.width is None or not 1 <= self.layers[0] <= self.layers[1] or not 1 <= self.width[0] <= self.width[1]
        ):
            raise ValueError("layers: [fewest, most] and width: [narrowest, widest], all at least 1")
        return self

    @property
    def is_int(self) -> bool:
        """A range of whole numbers: both ends written as integers (epochs: {low: 5, high: 30})."""
        return (
            isinstance(self.low, int)
            and isinstance(self.high, int)
            and (self.step is None or self.step == int(self.step))
        )


# What the tune stage searches by default: the built-in model's training settings.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "train.lr": {"low": 0.0003, "high": 0.03, "log": True},
    "train.batch_size": {"choices": [64, 128, 256, 512]},
    "train.model.hidden": {"layers": (1, 3), "width": (32, 256)},
    "train.model.dropout": {"low": 0.0, "high": 0.3},
    "train.weight_decay": {"choices": [0.0, 1e-5, 1e-4, 1e-3]},
    "train.epochs": {"low": 8, "high": 30},
}


class TuneConfig(_Strict):
    """Hyperparameter search before train (the `tune` stage): Optuna's TPE sampler, trials as Spark tasks
    (one rank each, train split in, validation split scored), poor trials pruned on their per-epoch
    validation loss; the best trial's settings are what train then uses."""

    enabled: bool = Field(False, description="run the tune stage before train, and train with what it found")
    trials: int = Field(20, gt=0, description="trials in the study (a resumed study counts the ones it has)")
    concurrency: int = Field(2, gt=0, description="trials at once, each a Spark task of one core")
    seed: int = Field(42, description="the sampler's seed")
    startup_trials: int = Field(5, ge=0, description="random trials before TPE takes over")
    prune_warmup_epochs: int = Field(3, ge=0, description="no trial is pruned before this many epochs")
    prune_min_trials: int = Field(3, ge=0, description="no pruning until this many trials have finished")
    storage: str | None = Field(
        None,
        description="where the study lives, so a killed tune resumes it: an Optuna journal file on the driver "
        "(default <project.root>/data/tune/<dataset>.journal) or a database URL (sqlite:///..., postgresql://...)",
    )
    space: dict[str, ParamRange] = Field(
        default_factory=lambda: {k: ParamRange.model_validate(v) for k, v in DEFAULT_SPACE.items()},
        description="config key (train.*) -> its range; train.model.params.<name> reaches your factory",
    )

    @field_validator("space", mode="before")
    @classmethod
    def _over_defaults(cls, space: Any) -> Any:
        """What conf gives is laid over the default space: a key adds or replaces a dimension, null drops one."""
        if not isinstance(space, dict):
            return space
        merged = {**DEFAULT_SPACE, **space}
        return {k: v for k, v in merged.items() if v is not None}

    @field_validator("space")
    @classmethod
    def _train_keys(cls, space: dict[str, ParamRange]) -> dict[str, ParamRange]:
        for key in space:
            _check_tunable(key)
        return space


PARTITION_COLUMNS = ("model_version", "prediction")


class InferConfig(_Strict):
    model_uri: str | None = Field(
        None, description="Default: models:/<model name>@candidate (a variant: @candidate-<variant>)"
    )
    variant: Literal["fp32", "int8", "onnx", "prune", "prune-onnx", "distill", "distill-onnx"] = Field(
        "fp32",
        description="the candidate's variant to score with: int8 (train's); the compress stage's (its README section)",
    )
    batch_size: int = Field(4096, gt=0)
    bytes_per_task: int = Field(
        4 * 2**20,
        gt=0,
        description="input bytes a scoring task takes at least: each task's Python worker loads the model, so a "
        "small input is scored in fewer tasks than it has files (a large one keeps Spark's split)",
    )
    source: str | None = Field(
        None,
        description="null: score the test split. A URI of new raw data (dataset.source's format and columns, "
        "the label optional) to validate, transform with the model's training statistics and score",
    )
    output: str | None = Field(
        None, description="Default: <warehouse>/<dataset>/predictions (test split) or .../scored (infer.source)"
    )
    partition_by: list[str] = Field(
        default_factory=lambda: ["model_version"],
        description="Parquet partition columns of the output, from: model_version, prediction (empty: none)",
    )

    @field_validator("partition_by")
    @classmethod
    def _known_columns(cls, value: list[str]) -> list[str]:
        bad = [c for c in value if c not in PARTITION_COLUMNS]
        if bad:
            raise ValueError(f"cannot partition predictions by {bad}; choose from {list(PARTITION_COLUMNS)} or []")
        return value


class MonitorConfig(_Strict):
    """The drift watch of every infer run on new data (dlpipe.data.drift): thresholds whose crossing raises an
    alert (the run is tagged dlpipe.drift=alert, naming what crossed)."""

    enabled: bool = Field(True, description="count drift while scoring new data (infer.source)")
    psi: float = Field(0.25, gt=0, description="a feature's population stability index vs the train split")
    unseen_share: float = Field(0.05, ge=0, le=1, description="share of a learned category's values never seen")
    missing_share_increase: float = Field(
        0.1, ge=0, le=1, description="rise of an imputed feature's missing share over the train split's"
    )
    quarantined_share: float = Field(0.05, ge=0, le=1, description="share of the rows quarantined")
    prediction_psi: float = Field(0.25, gt=0, description="PSI of the predicted classes (values) vs the train labels")
    fail_on_alert: bool = Field(False, description="fail the infer run on an alert (nothing is written)")


class QuantizeConfig(_Strict):
    enabled: bool = Field(True, description="build, measure and register an int8 variant after training")
    max_accuracy_drop: float = Field(
        0.01, ge=0, description="the int8 variant is registered only if it loses at most this much accuracy"
    )
    max_rmse_increase: float = Field(
        0.02, ge=0, description="regression: ... only if its RMSE is at most this much larger (relative)"
    )


class BaselineConfig(_Strict):
    """The gradient-boosted tree model the network must beat (dlpipe.model.baseline): XGBoost's Spark estimator
    on the same train split, early-stopped on the val split, scored on the test rows."""

    enabled: bool = Field(True, description="train, score, log and register the tree baseline in evaluate (tabular)")
    rounds: int = Field(300, gt=0, description="boosting rounds at most (early stopping on the val split)")
    early_stopping_rounds: int = Field(20, gt=0, description="stop after this many rounds without val improvement")
    max_depth: int = Field(6, gt=0)
    learning_rate: float = Field(0.1, gt=0, le=1)
    workers: int | None = Field(
        None, gt=0, description="XGBoost workers (Spark barrier tasks); default: Spark's default parallelism"
    )
    max_train_rows: int = Field(
        2_000_000,
        gt=0,
        description="a larger train split is sampled down to about this many rows (each worker holds its share)",
    )
    register_model: bool = Field(True, description="register the tree model (alias `baseline`) so a user can choose it")


class PruneConfig(_Strict):
    """Structured pruning of the candidate MLP: the hidden units with the smallest weights are removed (a
    smaller dense network, not a sparse mask), then the smaller network is fine-tuned on the train split
    through train's launcher."""

    sparsity: float = Field(
        0.0, ge=0, lt=1, description="share of each hidden layer's units removed (0: no pruned variant)"
    )
    finetune_epochs: int = Field(3, ge=0, description="epochs of fine-tuning after pruning (0: none)")
    finetune_lr: float | None = Field(None, gt=0, description="default: train.lr / 3")


class DistillConfig(_Strict):
    """Knowledge distillation: a smaller student MLP trained on the candidate's soft targets (and the labels)
    through train's launcher (Horovod or TorchDistributor), on the train split."""

    enabled: bool = Field(False, description="train and measure a distilled student")
    hidden: list[int] = Field(default_factory=lambda: [32], min_length=1, description="the student's layer widths")
    temperature: float = Field(4.0, gt=0, description="softens both models' outputs for the soft-target loss")
    alpha: float = Field(
        0.7, ge=0, le=1, description="weight of the soft-target loss; 1 - alpha goes to the labels' own loss"
    )
    epochs: int | None = Field(None, gt=0, description="default: train.epochs")


class CompressConfig(_Strict):
    """Compressed variants of the candidate, made by the compress stage after train: each measured on the
    validation rows against the fp32 model (quality delta, size, single-thread and Spark rows/s) and
    registered under its own alias, candidate-<variant>, when it passes the gate below."""

    onnx: bool = Field(True, description="export to ONNX, scored with ONNX Runtime (alias candidate-onnx; tabular)")
    prune: PruneConfig = Field(default_factory=PruneConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    max_accuracy_drop: float = Field(0.01, ge=0, description="a variant is registered only if it loses at most this")
    max_rmse_increase: float = Field(
        0.02, ge=0, description="regression: ... only if its RMSE is at most this much larger (relative)"
    )

    @property
    def enabled(self) -> bool:
        """Whether the compress stage has a variant to make."""
        return self.onnx or self.prune.sparsity > 0 or self.distill.enabled


class EvaluateConfig(_Strict):
    """The quality gate between the `candidate` alias and `production`."""

    promote: bool = Field(True, description="false: evaluate only, never move the production alias")
    promote_metric: Literal["auto", "accuracy", "macro_f1", "auc", "log_loss", "rmse", "mae"] = Field(
        "auto",
        description="compared on the same test rows (log_loss, rmse, mae: lower is better); auto: accuracy for "
        "classification, rmse for regression",
    )
    promote_margin: float = Field(
        0.0, ge=0, description="how much better the candidate must be than production to replace it"
    )
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    require_beat_baseline: bool = Field(
        False, description="promote only a candidate whose promote_metric beats the tree baseline's"
    )


class Config(_Strict):
    project: ProjectConfig = Field(default_factory=ProjectConfig)
    spark: SparkConfig = Field(default_factory=SparkConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    dataset: DatasetConfig
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="after")
    def _fits_task(self) -> Config:
        if self.dataset.task == "regression" and "prediction" in self.infer.partition_by:
            raise ValueError(
                "infer.partition_by: a regressor's prediction is a number, one folder per value; use model_version"
            )
        metric = self.evaluate.promote_metric
        regression = metric in ("rmse", "mae")
        if metric != "auto" and regression != (self.dataset.task == "regression"):
            raise ValueError(
                f"evaluate.promote_metric={metric} does not fit a {self.dataset.task} dataset; use auto, or "
                + ("rmse or mae" if self.dataset.task == "regression" else "accuracy, macro_f1, auc or log_loss")
            )
        if self.evaluate.require_beat_baseline and not self.evaluate.baseline.enabled:
            raise ValueError(
                "evaluate.require_beat_baseline=true needs the baseline: set evaluate.baseline.enabled=true "
                "(or require_beat_baseline=false)"
            )
        if self.evaluate.require_beat_baseline and self.dataset.source.format == "image":
            raise ValueError("evaluate.require_beat_baseline: the tree baseline is for tabular data, not images")
        return self

    @property
    def promote_metric(self) -> str:
        metric = self.evaluate.promote_metric
        if metric == "auto":
            return "rmse" if self.dataset.task == "regression" else "accuracy"
        return metric

    @property
    def root(self) -> Path:
        return Path(self.project.root)

    @property
    def model_name(self) -> str:
        kind = "regressor" if self.dataset.task == "regression" else "classifier"
        return self.tracking.registered_model or f"{self.dataset.name}-{kind}"

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params."""
        return flatten(self.model_dump(mode="json"))


_UNTUNABLE = (
    "launcher",
    "num_proc",
    "resume",
    "fault_injection",
    "checkpoint_dir",
    "max_attempts",
    "init_from",
    "freeze",
)


def _check_tunable(key: str) -> None:
    """A search-space key must name a training setting (train.<field>, train.model.<field> or
    train.model.params.<anything>)."""
    parts = key.split(".")
    if parts[0] != "train" or len(parts) < 2:
        raise ValueError(f"'{key}': the space holds training settings, e.g. train.lr or train.model.params.<name>")
    if parts[1:3] == ["model", "params"] and len(parts) == 4:
        return
    model: type[BaseModel] = TrainConfig
    for i, part in enumerate(parts[1:], 1):
        fields = model.model_fields
        if part not in fields or part in _UNTUNABLE:
            known = ", ".join(f"{'.'.join(parts[:i])}.{f}" for f in fields if f not in _UNTUNABLE)
            raise ValueError(f"'{key}' is not a tunable setting; known: {known}")
        sub = _submodel(fields[part].annotation)
        if i == len(parts) - 1:
            if sub is not None:
                raise ValueError(f"'{key}' is a section; name one of its settings")
            return
        if sub is None:
            raise ValueError(f"'{'.'.join(parts[: i + 1])}' is a value, not a section")
        model = sub


# ------------------------------------------------------------------------------------------------------
def default_conf_dir() -> Path:
    """`./conf` when run from the project folder, else the conf/ beside the dlpipe package."""
    env_dir = os.environ.get("DLPIPE_CONF_DIR")
    if env_dir:
        return Path(env_dir)
    cwd_conf = Path.cwd() / "conf"
    if (cwd_conf / "base.yaml").is_file():
        return cwd_conf
    return Path(__file__).resolve().parent.parent / "conf"


def load_config(
    env: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    conf_dir: str | Path | None = None,
) -> Config:
    """Load base + env + overrides into a validated Config; raise ConfigError naming the bad key."""
    conf_dir = Path(conf_dir) if conf_dir else default_conf_dir()
    env = env or os.environ.get("DLPIPE_ENV") or DEFAULT_ENV
    base_file = conf_dir / "base.yaml"
    if not base_file.is_file():
        raise ConfigError(f"no {base_file}: run from the project folder or pass --conf-dir / set DLPIPE_CONF_DIR")
    data, dataset_file = _with_dataset(_read_yaml(base_file), {}, conf_dir, None)
    env_file = conf_dir / f"{env}.yaml"
    if not env_file.is_file():
        known = sorted(p.stem for p in conf_dir.glob("*.yaml") if p.stem not in ("base", "credentials"))
        raise ConfigError(f"environment '{env}' has no file {env_file}; known environments: {', '.join(known)}")
    data, dataset_file = _with_dataset(_read_yaml(env_file), data, conf_dir, dataset_file)
    for item in overrides:
        if item.partition("=")[0].strip() == "dataset":  # dataset=NAME picks conf/datasets/NAME.yaml
            dataset_file = _dataset_path(conf_dir, item.partition("=")[2].strip())
            data["dataset"] = _dataset_file(dataset_file)
        else:
            apply_override(data, item)
    data.setdefault("project", {})
    root = Path(data["project"].get("root") or ".")
    if not root.is_absolute():
        root = (conf_dir.resolve().parent / root).resolve()
    data["project"]["root"] = str(root)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, data, env, dataset_file)) from None
    redact.mapping(cfg.flat())  # remember the secrets it holds: masked wherever they would be shown
    return cfg


def _dataset_path(conf_dir: Path, name: str) -> Path:
    path = conf_dir / "datasets" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (conf_dir / "datasets").glob("*.yaml"))
        raise ConfigError(f"dataset '{name}' has no file {path}; known datasets: {', '.join(known) or 'none'}")
    return path


def _dataset_file(path: Path) -> dict[str, Any]:
    spec = _read_yaml(path)
    spec.setdefault("name", path.stem)
    return spec


def _with_dataset(
    layer: dict[str, Any], below: dict[str, Any], conf_dir: Path, dataset_file: Path | None
) -> tuple[dict[str, Any], Path | None]:
    """Overlay a config layer; a `dataset: NAME` in it replaces the dataset with conf/datasets/NAME.yaml.
    Returns the merged tree and the dataset's file (what messages about dataset keys name)."""
    layer = dict(layer)
    if isinstance(layer.get("dataset"), str):
        dataset_file = _dataset_path(conf_dir, layer.pop("dataset"))
        below = {**below, "dataset": _dataset_file(dataset_file)}
    return deep_merge(below, layer), dataset_file


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(p) for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p) or exc
        raise ConfigError(f"{path}{where}: not valid YAML: {what}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of keys at the top, found {type(loaded).__name__}")
    return loaded


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Return base overlaid by over; mappings merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one `key.path=value` override in place; the value is parsed as YAML (10, true, [64, 32])."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' is not of the form key.path=value (e.g. train.epochs=5)")
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    for prefix in _FREE_FORM:
        if key.startswith(prefix + "."):
            parts = prefix.split(".") + [key[len(prefix) + 1 :]]
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"override '{item}': '{where}' is a value ({child!r}), not a section")
        node = child
    node[parts[-1]] = value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = tree
    return out


def _lookup(data: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside an annotation such as `Foo`, `Foo | None` or `list[Foo]`."""
    for cand in (annotation, *get_args(annotation), *(a for arg in get_args(annotation) for a in get_args(arg))):
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            return cand
    return None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class holding the key at loc, to list the keys allowed beside it."""
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        model = _submodel(field.annotation) if field else None
    return model


def _explain(exc: ValidationError, data: dict[str, Any], env: str, dataset_file: Path | None = None) -> str:
    sources = f"conf/base.yaml + conf/{env}.yaml + overrides"
    if dataset_file is not None:
        sources += f"; dataset keys from {dataset_file}"
    lines = [f"invalid configuration ({sources}):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "<top>"
        where = ""
        if dataset_file is not None and loc and loc[0] == "dataset":
            where = f" in {dataset_file} (key '{'.'.join(str(p) for p in loc[1:]) or '<top>'}')"
        value = redact.value(key, _lookup(data, loc))
        kind = err["type"]
        if kind == "extra_forbidden":
            model = _model_at(loc)
            allowed = ", ".join(sorted(model.model_fields)) if model else "see conf/base.yaml"
            lines.append(f"  unknown key '{key}'{where} (value {value!r}); allowed keys here: {allowed}")
        elif kind == "missing":
            fix = f"set it in {dataset_file}" if where else f"set it in conf/{env}.yaml"
            lines.append(f"  missing required key '{key}'{where}: {fix} or pass {key}=VALUE")
        else:
            lines.append(f"  bad value for '{key}'{where}: {value!r}: {err['msg']}")
    return "\n".join(lines)
