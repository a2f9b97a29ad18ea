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

Real tables (`kind: penguins`, `kind: breast_cancer`): data that installed packages carry (palmerpenguins,
scikit-learn), written as one CSV with an `id` column added; nothing is fetched. String class labels,
missing values written `NA`: what a user's own file looks like.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Callable, Iterator

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


# Rows generated, formatted and written at a time: memory stays flat whatever dataset.generator.rows is.
CHUNK_ROWS = 200_000


def params_of(cfg: Config) -> dict:
    """What the generated data is a function of: equal params, equal files."""
    g = cfg.dataset.generator
    if g is None:
        raise ConfigError("dataset.generator is not set: this dataset has no built-in generator")
    return {**g.model_dump(), "num_classes": cfg.dataset.num_classes}


def manifest_metrics(manifest: dict) -> dict:
    """The stage's figures from a manifest: what was written, and the ceiling each generator knows."""
    keys = ("rows_written", "valid_rows", "malformed_total", "bayes_accuracy", "majority_fraction", "bayes_rmse")
    out = {k: manifest[k] for k in keys if manifest.get(k) is not None}
    out.update({f"malformed_{kind}": n for kind, n in manifest["malformed"].items()})
    return out


def already_generated(cfg: Config, uri: str) -> dict | None:
    """The manifest when uri already holds the data cfg's generator makes (same params), else None."""
    existing = read_manifest(uri, storage_settings(cfg))
    if not existing or existing.get("params") != params_of(cfg):
        return None
    log.info("generate: %s already holds this data (%d files/lines), skipping", uri, existing["rows_written"])
    return existing


def generate(cfg: Config, uri: str, force: bool = False) -> dict:
    """Write the example's raw files under uri and return the manifest (written last).

    Deterministic in the generator settings; if uri already holds data made with the same settings the
    work is skipped (the manifest says so), unless force. Tabular files are written a chunk of rows at a
    time, so any number of rows fits in memory.
    """
    g = cfg.dataset.generator
    params = params_of(cfg)
    existing = None if force else already_generated(cfg, uri)
    if existing:
        return {**existing, "skipped": True}
    threads = 1  # a table's chunks are made as they are written, in order
    if g.kind == "digits":
        images, facts = _digits(cfg)
        files = {name: iter([data]) for name, data in images.items()}
        summary: Callable[[], dict] = lambda: facts  # noqa: E731
        threads = IMAGE_WRITERS
    elif g.kind in PACKAGE_TABLES:
        name, data, facts = PACKAGE_TABLES[g.kind]()
        files, summary = {name: iter([data])}, lambda: facts
    else:  # tabular or regression
        tabular = _Tabular(cfg)
        files, summary = tabular.files(), tabular.summary
    _write_all(cfg, uri, files, lambda: {"params": params, **summary(), "skipped": False}, threads)
    manifest = read_manifest(uri, storage_settings(cfg))
    log.info(
        "generate: wrote %d rows (%d malformed) in %d files to %s",
        manifest["rows_written"],
        manifest["malformed_total"],
        len(files),
        uri,
    )
    return manifest


class _Tabular:
    """The tabular (or regression) example, made a chunk at a time: each chunk's rows come from its own
    seeded generator, so the data does not depend on how it is chunked in memory, only on the settings."""

    def __init__(self, cfg: Config):
        g = cfg.dataset.generator
        assert g is not None
        names = [c.name for c in cfg.dataset.columns]
        if names != expected_columns(cfg):
            raise ConfigError(f"dataset.columns {names} do not match what the generator writes {expected_columns(cfg)}")
        self.g, self.header = g, ",".join(names)
        self.k = cfg.dataset.num_classes or 0
        self.regression = g.kind == "regression"
        rng = np.random.default_rng(g.seed)
        d, n_cats = g.num_numeric, len(g.categories)
        if self.regression:
            self.w, self.b = rng.normal(size=d), rng.normal(size=n_cats)
            self.bad_label = "n/a"  # not a number
        else:
            self.w, self.b = rng.normal(size=(d, self.k)), rng.normal(size=(n_cats, self.k))
            self.bad_label = str(self.k + 3)  # out of the label range
        self.n_bad = int(round(g.rows * g.malformed_fraction))
        self.counts = dict.fromkeys(MALFORMED_KINDS, 0)
        self.valid = self.hits = 0
        self.class_counts = np.zeros(max(self.k, 1), dtype=np.int64)
        self.y_sum = self.y_sq = 0.0

    def files(self) -> dict[str, Iterator[bytes]]:
        """File name -> its bytes, produced lazily a chunk at a time (header first)."""
        base, extra = divmod(self.g.rows, self.g.files)  # np.array_split's sizes: the first files one row more
        sizes = [base + 1 if i < extra else base for i in range(self.g.files)]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return {f"part-{i:05d}.csv": self._file(int(starts[i]), int(starts[i + 1])) for i in range(self.g.files)}

    def _file(self, start: int, end: int) -> Iterator[bytes]:
        yield (self.header + "\n").encode()
        for lo in range(start, end, CHUNK_ROWS):
            yield self._chunk(lo, min(end, lo + CHUNK_ROWS))

    def _bad_before(self, row: int) -> int:
        """How many of the first `row` rows are malformed (the malformed lines are spread evenly)."""
        return int(round(self.n_bad * row / self.g.rows))

    def _chunk(self, lo: int, hi: int) -> bytes:
        import pyarrow as pa
        import pyarrow.compute as pc

        g, m = self.g, hi - lo
        rng = np.random.default_rng([g.seed, lo])
        d, cats = g.num_numeric, g.categories
        x = rng.normal(size=(m, d)) + g.shift
        seg = rng.integers(0, len(cats), size=m)
        if self.regression:
            y = x @ self.w + self.b[seg] + x[:, 0] * x[:, 1] + rng.normal(scale=g.label_noise, size=m)
            label = pc.cast(pa.array(np.round(y, 6)), pa.string())
        else:
            y_true = np.argmax(x @ self.w + self.b[seg], axis=1)
            noisy = rng.random(m) < g.label_noise
            y = np.where(noisy, rng.integers(0, self.k, size=m), y_true)
            label = pc.cast(pa.array(y), pa.string())
        first_bad = self._bad_before(lo)
        bad_rows = rng.choice(m, size=self._bad_before(hi) - first_bad, replace=False)
        kind_of = np.full(m, -1)  # index into MALFORMED_KINDS, taken in turn across the whole dataset
        kind_of[bad_rows] = (first_bad + np.arange(len(bad_rows))) % len(MALFORMED_KINDS)
        fields = [pc.cast(pa.array(np.arange(lo, hi)), pa.string())]
        bad_number_col = rng.integers(0, d, size=m)
        for j in range(d):
            text = pc.cast(pa.array(np.round(x[:, j], 6)), pa.string())
            broken = (kind_of == MALFORMED_KINDS.index("bad_number")) & (bad_number_col == j)
            fields.append(pc.if_else(pa.array(broken), "n/a", text))
        fields.append(pa.array(np.asarray(cats, dtype=object)[seg], pa.string()))
        label = pc.if_else(pa.array(kind_of == MALFORMED_KINDS.index("missing_label")), "", label)
        label = pc.if_else(pa.array(kind_of == MALFORMED_KINDS.index("bad_label")), self.bad_label, label)
        # a line one field short: the label is null, and the join skips it
        short = pa.array(kind_of == MALFORMED_KINDS.index("wrong_field_count"))
        fields.append(pc.if_else(short, pa.scalar(None, pa.string()), label))
        lines = pc.binary_join_element_wise(*fields, ",", null_handling="skip")
        text = pc.binary_join(pa.ListArray.from_arrays(pa.array([0, m], pa.int32()), lines), "\n")
        self._count(kind_of, y, None if self.regression else y_true)
        return text[0].as_py().encode() + b"\n"

    def _count(self, kind_of: np.ndarray, y: np.ndarray, y_true: np.ndarray | None) -> None:
        valid = kind_of < 0
        for i, kind in enumerate(MALFORMED_KINDS):
            self.counts[kind] += int((kind_of == i).sum())
        self.valid += int(valid.sum())
        if y_true is None:
            self.y_sum += float(y[valid].sum())
            self.y_sq += float((y[valid] ** 2).sum())
        else:
            self.hits += int((y_true[valid] == y[valid]).sum())
            self.class_counts += np.bincount(y[valid], minlength=self.k)

    def summary(self) -> dict:
        """The manifest's facts, once every chunk has been written."""
        g = self.g
        facts: dict = {
            "rows_written": g.rows,
            "valid_rows": self.valid,
            "malformed": self.counts,
            "malformed_total": sum(self.counts.values()),
        }
        if self.regression:
            mean = self.y_sum / max(self.valid, 1)
            facts["bayes_rmse"] = g.label_noise
            facts["label_std"] = float(np.sqrt(max(self.y_sq / max(self.valid, 1) - mean * mean, 0.0)))
        else:
            facts["bayes_accuracy"] = 1 - g.label_noise + g.label_noise / self.k
            facts["realized_ceiling_accuracy"] = self.hits / max(self.valid, 1)
            facts["majority_fraction"] = float(self.class_counts.max() / max(self.valid, 1))
        return facts


def _with_id(lines: list[str]) -> bytes:
    """CSV lines with an `id` column in front (1, 2, ...): a real table often has no key of its own."""
    rows = [f"{i},{line}" for i, line in enumerate(lines[1:], start=1) if line]
    return "\n".join([f"id,{lines[0]}", *rows, ""]).encode()


def _table_facts(data: bytes, label: int) -> dict:
    """Rows and the share of the most frequent class (the label is field `label` of each line)."""
    lines = data.decode().splitlines()[1:]
    classes = [line.split(",")[label] for line in lines]
    top = max(classes.count(c) for c in set(classes))
    return {"rows_written": len(lines), "malformed": {}, "malformed_total": 0, "majority_fraction": top / len(lines)}


def _penguins() -> tuple[str, bytes, dict]:
    """palmerpenguins' penguins.csv as shipped: species as names, `NA` where a value is missing."""
    from importlib.resources import files

    text = files("palmerpenguins").joinpath("data/penguins.csv").read_text(encoding="utf-8")
    data = _with_id(text.splitlines())
    return "penguins.csv", data, _table_facts(data, label=1)


def _breast_cancer() -> tuple[str, bytes, dict]:
    """scikit-learn's copy of the Wisconsin diagnostic breast cancer table, with the diagnosis written as the
    class name (`benign` / `malignant`) and column names in snake_case."""
    from sklearn.datasets import load_breast_cancer

    ds = load_breast_cancer()
    names = [n.replace(" ", "_") for n in ds.feature_names]
    lines = [",".join([*names, "diagnosis"])]
    for row, t in zip(ds.data, ds.target, strict=True):
        lines.append(",".join([*(f"{v:.6g}" for v in row), ds.target_names[t]]))
    data = _with_id(lines)
    return "breast_cancer.csv", data, _table_facts(data, label=len(names) + 1)


PACKAGE_TABLES: dict[str, Callable[[], tuple[str, bytes, dict]]] = {
    "penguins": _penguins,
    "breast_cancer": _breast_cancer,
}

DIGITS_MALFORMED = ("corrupt_file", "wrong_shape", "unlabeled")
IMAGE_WRITERS = 8  # images written at once: small files on a remote store wait on round trips, not the CPU


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


def _write_all(
    cfg: Config, uri: str, files: dict[str, Iterator[bytes]], manifest: Callable[[], dict], threads: int = 1
) -> None:
    """Write files (each streamed from its chunks) and then the manifest; where the filesystem can rename
    folders (local, HDFS), into a temporary folder renamed into place at the end, so a killed run leaves
    nothing under uri. threads > 1 writes that many files at once: many small files on a remote store
    spend their time waiting on round trips (150 images on HDFS: 26 s one at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs as pafs

    fs, root = python_fs(uri, storage_settings(cfg))
    in_place = isinstance(fs, pafs.S3FileSystem)  # S3 has no folder rename: the manifest, written last, marks done
    parent, _, name = root.rstrip("/").rpartition("/")
    target = root if in_place else f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:12]}"
    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        fs.delete_dir(root)
    fs.create_dir(target, recursive=True)

    def write(rel: str, chunks: Iterator[bytes]) -> None:
        with fs.open_output_stream(f"{target}/{rel}") as f:
            for chunk in chunks:
                f.write(chunk)

    try:
        for folder in sorted({rel.rsplit("/", 1)[0] for rel in files if "/" in rel}):
            fs.create_dir(f"{target}/{folder}", recursive=True)
        with ThreadPoolExecutor(threads) as pool:
            pending = [pool.submit(write, rel, chunks) for rel, chunks in files.items()]
            try:
                for done in pending:
                    done.result()
            finally:
                for waiting in pending:  # after a failure, start no more
                    waiting.cancel()
        with fs.open_output_stream(f"{target}/{MANIFEST}") as f:
            f.write(json.dumps(manifest(), indent=2).encode())
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
