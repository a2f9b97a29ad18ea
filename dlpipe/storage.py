"""Storage: the one place that maps URIs to Spark paths and to filesystems, and commits outputs atomically.

Driver-side directory work (exists, rename, delete, small files) goes through Hadoop's FileSystem in the
Spark JVM, so every scheme Spark can read (file, hdfs, s3a) behaves the same. Executor-side Python reads
(the training loader) use pyarrow filesystems from `python_fs`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pyspark.sql import SparkSession


def resolve_uri(root: str | Path, uri: str) -> str:
    """A config path -> a full URI. Relative paths live under the project root; s3:// means s3a://."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return ("s3a" if scheme == "s3" else scheme) + "://" + rest
    path = Path(uri)
    if not path.is_absolute():
        path = Path(root) / path
    return path.resolve().as_uri()


def local_path(uri: str) -> Path:
    """The local path of a file:// URI (error for any other scheme)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("file", ""):
        raise ValueError(f"{uri} is not a local file:// path")
    return Path(parsed.path)


@dataclass(frozen=True)
class DatasetPaths:
    """Where each stage reads and writes for one dataset (see the data flow in the README)."""

    raw: str
    clean: str
    quarantine: str
    petastorm: str
    predictions: str

    def split(self, name: str) -> str:
        return f"{self.petastorm}/{name}"

    @property
    def stats(self) -> str:
        return f"{self.petastorm}/_dlpipe_stats.json"


def dataset_paths(cfg: Any) -> DatasetPaths:
    base = resolve_uri(cfg.root, cfg.storage.warehouse).rstrip("/") + "/" + cfg.dataset.name
    return DatasetPaths(
        raw=resolve_uri(cfg.root, cfg.dataset.raw_uri),
        clean=f"{base}/clean",
        quarantine=f"{base}/quarantine",
        petastorm=f"{base}/petastorm",
        predictions=f"{base}/predictions",
    )


class HadoopFS:
    """Hadoop FileSystem calls through the Spark JVM: the same code for file://, hdfs:// and s3a://."""

    def __init__(self, spark: SparkSession):
        self._jvm = spark.sparkContext._jvm
        self._conf = spark.sparkContext._jsc.hadoopConfiguration()

    def _fs(self, uri: str):
        path = self._jvm.org.apache.hadoop.fs.Path(uri)
        return path.getFileSystem(self._conf), path

    def exists(self, uri: str) -> bool:
        fs, path = self._fs(uri)
        return bool(fs.exists(path))

    def delete(self, uri: str) -> None:
        fs, path = self._fs(uri)
        if fs.exists(path):
            fs.delete(path, True)

    def rename(self, src: str, dst: str) -> None:
        fs, src_path = self._fs(src)
        dst_path = self._jvm.org.apache.hadoop.fs.Path(dst)
        parent = dst_path.getParent()
        if parent is not None and not fs.exists(parent):
            fs.mkdirs(parent)
        if not fs.rename(src_path, dst_path):
            raise OSError(f"could not rename {src} to {dst}")

    def write_bytes(self, uri: str, data: bytes) -> None:
        fs, path = self._fs(uri)
        out = fs.create(path, True)
        try:
            out.write(bytearray(data))
        finally:
            out.close()

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self._fs(uri)
        stream = fs.open(path)
        try:
            return bytes(self._jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
        finally:
            stream.close()

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri).decode())

    def list_names(self, uri: str) -> list[str]:
        fs, path = self._fs(uri)
        return sorted(str(st.getPath().getName()) for st in fs.listStatus(path))


@contextmanager
def atomic_output(spark: SparkSession, final_uri: str) -> Iterator[str]:
    """Yield a temporary sibling of final_uri to write into; on success it replaces final_uri by rename.

    A stage that dies halfway leaves only a `<name>.tmp-*` folder that no reader looks at (and that the
    failure path removes), never a partial dataset under the final name. Re-running is safe. (Not a
    hidden `.name`: Spark skips paths starting with '.' or '_' when they are read back for checks.)
    """
    fs = HadoopFS(spark)
    parent, _, name = final_uri.rstrip("/").rpartition("/")
    tmp = f"{parent}/{name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        yield tmp
    except BaseException:
        fs.delete(tmp)
        raise
    fs.delete(final_uri)
    fs.rename(tmp, final_uri)


def python_fs(uri: str):
    """(pyarrow FileSystem, path) for reading a dataset from Python on a driver or an executor."""
    import pyarrow.fs as pafs

    parsed = urlparse(uri)
    if parsed.scheme in ("file", ""):
        return pafs.LocalFileSystem(), parsed.path
    raise ValueError(f"no Python-side filesystem for scheme '{parsed.scheme}' in {uri}")
