"""One redaction rule for everything that leaves the process: MLflow params and tags, logs, status output.

A value is masked when its key names a secret (secret, password, token, credential, access key, SAS,
signature, private key, ...), and the user:password part of any URI is masked wherever it appears. Secret
values met on the way (a secret-named config key, the S3 credentials from the environment or the
credentials file) are remembered, so the same text is masked in free text too: a log line or an error
message that quotes one shows the mask instead.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from typing import Any

MASK = "*****"
_SECRET_KEY = re.compile(
    r"secret|passw(?:or)?d|pwd|token|credential|\bsas\b|sig(?:nature)?$|private[._-]?key|access[._-]?key|"
    r"api[._-]?key|auth[._-]?key|session[._-]?key",
    re.IGNORECASE,
)
# scheme://user:password@host: the password part (the user stays readable)
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:@/\s]*:)(?P<pw>[^@/\s]+)(?P<at>@)")
_MIN_REMEMBERED = 4  # shorter values are too likely to be ordinary text ("true", "1")
_known: set[str] = set()
_lock = threading.Lock()


def is_secret_key(key: str) -> bool:
    """Whether a config or environment key names a secret (a key naming a file or path that holds one,
    such as storage.s3.credentials_file, does not)."""
    key = str(key)
    return bool(_SECRET_KEY.search(key)) and not key.lower().endswith(("_file", ".file", "_path", ".path"))


def remember(value: Any) -> None:
    """Mask this exact text wherever it shows up from now on (a secret this process holds)."""
    if isinstance(value, str) and len(value) >= _MIN_REMEMBERED:
        with _lock:
            _known.add(value)


def text(value: str) -> str:
    """value with URI passwords and every remembered secret masked."""
    out = _USERINFO.sub(lambda m: f"{m['head']}{MASK}{m['at']}", value)
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for secret in known:
        if secret in out:
            out = out.replace(secret, MASK)
    return out


def value(key: str, v: Any) -> Any:
    """What may be shown of key's value v: masked whole if the key names a secret; else its text redacted
    (non-text values pass as they are)."""
    if is_secret_key(key) and v not in (None, ""):
        remember(str(v))
        return MASK
    return text(v) if isinstance(v, str) else v


def mapping(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A flat key -> value map (a config's params, tags) safe to show."""
    for k, v in flat.items():  # first remember every secret, so one quoted under another key is masked too
        if is_secret_key(k) and isinstance(v, str):
            remember(v)
    return {k: value(k, v) for k, v in flat.items()}


def tree(obj: Any) -> Any:
    """A JSON-like value (dicts, lists, text) with every text redacted and secret-named keys masked."""
    if isinstance(obj, Mapping):
        return {k: MASK if is_secret_key(str(k)) and obj[k] not in (None, "") else tree(obj[k]) for k in obj}
    if isinstance(obj, list | tuple):
        return [tree(v) for v in obj]
    return text(obj) if isinstance(obj, str) else obj


class RedactingFilter(logging.Filter):
    """A handler filter: the formatted message (and its exception text) with secrets masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = text(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[1] is not None:
            formatted = logging.Formatter().formatException(record.exc_info)
            safe = text(formatted)
            if safe != formatted:
                record.exc_info, record.exc_text = None, safe
        return True


_FILTER = RedactingFilter()


def install(logger: logging.Logger | None = None) -> None:
    """Put the filter on every handler of logger (default: the root logger), once each."""
    for handler in (logger or logging.getLogger()).handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
