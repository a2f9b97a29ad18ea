"""The registered model as users call it: raw records in, class names (or values) out.

A tabular model is logged as an MLflow pyfunc model that holds the network (an MLflow PyTorch model, as an
artifact; the tree baseline's XGBoost booster, dlpipe.model.trees; or an ONNX model, dlpipe.model.onnxmodel),
the statistics it was trained with and the declarations of its input columns. `predict` takes a DataFrame
of the dataset's raw feature columns, checks each record as ingest checks a row (missing value, type, range,
allowed values: the same reasons), transforms it exactly as preprocess does (dlpipe.data.features:
imputation, scaling, one-hot, missing indicators), and answers the class index, its name and the
probabilities in class order, or a regressor's value. `mlflow.pyfunc.load_model`, `mlflow models serve`
and `mlflow.pyfunc.spark_udf` all take raw rows. A record that cannot be scored fails the call with every
bad record's reason (the REST server answers 400, never 500).

The batch infer job does not go through `predict`: it transforms rows inside Spark and scores the network
directly (`network_of`), much faster; tests hold the two to the same answers.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from dlpipe.data.stats import FeatureStats, FittedStats

NUMERIC = {"int", "long", "float", "double"}
# JSON has booleans but no dates: a date or timestamp is text in the column's `format`, as in the raw files
SIGNATURE_TYPES = {
    "int": "integer",
    "long": "long",
    "float": "float",
    "double": "double",
    "string": "string",
    "boolean": "boolean",
    "date": "string",
    "timestamp": "string",
}
# ingest's words (dlpipe.data.ingest.TRUE_WORDS, FALSE_WORDS), here too so that the model needs no Spark
TRUE_WORDS = ("true", "yes", "1", "t", "y")
FALSE_WORDS = ("false", "no", "0", "f", "n")
_FIELDS = {"yyyy": "year", "MM": "month", "M": "month", "dd": "day", "d": "day", "HH": "hour", "H": "hour"}
_FIELDS.update({"mm": "minute", "m": "minute", "ss": "second", "s": "second", "SSS": "milli"})


class DatetimeFormat:
    """A Spark datetime pattern (dataset column `format`) parsed and written in Python as ingest parses it in
    Spark SQL: text of the pattern's exact shape (dlpipe.config.datetime_regex), then a real calendar day
    (31/02 is not one); fields the pattern lacks are Spark's defaults (1970-01-01 00:00:00)."""

    def __init__(self, pattern: str):
        from dlpipe.config import datetime_pattern_parts, datetime_regex

        self.parts = datetime_pattern_parts(pattern)
        self.shape = re.compile(datetime_regex(pattern))
        groups = ["([0-9]+)" if kind == "token" else re.escape(text) for kind, text in self.parts]
        self.fields = re.compile("^" + "".join(groups) + "$")
        self.tokens = [text for kind, text in self.parts if kind == "token"]

    def parse(self, text: str) -> dt.datetime | None:
        if not self.shape.match(text):
            return None
        values = {"year": 1970, "month": 1, "day": 1, "hour": 0, "minute": 0, "second": 0, "milli": 0}
        for token, digits in zip(self.tokens, self.fields.match(text).groups(), strict=True):
            values[_FIELDS[token]] = int(digits)
        milli = values.pop("milli")
        try:
            return dt.datetime(**values, microsecond=milli * 1000)
        except ValueError:
            return None

    def format(self, value: dt.date) -> str:
        if not isinstance(value, dt.datetime):
            value = dt.datetime(value.year, value.month, value.day)
        numbers = {"year": value.year, "month": value.month, "day": value.day, "hour": value.hour}
        numbers.update(minute=value.minute, second=value.second, milli=value.microsecond // 1000)
        out = []
        for kind, text in self.parts:
            if kind == "literal":
                out.append(text)
            else:
                width = 4 if text == "yyyy" else 3 if text == "SSS" else len(text)
                out.append(f"{numbers[_FIELDS[text]]:0{width}d}")
        return "".join(out)


def _iso(text: str) -> dt.datetime:
    """A fill value of a date or timestamp column, as the statistics keep it (ISO text)."""
    return dt.datetime.fromisoformat(text)


def _boolean_number(value) -> float:
    word = str(value).strip().lower()
    return 1.0 if word in TRUE_WORDS else 0.0 if word in FALSE_WORDS else math.nan


def hash_buckets(values, buckets: int) -> np.ndarray:
    """dlpipe.data.features.hash_bucket in Python: crc32 of the value's UTF-8 bytes, mod buckets."""
    return np.array([zlib.crc32(str(v).encode("utf-8")) % buckets for v in values], dtype=np.int64)


class BadRecordsError(ValueError):
    """Records that cannot be scored, each with its reason."""

    def __init__(self, reasons: dict[int, str], total: int):
        self.reasons = reasons
        shown = "; ".join(f"record {i}: {r}" for i, r in list(reasons.items())[:20])
        more = f" (and {len(reasons) - 20} more)" if len(reasons) > 20 else ""
        super().__init__(f"{len(reasons)} of {total} records cannot be scored: {shown}{more}")


def _missing(values: pd.Series) -> np.ndarray:
    text = values.astype("string")
    return (values.isna() | text.str.strip().eq("")).to_numpy(dtype=bool)


def _check_numbers(col: dict, entry: FeatureStats, values: pd.Series, reasons: list[str | None]) -> pd.Series:
    """_check_and_fill for a numeric column that arrived as numbers (JSON numbers, a float DataFrame column):
    the same checks and words in numpy, without the text round trip (a served single record's main cost)."""
    name, kind = col["name"], col["type"]
    number = values.to_numpy(np.float64, na_value=np.nan)  # a nullable integer column's <NA> too
    missing = np.isnan(number)

    def fail(mask: np.ndarray, why: str) -> None:
        for i in np.flatnonzero(mask):
            if reasons[i] is None:
                reasons[i] = f"{why}: {name}" if why == "missing value" else f"{why}: {name}={values.iloc[i]}"

    if col["missing"] == "quarantine":
        fail(missing, "missing value")
    present = ~missing
    if kind in ("int", "long"):
        limit = 2**31 if kind == "int" else 2**53
        whole = np.where(present, number, 0.0)
        integral = np.isfinite(whole) & (np.floor(whole) == whole) & (np.abs(whole) < limit)
        fail(present & ~integral, f"not {'an' if kind == 'int' else 'a'} {kind}")
        finite = present & integral
    else:
        finite = present & np.isfinite(np.where(present, number, 0.0))
        fail(present & ~finite, "not finite")
    with np.errstate(invalid="ignore"):
        low = number < col["min"] if col.get("min") is not None else np.zeros(len(number), bool)
        high = number > col["max"] if col.get("max") is not None else np.zeros(len(number), bool)
    fail(finite & (low | high), f"out of range [{col.get('min')}, {col.get('max')}]")
    return pd.Series(np.where(missing, math.nan if entry.fill is None else float(entry.fill), number))


def _check_and_fill(col: dict, entry: FeatureStats, values: pd.Series, reasons: list[str | None]) -> pd.Series:
    """The column's values ready to transform (missing ones filled), recording the first reason per bad
    record in `reasons`: the checks, their order and their words are ingest's."""
    name, kind = col["name"], col["type"]
    if kind in NUMERIC and pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values):
        return _check_numbers(col, entry, values, reasons)
    missing = _missing(values)

    def fail(mask: np.ndarray, why) -> None:
        for i in np.flatnonzero(mask):
            if reasons[i] is None:
                reasons[i] = why(i)

    if col["missing"] == "quarantine":
        fail(missing, lambda i: f"missing value: {name}")
    text = values.astype("string").str.strip()
    if kind in NUMERIC:
        number = pd.to_numeric(text.where(~missing), errors="coerce").astype("float64")
        bad_type = ~missing & number.isna().to_numpy()
        if kind in ("int", "long"):
            whole = number.fillna(0).to_numpy()
            limit = 2**31 if kind == "int" else 2**53  # ingest's casts: int32, or exact in a double
            integral = np.isfinite(whole) & (np.floor(whole) == whole) & (np.abs(whole) < limit)
            bad_type |= ~missing & ~integral
        article = "an" if kind == "int" else "a"
        fail(bad_type, lambda i: f"not {article} {kind}: {name}={text.iloc[i]}")
        if kind in ("float", "double"):
            fail(
                ~missing & ~bad_type & ~np.isfinite(number.fillna(0).to_numpy()),
                lambda i: f"not finite: {name}={text.iloc[i]}",
            )
        low = number.lt(col["min"]).to_numpy() if col.get("min") is not None else np.zeros(len(values), bool)
        high = number.gt(col["max"]).to_numpy() if col.get("max") is not None else np.zeros(len(values), bool)
        fail(low | high, lambda i: f"out of range [{col.get('min')}, {col.get('max')}]: {name}={text.iloc[i]}")
        return number.where(~missing, math.nan if entry.fill is None else entry.fill)
    if kind == "boolean":
        number = pd.Series([_boolean_number(v) for v in values.astype("object")], dtype="float64")
        fail(~missing & number.isna().to_numpy(), lambda i: f"not a boolean: {name}={text.iloc[i]}")
        return number.where(~missing, math.nan if entry.fill is None else float(entry.fill))
    if kind in ("date", "timestamp"):
        fmt = DatetimeFormat(col["format"])

        def when(value) -> dt.datetime | None:
            if isinstance(value, dt.date):  # a date or datetime (pandas Timestamp) given as such, not as text
                return value if isinstance(value, dt.datetime) else dt.datetime(value.year, value.month, value.day)
            return fmt.parse(str(value).strip())

        parsed = [None if m else when(v) for v, m in zip(values.astype("object"), missing, strict=True)]
        fail(
            ~missing & np.array([p is None for p in parsed], dtype=bool),
            lambda i: f"not a {kind}: {name}={text.iloc[i]}",
        )
        fill = _iso(str(entry.fill)) if entry.fill is not None else None
        return pd.Series([fill if m else p for p, m in zip(parsed, missing, strict=True)], dtype="object")
    if col.get("values") is not None:
        fail(
            ~missing & ~text.isin(col["values"]).fillna(False).to_numpy(),
            lambda i: f"not an allowed value of {name}: {text.iloc[i]}",
        )
    return values.astype("object").where(~missing, entry.fill)


def transform_records(
    records: pd.DataFrame, stats: FittedStats, columns: list[dict]
) -> tuple[np.ndarray, list[str | None]]:
    """Raw records -> (n, features) float32, as `dlpipe.data.features.feature_vector` computes it in Spark, and
    a reason per record that cannot be scored (None for the others; their rows of the array are zeros)."""
    n = len(records)
    reasons: list[str | None] = [None] * n
    by_name = {c["name"]: c for c in columns}
    parts: list[np.ndarray] = []
    for entry in stats.features:
        col = by_name[entry.name]
        raw = records[col["name"]] if col["name"] in records.columns else pd.Series([None] * n, dtype="object")
        raw = raw.reset_index(drop=True)
        values = _check_and_fill(col, entry, raw, reasons)
        if entry.transform == "standardize":
            parts.append(((values.to_numpy(np.float64) - entry.mean) / entry.std)[:, None])
        elif entry.transform == "onehot":
            v = values.astype("string").fillna("").to_numpy(dtype=object)
            vocab = entry.vocab or ()
            hot = [v == word for word in vocab]
            if entry.other:  # top_k: a value outside the vocabulary is __other__
                hot.append(~np.isin(v, np.asarray(vocab, dtype=object)))
            parts.append(np.stack(hot, axis=1).astype(np.float64) if hot else np.zeros((n, 0)))
        elif entry.transform == "hash":
            bucket = hash_buckets(values.astype("string").fillna("").to_numpy(dtype=object), entry.buckets)
            parts.append((bucket[:, None] == np.arange(entry.buckets)[None, :]).astype(np.float64))
        elif entry.transform == "date":
            parts.append(_date_parts(values, entry))
        else:
            parts.append(pd.to_numeric(values, errors="coerce").to_numpy(np.float64)[:, None])
        if entry.indicator:
            parts.append(_missing(raw)[:, None].astype(np.float64))
    x = np.concatenate(parts, axis=1).astype(np.float32) if parts else np.zeros((n, 0), np.float32)
    bad = np.array([r is not None for r in reasons], dtype=bool)
    x[bad] = 0.0
    return np.nan_to_num(x, copy=False), reasons


def _date_parts(values: pd.Series, entry: FeatureStats) -> np.ndarray:
    """dlpipe.data.features._date_parts in numpy: standardized year; month, day of week (Monday = 0) and hour of
    the day (timestamps) as sine and cosine; (day of year - 1) / 366. A value that is None gives zeros."""
    whens = [v if v is not None else dt.datetime(1970, 1, 1) for v in values]
    year = np.array([w.year for w in whens], np.float64)
    month = np.array([w.month - 1 for w in whens], np.float64)
    dow = np.array([w.weekday() for w in whens], np.float64)
    doy = np.array([w.timetuple().tm_yday - 1 for w in whens], np.float64)
    cols = [(year - entry.year_mean) / entry.year_std]
    for value, period in ((month, 12.0), (dow, 7.0)):
        angle = value * (2.0 * np.pi / period)
        cols += [np.sin(angle), np.cos(angle)]
    cols.append(doy / 366.0)
    if entry.kind == "timestamp":
        hour = np.array([w.hour + w.minute / 60.0 + w.second / 3600.0 for w in whens], np.float64)
        angle = hour * (2.0 * np.pi / 24.0)
        cols += [np.sin(angle), np.cos(angle)]
    return np.stack(cols, axis=1)


def answers(scores: np.ndarray, stats: FittedStats) -> pd.DataFrame:
    """What predict returns: a regressor's value; a classifier's index, class name and probabilities."""
    if stats.is_regression:
        return pd.DataFrame({"prediction": scores.reshape(-1).astype(np.float64)})
    classes = np.asarray(stats.class_names, dtype=object)
    index = scores.argmax(1).astype(np.int32)
    return pd.DataFrame(
        {"prediction": index, "predicted_class": classes[index], "probabilities": list(scores.astype(np.float32))}
    )


class RawRecordModel(PythonModel):
    """The pyfunc form of a tabular model (see the module's docstring)."""

    def load_context(self, context) -> None:
        import mlflow

        self.stats = FittedStats.from_json(Path(context.artifacts["stats"]).read_text())
        if "booster" in context.artifacts:  # the tree baseline (dlpipe.model.trees)
            from dlpipe.model.trees import BoosterModule

            self.network = BoosterModule.load(context.artifacts["booster"], self.stats.task, self.stats.outputs)
        elif "onnx" in context.artifacts:  # the ONNX variant (dlpipe.model.onnxmodel)
            from dlpipe.model.onnxmodel import OnnxModule

            self.network = OnnxModule.load(context.artifacts["onnx"])
        else:
            self.network = mlflow.pytorch.load_model(context.artifacts["network"], map_location="cpu")
        if hasattr(self.network, "eval") and not _is_graph_module(self.network):
            self.network.eval()
        self.columns = json.loads(Path(context.artifacts["columns"]).read_text())

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from dlpipe.serve.scoring import predict_proba

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        x, reasons = transform_records(model_input, self.stats, self.columns)
        bad = {i: r for i, r in enumerate(reasons) if r is not None}
        if bad:
            raise MlflowException(str(BadRecordsError(bad, len(reasons))), error_code=INVALID_PARAMETER_VALUE)
        return answers(predict_proba(self.network, x), self.stats)


def _is_graph_module(model) -> bool:
    import torch

    return isinstance(model, torch.fx.GraphModule)


def input_columns(cfg) -> list[dict]:
    """The declarations a record is checked against: each feature's name, type, range, values, policy."""
    return [
        {
            "name": c.name,
            "type": c.type,
            "min": c.min,
            "max": c.max,
            "values": c.values,
            "missing": c.missing_policy,
            "format": c.datetime_format,
        }
        for c in cfg.dataset.features
    ]


def raw_example(spark, cfg):
    """A few clean rows' raw feature columns: the registered model's input example (None for images, whose
    model takes tensors)."""
    if cfg.dataset.source.format == "image":
        return None
    from dlpipe.data.ingest import read_clean

    return read_clean(spark, cfg).select(*[c.name for c in cfg.dataset.features]).limit(5).toPandas()


def signature(columns: list[dict], example_out: pd.DataFrame):
    """Raw columns with the YAML's types. A column whose missing value is imputed is optional; an integer
    one is declared double, since a record's missing integer reaches pandas as NaN."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ColSpec, Schema

    specs = []
    for c in columns:
        optional = c["missing"] != "quarantine"
        kind = "double" if optional and c["type"] in ("int", "long") else SIGNATURE_TYPES[c["type"]]
        specs.append(ColSpec(kind, c["name"], required=not optional))
    out = infer_signature(None, example_out).outputs if example_out is not None else None
    return ModelSignature(inputs=Schema(specs), outputs=out)


def as_records(frame: pd.DataFrame, columns: list[dict]) -> pd.DataFrame:
    """Rows as a client sends them (the input example): dates and timestamps as text in their `format` (read
    from the clean dataset they are date objects), booleans as booleans."""
    frame = frame.copy()
    for c in columns:
        if c["name"] in frame.columns and c["type"] in ("date", "timestamp"):
            fmt = DatetimeFormat(c["format"])
            cells = frame[c["name"]].astype("object")
            frame[c["name"]] = [None if pd.isna(v) else fmt.format(v) if isinstance(v, dt.date) else v for v in cells]
    return frame


def log_raw_model(
    network,
    stats: FittedStats,
    columns: list[dict],
    artifact: str,
    registered_name: str,
    example: pd.DataFrame,
    tensor_example: np.ndarray,
    pip_requirements: list[str],
    metadata: dict | None = None,
    serialization_format: str | None = None,
) -> str:
    """Log the pyfunc raw-record model to the active run as a new version of `registered_name`. network: a
    torch module, the tree baseline's BoosterModule (saved in XGBoost's own format) or an OnnxModule."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from dlpipe.model.onnxmodel import OnnxModule
    from dlpipe.model.trees import BoosterModule

    with tempfile.TemporaryDirectory(prefix="dlpipe-model-") as tmp:
        if isinstance(network, BoosterModule):
            scorer = {"booster": str(network.save(Path(tmp)))}
        elif isinstance(network, OnnxModule):
            scorer = {"onnx": str(network.save(Path(tmp)))}
        else:
            net_dir = Path(tmp) / "network"
            with torch.no_grad():
                tensor_out = network(torch.from_numpy(tensor_example)).numpy()
            kwargs = {"serialization_format": serialization_format} if serialization_format else {}
            mlflow.pytorch.save_model(
                network,
                str(net_dir),
                signature=infer_signature(tensor_example, tensor_out),
                input_example=tensor_example,
                pip_requirements=pip_requirements,
                **kwargs,
            )
            scorer = {"network": str(net_dir)}
        (Path(tmp) / "stats.json").write_text(stats.to_json())
        (Path(tmp) / "columns.json").write_text(json.dumps(columns))
        model = RawRecordModel()
        example = as_records(example, columns)
        x, _ = transform_records(example, stats, columns)
        with torch.no_grad():
            example_out = answers(network(torch.from_numpy(x)).numpy(), stats)
        info = mlflow.pyfunc.log_model(
            name=artifact,
            python_model=model,
            artifacts={
                **scorer,
                "stats": str(Path(tmp) / "stats.json"),
                "columns": str(Path(tmp) / "columns.json"),
            },
            signature=signature(columns, example_out),
            input_example=example,
            pip_requirements=pip_requirements,
            registered_model_name=registered_name,
            metadata=metadata,
        )
    return str(info.registered_model_version)


def model_metadata(stats: FittedStats) -> dict:
    """Logged in the model's MLmodel file: its class names in output order, and where the statistics that
    transform its inputs are (in the run that logged it)."""
    from dlpipe.model.names import STATS_ARTIFACT

    meta: dict = {"dlpipe_stats": STATS_ARTIFACT, "task": stats.task}
    if not stats.is_regression:
        meta["classes"] = stats.class_names
    return meta


def register_variant(
    cfg,
    stats: FittedStats,
    network,
    variant: str,
    alias: str,
    example: pd.DataFrame,
    requirements: list[str],
    tags: dict[str, str] | None = None,
    tensor_example: np.ndarray | None = None,
) -> str:
    """Register a model made from the candidate's data outside train (a compressed variant, the tree
    baseline) as a new version of the registered model, behind the raw-record interface, under alias: the
    statistics its inputs are transformed with go to the active run (where infer looks for them), the version
    is tagged `dlpipe.variant` (and with tags). A torch network needs tensor_example (a few rows of
    features), the input example of its own saved form. Returns the version."""
    import mlflow

    from dlpipe.model.names import STATS_ARTIFACT

    mlflow.log_dict(stats.to_dict(), STATS_ARTIFACT)
    metadata = {**model_metadata(stats), "variant": variant}
    name = cfg.model_name
    version = log_raw_model(
        network,
        stats,
        input_columns(cfg),
        f"model_{variant}",
        name,
        example,
        tensor_example,
        requirements,
        metadata=metadata,
    )
    client = mlflow.MlflowClient()
    for key, value in {"dlpipe.variant": variant, **(tags or {})}.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, alias, version)
    return version


def network_of(model_uri: str):
    """The network inside a registered model: the raw-record pyfunc's, or a plain PyTorch model's.

    The flavour comes from the MLmodel file alone (Model.load). MLflow's get_model_info would also look the
    logged model up in the tracking store: in a fresh Spark worker that is SQLAlchemy's import and the store's
    schema check, 2.7 of the 9.6 CPU-seconds a load took (measured), for metadata nobody reads here."""
    import mlflow
    from mlflow.models import Model
    from mlflow.utils.file_utils import local_file_uri_to_path

    if model_uri.startswith("file:"):  # Model.load tests os.path.exists on the URI itself, which fails for file:
        model_uri = local_file_uri_to_path(model_uri)
    flavors = Model.load(model_uri).flavors
    if "python_function" in flavors and flavors["python_function"].get("loader_module") == "mlflow.pyfunc.model":
        return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().network
    return mlflow.pytorch.load_model(model_uri, map_location="cpu")
