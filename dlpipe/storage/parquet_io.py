"""One pass, several Parquet outputs; row counts from footers; a summary file that names each output's columns.

Spark writes one DataFrame per job, with one schema for every file. A stage that splits its rows (kept and
quarantined, scored and rejected, train/val/test) would otherwise read and parse its input once per
output. `write_routed` writes the rows once, partitioned by their destination, with a few Parquet writers
open per task instead of a sort; then each destination's folder is renamed into place and given a
`_common_metadata` summary holding only that output's columns. Spark takes a dataset's schema from that
summary (it reads `_common_metadata` before any data file), so readers see exactly the output's columns;
the columns that belong to the other outputs are all null in these files and cost a few bytes each.

Counts come from the footers of what was written (`footers`), not from reading the data again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, SparkSession

from dlpipe.storage import HadoopFS, StorageSettings, python_fs

log = logging.getLogger(__name__)

ROUTE = "_route"
SUMMARY = "_common_metadata"
SPARK_SCHEMA_KEY = b"org.apache.spark.sql.parquet.row.metadata"
# Row group size of routed outputs: every open writer buffers up to one row group, and a task holds one
# writer per destination, so this bounds a task's Parquet buffers (a 512 MB heap runs four tasks' worth).
ROUTED_ROW_GROUP_MB = 32


@dataclass(frozen=True)
class PartFile:
    path: str  # relative to the dataset folder
    rows: int
    row_groups: int


@contextmanager
def sql_conf(spark: SparkSession, settings: Mapping[str, str]) -> Iterator[None]:
    """Session SQL settings for the duration of one action, restored afterwards."""
    before = {k: spark.conf.get(k, None) for k in settings}
    for k, v in settings.items():
        spark.conf.set(k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)


def concurrent_writers(n: int) -> dict[str, str]:
    """Up to n Parquet writers open per task instead of sorting each task's rows by partition: a routed write
    then costs what a plain write does (beyond n destinations, Spark sorts the rest, in bounded memory)."""
    return {"spark.sql.optimizer.plannedWrite.enabled": "false", "spark.sql.maxConcurrentOutputFileWriters": str(n)}


@dataclass(frozen=True)
class Output:
    """One destination of a routed write: where it goes, which columns are its own (None: all), and more
    key-value metadata for its summary, made from its part files (Petastorm's, for instance)."""

    uri: str
    columns: Sequence[str] | None
    metadata: Callable[[Sequence[PartFile]], Mapping[bytes, bytes]] | None = None


def footers(uri: str, settings: StorageSettings | None = None) -> list[PartFile]:
    """Every visible Parquet file under uri (partition folders included), from its footer alone."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, root = python_fs(uri, settings)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    root = root.rstrip("/")
    paths = sorted(
        i.path
        for i in infos
        if i.is_file
        and not any(part.startswith(("_", ".")) and "=" not in part for part in i.path[len(root) :].split("/") if part)
    )

    def read(path: str) -> PartFile:
        meta = pq.read_metadata(fs.open_input_file(path))
        return PartFile(path[len(root) + 1 :], meta.num_rows, meta.num_row_groups)

    with ThreadPoolExecutor(max_workers=8) as pool:  # object stores answer each footer read with a round trip
        return list(pool.map(read, paths))


def row_count(uri: str, settings: StorageSettings | None = None) -> int:
    return sum(f.rows for f in footers(uri, settings))


def write_summary(
    uri: str,
    columns: Sequence[str] | None,
    settings: StorageSettings | None = None,
    extra: Mapping[bytes, bytes] | None = None,
    files: Sequence[PartFile] | None = None,
) -> None:
    """Write uri/_common_metadata: the schema of uri's part files, cut to `columns` (None: all of them),
    with `extra` key-value metadata (Petastorm keeps its Unischema there). Spark, Petastorm and pyarrow's
    legacy dataset reader take the dataset's schema from this file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root = python_fs(uri, settings)
    files = files if files is not None else footers(uri, settings)
    if not files:
        raise FileNotFoundError(f"no Parquet files under {uri} to describe")
    schema = pq.read_schema(fs.open_input_file(f"{root.rstrip('/')}/{files[0].path}"))
    metadata = dict(schema.metadata or {})
    if columns is not None:
        keep = [c for c in columns if c in schema.names]
        schema = pa.schema([schema.field(c) for c in keep])
        if SPARK_SCHEMA_KEY in metadata:
            spark_schema = json.loads(metadata[SPARK_SCHEMA_KEY])
            by_name = {f["name"]: f for f in spark_schema["fields"]}
            spark_schema["fields"] = [by_name[c] for c in keep if c in by_name]
            metadata[SPARK_SCHEMA_KEY] = json.dumps(spark_schema).encode()
    metadata.update(extra or {})
    with fs.open_output_stream(f"{root.rstrip('/')}/{SUMMARY}") as out:
        pq.write_metadata(schema.with_metadata(metadata), out)


def write_routed(
    spark: SparkSession,
    df: DataFrame,
    route: Column | str,
    outputs: Mapping[str, Output],
    staging: str,
    settings: StorageSettings | None = None,
    partition_by: Sequence[str] = (),
    row_group_mb: int = ROUTED_ROW_GROUP_MB,
    options: Mapping[str, str] | None = None,
) -> dict[str, list[PartFile]]:
    """Write df once; a row goes to outputs[route's value for it] (route: an expression, or the name of a
    column of df, which is then not written). Each output folder is moved into its uri (which must not
    exist yet: an atomic_output temporary) with a summary naming its columns.

    Returns each output's part files (rows and row groups from their footers). staging is removed."""
    fs = HadoopFS(spark)
    df = df.withColumnRenamed(route, ROUTE) if isinstance(route, str) else df.withColumn(ROUTE, route)
    writer = df.write.mode("overwrite")
    writer = writer.option("parquet.block.size", str(row_group_mb * 1024 * 1024)).options(**(options or {}))
    n_writers = 2 * len(outputs) * max(1, len(partition_by))
    try:
        with sql_conf(spark, concurrent_writers(n_writers)):
            writer.partitionBy(ROUTE, *partition_by).parquet(staging)
        written: dict[str, list[PartFile]] = {}
        for name, out in outputs.items():
            part = f"{staging}/{ROUTE}={name}"
            if fs.exists(part):
                fs.rename(part, out.uri)
            else:  # no row went here: an empty dataset that still has the columns
                spark.createDataFrame([], df.drop(ROUTE).schema).write.mode("overwrite").parquet(out.uri)
            files = footers(out.uri, settings)
            extra = out.metadata(files) if out.metadata else None
            write_summary(out.uri, out.columns, settings, extra=extra, files=files)
            written[name] = files
        return written
    finally:
        fs.delete(staging)
