"""Storage: the one place that maps URIs to Spark paths and to filesystems, and commits outputs atomically.

Driver-side directory work (exists, rename, delete, small files) goes through Hadoop's FileSystem in the
Spark JVM, so every scheme Spark can read (file, hdfs, s3a) behaves the same. Executor-side Python reads
(the training loader) use pyarrow filesystems from `python_fs`.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:  # executors import this module (StorageSettings, python_fs): it must not need pyspark
    from pyspark.sql import SparkSession

from dlpipe import redact

log = logging.getLogger(__name__)


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


STATS_FILE = "_dlpipe_stats.json"  # the fitted statistics, beside the splits (leading _: readers skip it)


@dataclass(frozen=True)
class DatasetPaths:
    """Where each stage reads and writes for one dataset (see the data flow in the README)."""

    raw: str
    clean: str
    quarantine: str
    petastorm: str
    tune: str  # the tune stage's best settings (best.json) and its trials
    variants: str  # the compress stage's comparison of the candidate's variants (variants.json)
    predictions: str  # the test split's predictions: what evaluate, status and the notebooks read
    scored: str  # new raw data's (infer.source)
    infer_output: str  # what this config's infer stage writes: one of the two

    def split(self, name: str) -> str:
        return f"{self.petastorm}/{name}"

    @property
    def infer_quarantine(self) -> str:
        """Rows infer could not score, with the reason: beside its predictions."""
        return self.infer_output.rstrip("/") + "_quarantine"

    @property
    def stats(self) -> str:
        return f"{self.petastorm}/{STATS_FILE}"


def dataset_base(cfg: Any) -> str:
    """The warehouse folder of cfg's dataset: every stage output (and the run lock) lives under it."""
    return resolve_uri(cfg.root, cfg.storage.warehouse).rstrip("/") + "/" + cfg.dataset.name


def dataset_paths(cfg: Any) -> DatasetPaths:
    """Every stage output's location for cfg, the output settings (infer.output) applied: the one place
    writers and readers (evaluate, status, the summary, the notebooks) ask."""
    base = dataset_base(cfg)
    predictions, scored = f"{base}/predictions", f"{base}/scored"
    chosen = resolve_uri(cfg.root, cfg.infer.output) if cfg.infer.output else None
    if cfg.infer.source:
        scored = chosen or scored
    else:
        predictions = chosen or predictions
    return DatasetPaths(
        raw=resolve_uri(cfg.root, cfg.dataset.source.uri),
        clean=f"{base}/clean",
        quarantine=f"{base}/quarantine",
        petastorm=f"{base}/petastorm",
        tune=f"{base}/tune",
        variants=f"{base}/variants",
        predictions=predictions,
        scored=scored,
        infer_output=scored if cfg.infer.source else predictions,
    )


@dataclass(frozen=True)
class StorageSettings:
    """What Python code on a driver or an executor needs to open s3a:// and hdfs:// paths.

    Picklable, so it travels to executors with a task. The secret never shows in a repr or a log line.
    """

    s3_endpoint: str | None = None
    s3_path_style: bool = False
    s3_region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    webhdfs_url: str | None = None
    hdfs_user: str | None = None
    s3a_extra: tuple[tuple[str, str], ...] = ()


def s3_credentials(cfg: Any) -> tuple[str | None, str | None, str | None]:
    """(access key, secret key, session token) from the environment, else the git-ignored credentials file;
    each is remembered by dlpipe.redact, so it is masked wherever it would be shown."""
    found = _s3_credentials(cfg)
    for part in found:
        redact.remember(part)
    return found


def _s3_credentials(cfg: Any) -> tuple[str | None, str | None, str | None]:
    env = (os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"))
    if all(env):
        return env[0], env[1], os.environ.get("AWS_SESSION_TOKEN")
    path_setting = cfg.storage.s3.credentials_file
    if path_setting:
        path = Path(path_setting)
        path = path if path.is_absolute() else cfg.root / path
        if path.is_file():
            import yaml

            s3 = (yaml.safe_load(path.read_text()) or {}).get("s3") or {}
            if s3.get("access_key") and s3.get("secret_key"):
                return s3["access_key"], s3["secret_key"], s3.get("session_token")
    return None, None, None


def storage_settings(cfg: Any) -> StorageSettings:
    key, secret, token = s3_credentials(cfg)
    s3, hdfs = cfg.storage.s3, cfg.storage.hdfs
    extra = tuple((k, str(v).lower() if isinstance(v, bool) else str(v)) for k, v in sorted(s3.hadoop.items()))
    return StorageSettings(
        s3.endpoint, s3.path_style_access, s3.region, key, secret, token, hdfs.webhdfs_url, hdfs.user, extra
    )


def s3a_jars(cfg: Any) -> list[str]:
    """The hadoop-aws and AWS SDK jars Spark needs for s3a:// (pyspark ships neither)."""
    if cfg.storage.s3.jars is not None:
        return [str(Path(j) if Path(j).is_absolute() else cfg.root / j) for j in cfg.storage.s3.jars]
    return sorted(str(p) for p in (cfg.root / ".cache" / "servers" / "jars" / "s3a").glob("*.jar"))


def hadoop_s3a_conf(settings: StorageSettings) -> dict[str, str]:
    """Hadoop settings for s3a:// from the storage settings (keys without the `spark.hadoop.` prefix)."""
    conf: dict[str, str] = {}
    if settings.s3_endpoint:
        conf["fs.s3a.endpoint"] = settings.s3_endpoint
        conf["fs.s3a.connection.ssl.enabled"] = str(settings.s3_endpoint.startswith("https")).lower()
    if settings.s3_path_style:
        conf["fs.s3a.path.style.access"] = "true"
    if settings.s3_region:
        conf["fs.s3a.endpoint.region"] = settings.s3_region
    if settings.access_key and settings.secret_key:
        provider = "TemporaryAWSCredentialsProvider" if settings.session_token else "SimpleAWSCredentialsProvider"
        conf["fs.s3a.aws.credentials.provider"] = f"org.apache.hadoop.fs.s3a.{provider}"
        conf["fs.s3a.access.key"] = settings.access_key
        conf["fs.s3a.secret.key"] = settings.secret_key
        if settings.session_token:
            conf["fs.s3a.session.token"] = settings.session_token
    conf.update(settings.s3a_extra)
    return conf


_S3A_KEYS = (
    "fs.s3a.endpoint",
    "fs.s3a.connection.ssl.enabled",
    "fs.s3a.path.style.access",
    "fs.s3a.endpoint.region",
    "fs.s3a.aws.credentials.provider",
    "fs.s3a.access.key",
    "fs.s3a.secret.key",
    "fs.s3a.session.token",
)


def configure_spark_storage(spark: SparkSession, cfg: Any) -> None:
    """Make a running session's s3a settings those of cfg.

    Settings an earlier config made and this one does not are removed, so one config's credentials never
    serve another's. Hadoop caches one FileSystem per bucket, built with the settings of its day: when the
    settings change (a wrong key fixed in the same session), the cached clients of cfg's buckets are
    closed, so the next access builds one with the new settings.
    """
    hconf = spark.sparkContext._jsc.hadoopConfiguration()
    wanted = hadoop_s3a_conf(storage_settings(cfg))
    previous = (hconf.get("dlpipe.s3a.keys") or "").split(",")
    stale = {*_S3A_KEYS, *previous} - set(wanted) - {""}
    changed = any(hconf.get(k) is not None for k in stale) or any(hconf.get(k) != v for k, v in wanted.items())
    for key in stale:
        hconf.unset(key)
    for key, value in wanted.items():
        hconf.set(key, value)
    hconf.set("dlpipe.s3a.keys", ",".join(sorted(wanted)))
    if changed:
        _close_cached_s3a(spark, cfg)


def _close_cached_s3a(spark: SparkSession, cfg: Any) -> None:
    """Close (and so drop from Hadoop's FileSystem cache) the s3a client of each bucket cfg reads or writes."""
    uris = [dataset_paths(cfg).raw, dataset_base(cfg), cfg.infer.source, cfg.infer.output]
    buckets = sorted({urlparse(u).netloc for u in uris if u and urlparse(u).scheme in ("s3a", "s3")})
    jvm, hconf = spark._jvm, spark.sparkContext._jsc.hadoopConfiguration()
    for bucket in buckets:
        jvm.org.apache.hadoop.fs.FileSystem.get(jvm.java.net.URI.create(f"s3a://{bucket}/"), hconf).close()
        log.info("s3a settings changed: the cached client of bucket %s is closed; the next access makes one", bucket)


class StorageError(OSError):
    """A store refused or failed an operation; the message names the URI and, for auth, what to check."""


_AUTH_MARKERS = ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")


@contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Turn a Java storage exception (a page of JVM stack) into one line naming the URI."""
    from py4j.protocol import Py4JJavaError

    try:
        yield
    except Py4JJavaError as exc:
        text = str(exc.java_exception.toString())
        hint = ""
        if any(m in text for m in _AUTH_MARKERS):
            hint = (
                " (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or storage.s3.credentials_file, "
                "and storage.s3.endpoint)"
            )
        raise StorageError(f"cannot access {uri}: {text.splitlines()[0]}{hint}") from None


class HadoopFS:
    """Hadoop FileSystem calls through the Spark JVM: the same code for file://, hdfs:// and s3a://."""

    def __init__(self, spark: SparkSession):
        self._jvm = spark.sparkContext._jvm
        self._conf = spark.sparkContext._jsc.hadoopConfiguration()

    def _fs(self, uri: str):
        path = self._jvm.org.apache.hadoop.fs.Path(uri)
        return path.getFileSystem(self._conf), path

    def exists(self, uri: str) -> bool:
        with storage_errors(uri):
            fs, path = self._fs(uri)
            return bool(fs.exists(path))

    def delete(self, uri: str) -> None:
        with storage_errors(uri):
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

    def create_new(self, uri: str, data: bytes) -> bool:
        """Write uri only if it does not exist yet (False if it does): the file system's exclusive create,
        atomic on HDFS; on local disk and S3 a check and a create, a window of milliseconds."""
        from py4j.protocol import Py4JJavaError

        fs, path = self._fs(uri)
        parent = path.getParent()
        if parent is not None and not fs.exists(parent):
            fs.mkdirs(parent)
        try:
            out = fs.create(path, False)
        except Py4JJavaError as exc:
            if "FileAlreadyExists" in str(exc.java_exception) or fs.exists(path):
                return False
            raise
        try:
            out.write(bytearray(data))
        finally:
            out.close()
        return True

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri).decode())

    def total_bytes(self, uri: str) -> int:
        """The size of the file at uri, or of every file under the folder at uri."""
        fs, path = self._fs(uri)
        with storage_errors(uri):
            return int(fs.getContentSummary(path).getLength())

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
    if fs.exists(parent):  # leftovers of a run that was killed before it could clean up
        for stale in fs.list_names(parent):
            if stale.startswith(f"{name}.tmp-"):
                log.warning("removing %s/%s, left by an interrupted run", parent, stale)
                fs.delete(f"{parent}/{stale}")
    tmp = f"{parent}/{name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        yield tmp
    except BaseException:
        fs.delete(tmp)
        raise
    fs.delete(final_uri)
    fs.rename(tmp, final_uri)


def python_fs(uri: str, settings: StorageSettings | None = None):
    """(pyarrow FileSystem, path) for Python-side reads and writes on a driver or an executor.

    file:// -> local; s3a:// -> pyarrow's S3 client; hdfs:// -> WebHDFS through HdfsCLI (there is no
    libhdfs for pyarrow's own HadoopFileSystem here, and WebHDFS needs nothing but HTTP).
    """
    import pyarrow.fs as pafs

    settings = settings or StorageSettings()
    parsed = urlparse(uri)
    if parsed.scheme in ("file", ""):
        return pafs.LocalFileSystem(), parsed.path
    if parsed.scheme in ("s3a", "s3"):
        kwargs: dict[str, Any] = {}
        if settings.s3_endpoint:
            endpoint = urlparse(settings.s3_endpoint)
            kwargs["endpoint_override"] = endpoint.netloc or settings.s3_endpoint
            kwargs["scheme"] = endpoint.scheme or "https"
        if settings.access_key and settings.secret_key:
            kwargs.update(
                access_key=settings.access_key, secret_key=settings.secret_key, session_token=settings.session_token
            )
        # pyarrow 14 addresses buckets by path whenever an endpoint is given (s3_path_style is Spark's concern)
        kwargs["region"] = settings.s3_region or "us-east-1"
        return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme == "hdfs":
        if not settings.webhdfs_url:
            raise ValueError(
                f"storage.hdfs.webhdfs_url is not set: Python-side access to {uri} goes through WebHDFS; "
                "set it to the NameNode's HTTP address, e.g. http://namenode:9870"
            )
        from dlpipe.storage.webhdfs import webhdfs_filesystem

        return webhdfs_filesystem(settings.webhdfs_url, settings.hdfs_user), parsed.path or "/"
    raise ValueError(f"unsupported storage scheme '{parsed.scheme}' in {uri}: use file://, hdfs:// or s3a://")
