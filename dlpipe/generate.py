"""The built-in example datasets, written as raw files: tabular CSV problems and PNG digit images.

Tabular (`kind: tabular`):
Features x ~ N(0, I) plus a categorical `segment`; the true class is argmax(x W + B[segment]). With
probability `label_noise` the label is replaced by a uniformly random class, so the best any model can do
(the Bayes accuracy) is 1 - noise + noise / K, known before training. A few percent of lines are broken
on purpose, in four kinds, and the manifest counts each kind so tests can check the quarantine exactly.

Regression (`kind: regression`): the same features and broken lines; the target is
x w + b[segment] + x0 * x1 plus Gaussian noise of std `label_noise`, so the best possible RMSE is known.

Images (`kind: digits`): scikit-learn's 8x8 digits rendered to PNG files `<label>/<index>.png`, with a
few corrupt files, wrong-sized images and unlabeled files (counted the same way).
"""

from __future__ import annotations

import io
import json
import logging
import uuid

import numpy as np

from dlpipe.config import Config, ConfigError
from dlpipe.storage import StorageSettings, python_fs, storage_settings

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"  # leading underscore: Spark's file listing skips it
MALFORMED_KINDS = ("wrong_field_count", "bad_number", "missing_label", "bad_label")


def expected_columns(cfg: Config) -> list[str]:
    g = cfg.dataset.generator
    assert g is not None
    return ["id", *[f"x{i}" for i in range(g.num_numeric)], "segment", cfg.dataset.column("label").name]


def generate(cfg: Config, uri: str, force: bool = False) -> dict:
    """Write the example's raw files under uri and return the manifest (written last).

    Deterministic in the generator settings; if uri already holds data made with the same settings the
    work is skipped (the manifest says so), unless force.
    """
    g = cfg.dataset.generator
    if g is None:
        raise ConfigError("dataset.generator is not set: this dataset has no built-in generator")
    params = {**g.model_dump(), "num_classes": cfg.dataset.num_classes}
    existing = read_manifest(uri, storage_settings(cfg))
    if not force and existing and existing.get("params") == params:
        log.info("generate: %s already holds this data (%d files/lines), skipping", uri, existing["rows_written"])
        return {**existing, "skipped": True}
    files, manifest = _digits(cfg) if g.kind == "digits" else _tabular(cfg)  # tabular or regression
    manifest = {"params": params, **manifest, "skipped": False}
    _write_all(cfg, uri, files, manifest)
    log.info(
        "generate: wrote %d rows (%d malformed) in %d files to %s",
        manifest["rows_written"],
        manifest["malformed_total"],
        len(files),
        uri,
    )
    return manifest


def _tabular(cfg: Config) -> tuple[dict[str, bytes], dict]:
    g = cfg.dataset.generator
    assert g is not None
    names = [c.name for c in cfg.dataset.columns]
    if names != expected_columns(cfg):
        raise ConfigError(f"dataset.columns {names} do not match what the generator writes {expected_columns(cfg)}")
    rng = np.random.default_rng(g.seed)
    n, d, cats = g.rows, g.num_numeric, g.categories
    if g.kind == "regression":
        label_text, bad_label, facts = _regression_labels(rng, n, d, len(cats), g.label_noise)
    else:
        label_text, bad_label, facts = _class_labels(rng, n, d, len(cats), cfg.dataset.num_classes, g.label_noise)
    x, seg = facts.pop("x"), facts.pop("seg")

    n_bad = int(round(n * g.malformed_fraction))
    bad_rows = rng.choice(n, size=n_bad, replace=False)
    kind_of = {int(r): MALFORMED_KINDS[i % len(MALFORMED_KINDS)] for i, r in enumerate(bad_rows)}
    counts = dict.fromkeys(MALFORMED_KINDS, 0)
    lines = []
    for i in range(n):
        fields = [str(i), *(f"{v:.6f}" for v in x[i]), cats[seg[i]], label_text[i]]
        kind = kind_of.get(i)
        if kind == "wrong_field_count":
            fields = fields[:-1]
        elif kind == "bad_number":
            fields[1 + int(rng.integers(0, d))] = "n/a"
        elif kind == "missing_label":
            fields[-1] = ""
        elif kind == "bad_label":
            fields[-1] = bad_label
        if kind:
            counts[kind] += 1
        lines.append(",".join(fields))

    valid = np.ones(n, dtype=bool)
    valid[bad_rows] = False
    header = ",".join(expected_columns(cfg))
    files = {
        f"part-{part:05d}.csv": ("\n".join([header, *(lines[i] for i in chunk)]) + "\n").encode()
        for part, chunk in enumerate(np.array_split(np.arange(n), g.files))
    }
    summary = {k: (v(valid) if callable(v) else v) for k, v in facts.items()}
    return files, {
        "rows_written": n,
        "valid_rows": int(valid.sum()),
        "malformed": counts,
        "malformed_total": n_bad,
        **summary,
    }


def _class_labels(rng, n: int, d: int, n_cats: int, k: int, noise: float):
    """argmax(x W + B[segment]), replaced by a random class with probability noise."""
    w = rng.normal(size=(d, k))
    b = rng.normal(size=(n_cats, k))
    x = rng.normal(size=(n, d))
    seg = rng.integers(0, n_cats, size=n)
    y_true = np.argmax(x @ w + b[seg], axis=1)
    noisy = rng.random(n) < noise
    y = np.where(noisy, rng.integers(0, k, size=n), y_true)
    return (
        [str(int(v)) for v in y],
        str(k + 3),  # out of the label range
        {
            "x": x,
            "seg": seg,
            "bayes_accuracy": 1 - noise + noise / k,
            "realized_ceiling_accuracy": lambda valid: float(np.mean(y_true[valid] == y[valid])),
            "majority_fraction": lambda valid: float(np.bincount(y[valid], minlength=k).max() / valid.sum()),
        },
    )


def _regression_labels(rng, n: int, d: int, n_cats: int, noise: float):
    """x w + b[segment] + x0 * x1 (a little non-linear) + N(0, noise^2): the best possible RMSE is noise."""
    w = rng.normal(size=d)
    b = rng.normal(size=n_cats)
    x = rng.normal(size=(n, d))
    seg = rng.integers(0, n_cats, size=n)
    y = x @ w + b[seg] + x[:, 0] * x[:, 1] + rng.normal(scale=noise, size=n)
    return (
        [f"{v:.6f}" for v in y],
        "n/a",  # not a number
        {
            "x": x,
            "seg": seg,
            "bayes_rmse": noise,
            "label_std": lambda valid: float(np.std(y[valid])),  # the RMSE of always predicting the mean
        },
    )


DIGITS_MALFORMED = ("corrupt_file", "wrong_shape", "unlabeled")


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _digits(cfg: Config) -> tuple[dict[str, bytes], dict]:
    """scikit-learn's 8x8 digits (shipped with it, no download) as PNG files <label>/<index>.png."""
    from sklearn.datasets import load_digits

    g = cfg.dataset.generator
    assert g is not None
    digits = load_digits()
    rng = np.random.default_rng(g.seed)
    n = g.rows
    order = np.arange(n) % len(digits.target)
    images = np.clip(np.round(digits.images[order] * 255.0 / 16.0), 0, 255).astype(np.uint8)
    labels = digits.target[order]
    n_bad = int(round(n * g.malformed_fraction))
    bad = {
        int(r): DIGITS_MALFORMED[i % len(DIGITS_MALFORMED)] for i, r in enumerate(rng.choice(n, n_bad, replace=False))
    }
    counts = dict.fromkeys(DIGITS_MALFORMED, 0)
    files: dict[str, bytes] = {}
    for i in range(n):
        kind = bad.get(i)
        name = f"{labels[i]}/{i:05d}.png"
        if kind == "corrupt_file":
            files[name] = b"\x89PNG\r\n\x1a\n" + rng.bytes(40)
        elif kind == "wrong_shape":
            files[name] = _png(np.zeros((9, 9), dtype=np.uint8))
        elif kind == "unlabeled":
            files[f"unsorted/{i:05d}.png"] = _png(images[i])
        else:
            files[name] = _png(images[i])
        if kind:
            counts[kind] += 1
    valid = np.array([i not in bad for i in range(n)])
    return files, {
        "rows_written": n,
        "valid_rows": int(valid.sum()),
        "malformed": counts,
        "malformed_total": n_bad,
        "majority_fraction": float(np.bincount(labels[valid], minlength=10).max() / valid.sum()),
    }


def _write_all(cfg: Config, uri: str, files: dict[str, bytes], manifest: dict) -> None:
    """Write files and then the manifest; where the filesystem can rename folders (local, HDFS), into a
    temporary folder renamed into place at the end, so a killed run leaves nothing under uri."""
    import pyarrow.fs as pafs

    fs, root = python_fs(uri, storage_settings(cfg))
    in_place = isinstance(fs, pafs.S3FileSystem)  # S3 has no folder rename: the manifest, written last, marks done
    parent, _, name = root.rstrip("/").rpartition("/")
    target = root if in_place else f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:12]}"
    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        fs.delete_dir(root)
    fs.create_dir(target, recursive=True)
    try:
        for rel, data in files.items():
            if "/" in rel:
                fs.create_dir(f"{target}/{rel.rsplit('/', 1)[0]}", recursive=True)
            with fs.open_output_stream(f"{target}/{rel}") as f:
                f.write(data)
        with fs.open_output_stream(f"{target}/{MANIFEST}") as f:
            f.write(json.dumps(manifest, indent=2).encode())
        if not in_place:
            fs.move(target, root)
    except BaseException:
        fs.delete_dir(target)
        raise


def read_manifest(uri: str, settings: StorageSettings | None = None) -> dict | None:
    fs, root = python_fs(uri, settings)
    path = f"{root}/{MANIFEST}"
    if not fs.get_file_info(path).is_file:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())
