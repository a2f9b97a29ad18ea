"""Bad input everywhere, a test each (issue 13): a CSV file with a header and no rows, the wrong separator,
duplicate keys and the declared policy for them, labels at scoring time that training never saw, new data
with more bad rows than allowed, and REST requests with wrong columns or types. Real Spark in local mode,
real files, one small trained model (penguins, 2 epochs) shared by the scoring tests, one REST server.

Covered elsewhere, not repeated here: an empty input folder or a folder of header-only files
(test_datasets: test_empty_input_and_missing_path_name_the_path), files whose columns differ
(test_sources), invalid YAML and a misspelt key (test_config), a header that lacks a declared column
(test_stages, test_sources)."""

from __future__ import annotations

import pytest

from dlpipe import ingest
from dlpipe.config import DatasetConfig
from dlpipe.ingest import BadDataError, SchemaMismatchError
from dlpipe.storage import dataset_paths, local_path
from tests.conftest import make_cfg

COLUMNS = [
    {"name": "id", "type": "long", "role": "key"},
    {"name": "x", "type": "double"},
    {"name": "name", "type": "string", "values": ["a", "b", "c"]},
    {"name": "label", "type": "int", "role": "label"},
]
HEADER = "id,x,name,label"


def _cfg(root, uri, options=None, **dataset):
    """A small classification dataset (id, x, name, label) read from uri, rooted in root."""
    spec = {
        "name": "bad",
        "source": {"uri": str(uri), "format": "csv", "options": {"header": True, **(options or {})}},
        "num_classes": 3,
        "columns": COLUMNS,
        "max_bad_fraction": 0.5,
        **dataset,
    }
    return make_cfg(root).model_copy(update={"dataset": DatasetConfig.model_validate(spec)})


def _files(folder, files: dict[str, str]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def _books(m: dict, rows_in: int, kept: int, **codes: int) -> None:
    """The ingest metrics: rows in, kept, and quarantined per reason code, nothing else quarantined."""
    assert (m["rows_in"], m["rows_kept"]) == (rows_in, kept), m
    assert m["rows_in"] == m["rows_kept"] + m["rows_quarantined"], m
    got = {k.removeprefix("quarantined_"): v for k, v in m.items() if k.startswith("quarantined_")}
    assert got == codes, got


def _clean(spark, cfg) -> dict:
    return {r["id"]: (r["x"], r["name"], r["label"]) for r in ingest.read_clean(spark, cfg).collect()}


def _quarantine(spark, cfg) -> list:
    return spark.read.parquet(dataset_paths(cfg).quarantine).collect()


# --- 1. a CSV file with a header and no rows ----------------------------------------------------------------
def test_header_only_files_beside_files_with_rows_add_no_rows(spark, tmp_path):
    """Header-only files (one with the columns in another order and an extra one, one lacking a declared
    column) and an empty file beside files with rows add nothing, and the books hold. Alone, they are an
    error naming the path (test_datasets)."""
    raw = _files(
        tmp_path / "raw",
        {
            "a.csv": HEADER + "\n",
            "b.csv": HEADER + "\n1,1.0,a,0\n2,2.0,b,1\n3,zz,c,2\n",
            "c.csv": "",
            "d.csv": "label,name,note,x,id\r\n",
            "e.csv": "id,x,label\n",  # lacks `name`, but has no row to quarantine for it
            "f.csv": "label,id,x,name\n2,4,4.0,c\n",
        },
    )
    cfg = _cfg(tmp_path, raw)
    m = ingest.run(spark, cfg)
    _books(m, 4, 3, type=1)
    assert _clean(spark, cfg) == {1: (1.0, "a", 0), 2: (2.0, "b", 1), 4: (4.0, "c", 2)}
    (bad,) = _quarantine(spark, cfg)
    assert (bad["id"], bad["reason"]) == (3, "not a double: x=zz") and bad["source_file"].endswith("/b.csv")


# --- 2. the wrong separator ---------------------------------------------------------------------------------
def test_a_file_read_with_the_wrong_separator_stops_at_once_naming_it_and_the_option(spark, tmp_path):
    """A `;` file read with `,` has one column, its whole header: ingest stops before reading any row,
    naming that file (not its well-formed neighbour), the columns it expected and the option to set."""
    raw = _files(
        tmp_path / "raw",
        {"good.csv": HEADER + "\n1,1.0,a,0\n", "semi.csv": "id;x;name;label\n2;2.0;b;1\n"},
    )
    cfg = _cfg(tmp_path, raw)
    sc = spark.sparkContext
    sc.setJobGroup("wrong-separator", "ingest with the wrong separator")
    try:
        with pytest.raises(SchemaMismatchError) as err:
            ingest.run(spark, cfg)
        jobs = sc.statusTracker().getJobIdsForGroup("wrong-separator")
    finally:
        sc.setJobGroup(None, None)  # type: ignore[arg-type]
    text = str(err.value)
    assert f"ingest: file:{raw / 'semi.csv'}: " in text and "good.csv" not in text, text
    assert "the expected columns ['id', 'x', 'name', 'label'] (dataset.columns) were not found" in text
    assert "the header is one column 'id;x;name;label'" in text
    assert 'Set dataset.source.options.sep: ";"' in text
    assert list(jobs) == [], "a Spark job ran before the separator was found wrong"
    assert not local_path(dataset_paths(cfg).clean).parent.exists(), "a failed ingest left its folder"

    # the other way round: tab-separated files, read with a configured `;`
    tabs = _files(tmp_path / "tabs", {"t.csv": "id\tx\tname\tlabel\n1\t1.0\ta\t0\n"})
    with pytest.raises(SchemaMismatchError, match=r'Set dataset.source.options.sep: "\\t"'):
        ingest.run(spark, _cfg(tmp_path, tabs, {"sep": ";"}))

    # without a header the columns are taken by position: every line is one field too few. Too many bad
    # rows, and the message points at the separator
    with pytest.raises(BadDataError, match=r'(?s)2 of 2 rows .*separated by "," and quoted with """'):
        ingest.run(spark, _cfg(tmp_path, raw / "semi.csv", {"header": False}))
