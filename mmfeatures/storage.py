"""Every byte the job reads or writes goes through fsspec, so local paths and object stores
(gs://, s3://, http(s)://, memory://) behave the same from a laptop to a cluster."""

from __future__ import annotations

import logging
import os
import posixpath
import re
from typing import Any, Iterable
from urllib.parse import urlsplit

import fsspec
from apache_beam.utils import retry
from fsspec.core import url_to_fs

from mmfeatures.errors import FetchError

_LOG = logging.getLogger(__name__)


CACHE_ENV = "MMFEATURES_CACHE"


def cache_root() -> str:
    """This machine's cache for copied models and sample sources (``$MMFEATURES_CACHE``)."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mmfeatures")


# -- redaction ---------------------------------------------------------------------------------
# Credentials travel inside URLs: userinfo (``scheme://user:password@host``) and query strings or
# fragments (S3 ``X-Amz-Signature``, GCS ``X-Goog-Signature``, Azure SAS ``sv=...&sig=...``,
# ``?token=``...). ``redact`` masks them wherever a URL appears in a text; it is applied to every
# error message, error row and run summary, so none of them can carry a secret.

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
_BARE_QUERY = re.compile(
    rf"\?(?=(?:[^\s'\"<>`#]*[&;])?{_SECRET_PARAMETER}=)[^\s'\"<>`]*", re.IGNORECASE
)


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
    netloc, after = parts.netloc, rest[len(parts.netloc):]
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


def has_scheme(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    """Join path parts under ``base``, which may be a local path or a URL."""
    if has_scheme(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def parent(path: str) -> str:
    return posixpath.dirname(path) if has_scheme(path) else os.path.dirname(os.path.abspath(path))


def resolve_reference(reference: str, manifest_dir: str) -> str:
    """A media reference as a readable location: URLs and absolute paths stay as they are,
    relative paths are taken from the manifest's folder (which may itself be a URL)."""
    if has_scheme(reference) or os.path.isabs(reference):
        return reference
    return join(manifest_dir, reference)


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Expand paths and globs into a sorted list of files; fail before any work if one matches
    nothing, since a scheduled job silently reading zero files is worse than a clear failure."""
    files: list[str] = []
    for pattern in patterns:
        try:
            fs, _ = url_to_fs(pattern)
            matches = sorted(fs.glob(pattern)) if fsspec.core.has_magic(pattern) else [pattern]
            matches = [m for m in matches if fs.isfile(m)]
        except (OSError, ValueError) as exc:  # the storage's own text may quote the full URL
            kind = next(k for k in (FileNotFoundError, PermissionError, ValueError, OSError) if isinstance(exc, k))
            raise kind(redact(f"input {pattern!r} cannot be listed: {exc}")) from None
        if not matches:
            raise FileNotFoundError(f"input {redact(pattern)!r} matches no file")
        files += [_with_protocol(fs, pattern, m) for m in matches]
    return files


def _with_protocol(fs: fsspec.AbstractFileSystem, pattern: str, path: str) -> str:
    """fsspec's glob drops the scheme; put it back so workers can open the file anywhere."""
    if not has_scheme(pattern):
        return os.path.abspath(path)  # workers may run in another folder
    return fs.unstrip_protocol(path)


FETCH_RETRIES = 4  # transient faults: about 0.5 + 1 + 2 + 4 s of backoff before a record fails
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def is_transient(exc: BaseException) -> bool:
    """A storage fault worth retrying: a 5xx/429/408 answer, a reset or refused connection, or a
    timeout, anywhere in the exception's chain (fsspec's HTTP filesystem wraps them all in
    FileNotFoundError)."""
    seen: BaseException | None = exc
    while seen is not None:
        status = getattr(seen, "status", None) or getattr(seen, "code", None)
        if isinstance(status, int) and status in _TRANSIENT_STATUS:
            return True
        if isinstance(seen, (ConnectionError, TimeoutError)) or type(seen).__name__ in (
            "ClientOSError", "ServerDisconnectedError", "ClientConnectorError", "ClientPayloadError",
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _log_retry(message: str, *args: object) -> None:
    _LOG.warning(redact(message % args))


@retry.with_exponential_backoff(
    num_retries=FETCH_RETRIES, initial_delay_secs=0.5, max_delay_secs=8, retry_filter=is_transient, logger=_log_retry
)
def _read_whole(location: str, max_bytes: int | None) -> bytes:
    fs, path = url_to_fs(location)
    if max_bytes is not None:
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise FetchError(f"{size} bytes is over the {max_bytes}-byte limit", error_type="file_too_large")
    with fs.open(path, "rb") as handle:
        data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:  # a store that did not report the size
        raise FetchError(f"over the {max_bytes}-byte limit", error_type="file_too_large")
    return data


def read_bytes(location: str, max_bytes: int | None = None) -> bytes:
    """Read a whole media file, retrying transient faults with backoff, and mapping what still
    fails to ``FetchError`` codes."""
    try:
        return _read_whole(location, max_bytes)
    except FetchError:
        raise
    # ``from None``: the storage's own exception may quote the full URL, credentials included,
    # and a chained cause would carry it into any traceback that is logged.
    except Exception as exc:  # noqa: BLE001 - classified below, never lost
        if is_transient(exc):
            message = f"storage still failing after {FETCH_RETRIES} retries: {location}: {exc}"
            raise FetchError(redact(message), error_type="storage_unavailable") from None
        if isinstance(exc, FileNotFoundError):
            raise FetchError(redact(f"no such file: {location}"), error_type="missing_file") from None
        if isinstance(exc, PermissionError):
            raise FetchError(redact(f"permission denied: {location}"), error_type="permission_denied") from None
        if isinstance(exc, IsADirectoryError):
            raise FetchError(redact(f"is a directory: {location}"), error_type="not_a_file") from None
        if isinstance(exc, OSError):
            raise FetchError(redact(f"could not read {location}: {exc}"), error_type="fetch_failed") from None
        raise
