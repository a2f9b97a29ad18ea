"""Feature types that real tables have: booleans, dates and timestamps, strings with many values (top_k, hash),
checked by ingest, expanded by preprocess, and the same numbers from the registered model's raw records."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import zlib

import numpy as np
import pandas as pd
import pytest
import yaml

from dlpipe.config import load_config
from dlpipe.data import features, ingest
from dlpipe.model import rawmodel
from dlpipe.storage import dataset_paths
from tests.conftest import REPO, UNCHECKED_WORK

FLAG_WORDS = ["true", "No", " YES ", "1", "0", "t", "F", "y", "n", "False"]


def _cfg(tmp_path, columns: list[dict], fmt: str = "csv", overrides: tuple[str, ...] = (), **more):
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf, dirs_exist_ok=True)
    spec = {
        "name": "types",
        "source": {"uri": "data/raw/types", "format": fmt},
        "num_classes": 2,
        "columns": [
            {"name": "id", "type": "long", "role": "key"},
            *columns,
            {"name": "y", "type": "int", "role": "label"},
        ],
        "max_bad_fraction": 0.9,
        **more,
    }
    (conf / "datasets" / "types.yaml").write_text(yaml.safe_dump(spec))
    base = ["dataset=types", f"project.root={tmp_path}", "spark.master=local[2]"]
    return load_config("local", [*base, *overrides], conf_dir=conf)


def _raw_dir(cfg):
    path = dataset_paths(cfg).raw.removeprefix("file://")
    import pathlib

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_csv(cfg, header: list[str], rows: list[list]) -> None:
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    (_raw_dir(cfg) / "part-0.csv").write_text("\n".join(lines) + "\n")


def _quarantine(spark, cfg) -> dict:
    q = spark.read.parquet(dataset_paths(cfg).quarantine).select("id", "reason", "reason_code").collect()
    return {r["id"]: (r["reason"], r["reason_code"]) for r in q}


def _clean(spark, cfg, column: str) -> dict:
    return {r["id"]: r[column] for r in ingest.read_clean(spark, cfg).select("id", column).collect()}


# --- ingest: the types and their reasons ----------------------------------------------------------------
def test_booleans_accept_the_usual_words_and_quarantine_anything_else(spark, tmp_path):
    cfg = _cfg(tmp_path, [{"name": "flag", "type": "boolean"}])
    words = [*FLAG_WORDS, "maybe", "2", ""]
    _write_csv(cfg, ["id", "flag", "y"], [[i, w, i % 2] for i, w in enumerate(words)])
    m = ingest.run(spark, cfg)
    assert (m["rows_in"], m["rows_kept"], m["rows_quarantined"]) == (13, 10, 3)
    flags = _clean(spark, cfg, "flag")
    assert [flags[i] for i in range(10)] == [True, False, True, True, False, True, False, True, False, False]
    q = _quarantine(spark, cfg)
    assert q[10] == ("not a boolean: flag=maybe", "type")
    assert q[11] == ("not a boolean: flag=2", "type")
    assert q[12] == ("missing value: flag", "missing")
    assert ingest.read_clean(spark, cfg).schema["flag"].dataType.simpleString() == "boolean"


def test_dates_and_timestamps_parse_their_format_and_quarantine_what_does_not(spark, tmp_path):
    cfg = _cfg(
        tmp_path,
        [{"name": "day", "type": "date", "format": "dd/MM/yyyy"}, {"name": "at", "type": "timestamp"}],
    )
    rows = [
        [0, "01/02/2020", "2020-03-04 05:06:07"],
        [1, " 29/02/2024 ", "1999-12-31 23:59:59"],
        [2, "31/02/2021", "2020-03-04 05:06:07"],  # no such day
        [3, "2020-02-01", "2020-03-04 05:06:07"],  # ISO, not the declared dd/MM/yyyy
        [4, "1/2/2020", "2020-03-04 05:06:07"],  # Spark 3.5 throws on this shape: must be a reason, not a crash
        [5, "01/02/2020", "2020-03-04T05:06:07"],
        [6, "01/02/2020", "04/03/2020"],
    ]
    _write_csv(cfg, ["id", "day", "at", "y"], [[*r, r[0] % 2] for r in rows])
    m = ingest.run(spark, cfg)
    assert (m["rows_kept"], m["rows_quarantined"]) == (2, 5)
    days, ats = _clean(spark, cfg, "day"), _clean(spark, cfg, "at")
    assert days == {0: dt.date(2020, 2, 1), 1: dt.date(2024, 2, 29)}
    assert ats == {0: dt.datetime(2020, 3, 4, 5, 6, 7), 1: dt.datetime(1999, 12, 31, 23, 59, 59)}
    q = _quarantine(spark, cfg)
    assert q[2] == ("not a date: day=31/02/2021", "type")
    assert q[3] == ("not a date: day=2020-02-01", "type")
    assert q[4] == ("not a date: day=1/2/2020", "type")
    assert q[5] == ("not a timestamp: at=2020-03-04T05:06:07", "type")
    assert q[6] == ("not a timestamp: at=04/03/2020", "type")


def test_json_lines_and_parquet_carry_booleans_and_dates_of_their_own(spark, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = [{"name": "flag", "type": "boolean"}, {"name": "day", "type": "date"}]
    jcfg = _cfg(tmp_path / "j", cols, fmt="jsonl")
    lines = [
        {"id": 0, "flag": True, "day": "2021-05-06", "y": 0},
        {"id": 1, "flag": "no", "day": "2021-05-07", "y": 1},
        {"id": 2, "flag": 2, "day": "2021-05-08", "y": 0},
        {"id": 3, "flag": False, "day": "06/05/2021", "y": 1},
    ]
    (_raw_dir(jcfg) / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert ingest.run(spark, jcfg)["rows_kept"] == 2
    assert _clean(spark, jcfg, "flag") == {0: True, 1: False}
    q = _quarantine(spark, jcfg)
    assert q[2] == ("not a boolean: flag=2", "type") and q[3] == ("not a date: day=06/05/2021", "type")

    pcfg = _cfg(tmp_path / "p", cols, fmt="parquet")
    table = pa.table(
        {
            "id": pa.array([0, 1, 2], pa.int64()),
            "flag": pa.array([True, False, None], pa.bool_()),
            "day": pa.array([dt.date(2021, 5, 6), dt.date(1970, 1, 1), dt.date(2000, 2, 29)], pa.date32()),
            "y": pa.array([0, 1, 0], pa.int32()),
        }
    )
    pq.write_table(table, _raw_dir(pcfg) / "part-0.parquet")
    assert ingest.run(spark, pcfg)["rows_kept"] == 2
    assert _clean(spark, pcfg, "flag") == {0: True, 1: False}
    assert _clean(spark, pcfg, "day") == {0: dt.date(2021, 5, 6), 1: dt.date(1970, 1, 1)}
    assert _quarantine(spark, pcfg)[2] == ("missing value: flag", "missing")


# --- preprocess and the registered model's transform ----------------------------------------------------
def _mixed_rows(n: int = 400) -> list[list]:
    rng = np.random.default_rng(3)
    cities = ["c0"] * 60 + ["c1"] * 50 + ["c2"] * 40 + ["c3"] * 30 + ["c4"] * 20
    rows = []
    for i in range(n):
        flag = "" if i % 17 == 0 else FLAG_WORDS[i % len(FLAG_WORDS)].strip()
        day = (
            ""
            if i % 13 == 0
            else (dt.date(2015, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3000)))).strftime("%d/%m/%Y")
        )
        at = (dt.datetime(2020, 1, 1) + dt.timedelta(seconds=int(rng.integers(0, 10**8)))).strftime("%Y-%m-%d %H:%M:%S")
        city = cities[i] if i < len(cities) else f"u{i}"  # 200 values of the same few cities, then unique ones
        user = "" if i % 11 == 0 else f"user-{int(rng.integers(0, 50))}-é"
        rows.append([i, round(float(rng.normal()), 4), flag, day, at, city, user, i % 2])
    return rows


MIXED = [
    {"name": "x", "type": "double"},
    {"name": "flag", "type": "boolean", "missing": "impute"},
    {"name": "day", "type": "date", "format": "dd/MM/yyyy", "missing": "indicator"},
    {"name": "at", "type": "timestamp"},
    {"name": "city", "type": "string", "top_k": 3},
    {"name": "user", "type": "string", "transform": "hash", "buckets": 8, "missing": "impute"},
]
MIXED_HEADER = ["id", "x", "flag", "day", "at", "city", "user", "y"]


@pytest.fixture(scope="module")
def mixed(spark, tmp_path_factory):
    """A CSV with every new type, ingested and preprocessed."""
    root = tmp_path_factory.mktemp("mixed")
    cfg = _cfg(root, MIXED, split={"train": 0.6, "val": 0.2, "test": 0.2})
    rows = _mixed_rows()
    _write_csv(cfg, MIXED_HEADER, rows)
    ingest.run(spark, cfg)
    pre = features.run(spark, cfg)
    return cfg, rows, features.read_stats(spark, cfg), pre


def test_the_new_types_become_named_features_fitted_on_the_train_split(spark, mixed):
    cfg, rows, stats, pre = mixed
    names = list(stats.feature_names)
    day = ["day_year", "day_month_sin", "day_month_cos", "day_dow_sin", "day_dow_cos", "day_doy", "day_missing"]
    at = ["at_year", "at_month_sin", "at_month_cos", "at_dow_sin", "at_dow_cos", "at_doy", "at_hour_sin", "at_hour_cos"]
    by_name = {f.name: f for f in stats.features}
    vocab = list(by_name["city"].vocab)
    city = [f"city={v}" for v in vocab] + ["city=__other__"]
    assert names == ["x", "flag", *day, *at, *city, *(f"user#{b}" for b in range(8))]
    assert stats.feature_shape == (len(names),) and stats.input_width == len(names)
    # the vocabulary is the 3 most frequent cities of the train split, counted here from the clean rows
    clean = ingest.read_clean(spark, cfg).withColumn("_s", features.split_column(cfg)).where("_s = 'train'")
    counts = pd.Series([r["city"] for r in clean.select("city").collect()]).value_counts()
    assert sorted(vocab) == vocab and set(vocab) == set(counts.index[:3]) and counts.iloc[2] > counts.iloc[3]
    # the year is standardized with the train split's mean and std of the year
    years = np.array([r["y"] for r in clean.selectExpr("year(day) AS y").where("y IS NOT NULL").collect()])
    assert by_name["day"].year_mean == pytest.approx(years.mean())
    assert by_name["day"].year_std == pytest.approx(years.std())
    assert by_name["flag"].fill in (True, False) and isinstance(by_name["day"].fill, str)
    assert by_name["user"].fill.startswith("user-")  # most frequent in train, from a bounded top-1 query
    assert pre["imputed_share_flag"] > 0 and pre["imputed_share_day"] > 0


def test_the_date_expansion_is_the_documented_one(spark, mixed):
    cfg, _, stats, _ = mixed
    schema = ingest.read_clean(spark, cfg).schema
    row = {"id": 1, "x": 0.5, "flag": True, "day": dt.date(2024, 1, 1), "at": dt.datetime(2024, 4, 3, 18, 30, 0)}
    row.update(city="c0", user="u", y=0)
    df = spark.createDataFrame([row], schema)
    x = np.asarray(features.transform(df, cfg, stats).collect()[0]["features"], dtype=np.float64)
    names = stats.feature_names
    got = {n: x[names.index(n)] for n in names if n.startswith(("day_", "at_"))}
    day = stats.feature("day")
    # 2024-01-01 is a Monday (day 0 of the week), day 1 of the year, month 1
    assert got["day_year"] == pytest.approx((2024 - day.year_mean) / day.year_std, abs=1e-5)
    assert [got[f"day_{p}"] for p in ("month_sin", "month_cos", "dow_sin", "dow_cos", "doy")] == pytest.approx(
        [0.0, 1.0, 0.0, 1.0, 0.0], abs=1e-6
    )
    assert got["day_missing"] == 0.0
    # 2024-04-03 18:30: April (month index 3), a Wednesday (2), day 94 of the year, 18.5 hours
    two_pi = 2 * np.pi
    expected = [np.sin(two_pi * 3 / 12), np.cos(two_pi * 3 / 12), np.sin(two_pi * 2 / 7), np.cos(two_pi * 2 / 7)]
    expected += [93 / 366, np.sin(two_pi * 18.5 / 24), np.cos(two_pi * 18.5 / 24)]
    parts = ("month_sin", "month_cos", "dow_sin", "dow_cos", "doy", "hour_sin", "hour_cos")
    assert [got[f"at_{p}"] for p in parts] == pytest.approx(expected, abs=1e-6)
    assert x[names.index("flag")] == 1.0


def test_hash_buckets_are_the_same_in_spark_and_python(spark):
    values = ["", "a", "user-7-é", "日本語", "x" * 300, "Ünïcødé"]
    df = spark.createDataFrame([(v,) for v in values], "v string")
    for buckets in (2, 8, 1000):
        got = [r[0] for r in df.select(features.hash_bucket(df["v"], buckets)).collect()]
        assert got == [zlib.crc32(v.encode("utf-8")) % buckets for v in values]
        assert got == list(rawmodel.hash_buckets(values, buckets))
    assert len(set(rawmodel.hash_buckets([f"v{i}" for i in range(1000)], 8))) == 8  # it spreads


def _spark_features(spark, cfg, stats, df=None) -> dict:
    df = df if df is not None else ingest.read_clean(spark, cfg)
    return {r["id"]: np.asarray(r["features"]) for r in features.transform(df, cfg, stats).collect()}


def test_raw_records_through_the_registered_model_give_the_spark_features(spark, mixed):
    """The same raw rows: Spark (ingest, then features.transform) and rawmodel.transform_records on the text."""
    cfg, rows, stats, _ = mixed
    spark_x = _spark_features(spark, cfg, stats)
    raw = pd.DataFrame(rows, columns=MIXED_HEADER).astype(str)
    raw = raw[raw["id"].astype(int).isin(list(spark_x))].reset_index(drop=True)
    assert len(raw) == len(spark_x) == 400
    x, reasons = rawmodel.transform_records(raw, stats, rawmodel.input_columns(cfg))
    assert all(r is None for r in reasons)
    expected = np.stack([spark_x[int(i)] for i in raw["id"]])
    np.testing.assert_allclose(x, expected, atol=1e-5)
    # a value the train split never had: the top_k's __other__, its own hash bucket; the same both ways
    names = stats.feature_names
    new = {"id": 9001, "x": 1.0, "flag": False, "day": dt.date(2031, 12, 31), "at": dt.datetime(2030, 6, 1, 0, 0, 1)}
    new.update(city="never-seen", user="never-seen", y=None)
    gone = dict(new, id=9002, flag=None, day=None, user=None)  # missing: imputed with the train fill
    df = spark.createDataFrame([new, gone], ingest.read_clean(spark, cfg).schema)
    from_spark = _spark_features(spark, cfg, stats, df)
    text = pd.DataFrame(
        [
            {**new, "flag": "no", "day": "31/12/2031", "at": "2030-06-01 00:00:01"},
            {**gone, "flag": "", "day": None, "at": "2030-06-01 00:00:01", "user": ""},
        ]
    )
    x2, reasons2 = rawmodel.transform_records(text, stats, rawmodel.input_columns(cfg))
    assert reasons2 == [None, None]
    np.testing.assert_allclose(x2, np.stack([from_spark[9001], from_spark[9002]]), atol=1e-5)
    assert x2[0, names.index("city=__other__")] == 1.0 and x2[0, [n.startswith("city=c") for n in names]].sum() == 0
    bucket = zlib.crc32(b"never-seen") % 8
    assert x2[0, names.index(f"user#{bucket}")] == 1.0 and x2[0, [n.startswith("user#") for n in names]].sum() == 1
    assert x2[1, names.index("day_missing")] == 1.0


def test_the_registered_model_gives_ingests_reasons_for_bad_new_values(mixed):
    cfg, _, stats, _ = mixed
    text = pd.DataFrame(
        [
            {"x": 1.0, "flag": "maybe", "day": "01/01/2020", "at": "2020-01-01 00:00:00", "city": "c0", "user": "u"},
            {"x": 1.0, "flag": "yes", "day": "31/02/2020", "at": "2020-01-01 00:00:00", "city": "c0", "user": "u"},
            {"x": 1.0, "flag": True, "day": "01/01/2020", "at": "2020-01-01T00:00", "city": "c0", "user": "u"},
            {"x": 1.0, "flag": True, "day": dt.date(2020, 1, 1), "at": "2020-01-01 00:00:00", "city": "", "user": "u"},
        ]
    )
    _, reasons = rawmodel.transform_records(text, stats, rawmodel.input_columns(cfg))
    assert reasons == [
        "not a boolean: flag=maybe",
        "not a date: day=31/02/2020",
        "not a timestamp: at=2020-01-01T00:00",
        "missing value: city",
    ]


def test_the_signature_takes_json_booleans_and_dates_as_text(mixed):
    from mlflow.models.utils import _enforce_schema

    cfg, _, stats, _ = mixed
    columns = rawmodel.input_columns(cfg)
    sig = rawmodel.signature(columns, None)
    kinds = {c.name: (c.type.name, c.required) for c in sig.inputs.inputs}
    assert kinds["flag"] == ("boolean", False) and kinds["day"] == ("string", False)
    assert kinds["at"] == ("string", True) and kinds["city"] == ("string", True)
    records = json.loads(
        '[{"x": 1.5, "flag": true, "day": "02/03/2021", "at": "2021-03-02 10:00:00", "city": "c1", "user": "u"},'
        ' {"x": 2.5, "flag": false, "day": null, "at": "2021-03-02 11:00:00", "city": "zz", "user": "v"}]'
    )
    enforced = _enforce_schema(pd.DataFrame(records), sig.inputs)
    x, reasons = rawmodel.transform_records(enforced, stats, columns)
    assert reasons == [None, None] and x[0, stats.feature_names.index("flag")] == 1.0
    # the input example logged with the model: the clean rows' dates written back in their format
    example = rawmodel.as_records(
        pd.DataFrame({"day": [dt.date(2021, 3, 2), None], "at": [pd.Timestamp("2021-03-02 10:00:00"), pd.NaT]}),
        columns,
    )
    assert list(example["day"]) == ["02/03/2021", None] and list(example["at"]) == ["2021-03-02 10:00:00", None]


@pytest.mark.parametrize(
    ("kind", "pattern"),
    [
        ("date", "dd/MM/yyyy"),
        ("date", "d.M.yyyy"),
        ("date", "yyyy-MM-dd"),
        ("timestamp", "yyyy-MM-dd HH:mm:ss"),
        ("timestamp", "yyyy-MM-dd'T'H:m:s.SSS"),
    ],
)
def test_spark_and_the_registered_model_parse_the_same_text_the_same_way(spark, kind, pattern):
    from dlpipe.config import ColumnSpec

    texts = [
        "01/02/2020", "1/2/2020", "31/02/2020", "29/02/2024", "29/02/2023", "01/02/20", "1.2.2020", "01.02.2020",
        "31.12.1999", "2020-01-02", "2020-1-2", "2020-12-31", "2020-13-01", "2020-01-02 03:04:05", "2020-01-02 3:04:05",
        "2020-01-02 24:00:00", "2020-01-02T03:04:05.123", "2020-01-02T3:4:5.678", "2020-01-02T03:04:05", " 01/02/2020 ",
        "0001-01-01", "abc", "01/02/2020x", "1999-12-31 23:59:59", "2020-01-02T23:59:59.999",
    ]  # fmt: skip
    col = ColumnSpec(name="v", type=kind, format=pattern)
    df = spark.createDataFrame([(t,) for t in texts], "v string")
    from_spark = [r[0] for r in df.selectExpr(ingest._typed(col, "v")).collect()]
    fmt = rawmodel.DatetimeFormat(pattern)
    from_python = [fmt.parse(t.strip()) for t in texts]
    if kind == "date":
        from_python = [p.date() if p else None for p in from_python]
    assert from_spark == from_python
    assert sum(p is not None for p in from_python) >= 2  # the pattern does parse some of them


@pytest.mark.slow
def test_a_table_with_a_boolean_a_dd_mm_yyyy_date_and_many_cities_runs_end_to_end(spark, tmp_path):
    """A CSV written here: ingest quarantines the bad booleans and dates, preprocess expands the rest, the
    pipeline trains, scores and registers a model that takes the raw records."""
    import mlflow

    from dlpipe.pipeline import run_pipeline

    columns = [
        {"name": "member", "type": "boolean"},
        {"name": "joined", "type": "date", "format": "dd/MM/yyyy"},
        {"name": "city", "type": "string", "top_k": 4},
    ]
    overrides = (
        "train.epochs=10",
        "train.lr=0.03",
        "train.batch_size=32",
        "train.model.hidden=[16]",
        *UNCHECKED_WORK,
    )
    cfg = _cfg(tmp_path, columns, overrides=overrides, max_bad_fraction=0.1)
    rng = np.random.default_rng(5)
    rows = []
    for i in range(600):
        member = bool(rng.integers(0, 2))
        joined = dt.date(2010, 1, 1) + dt.timedelta(days=int(rng.integers(0, 5000)))
        city = f"city{int(rng.integers(0, 4))}" if i % 3 else f"town{i}"  # 4 big cities, 200 towns of one row
        words = ("yes", "no") if i % 2 else ("TRUE", "false")
        rows.append([i, words[0] if member else words[1], joined.strftime("%d/%m/%Y"), city, int(member)])
    rows[7][1], rows[8][2], rows[9][2] = "perhaps", "2020-01-31", "30/02/2020"
    _write_csv(cfg, ["id", "member", "joined", "city", "y"], rows)

    result = run_pipeline(spark, cfg)
    ing, pre, ev = (result.metrics[s] for s in ("ingest", "preprocess", "evaluate"))
    assert (ing["rows_in"], ing["rows_kept"], ing["rows_quarantined"]) == (600, 597, 3)
    assert ing["quarantined_type"] == 3
    q = _quarantine(spark, cfg)
    assert q == {
        7: ("not a boolean: member=perhaps", "type"),
        8: ("not a date: joined=2020-01-31", "type"),
        9: ("not a date: joined=30/02/2020", "type"),
    }
    stats = features.read_stats(spark, cfg)
    cities = [f"city=city{k}" for k in range(4)]
    joined = [f"joined_{p}" for p in ("year", "month_sin", "month_cos", "dow_sin", "dow_cos", "doy")]
    assert list(stats.feature_names) == ["member", *joined, *cities, "city=__other__"]
    assert pre["feature_dim"] == 12 and pre["rows_in"] == 597
    assert ev["accuracy"] > 0.9  # the label is the boolean: learnable only if it reached the features
    # the registered model takes raw records: JSON booleans, dates as text in their format, unknown cities
    mlflow.set_tracking_uri(result.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.model_name}@candidate")
    records = pd.DataFrame(
        [
            {"member": True, "joined": "02/03/2015", "city": "city1"},
            {"member": False, "joined": "02/03/2015", "city": "nowhere"},
        ]
    )
    answer = model.predict(records)
    assert list(answer["prediction"]) == [1, 0]
    # new raw data for the infer job: the same checks, an unknown city is __other__, and the same answers
    from dlpipe.pipeline import run_stage

    src = tmp_path / "new"
    src.mkdir()
    new_rows = "id,member,joined,city\n1,y,02/03/2015,city1\n2,N,02/03/2015,nowhere\n3,maybe,02/03/2015,city1\n"
    (src / "new.csv").write_text(new_rows)
    new_cfg = cfg.model_copy(deep=True)
    new_cfg.infer.source = str(src)
    new_cfg.dataset.max_bad_fraction = 0.5  # one bad row of three, on purpose
    m = run_stage(spark, new_cfg, "infer", force=True)
    assert (m["rows_scored"], m["rows_quarantined"]) == (2, 1)
    scored = spark.read.parquet(dataset_paths(new_cfg).infer_output).select("id", "prediction").collect()
    assert {r["id"]: r["prediction"] for r in scored} == {1: 1, 2: 0}
    bad = spark.read.parquet(dataset_paths(new_cfg).infer_quarantine).select("id", "reason").collect()
    assert [(r["id"], r["reason"]) for r in bad] == [(3, "not a boolean: member=maybe")]
