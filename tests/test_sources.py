"""Sources as they come (issue 12): CSV dialects and encodings, a byte order mark, compressed files, headers
with extra or reordered columns, folders whose files differ in columns, nested JSON fields by a dotted path,
and Parquet whose types differ from the declaration. Every case runs the real ingest on a real local Spark
and checks the books: rows in = rows kept + rows quarantined, one reason per bad row."""

from __future__ import annotations

import bz2
import gzip
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from dlpipe.config import ConfigError, DatasetConfig
from dlpipe.data import ingest
from dlpipe.data.ingest import SchemaMismatchError
from dlpipe.storage import dataset_paths
from tests.conftest import make_cfg

NAMES = ["a", "b", "é;x", "d'q"]  # allowed values of `name`: non-ASCII, the separator, a quote


def _cfg(tmp_path, uri, fmt="csv", options=None, columns=None, **dataset):
    """A small classification dataset: id (key), x (double in [-50, 50]), name (one of NAMES), label."""
    spec = {
        "name": "sources",
        "source": {"uri": str(uri), "format": fmt, "options": options or {}},
        "num_classes": 3,
        "columns": columns
        or [
            {"name": "id", "type": "long", "role": "key"},
            {"name": "x", "type": "double", "min": -50, "max": 50},
            {"name": "name", "type": "string", "values": NAMES},
            {"name": "label", "type": "int", "role": "label"},
        ],
        "max_bad_fraction": 0.9,
        **dataset,
    }
    cfg = make_cfg(tmp_path)
    return cfg.model_copy(update={"dataset": DatasetConfig.model_validate(spec)})


def _books(m, rows_in, kept, **codes):
    """The ingest metrics: rows in, kept, and quarantined per reason code (and nothing else quarantined)."""
    assert (m["rows_in"], m["rows_kept"]) == (rows_in, kept), m
    assert m["rows_in"] == m["rows_kept"] + m["rows_quarantined"]
    got = {k.removeprefix("quarantined_"): v for k, v in m.items() if k.startswith("quarantined_")}
    assert got == codes, got


def _quarantine(spark, cfg):
    return {r["id"]: r for r in spark.read.parquet(dataset_paths(cfg).quarantine).collect()}


def _clean(spark, cfg):
    return {r["id"]: r for r in spark.read.parquet(dataset_paths(cfg).clean).collect()}


def test_csv_with_another_separator_quote_escape_and_encoding(spark, tmp_path):
    """cp1252 text, `;` between fields, `'` around them, `#` escaping a quote: the typed read and the
    re-parse of a bad line (from_csv) both split them the same way."""
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = [
        "id;x;name;label",
        "1;1.5;'é;x';0",  # a quoted separator, non-ASCII
        "2;-2.0;'d#'q';1",  # an escaped quote
        "3;0.0;a;2",
        "4;abc;'é;x';1",  # not a double: re-parsed with the same separator and quote
        "5;1.0;'Zoë';1",  # not an allowed value (decoded as cp1252)
        "6;1.0;a",  # one field short
    ]
    (raw / "part-0.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode("cp1252"))
    options = {"header": True, "delimiter": ";", "quote": "'", "escape": "#", "encoding": "latin-1"}
    cfg = _cfg(tmp_path, raw, options=options)
    assert ingest.reader_options(cfg)["sep"] == ";"  # Spark's alias, under one name
    m = ingest.run(spark, cfg)
    _books(m, 6, 3, type=1, value=1, malformed=1)
    clean = _clean(spark, cfg)
    assert (clean[1]["name"], clean[1]["x"]) == ("é;x", 1.5) and clean[2]["name"] == "d'q"
    q = _quarantine(spark, cfg)
    assert q[4]["reason"] == "not a double: x=abc" and q[4]["raw_line"] == "4;abc;'é;x';1"
    assert q[5]["reason"] == "not an allowed value of name: Zoë"
    assert q[6]["reason_code"] == "malformed"


def test_a_utf8_byte_order_mark_does_not_rename_the_first_column(spark, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    text = "id,x,name,label\n1,1.0,a,0\n2,2.0,é;x,1\n3,zz,b,1\n"
    (raw / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert ingest._split_header("\ufeffid,x", {}) == ["\ufeffid", "x"]  # the reader drops it before splitting
    cfg = _cfg(tmp_path, raw, options={"header": True, "encoding": "utf-8-sig"})
    m = ingest.run(spark, cfg)
    _books(m, 3, 2, type=1)
    assert sorted(_clean(spark, cfg)) == [1, 2] and _quarantine(spark, cfg)[3]["reason"] == "not a double: x=zz"


def test_invalid_reader_options_name_dataset_source_options(spark, tmp_path):
    def opts(**options):
        return ingest.reader_options(_cfg(tmp_path, tmp_path, options=options))

    assert opts(Delimiter="\\t", charset="cp1252") == {"sep": "\\t", "encoding": "cp1252"}
    for bad, why in [
        ({"delimeter": ";"}, r"options\.delimeter: not a Spark csv reader option"),
        ({"mode": "FAILFAST"}, r"options\.mode: ingest sets this option itself"),
        ({"quote": "ab"}, r"options\.quote: one character"),
        ({"sep": ""}, r"options\.sep: the delimiter cannot be empty"),
        ({"sep": ";", "delimiter": ","}, r"options: sep is given twice"),
    ]:
        with pytest.raises(ConfigError, match=f"dataset.source.{why}"):
            opts(**bad)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.csv").write_text("id,x,name,label\n1,1.0,a,0\n")
    with pytest.raises(ConfigError, match=r"dataset.source.options.encoding: unknown charset 'klingon'"):
        ingest.run(spark, _cfg(tmp_path, raw, options={"encoding": "klingon"}))


def test_gzip_and_bzip2_files_are_read_and_their_bad_rows_counted(spark, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    good = [f"{i},{i / 10},a,{i % 3}" for i in range(50)]
    with gzip.open(raw / "a.csv.gz", "wt") as f:
        f.write("\n".join(["id,x,name,label", *good[:25], "100,oops,a,0", "101,1.0"]) + "\n")
    with bz2.open(raw / "b.csv.bz2", "wt") as f:  # and the columns in another order
        f.write("\n".join(["label,id,name,x", *[f"{i % 3},{i},a,{i / 10}" for i in range(25, 50)], "2,102,a,99"]))
    cfg = _cfg(tmp_path, raw, options={"header": True})
    m = ingest.run(spark, cfg)
    _books(m, 53, 50, type=1, malformed=1, range=1)
    q = _quarantine(spark, cfg)
    assert q[100]["source_file"].endswith("a.csv.gz") and q[102]["source_file"].endswith("b.csv.bz2")
    assert q[102]["reason"] == "out of range [-50.0, 50.0]: x=99.0"
    assert _clean(spark, cfg)[42]["x"] == 4.2 and _clean(spark, cfg)[42]["label"] == 0

    jraw = tmp_path / "jraw"
    jraw.mkdir()
    rows = [json.dumps({"id": i, "x": 0.5, "name": "b", "label": i % 3}) for i in range(30)]
    with gzip.open(jraw / "part-0.jsonl.gz", "wt") as f:
        f.write("\n".join([*rows, '{"id": 30, "x": ', json.dumps({"id": 31, "x": 1, "name": "b", "label": 5})]) + "\n")
    jcfg = _cfg(tmp_path / "j", jraw, fmt="jsonl")
    _books(ingest.run(spark, jcfg), 32, 30, malformed=1, label_range=1)


def test_headers_with_extra_columns_or_another_order_are_read_by_name(spark, tmp_path, caplog):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.csv").write_text("id,x,name,label\n1,1.0,a,0\n2,2.0,b,1\n")
    (raw / "b.csv").write_text("label,name,x,id\n2,a,3.0,3\n1,b,zz,4\n")  # reordered; a bad value
    (raw / "c.csv").write_text("id,note,x,NAME,label,extra\n5,hi,5.0,a,0,x\n6,there,6.0,b,1\n")  # extras; short
    cfg = _cfg(tmp_path, raw, options={"header": True})
    with caplog.at_level(logging.INFO, logger="dlpipe.data.ingest"):
        m = ingest.run(spark, cfg)
    _books(m, 6, 4, type=1, malformed=1)
    clean = _clean(spark, cfg)
    assert {k: (r["x"], r["name"], r["label"]) for k, r in clean.items()} == {
        1: (1.0, "a", 0),
        2: (2.0, "b", 1),
        3: (3.0, "a", 2),
        5: (5.0, "a", 0),
    }
    q = _quarantine(spark, cfg)
    assert q[4]["reason"] == "not a double: x=zz" and q[6]["reason_code"] == "malformed"
    ignored = [r.getMessage() for r in caplog.records if "not in dataset.columns; ignored" in r.getMessage()]
    assert len(ignored) == 1 and "['extra', 'note']" in ignored[0]


def test_rows_of_a_csv_file_that_lacks_a_column_are_quarantined_naming_it(spark, tmp_path, caplog):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.csv").write_text("id,x,name,label\n1,1.0,a,0\n2,2.0,b,1\n3,1.0,a,9\n")
    (raw / "b 2.csv").write_text("id,label,x\n4,0,1.0\n5,1,1.0\n")  # no `name`; a space in its name
    (raw / "c.csv").write_text("label,id\n0,6\n")  # no `x`, no `name`
    cfg = _cfg(tmp_path, raw, options={"header": True})
    with caplog.at_level(logging.WARNING, logger="dlpipe.data.ingest"):
        m = ingest.run(spark, cfg)
    _books(m, 6, 2, missing_column=3, label_range=1)
    q = _quarantine(spark, cfg)
    assert q[4]["reason"] == f"missing column name in file {(raw / 'b 2.csv').as_uri()}"
    assert q[6]["reason"] == f"missing columns x, name in file {(raw / 'c.csv').as_uri()}"
    assert q[5]["source_file"].endswith("b%202.csv") and q[4]["raw_line"] == "4,1.0,,0"
    assert any("2 file(s) lack declared column(s) ['name', 'x']" in r.getMessage() for r in caplog.records)
    with pytest.raises(SchemaMismatchError, match=r"no file has the column\(s\) \['x', 'name'\]"):
        ingest.run(spark, _cfg(tmp_path / "c", raw / "c.csv", options={"header": True}))


def test_parquet_files_with_differing_schemas_and_types_are_cast_when_exact(spark, tmp_path):
    """Types differ from the declaration and between files (which Spark's mergeSchema refuses): a value is
    kept when it is exactly of the declared type, else quarantined with its reason."""
    raw = tmp_path / "raw"
    raw.mkdir()
    cols = [
        {"name": "id", "type": "long", "role": "key"},
        {"name": "x", "type": "double"},
        {"name": "n", "type": "int"},
        {"name": "s", "type": "int"},
        {"name": "label", "type": "int", "role": "label"},
    ]
    pq.write_table(  # x float32 (declared double), n double, s text, label int64
        pa.table(
            {
                "id": pa.array([1, 2, 3], pa.int64()),
                "x": pa.array([0.5, 1.25, -2.0], pa.float32()),
                "n": pa.array([3.0, 2.5, 7.0]),
                "s": pa.array(["12", "13", "x1"]),
                "label": pa.array([0, 1, 2], pa.int64()),
            }
        ),
        raw / "a.parquet",
    )
    pq.write_table(  # another order, an extra column, n int64 (one too big for int), x int32
        pa.table(
            {
                "label": pa.array([1, 2], pa.int32()),
                "extra": pa.array(["p", "q"]),
                "n": pa.array([4, 3_000_000_000], pa.int64()),
                "s": pa.array([5, 6], pa.int16()),
                "x": pa.array([7, 8], pa.int32()),
                "id": pa.array([4, 5], pa.int32()),
            }
        ),
        raw / "b.parquet",
    )
    pq.write_table(pa.table({"id": pa.array([6], pa.int64()), "x": [1.0], "n": [1], "label": [0]}), raw / "c.parquet")
    cfg = _cfg(tmp_path, raw, fmt="parquet", columns=cols)
    m = ingest.run(spark, cfg)
    _books(m, 6, 2, type=3, missing_column=1)
    clean = _clean(spark, cfg)
    assert {k: (r["x"], r["n"], r["s"], r["label"]) for k, r in clean.items()} == {
        1: (0.5, 3, 12, 0),
        4: (7.0, 4, 5, 1),
    }
    q = _quarantine(spark, cfg)
    assert q[2]["reason"] == "not an int: n=2.5" and q[2]["reason_code"] == "type"
    assert q[3]["reason"] == "not an int: s=x1" and q[5]["reason"] == "not an int: n=3000000000"
    assert q[6]["reason"] == f"missing column s in file {(raw / 'c.parquet').as_uri()}"
    schema = dict(spark.read.parquet(dataset_paths(cfg).clean).dtypes)
    assert schema == {"id": "bigint", "x": "double", "n": "int", "s": "int", "label": "int"}


def test_jsonl_nested_fields_are_read_by_their_dotted_path(spark, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    cols = [
        {"name": "id", "type": "long", "role": "key"},
        {"name": "age", "type": "double", "path": "patient.age", "min": 0},
        {"name": "name", "type": "string", "path": "patient.info.name"},
        {"name": "label", "type": "int", "role": "label", "path": "outcome.code"},
    ]

    def row(i, age, name="n", code=0):
        return json.dumps({"id": i, "patient": {"age": age, "info": {"name": name}}, "outcome": {"code": code}})

    lines = [row(i, 20 + i, f"p{i}", i % 3) for i in range(10)]
    lines += [row(10, "old"), row(11, -1), json.dumps({"id": 12, "patient": {"info": {"name": "x"}}})]
    (raw / "p.jsonl").write_text("\n".join(lines) + "\n")
    cfg = _cfg(tmp_path, raw, fmt="jsonl", columns=cols)
    m = ingest.run(spark, cfg)
    _books(m, 13, 10, type=1, range=1, missing=1)
    clean = spark.read.parquet(dataset_paths(cfg).clean)
    assert clean.columns == ["id", "age", "name", "label"]
    r = _clean(spark, cfg)[3]
    assert (r["age"], r["name"], r["label"]) == (23.0, "p3", 0)
    q = _quarantine(spark, cfg)
    assert q[10]["reason"] == "not a double: age=old" and q[12]["reason"].startswith("missing value: ")

    csv_with_path = {**cols[1], "name": "age"}
    with pytest.raises(ValidationError, match="path, which is for source.format: jsonl"):
        DatasetConfig.model_validate(
            {"name": "d", "source": {"uri": "x"}, "num_classes": 3, "columns": [cols[0], csv_with_path, cols[3]]}
        )
    inside = {"name": "patient", "type": "string"}
    with pytest.raises(ValidationError, match="column 'patient' .* holds column 'age'"):
        DatasetConfig.model_validate(
            {"name": "d", "source": {"uri": "x", "format": "jsonl"}, "num_classes": 3, "columns": [*cols, inside]}
        )
