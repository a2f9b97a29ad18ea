"""The built-in example dataset: raw CSV files of a classification problem with a known ground truth.

Features x ~ N(0, I) plus a categorical `segment`; the true class is argmax(x W + B[segment]). With
probability `label_noise` the label is replaced by a uniformly random class, so the best any model can do
(the Bayes accuracy) is 1 - noise + noise / K, known before training. A few percent of lines are broken
on purpose, in four kinds, and the manifest counts each kind so tests can check the quarantine exactly.
"""

from __future__ import annotations

import io
import json
import logging
import uuid

import numpy as np

from dlpipe.config import Config, ConfigError
from dlpipe.storage import python_fs

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"  # leading underscore: Spark's file listing skips it
MALFORMED_KINDS = ("wrong_field_count", "bad_number", "missing_label", "bad_label")


def expected_columns(cfg: Config) -> list[str]:
    g = cfg.dataset.generator
    assert g is not None
    return ["id", *[f"x{i}" for i in range(g.num_numeric)], "segment", "label"]


def generate(cfg: Config, uri: str, force: bool = False) -> dict:
    """Write the example's raw CSV files under uri (atomically) and return the manifest.

    Deterministic in the generator settings; if uri already holds data made with the same settings the
    work is skipped (the manifest says so), unless force.
    """
    g = cfg.dataset.generator
    if g is None:
        raise ConfigError("dataset.generator is not set: this dataset has no built-in generator")
    names = [c.name for c in cfg.dataset.columns]
    if names != expected_columns(cfg):
        raise ConfigError(f"dataset.columns {names} do not match what the generator writes {expected_columns(cfg)}")
    params = {**g.model_dump(), "num_classes": cfg.dataset.num_classes}
    fs, root = python_fs(uri)
    manifest_path = f"{root}/{MANIFEST}"
    if not force and fs.get_file_info(manifest_path).is_file:
        with fs.open_input_stream(manifest_path) as f:
            existing = json.loads(f.read())
        if existing.get("params") == params:
            log.info("generate: %s already holds this data (%d lines), skipping", uri, existing["rows_written"])
            return {**existing, "skipped": True}

    k = cfg.dataset.num_classes
    rng = np.random.default_rng(g.seed)
    n, d, cats = g.rows, g.num_numeric, g.categories
    w = rng.normal(size=(d, k))
    b = rng.normal(size=(len(cats), k))
    x = rng.normal(size=(n, d))
    seg = rng.integers(0, len(cats), size=n)
    y_true = np.argmax(x @ w + b[seg], axis=1)
    noisy = rng.random(n) < g.label_noise
    y = np.where(noisy, rng.integers(0, k, size=n), y_true)

    n_bad = int(round(n * g.malformed_fraction))
    bad_rows = rng.choice(n, size=n_bad, replace=False)
    kind_of = {int(r): MALFORMED_KINDS[i % len(MALFORMED_KINDS)] for i, r in enumerate(bad_rows)}
    counts = dict.fromkeys(MALFORMED_KINDS, 0)

    header = ",".join(expected_columns(cfg))
    lines = []
    for i in range(n):
        fields = [str(i), *(f"{v:.6f}" for v in x[i]), cats[seg[i]], str(int(y[i]))]
        kind = kind_of.get(i)
        if kind == "wrong_field_count":
            fields = fields[:-1]
        elif kind == "bad_number":
            fields[1 + int(rng.integers(0, d))] = "n/a"
        elif kind == "missing_label":
            fields[-1] = ""
        elif kind == "bad_label":
            fields[-1] = str(k + 3)
        if kind:
            counts[kind] += 1
        lines.append(",".join(fields))

    valid = np.ones(n, dtype=bool)
    valid[bad_rows] = False
    manifest = {
        "params": params,
        "rows_written": n,
        "valid_rows": int(valid.sum()),
        "malformed": counts,
        "malformed_total": n_bad,
        "bayes_accuracy": 1 - g.label_noise + g.label_noise / k,
        "realized_ceiling_accuracy": float(np.mean(y_true[valid] == y[valid])),
        "majority_fraction": float(np.bincount(y[valid], minlength=k).max() / valid.sum()),
        "files": g.files,
        "skipped": False,
    }

    parent, _, name = root.rstrip("/").rpartition("/")
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:12]}"
    fs.create_dir(tmp, recursive=True)
    try:
        for part, chunk in enumerate(np.array_split(np.arange(n), g.files)):
            buf = io.StringIO()
            buf.write(header + "\n")
            for i in chunk:
                buf.write(lines[i] + "\n")
            with fs.open_output_stream(f"{tmp}/part-{part:05d}.csv") as f:
                f.write(buf.getvalue().encode())
        with fs.open_output_stream(f"{tmp}/{MANIFEST}") as f:
            f.write(json.dumps(manifest, indent=2).encode())
        if fs.get_file_info(root).type.name != "NotFound":
            fs.delete_dir(root)
        fs.move(tmp, root)
    except BaseException:
        fs.delete_dir(tmp)
        raise
    log.info("generate: wrote %d lines (%d malformed) in %d files to %s", n, n_bad, g.files, uri)
    return manifest


def read_manifest(uri: str) -> dict | None:
    fs, root = python_fs(uri)
    path = f"{root}/{MANIFEST}"
    if not fs.get_file_info(path).is_file:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())
