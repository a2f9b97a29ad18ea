"""Fingerprints and lineage: what each output was made from, so an unchanged stage can be skipped.

Every committed output folder holds `_dlpipe_meta.json` (leading underscore: Spark and Petastorm readers
skip it) with the stage, a fingerprint of its inputs and its config, the inputs' own fingerprints and the
stage's metrics. Raw inputs are fingerprinted by their file listing (path, size, modification time).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from pyspark.sql import SparkSession

from dlpipe import redact
from dlpipe.storage import HadoopFS

META = "_dlpipe_meta.json"


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def source_fingerprint(spark: SparkSession, uri: str) -> str:
    """A digest of every visible file under uri: relative path, size and modification time."""
    fs, path = HadoopFS(spark)._fs(uri)
    root = str(fs.getFileStatus(path).getPath().toUri().getPath()).rstrip("/")
    entries = []
    it = fs.listFiles(path, True)
    while it.hasNext():
        st = it.next()
        rel = str(st.getPath().toUri().getPath())[len(root) :]
        if any(part.startswith(("_", ".")) for part in rel.split("/") if part):
            continue  # Spark's readers skip these too
        entries.append((rel, int(st.getLen()), int(st.getModificationTime())))
    return digest(sorted(entries))


def read_meta(spark: SparkSession, uri: str) -> dict | None:
    fs = HadoopFS(spark)
    meta_uri = f"{uri}/{META}"
    return fs.read_json(meta_uri) if fs.exists(meta_uri) else None


def dataset_fingerprint(spark: SparkSession, uri: str) -> str:
    """The fingerprint a stage recorded for uri, or its file listing's for data dlpipe did not write."""
    meta = read_meta(spark, uri)
    return meta["fingerprint"] if meta else source_fingerprint(spark, uri)


def write_meta(
    spark: SparkSession, uri: str, stage: str, fingerprint: str, inputs: dict[str, str], metrics: dict[str, Any]
) -> dict:
    meta = {
        "stage": stage,
        "fingerprint": fingerprint,
        "inputs": inputs,
        "metrics": metrics,
        "created_unix": round(time.time(), 3),
    }
    HadoopFS(spark).write_json(f"{uri}/{META}", meta)
    return meta


def reusable(spark: SparkSession, uri: str, fingerprint: str) -> dict | None:
    """The stored meta of uri when it was made from exactly these inputs and config, else None."""
    meta = read_meta(spark, uri)
    return meta if meta and meta.get("fingerprint") == fingerprint else None


def log_lineage(stage: str, fingerprint: str, inputs: dict[str, str], outputs: list[str], skipped: bool) -> None:
    """Record lineage on the active MLflow run: tags to search by, and the whole record as JSON.

    Without an active run (a stage called as a plain function) there is nothing to record on; calling
    MLflow anyway would silently start a run in its default store, in whatever folder we are in.
    """
    import mlflow

    if mlflow.active_run() is None:
        return
    outs = ",".join(outputs)
    tags = {"dlpipe.fingerprint": fingerprint, "dlpipe.skipped": str(skipped).lower(), "dlpipe.outputs": outs}
    mlflow.set_tags(redact.tree(tags))
    record = {"stage": stage, "fingerprint": fingerprint, "inputs": inputs, "outputs": outputs, "skipped": skipped}
    mlflow.log_dict(redact.tree(record), "lineage.json")
