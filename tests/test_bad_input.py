"""Bad input everywhere, a test each (issue 13): a CSV file with a header and no rows, the wrong separator,
duplicate keys and the declared policy for them, labels at scoring time that training never saw, new data
with more bad rows than allowed, and REST requests with wrong columns or types. Real Spark in local mode,
real files, one small trained model (penguins, 2 epochs) shared by the scoring tests, one REST server.

Covered elsewhere, not repeated here: an empty input folder or a folder of header-only files
(test_datasets: test_empty_input_and_missing_path_name_the_path), files whose columns differ
(test_sources), invalid YAML and a misspelt key (test_config), a header that lacks a declared column
(test_stages, test_sources)."""

from __future__ import annotations

import json
import logging
import shutil
import urllib.error
import urllib.request

import mlflow
import pandas as pd
import pytest
import yaml

from dlpipe import tracking
from dlpipe.config import ConfigError, DatasetConfig, load_config
from dlpipe.data import ingest
from dlpipe.data.ingest import BadDataError, SchemaMismatchError
from dlpipe.pipeline import run_pipeline, run_stage
from dlpipe.storage import dataset_paths, lineage, local_path
from dlpipe.storage.parquet_io import sql_conf
from tests.conftest import REPO, UNCHECKED_WORK, make_cfg

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


# --- 3. duplicate keys --------------------------------------------------------------------------------------
def _with_duplicates(tmp_path):
    """Valid rows sharing keys within a file and across files; bad rows that share a key with a valid one
    (no duplicate: a bad row is quarantined for its own reason) or have none. c.csv is large enough to be
    read in several splits, so the first of its keys is the first by line, not by task."""
    big = [f"{k},{k % 7}.0,a,{k % 3}" for k in range(1000, 3000)]
    return _files(
        tmp_path / "raw",
        {
            "a.csv": "\n".join([HEADER, "1,1.0,a,0", "2,2.0,b,1", "3,3.0,a,2", "2,2.5,b,1", "4,oops,a,0"])
            + "\n4,4.0,a,0\n,5.0,a,0\n,6.0,a,0\n",
            "b.csv": HEADER + "\n3,30.0,c,2\n5,5.0,b,0\n5,50.0,b,0\n2,20.0,a,1\n",
            "c.csv": HEADER + "\n" + "\n".join([*big, "1000,999.0,c,1", "1,111.0,c,0"]) + "\n",
        },
    )


ROWS_IN, VALID = 8 + 4 + 2002, 5 + 4 + 2002  # 3 bad rows: a type error and two without a key
DUP_KEYS, DUP_ROWS = 5, 6  # keys 1, 2 (three rows), 3, 5, 1000


def test_duplicate_keys_are_reported_and_kept_by_default_logged_with_the_stage(spark, tmp_path):
    raw = _with_duplicates(tmp_path)
    cfg = _cfg(tmp_path, raw, max_bad_fraction=0.003)
    assert cfg.dataset.duplicates == "keep_all"
    with tracking.pipeline_run(cfg, "test-duplicates"):
        m = run_stage(spark, cfg, "ingest")
    _books(m, ROWS_IN, VALID, type=1, missing=2)
    assert (m["duplicate_keys"], m["duplicate_rows"]) == (DUP_KEYS, DUP_ROWS)
    clean = spark.read.parquet(dataset_paths(cfg).clean)
    assert clean.where("id = 2").count() == 3 and clean.where("id = 4").count() == 1
    meta = lineage.read_meta(spark, dataset_paths(cfg).clean)
    assert (meta["metrics"]["duplicate_keys"], meta["metrics"]["duplicate_rows"]) == (DUP_KEYS, DUP_ROWS)
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    run = tracking.last_stage_run(
        client, client.get_experiment_by_name(cfg.tracking.experiment).experiment_id, "ingest", cfg.dataset.name
    )
    assert run.data.metrics["duplicate_keys"] == DUP_KEYS and run.data.metrics["duplicate_rows"] == DUP_ROWS


def test_keep_first_keeps_the_first_row_by_file_and_line_and_quarantines_the_rest(spark, tmp_path):
    raw = _with_duplicates(tmp_path)
    # dataset.duplicates is not bad data: 9 quarantined of 2014 is over 0.003, the 3 failed rows are not
    cfg = _cfg(tmp_path, raw, max_bad_fraction=0.003, duplicates="keep_first")
    with sql_conf(spark, {"spark.sql.files.maxPartitionBytes": "8192"}):  # c.csv: about four splits
        m = ingest.run(spark, cfg)
    _books(m, ROWS_IN, VALID - DUP_ROWS, type=1, missing=2, duplicate_key=DUP_ROWS)
    assert (m["duplicate_keys"], m["duplicate_rows"]) == (DUP_KEYS, DUP_ROWS)
    assert m["bad_fraction"] == pytest.approx(3 / ROWS_IN)
    clean = _clean(spark, cfg)
    assert len(clean) == VALID - DUP_ROWS
    assert [clean[k] for k in (1, 2, 3, 4, 5, 1000)] == [
        (1.0, "a", 0),  # a.csv before c.csv
        (2.0, "b", 1),  # line 2 of a.csv, before its line 5 and b.csv
        (3.0, "a", 2),
        (4.0, "a", 0),  # its bad twin is quarantined for its own reason
        (5.0, "b", 0),
        (6.0, "a", 1),  # the first line of c.csv, not its last (another split)
    ]
    dups = [r for r in _quarantine(spark, cfg) if r["reason_code"] == "duplicate_key"]
    assert sorted((r["id"], r["raw_line"], r["source_file"].rsplit("/", 1)[-1]) for r in dups) == [
        (1, "1,111.0,c,0", "c.csv"),
        (2, "2,2.5,b,1", "a.csv"),
        (2, "2,20.0,a,1", "b.csv"),
        (3, "3,30.0,c,2", "b.csv"),
        (5, "5,50.0,b,0", "b.csv"),
        (1000, "1000,999.0,c,1", "c.csv"),
    ]
    assert {r["reason"] for r in dups if r["id"] == 2} == {
        "duplicate key (dataset.duplicates: keep_first kept its first row): id=2"
    }


def test_quarantine_policy_quarantines_every_row_of_a_duplicated_key(spark, tmp_path):
    raw = _with_duplicates(tmp_path)
    cfg = _cfg(tmp_path, raw, max_bad_fraction=0.003, duplicates="quarantine")
    m = ingest.run(spark, cfg)
    dropped = DUP_KEYS + DUP_ROWS  # every row of the five keys
    _books(m, ROWS_IN, VALID - dropped, type=1, missing=2, duplicate_key=dropped)
    assert (m["duplicate_keys"], m["duplicate_rows"]) == (DUP_KEYS, DUP_ROWS)
    clean = _clean(spark, cfg)
    assert not {1, 2, 3, 5, 1000} & set(clean) and clean[4] == (4.0, "a", 0) and len(clean) == VALID - dropped
    reasons = {r["reason"] for r in _quarantine(spark, cfg) if r["id"] == 5}
    assert reasons == {"duplicate key (dataset.duplicates: quarantine, every row of it): id=5"}


def test_the_duplicates_policy_is_part_of_the_ingest_fingerprint(spark, tmp_path):
    raw = _files(tmp_path / "raw", {"a.csv": HEADER + "\n1,1.0,a,0\n1,2.0,b,1\n2,3.0,c,2\n"})
    runs = []
    for policy in ("keep_all", "keep_all", "keep_first", "keep_first", "quarantine", "keep_all"):
        cfg = _cfg(tmp_path, raw, duplicates=policy)
        m = ingest.run(spark, cfg)
        runs.append((policy, m["skipped"], m["rows_kept"], ingest.Ingest().plan(spark, cfg).fingerprint))
    assert [r[:3] for r in runs] == [
        ("keep_all", 0, 3),
        ("keep_all", 1, 3),
        ("keep_first", 0, 2),
        ("keep_first", 1, 2),
        ("quarantine", 0, 1),
        ("keep_all", 0, 3),
    ]
    assert len({r[3] for r in runs}) == 3
    # keep_all (the default) leaves the fingerprint as it was before the policy existed
    spec = cfg.dataset.model_dump(mode="json", exclude={"generator", "split", "duplicates"})
    inputs = {dataset_paths(cfg).raw: lineage.source_fingerprint(spark, dataset_paths(cfg).raw)}
    assert runs[0][3] == lineage.digest({"stage": "ingest", "inputs": inputs, "dataset": spec})


def test_a_bad_duplicates_policy_names_the_file_the_key_and_the_choices(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    spec = {"name": "mine", "source": {"uri": "raw"}, "num_classes": 3, "columns": COLUMNS, "duplicates": "keep_last"}
    (conf / "datasets" / "mine.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as err:
        load_config("local", ["dataset=mine"], conf_dir=conf)
    text = str(err.value)
    assert f"{conf / 'datasets' / 'mine.yaml'} (key 'duplicates')" in text
    assert "'keep_last'" in text and "'keep_all', 'keep_first' or 'quarantine'" in text
    with pytest.raises(ConfigError, match="an image dataset's key is each file's path.*remove duplicates"):
        load_config("local", ["dataset=digits_images", "dataset.duplicates=keep_first"], conf_dir=REPO / "conf")


# --- a small trained model, shared by the scoring tests -----------------------------------------------------
@pytest.fixture(scope="module")
def penguins(spark, tmp_path_factory):
    """penguins through train (2 epochs, no int8 variant): a registered candidate with string classes."""
    root = tmp_path_factory.mktemp("penguins")
    cfg = load_config(
        "local",
        [
            "dataset=penguins",
            f"project.root={root}",
            "spark.master=local[2]",
            "train.epochs=2",
            "train.batch_size=32",
            "train.model.hidden=[16]",
            *UNCHECKED_WORK,
        ],
        conf_dir=REPO / "conf",
    )
    result = run_pipeline(spark, cfg, stages=("generate", "ingest", "preprocess", "train"))
    raw = pd.read_csv(local_path(dataset_paths(cfg).raw) / "penguins.csv")
    return cfg, result, raw


def _scoring(cfg, source, out, **dataset):
    new = cfg.model_copy(deep=True)
    new.infer.source, new.infer.output, new.infer.partition_by = str(source), str(out), []
    for k, v in dataset.items():
        setattr(new.dataset, k, v)
    return new


# --- 4. labels at scoring time that training never saw ------------------------------------------------------
@pytest.mark.slow
def test_labels_the_model_never_saw_are_scored_counted_and_named(spark, penguins, tmp_path, caplog):
    """New data whose label holds a class the model was not trained on: its features are fine, so the row
    is scored (the batch job scores, it does not learn); the label is null in the output, the rows are
    counted (unseen_label_rows) and a warning names the classes."""
    cfg, _, raw = penguins
    new = raw.head(60).copy()
    new.loc[0:4, "species"] = "Emperor"
    new.loc[5:6, "species"] = "King"
    src = tmp_path / "new"
    src.mkdir()
    new.to_csv(src / "new.csv", index=False, na_rep="NA")
    ncfg = _scoring(cfg, src, tmp_path / "scored")
    with caplog.at_level(logging.WARNING, logger="dlpipe.serve.infer"):
        m = run_stage(spark, ncfg, "infer")
    assert (m["rows_in"], m["rows_scored"], m["rows_quarantined"], m["unseen_label_rows"]) == (60, 60, 0, 7)
    warning = [r.getMessage() for r in caplog.records if "never trained on" in r.getMessage()]
    assert len(warning) == 1 and "7 rows" in warning[0] and "2 class(es): Emperor .. King" in warning[0]
    assert "['Adelie', 'Chinstrap', 'Gentoo']" in warning[0]
    scored = spark.read.parquet(dataset_paths(ncfg).infer_output).toPandas().set_index("id").loc[new["id"]]
    assert scored["label"].isna().to_numpy().tolist() == [True] * 7 + [False] * 53
    classes = ["Adelie", "Chinstrap", "Gentoo"]
    assert list(scored["label"].iloc[7:].astype(int)) == [classes.index(s) for s in new["species"].iloc[7:]]
    assert scored["predicted_class"].notna().all()
    assert lineage.read_meta(spark, dataset_paths(ncfg).infer_output)["metrics"]["unseen_label_rows"] == 7


# --- 5. new data with more bad rows than allowed ------------------------------------------------------------
@pytest.mark.slow
def test_scoring_too_many_bad_rows_fails_writes_nothing_and_a_raised_limit_succeeds(spark, penguins, tmp_path):
    cfg, _, raw = penguins
    new = raw.head(40).drop(columns=["species"]).astype({"body_mass_g": "object"})
    new.loc[0:5, "body_mass_g"] = "heavy"  # type
    new.loc[6:11, "island"] = None  # missing (island is required)
    src = tmp_path / "in" / "new"
    src.mkdir(parents=True)
    new.to_csv(src / "new.csv", index=False, na_rep="NA")
    out = tmp_path / "out" / "scored"
    with pytest.raises(BadDataError) as err:
        run_stage(spark, _scoring(cfg, src, out), "infer")
    text = str(err.value)
    assert "12 of 40 rows (30.0%) could not be scored, more than dataset.max_bad_fraction=0.05" in text
    assert "'type': 6" in text and "'missing': 6" in text and "Nothing was written" in text
    leftovers = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    assert leftovers == [], f"a failed infer left {leftovers}"

    m = run_stage(spark, _scoring(cfg, src, out, max_bad_fraction=0.5), "infer")
    assert (m["rows_in"], m["rows_scored"], m["rows_quarantined"]) == (40, 28, 12)
    assert (m["quarantined_type"], m["quarantined_missing"], m["unseen_label_rows"]) == (6, 6, 0)
    assert sorted(p.name for p in out.parent.iterdir()) == ["scored", "scored_quarantine"]
    assert spark.read.parquet(out.as_uri()).count() == 28


# --- 6. REST requests with wrong columns or types -----------------------------------------------------------
def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.slow
def test_rest_requests_with_wrong_columns_or_types_get_a_4xx_naming_them(penguins, tmp_path):
    """One server. Each wrong request is answered 400 naming the column or the record, never 500
    (test_your_data covers out of range, not allowed, missing values and text in a number column sent as
    dataframe_split). What MLflow accepts is accepted as ingest would: an undeclared column is ignored, an
    optional (imputed) column may be absent, a number in a string column is its text."""
    from dlpipe.serve.serving import ModelServer

    cfg, result, raw = penguins
    good = raw[[c.name for c in cfg.dataset.features]].head(3)
    row = json.loads(good.head(1).to_json(orient="records"))[0]

    def split(frame: pd.DataFrame) -> bytes:
        return json.dumps({"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}).encode()

    def records(*rows: dict) -> bytes:
        return json.dumps({"dataframe_records": list(rows)}).encode()

    refused = {  # the request -> words its 400 answer must hold
        "a required column missing": (split(good.drop(columns=["island"])), ["missing inputs ['island']"]),
        "text for a number": (records({**row, "bill_depth_mm": "thick"}), ["column bill_depth_mm", "thick"]),
        "a list for a number": (records({**row, "flipper_length_mm": [1.0, 2.0]}), ["column flipper_length_mm"]),
        "a number not allowed": (records({**row, "sex": 3}), ["record 0: not an allowed value of sex: 3"]),
        "an infinite number": (records({**row, "body_mass_g": "1e400"}), ["record 0: not finite: body_mass_g"]),
        "null in a required column": (records(row, {**row, "island": None}), ["record 1: missing value: island"]),
        "no rows": (records(), ["missing inputs ['island']"]),
        "not JSON": (b'{"dataframe_split": ', ["valid JSON"]),
        "no known format": (json.dumps({"rows": [row]}).encode(), ["dataframe_records"]),
        "records not a list": (json.dumps({"dataframe_records": 5}).encode(), ["must be a list of records"]),
        "a row too short": (json.dumps({"dataframe_split": {"columns": list(good), "data": [[1, 2]]}}).encode(), []),
    }
    accepted = {  # the request -> the request it is answered like
        "an undeclared column": (split(good.assign(colour="blue")), split(good)),
        "an optional column absent": (split(good.drop(columns=["sex"])), split(good.assign(sex=None))),
        "a number in a string column": (records({**row, "island": 3}), records({**row, "island": "3"})),
    }
    server = ModelServer(f"models:/{cfg.model_name}@candidate", result.tracking_uri, tmp_path / "serve.log")
    with server:
        url = f"{server.url}/invocations"
        refusals = {name: _post(url, body) for name, (body, _) in refused.items()}
        answers = {name: (_post(url, body), _post(url, like)) for name, (body, like) in accepted.items()}
    for name, (status, answer) in refusals.items():
        assert status == 400, f"{name}: {status} {answer}"
        for words in refused[name][1]:
            assert words in answer.get("message", ""), f"{name}: {answer}"
    for name, ((status, answer), (like_status, like)) in answers.items():
        assert status == like_status == 200 and answer == like, f"{name}: {status} {answer} vs {like}"
    assert (
        answers["an optional column absent"][0][1]["predictions"]
        != answers["an undeclared column"][0][1]["predictions"]
    ), "imputing sex changed nothing: the comparison would not see a column dropped"
