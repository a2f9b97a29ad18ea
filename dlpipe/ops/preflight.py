"""Pre-flight: the services a run needs, checked before any Spark work, each answered in seconds.

A tracking server that is down, an S3 endpoint that does not answer or refuses the credentials, an HDFS
NameNode or WebHDFS that is down, a registered model, alias or version that does not exist: each would
otherwise surface minutes later, after retries, as a page of stack. Here each becomes one line naming the
setting to fix; all lines together in one `PreflightError`, within about 30 seconds at most.
"""

from __future__ import annotations

import base64
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from urllib.parse import urlparse

from dlpipe import redact
from dlpipe.config import Config
from dlpipe.storage import dataset_paths, resolve_uri, storage_settings

log = logging.getLogger(__name__)

TIMEOUT_S = 5.0  # per probe; a handful of probes stays well inside the 30 s promise
# A tracking server checks a password with a deliberately slow hash (MLflow's basic-auth app: scrypt, a
# quarter of a second of CPU on a quiet machine, several seconds on a busy one): its probe gets longer.
AUTH_TIMEOUT_S = 15.0


class PreflightError(RuntimeError):
    """What is down or misconfigured, one line per problem, each naming the setting to fix."""


def _http(url: str, timeout: float = TIMEOUT_S, auth: tuple[str, str] | None = None, token: str | None = None) -> int:
    """The HTTP status of a GET (an error status too), with basic auth or a bearer token as MLflow's client
    sends them; raises OSError when nothing answers."""
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    elif token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except urllib.error.URLError as err:
        raise OSError(str(err.reason)) from None


def _reason(exc: BaseException) -> str:
    return redact.text(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__)


def check_tracking(cfg: Config) -> list[str]:
    """An HTTP tracking server answers /health, and accepts the credentials MLflow would send."""
    import os

    from dlpipe.tracking import tracking_uri

    uri = tracking_uri(cfg)
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return []  # sqlite / file: local, nothing to reach
    shown = redact.text(uri)
    base = uri.rstrip("/")
    try:
        status = _http(f"{base}/health")
    except OSError as exc:
        return [f"tracking.uri={shown}: no MLflow tracking server answers ({exc}); start it, or fix tracking.uri"]
    if status != 200:
        return [f"tracking.uri={shown}: /health answered HTTP {status}; is this an MLflow tracking server?"]
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or parsed.username
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or parsed.password
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    redact.remember(password)
    redact.remember(token)
    probe = f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=dlpipe-preflight"
    basic = (user, password) if user and password else None
    try:
        status = _http(probe, timeout=AUTH_TIMEOUT_S, auth=basic, token=token)
    except OSError as exc:
        return [f"tracking.uri={shown}: /health answers but the API does not ({_reason(exc)}); is it overloaded?"]
    if status >= 500:  # e.g. MLflow 3.17's basic-auth app with its auth cache on, sent a bearer token
        if basic:
            sent = f"basic auth as user '{redact.text(user)}'"
        else:
            sent = "the bearer token in MLFLOW_TRACKING_TOKEN" if token else "no credentials"
        return [f"tracking.uri={shown}: the API answered HTTP {status} to {sent}; see the tracking server's log"]
    if status == 403 and user and password:
        return [
            f"tracking.uri={shown}: user '{redact.text(user)}' may not read experiments (HTTP 403); ask the "
            "server's admin for a permission, or set MLFLOW_TRACKING_USERNAME to another user"
        ]
    if status in (401, 403):
        if user and password:
            given = f"the credentials of user '{redact.text(user)}' were refused"
        elif token:
            given = "the token in MLFLOW_TRACKING_TOKEN was refused"
        elif user or password:
            given = "only one of user and password was given"
        else:
            given = "the server needs credentials and none were given"
        setting = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        if token and not basic:
            setting = "MLFLOW_TRACKING_TOKEN"
        return [f"tracking.uri={shown}: {given} (HTTP {status}); set {setting}"]
    return []


def check_s3(cfg: Config, uris: Sequence[str]) -> list[str]:
    """The S3 endpoint answers and accepts the credentials, for the buckets the run reads and writes."""
    buckets = sorted({urlparse(u).netloc for u in uris if urlparse(u).scheme in ("s3a", "s3")})
    if not buckets:
        return []
    import pyarrow.fs as pafs

    settings = storage_settings(cfg)
    endpoint = settings.s3_endpoint or "AWS"
    kwargs: dict = {"connect_timeout": TIMEOUT_S, "request_timeout": TIMEOUT_S}
    kwargs["region"] = settings.s3_region or "us-east-1"
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=1)
    if settings.s3_endpoint:
        parsed = urlparse(settings.s3_endpoint)
        kwargs.update(endpoint_override=parsed.netloc or settings.s3_endpoint, scheme=parsed.scheme or "https")
        try:  # a closed port answers at once; a host that drops packets would eat the whole timeout per call
            socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)), 3)
        except OSError as exc:
            return [f"storage.s3.endpoint={redact.text(endpoint)}: nothing answers ({exc}); start it, or fix it"]
    if settings.access_key and settings.secret_key:
        kwargs.update(access_key=settings.access_key, secret_key=settings.secret_key)
        kwargs["session_token"] = settings.session_token
    fs = pafs.S3FileSystem(**kwargs)
    problems = []
    for bucket in buckets:
        try:
            fs.get_file_info(pafs.FileSelector(bucket, allow_not_found=True, recursive=False))
        except OSError as exc:
            text = str(exc).upper().replace("_", "")  # pyarrow says SIGNATURE_DOES_NOT_MATCH, S3 SignatureDoesNotMatch
            if any(m in text for m in ("ACCESSDENIED", "INVALIDACCESSKEYID", "SIGNATUREDOESNOTMATCH", "403")):
                problems.append(
                    f"s3a://{bucket} at {redact.text(endpoint)}: the credentials were refused; check "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or conf/credentials.yaml (storage.s3.credentials_file)"
                )
            elif "NOSUCHBUCKET" in text or "DOES NOT EXIST" in text:
                problems.append(f"s3a://{bucket} at {redact.text(endpoint)}: no such bucket; create it or fix the URI")
            else:
                where = f"storage.s3.endpoint={redact.text(endpoint)}"
                problems.append(f"{where}: s3a://{bucket} unreachable ({_reason(exc)})")
    return problems


def check_hdfs(cfg: Config, uris: Sequence[str]) -> list[str]:
    """The NameNode of each hdfs:// URI takes connections, and WebHDFS (storage.hdfs.webhdfs_url) answers."""
    namenodes = sorted({urlparse(u).netloc for u in uris if urlparse(u).scheme == "hdfs"})
    if not namenodes:
        return []
    problems = []
    for netloc in namenodes:
        host, _, port = netloc.partition(":")
        try:
            socket.create_connection((host, int(port or 8020)), TIMEOUT_S).close()
        except OSError as exc:
            problems.append(f"hdfs://{netloc}: the NameNode does not answer ({exc}); start it, or fix the hdfs:// URI")
    url = cfg.storage.hdfs.webhdfs_url
    if url:
        try:
            status = _http(f"{url.rstrip('/')}/webhdfs/v1/?op=GETFILESTATUS")
            if status >= 500:
                problems.append(f"storage.hdfs.webhdfs_url={url}: WebHDFS answered HTTP {status}")
        except OSError as exc:
            problems.append(f"storage.hdfs.webhdfs_url={url}: WebHDFS does not answer ({exc}); start it, or fix it")
    return problems


def check_model(cfg: Config, stages: Sequence[str]) -> list[str]:
    """infer (and evaluate's gate) without train before them score a registered model: it must exist."""
    if "infer" not in stages or "train" in stages:
        return []
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from dlpipe.serve.infer import model_uri
    from dlpipe.tracking import setup

    uri = model_uri(cfg)
    if not uri.startswith("models:"):
        return []
    setup(cfg)
    # models:/name@alias, models:/name/version (urlparse puts it all in the path: there is no netloc)
    named, _, version = uri.removeprefix("models:").strip("/").partition("/")
    name, sep, alias = named.partition("@")
    client = MlflowClient()
    setting = "infer.model_uri" if cfg.infer.model_uri else "tracking.registered_model (or infer.model_uri)"
    try:
        if sep:
            client.get_model_version_by_alias(name, alias)
        elif version:
            client.get_model_version(name, version)
        else:
            client.get_registered_model(name)
    except MlflowException as exc:
        known = ""
        try:
            versions = client.search_model_versions(f"name = '{name}'")
            aliases = sorted({a for v in versions for a in v.aliases})
            numbers = sorted(int(v.version) for v in versions)
            known = f"; it has versions {numbers}, aliases {aliases}" if versions else ""
        except MlflowException:
            known = "; the registry would not list its versions either"
        return [f"{setting}={uri}: no such registered model, alias or version ({_reason(exc)}){known}; train one first"]
    return []


def uris_of(cfg: Config, stages: Sequence[str]) -> list[str]:
    """The storage URIs the stages read or write."""
    paths = dataset_paths(cfg)
    uris = [paths.raw, paths.clean]
    if cfg.infer.source and "infer" in stages:
        uris.append(resolve_uri(cfg.root, cfg.infer.source))
    if cfg.infer.output and "infer" in stages:
        uris.append(resolve_uri(cfg.root, cfg.infer.output))
    return uris


def check(cfg: Config, stages: Sequence[str]) -> None:
    """Run every check for these stages; raise PreflightError listing every problem found."""
    started = time.monotonic()
    uris = uris_of(cfg, stages)
    checks: list[Callable[[], list[str]]] = [
        lambda: check_tracking(cfg),
        lambda: check_s3(cfg, uris),
        lambda: check_hdfs(cfg, uris),
    ]
    problems: list[str] = []
    for probe in checks:
        problems += probe()
    if not problems:  # the registry is asked only once the tracking server is known to answer
        problems += check_model(cfg, stages)
    outcome = f"{len(problems)} problem(s)" if problems else "ok"
    log.info("pre-flight: %s in %.1fs", outcome, time.monotonic() - started)
    if problems:
        raise PreflightError("pre-flight check failed, before any Spark work:\n  " + "\n  ".join(problems))
