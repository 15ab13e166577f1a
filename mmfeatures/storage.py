"""Every byte the job reads or writes goes through fsspec, so local paths and object stores
(gs://, s3://, http(s)://, memory://) behave the same from a laptop to a cluster. The one
exception is the hot path of reading a media file from a plain local path (see ``_open_media``)."""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import posixpath
import re
import socket
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

import aiohttp
import fsspec
from aiohttp import hdrs
from aiohttp.abc import ResolveResult
from apache_beam.utils import retry
from braceexpand import braceexpand
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from yarl import URL

from mmfeatures.errors import ConfigurationError, FetchError
from mmfeatures.limits import check_size
from mmfeatures.redaction import redact

_LOG = logging.getLogger(__name__)


CACHE_ENV = "MMFEATURES_CACHE"


def cache_root() -> str:
    """This machine's cache for copied models and sample sources (``$MMFEATURES_CACHE``)."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mmfeatures")


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


_LOCAL_SCHEMES = frozenset({"file", "local"})  # fsspec's names for this machine's files
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
_Key = tuple[str, tuple[str, ...]]  # (scheme, path components) that locations are compared on


def _key(location: str, resolve: bool = True) -> _Key | None:
    """``location`` as a lowercase scheme and its path components, or None where it cannot be
    judged safely. Local paths are realpath'ed (``resolve``) so neither ".." nor a symlink leads out
    of a root; URL paths are normalised as text, and the query or fragment is left out (a signed
    URL's path is what it reads). None for an fsspec chain ("a::b", which reads through another
    file system than the one named), a malformed scheme, or a ".." that is still there once
    percent-escapes and backslashes are read as a server may ("%2e%2e", "a\\..") or that sits in
    a query which some file systems take as part of the path."""
    if "::" in location:
        return None
    scheme, rest = location.split("://", 1) if has_scheme(location) else ("file", location)
    scheme = scheme.lower()
    if not _SCHEME.fullmatch(scheme):
        return None
    if scheme in _LOCAL_SCHEMES:
        path = os.path.realpath(rest) if resolve else os.path.abspath(rest)
        return "file", tuple(part for part in path.split(os.sep) if part)
    cut = min((index for index in (rest.find("?"), rest.find("#")) if index >= 0), default=len(rest))
    path, tail = posixpath.normpath(rest[:cut]), rest[cut:]
    if ".." in re.split(r"[/\\]", unquote(path + tail)):
        return None
    return scheme, tuple(part for part in path.split("/") if part not in ("", "."))


# Cloud metadata services answer with the machine's credentials. Link-local addresses are refused
# unless named (among them 169.254.169.254, where AWS, GCP and Azure serve metadata); these are
# the other services' addresses, and the names that reach them.
_METADATA_NAMES = frozenset({"metadata", "metadata.google.internal"})
_METADATA_ADDRESSES = frozenset(map(ipaddress.ip_address, ("fd00:ec2::254", "100.100.100.200")))


def _host_key(host: str) -> str:
    """A host as compared: lowercased, without a trailing dot or an IPv6 zone, an IP address in
    its canonical form."""
    name = host.lower().rstrip(".").split("%")[0]
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def _is_metadata_host(key: str) -> bool:
    """Whether a ``_host_key`` is a link-local address or a cloud metadata service's."""
    try:
        address = ipaddress.ip_address(key)
    except ValueError:
        return key in _METADATA_NAMES
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_link_local or address in _METADATA_ADDRESSES


def _root_host(root: str) -> str | None:
    """The ``_host_key`` of a URL root's host; None for a local root, a bare scheme, or an
    authority that no request could use."""
    try:
        host = urlsplit(root).hostname if has_scheme(root) else None
    except ValueError:
        return None
    return _host_key(host) if host else None


@dataclass(frozen=True)
class LocationPolicy:
    """Which locations manifest references may be read from (``--allowed_roots``), so a manifest
    written by someone else cannot make the job read files or buckets the user did not hand it.
    ``roots`` empty = anywhere. A root is a bare scheme ("https://": every URL of it), a URL prefix
    ("gs://bucket/images") or a local folder ("/data/media" or "file:///data/media"). Matching is
    by whole path components, so "/data/media" does not allow "/data/media-secret/x.png". Build it
    with ``from_roots``: plain data, so it pickles to workers unchanged."""

    roots: tuple[str, ...] = ()

    @classmethod
    def from_roots(cls, roots: Iterable[str]) -> LocationPolicy:
        """The policy for the roots the user passed, each normalised once, here on the launcher:
        local roots realpath'ed (a root reached through a symlink still matches the files under
        it), schemes lowercased, URL paths normalised. Raises ``ConfigurationError`` for a root
        that cannot be judged (an fsspec chain, a ".." above the bucket, an empty string)."""
        normalised: list[str] = []
        for root in roots:
            key = _key(root) if root.strip() else None
            if key is None:
                raise ConfigurationError(redact(f"--allowed_roots: cannot use {root!r} as a root"))
            scheme, parts = key
            if scheme == "file":
                normalised.append(os.sep + os.sep.join(parts))
            else:
                normalised.append(f"{scheme}://" + "/".join(parts))
        return cls(tuple(dict.fromkeys(normalised)))

    def check(self, location: str) -> None:
        """Raise ``FetchError`` ("location_not_allowed") unless ``location`` lies under a root.
        Check the location that will be read (after ``resolve_reference``); the message is
        redacted, since a refused URL may carry credentials."""
        if not self.roots:
            return
        key = _key(location)
        if key is not None:
            scheme, parts = key
            for root_scheme, root_parts in filter(None, (_key(root, resolve=False) for root in self.roots)):
                if scheme == root_scheme and parts[: len(root_parts)] == root_parts:
                    return
        raise FetchError(
            redact(f"location not allowed by --allowed_roots: {location}"), error_type="location_not_allowed"
        )

    def check_host(self, host: str | None, addresses: Iterable[str] = ()) -> None:
        """Raise ``FetchError`` ("location_not_allowed") where an HTTP(S) request to ``host``,
        which resolved to ``addresses``, would reach a link-local address or a cloud metadata
        service, unless a root names ``host`` itself: whatever the roots, since such a service
        hands out the credentials of the machine that asks. Naming an address allows that
        address, not every name that resolves to it."""
        key = _host_key(host or "")
        if not (_is_metadata_host(key) or any(_is_metadata_host(_host_key(address)) for address in addresses)):
            return
        if key in map(_root_host, self.roots):
            return
        raise FetchError(
            f"host not allowed: {host} is, or resolves to, a link-local or cloud metadata address (name it "
            "in --allowed_roots to read from it)",
            error_type="location_not_allowed",
        )


_NO_ROOTS = LocationPolicy()


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Expand paths, globs and brace patterns (WebDataset's ``shards/part-{000000..000099}.tar``,
    or ``{train,val}/*.jsonl``) into files, each pattern's sorted; fail before any work if one
    matches nothing (a brace pattern: if any of its names does), since a scheduled job silently
    reading fewer files than it was given is worse than a clear failure. A glob matches files
    only; a folder named as it is comes back with a trailing "/" (see ``is_folder_path``)."""
    found: list[str] = []
    for pattern in (expanded for given in patterns for expanded in braceexpand(given)):
        try:
            fs, _ = url_to_fs(pattern)
            if fsspec.core.has_magic(pattern):
                listed = fs.glob(pattern, detail=True)
                matches = sorted(path for path, info in listed.items() if info["type"] == "file")
            else:
                try:
                    entry = fs.info(pattern)["type"]
                except FileNotFoundError:
                    entry = None
                matches = [pattern.rstrip("/") + "/" * (entry == "directory")] if entry in ("file", "directory") else []
        except (OSError, ValueError) as exc:  # the storage's own text may quote the full URL
            kind = next(k for k in (FileNotFoundError, PermissionError, ValueError, OSError) if isinstance(exc, k))
            raise kind(redact(f"input {pattern!r} cannot be listed: {exc}")) from None
        if not matches:
            raise FileNotFoundError(f"input {redact(pattern)!r} matches no file")
        found += [_with_protocol(fs, pattern, m) for m in matches]
    return found


_WILDCARD = re.compile(r"[*?\[{]")  # where a glob or brace pattern stops naming one fixed folder


def pattern_root(pattern: str) -> str:
    """The fixed folder of an ``--input`` pattern, ending in "/": the part before its first
    wildcard or brace, up to the last "/"; for a file or folder named as it is, its parent."""
    wildcard = _WILDCARD.search(pattern)
    fixed = pattern[: wildcard.start()] if wildcard else pattern.rstrip("/")
    root = fixed[: fixed.rfind("/") + 1]
    return root if has_scheme(pattern) else os.path.abspath(root or ".").rstrip(os.sep) + os.sep


def common_root(roots: list[str]) -> str | None:
    """The deepest folder holding every one of ``roots`` (``pattern_root``s), or None when they
    lie on different file systems or buckets."""
    split = [root.rstrip("/").split("/") for root in roots]
    shared = next((i for i, parts in enumerate(zip(*split, strict=False)) if len(set(parts)) > 1), min(map(len, split)))
    least = 3 if has_scheme(roots[0]) else 1  # "gs:", "", "bucket"; or "", the top of a local disk
    return "/".join(split[0][:shared]) + "/" if shared >= least else None


def name_under(path: str, root: str) -> str:
    """``path`` relative to ``root`` (a ``pattern_root``), in "/" form; its base name where it is
    not under it. Both are compared in their file system's own terms, so "memory://x/a" and
    "memory:///x/a" are the same file."""
    _, path_key = url_to_fs(path.rstrip("/"))
    _, root_key = url_to_fs(root)
    prefix = root_key.rstrip("/") + "/"
    return path_key[len(prefix) :] if path_key.startswith(prefix) else posixpath.basename(path_key)


def is_folder_path(path: str) -> bool:
    """Whether ``expand_inputs`` found ``path`` to be a folder."""
    return path.endswith("/")


def _with_protocol(fs: fsspec.AbstractFileSystem, pattern: str, path: str) -> str:
    """fsspec's glob drops the scheme; put it back so workers can open the file anywhere."""
    folder = "/" if is_folder_path(path) else ""
    if not has_scheme(pattern):
        return os.path.abspath(path) + folder  # workers may run in another folder
    return fs.unstrip_protocol(path.rstrip("/")) + folder


FETCH_RETRIES = 4  # transient faults: about 0.5 + 1 + 2 + 4 s of backoff before a record fails
# A connection or read that stalls this long is a transient fault too: retried, then an error row,
# never a worker hung on a server that stopped answering. (Object stores' clients have their own.)
FETCH_TIMEOUT_SECONDS = 60.0
MAX_REDIRECTS = 5  # redirects followed for one HTTP(S) request; one more is an error row
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})  # the answers aiohttp follows


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling: fsspec's HTTP file system
    wraps aiohttp's, and the policy's refusals, in FileNotFoundError."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def is_transient(exc: BaseException) -> bool:
    """A storage fault worth retrying: a 5xx/429/408 answer, a reset or refused connection, or a
    timeout, anywhere in the exception's chain."""
    for seen in _chain(exc):
        status = getattr(seen, "status", None)
        if status is None:  # other clients' errors carry ``code``, which aiohttp's deprecate
            status = getattr(seen, "code", None)
        if isinstance(status, int) and status in _TRANSIENT_STATUS:
            return True
        if isinstance(seen, (ConnectionError, TimeoutError)) or type(seen).__name__ in (
            "ClientOSError",
            "ServerDisconnectedError",
            "ClientConnectorError",
            "ClientPayloadError",
        ):
            return True
    return False


class PolicyResolver(aiohttp.ThreadedResolver):
    """The system's resolver, refusing the addresses that ``LocationPolicy.check_host`` refuses.
    They are judged as each connection is made, so a name that resolved elsewhere when it was
    first looked up (DNS rebinding) still cannot reach them."""

    def __init__(self, policy: LocationPolicy):
        super().__init__()
        self.policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await super().resolve(host, port, family)
        self.policy.check_host(host, [entry["host"] for entry in found])
        return found


async def _http_session(policy: LocationPolicy, **client_kwargs: Any) -> aiohttp.ClientSession:
    """fsspec's HTTP client (its ``get_client``), held to ``policy`` on every request, each
    redirect included: the host is checked before a request is sent (an IP address in a URL skips
    the resolver), the address a name resolves to as the connection is made (``PolicyResolver``),
    and a redirect's target against the roots before it is followed."""

    async def within_policy(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        policy.check_host(request.url.raw_host)
        response = await handler(request)
        target = response.headers.get(hdrs.LOCATION) or response.headers.get(hdrs.URI)
        if response.status in _REDIRECT_STATUS and target:
            try:
                policy.check(str(request.url.join(URL(target))))
            except (FetchError, ValueError):  # refused, or not a URL (which aiohttp refuses too)
                response.close()
                raise
        return response

    connector = aiohttp.TCPConnector(resolver=PolicyResolver(policy))
    return aiohttp.ClientSession(connector=connector, middlewares=(within_policy,), **client_kwargs)


def _media_filesystem(location: str, policy: LocationPolicy) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's file system for a media file; HTTP(S) sessions get connect and read timeouts, a
    limit on redirects, and ``policy`` (``_http_session``)."""
    if location.lower().startswith(("http://", "https://")):
        timeout = aiohttp.ClientTimeout(sock_connect=FETCH_TIMEOUT_SECONDS, sock_read=FETCH_TIMEOUT_SECONDS)
        return url_to_fs(
            location,
            client_kwargs={"timeout": timeout},
            get_client=functools.partial(_http_session, policy),
            max_redirects=MAX_REDIRECTS + 1,  # aiohttp counts the redirect it refuses
        )
    return url_to_fs(location)


def _log_retry(message: str, *args: object) -> None:
    _LOG.warning(redact(message % args))


@retry.with_exponential_backoff(
    num_retries=FETCH_RETRIES, initial_delay_secs=0.5, max_delay_secs=8, retry_filter=is_transient, logger=_log_retry
)
def _read_whole(location: str, max_bytes: int | None, policy: LocationPolicy) -> bytes:
    size, handle = _open_media(location, max_bytes, policy)
    with handle:
        if max_bytes is None:
            data = handle.read()
        else:
            # A local file's read(n) allocates n bytes up front: ask for the size the store reported
            # (plus one, to notice growth), not the whole limit, which may be far larger than the
            # file. Reads stay bounded even where the size is wrong (a /proc file reports 0 bytes).
            data = handle.read((max_bytes if size is None else size) + 1)
            if size is not None and len(data) > size:  # it grew while being read
                data += handle.read(max_bytes + 1 - len(data))
    if max_bytes is not None and len(data) > max_bytes:  # the size was not reported, or was wrong
        raise FetchError(f"over the {max_bytes}-byte limit", error_type="file_too_large")
    return data


def _open_media(location: str, max_bytes: int | None, policy: LocationPolicy) -> tuple[int | None, BinaryIO]:
    """A media file opened for reading, and the size its storage reports (asked of a remote store
    only where ``max_bytes`` is set), refused before it is read when over ``max_bytes``.

    Plain local paths are Python's own to open: fsspec's local file system holds the GIL for its
    URL parsing and instance cache on every file, work that a plain path does not need and that
    the threads preparing records in parallel would wait on each other for. A local file named by
    URL ("file://") is opened the same way, so that it is refused for the same reasons.
    """
    if not has_scheme(location):
        return _open_regular_file(location, location, max_bytes)
    fs, path = _media_filesystem(location, policy)
    if isinstance(fs, LocalFileSystem):
        return _open_regular_file(path, location, max_bytes)
    size = fs.size(path) if max_bytes is not None else None
    check_size(size, max_bytes)
    return size, fs.open(path, "rb")


def _open_regular_file(path: str, location: str, max_bytes: int | None) -> tuple[int, BinaryIO]:
    """The local file ``path`` (named ``location``) opened for reading, and its size, if it is a
    regular file. It is judged on the opened descriptor, so it cannot be swapped for another file
    between the check and the open, and opened without blocking, where a FIFO would wait for a
    writer forever; a FIFO, a device (/dev/zero never ends) or a folder is refused unread."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise FetchError(redact(f"not a regular file: {location}"), error_type="not_a_file")
        check_size(status.st_size, max_bytes)
        os.set_blocking(descriptor, True)
        return status.st_size, open(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def read_bytes(location: str, max_bytes: int | None = None, policy: LocationPolicy = _NO_ROOTS) -> bytes:
    """Read a whole media file that ``policy`` allows, retrying transient faults with backoff, and
    mapping what still fails to ``FetchError`` codes. HTTP(S) requests are held to ``policy``
    throughout, redirects included (see ``_http_session``); an fsspec chain ("simplecache::...")
    is refused, as it would read through a file system that none of these checks hold."""
    try:
        if "::" in location:  # an fsspec chain reads through a file system not named first
            message = f"fsspec chains are not read as media: {location}"
            raise FetchError(redact(message), error_type="location_not_allowed")
        policy.check(location)
        return _read_whole(location, max_bytes, policy)
    except FetchError:
        raise
    # ``from None``: the storage's own exception may quote the full URL, credentials included,
    # and a chained cause would carry it into any traceback that is logged.
    except Exception as exc:  # noqa: BLE001 - classified below, never lost
        refused = next((seen for seen in _chain(exc) if isinstance(seen, FetchError)), None)
        if refused is not None:  # by the policy, in the middle of an HTTP request
            raise refused from None
        if any(isinstance(seen, aiohttp.TooManyRedirects) for seen in _chain(exc)):
            message = f"more than {MAX_REDIRECTS} redirects: {location}"
            raise FetchError(redact(message), error_type="too_many_redirects") from None
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
