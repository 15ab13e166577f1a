"""Redaction: credentials travel inside URLs, userinfo (``scheme://user:password@host``) and query
strings or fragments (S3 ``X-Amz-Signature``, GCS ``X-Goog-Signature``, Azure SAS ``sv=...&sig=...``,
``?token=``...). ``redact`` masks them wherever a URL appears in a text; it is applied to every error
message, error row, run summary and log line, so none of them can carry a secret."""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import urlsplit

MASK = "***"

# A URL-like substring: a scheme, "://", then anything up to whitespace, a quote or a bracket.
_URL = re.compile(r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]*")
# Punctuation that ends a sentence rather than a URL ("could not read URL: ...", "(URL)").
_TRAILING = re.compile(r"[.,;:!?)]+$")
# A "path:line" position after a URL (manifest sources), kept since it cannot be a secret.
_LINE_SUFFIX = re.compile(r":\d+$")
# A query with a credential-looking parameter where no scheme is left (e.g. ``bucket/key?sig=``).
_SECRET_PARAMETER = (
    r"(?:x-(?:amz|goog|ms)-[\w-]*|sig|signature|token|[\w-]*_token|sv|se|sp|skoid|sktid|"
    r"api[_-]?key|key|password|passwd|pwd|secret|[\w-]*credential[\w-]*|auth[\w-]*)"
)
_BARE_QUERY = re.compile(rf"\?(?=(?:[^\s'\"<>`#]*[&;])?{_SECRET_PARAMETER}=)[^\s'\"<>`]*", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it masked: ``user:password@`` becomes
    ``***@`` and a query string or fragment becomes ``?***`` (whatever its parameters, so no
    signature scheme is missed). Local paths and URLs without either are left as they are, and
    redacting twice changes nothing."""
    if not isinstance(text, str):
        return text
    if "://" in text:
        text = _URL.sub(_redact_url_match, text)
    if "?" in text:
        text = _BARE_QUERY.sub("?" + MASK, text)
    return text


def _redact_url_match(match: re.Match[str]) -> str:
    url = match.group(0)
    trailing = _TRAILING.search(url)
    suffix = ""
    if trailing:
        url, suffix = url[: trailing.start()], trailing.group(0)
    return _redact_url(url) + suffix


def _redact_url(url: str) -> str:
    scheme, rest = url.split("://", 1)
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced "[" in the host: keep nothing that may be a secret
        return f"{scheme}://{MASK}"
    if not rest.startswith(parts.netloc):  # urlsplit normalised something: play safe
        return f"{scheme}://{MASK}"
    netloc, after = parts.netloc, rest[len(parts.netloc) :]
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    if parts.query or parts.fragment:
        line = _LINE_SUFFIX.search(parts.fragment or parts.query)
        after = f"{parts.path}?{MASK}{line.group(0) if line else ''}"
    return f"{scheme}://{netloc}{after}"  # the original scheme spelling (urlsplit lowercases it)


def redact_all(value: Any) -> Any:
    """``value`` with ``redact`` applied to every string in it (dicts, lists and tuples too)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_all(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_all(item) for item in value)
    return value


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message and traceback text.

    Install it on the handlers (``install_log_redaction``), not on a logger: a handler's filters
    see every record that reaches it, third-party libraries' (fsspec, gcsfs, aiohttp) included."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's to report, not ours
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add a ``RedactingFilter`` to every handler of ``logger`` (the root logger by default)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
