"""Media references that point at something other than a media file: a FIFO, a device or a folder
on this machine (each an error row, never a hang or an endless read), and HTTP locations that
redirect out of --allowed_roots, redirect in a loop, or lead to link-local and cloud metadata
addresses. The servers bind 127.0.0.1, and no test sends a packet anywhere else: metadata
addresses are only judged (numeric host names resolve without a DNS query), never connected to."""

from __future__ import annotations

import asyncio
import errno
import http.server
import ipaddress
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from mmfeatures import schema, storage
from mmfeatures.errors import FetchError
from pipelines.extract_features import run
from tests.loopback_http import send_body, serving
from tests.test_bad_inputs import _png

HANG_SECONDS = 10.0  # far longer than any refusal takes; a read still blocked by then has hung


def _fetch_error(location: str, **kwargs: Any) -> FetchError:
    """The ``FetchError`` that reading ``location`` raises, failing the test, rather than hanging
    it, when the read blocks (the reading thread is a daemon, released by the fixtures)."""
    outcome: list[object] = []

    def read() -> None:
        try:
            outcome.append(storage.read_bytes(location, **kwargs))
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(HANG_SECONDS)
    assert outcome, f"reading {location} still blocked after {HANG_SECONDS} s"
    assert isinstance(outcome[0], FetchError), outcome[0]
    return outcome[0]


# -- special files on this machine -------------------------------------------------------------


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO that no process writes to; afterwards, a reader still blocked on it is released."""
    path = tmp_path / "image.png"
    os.mkfifo(path)
    yield path
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # wakes a reader blocked in open()
    except OSError as exc:
        assert exc.errno == errno.ENXIO  # no reader was waiting


@pytest.mark.parametrize("max_bytes", [None, 1000])
@pytest.mark.parametrize("form", ["path", "symlink", "file_url"])
def test_a_fifo_is_refused_without_waiting_for_a_writer(fifo: Path, form: str, max_bytes: int | None) -> None:
    location = {
        "path": str(fifo),
        "symlink": str(fifo.with_name("link.png")),
        "file_url": f"file://{fifo}",
    }[form]
    if form == "symlink":
        os.symlink(fifo, location)
    assert _fetch_error(location, max_bytes=max_bytes).error_type == "not_a_file"


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_a_character_device_is_refused_unread(device: str) -> None:
    if not os.path.exists(device):
        pytest.skip(f"no {device} here")
    assert _fetch_error(device, max_bytes=1000).error_type == "not_a_file"


def test_a_folder_is_refused_by_path_and_by_file_url(tmp_path: Path) -> None:
    for location in (str(tmp_path), f"file://{tmp_path}"):
        assert _fetch_error(location).error_type == "not_a_file"


def test_a_regular_file_still_reads_by_path_symlink_and_file_url(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(b"png bytes")
    os.symlink(path, tmp_path / "link.png")
    for location in (str(path), str(tmp_path / "link.png"), f"file://{path}", f"local://{path}"):
        assert storage.read_bytes(location) == b"png bytes"
        assert storage.read_bytes(location, max_bytes=9) == b"png bytes"
        assert _fetch_error(location, max_bytes=8).error_type == "file_too_large"


# -- HTTP redirects ----------------------------------------------------------------------------


class RedirectingServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` by path and answers each path in ``redirects`` with its status and
    Location; records every path requested."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, tuple[int, str]] = {}
        self.requested: list[str] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: RedirectingServer

    def do_GET(self) -> None:
        self.server.requested.append(self.path)
        if self.path in self.server.redirects:
            status, location = self.server.redirects[self.path]
            self.send_response(status)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        send_body(self, self.server.files.get(self.path))

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[RedirectingServer]:
    with serving(RedirectingServer()) as server:
        server.files = {"/media/a.png": b"the image", "/private/key.pem": b"the secret"}
        yield server


def _media_policy(server: RedirectingServer) -> storage.LocationPolicy:
    return storage.LocationPolicy.from_roots([f"{server.url}/media"])


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("absolute", [False, True])
def test_a_redirect_out_of_the_allowed_roots_is_refused_before_it_is_followed(
    server: RedirectingServer, status: int, absolute: bool
) -> None:
    server.redirects["/media/b.png"] = (status, f"{server.url if absolute else ''}/private/key.pem")
    error = _fetch_error(f"{server.url}/media/b.png", policy=_media_policy(server))
    assert error.error_type == "location_not_allowed"
    assert "/private/key.pem" not in server.requested


@pytest.mark.parametrize("status", [301, 302, 307])
@pytest.mark.parametrize("target", ["a.png", "/media/a.png", "{url}/media/a.png"])
def test_a_redirect_within_the_allowed_roots_is_followed(server: RedirectingServer, status: int, target: str) -> None:
    server.redirects["/media/b.png"] = (status, target.format(url=server.url))
    url = f"{server.url}/media/b.png"
    assert storage.read_bytes(url, policy=_media_policy(server)) == b"the image"
    assert storage.read_bytes(url, max_bytes=100, policy=_media_policy(server)) == b"the image"


def test_redirects_are_followed_up_to_the_limit(server: RedirectingServer) -> None:
    last = storage.MAX_REDIRECTS  # from hop1, MAX_REDIRECTS redirects lead to a.png; from hop0, one more
    for hop in range(last):
        server.redirects[f"/media/hop{hop}"] = (302, f"/media/hop{hop + 1}")
    server.redirects[f"/media/hop{last}"] = (302, "/media/a.png")
    assert storage.read_bytes(f"{server.url}/media/hop1", policy=_media_policy(server)) == b"the image"
    error = _fetch_error(f"{server.url}/media/hop0", policy=_media_policy(server))
    assert error.error_type == "too_many_redirects"


def test_a_redirect_loop_is_an_error_row(server: RedirectingServer) -> None:
    server.redirects["/media/loop.png"] = (307, "/media/loop.png")
    for policy in (storage.LocationPolicy(), _media_policy(server)):
        assert _fetch_error(f"{server.url}/media/loop.png", policy=policy).error_type == "too_many_redirects"


# -- link-local and cloud metadata addresses ---------------------------------------------------

METADATA_HOSTS = [
    "169.254.169.254",  # AWS, GCP, Azure, ...
    "169.254.1.1",  # any link-local IPv4 address
    "fe80::1",
    "fe80::1%lo",
    "fd00:ec2::254",  # AWS over IPv6
    "FD00:EC2:0::254",
    "::ffff:169.254.169.254",
    "100.100.100.200",  # Alibaba Cloud
    "metadata.google.internal",
    "Metadata.Google.Internal.",
    "metadata",
]


def _host_error(policy: storage.LocationPolicy, host: str, addresses: tuple[str, ...] = ()) -> FetchError:
    with pytest.raises(FetchError) as info:
        policy.check_host(host, addresses)
    assert info.value.error_type == "location_not_allowed"
    return info.value


@pytest.mark.parametrize("host", METADATA_HOSTS)
def test_metadata_and_link_local_hosts_are_refused_unless_a_root_names_them(host: str) -> None:
    for roots in ([], ["https://", "http://"], ["http://example.com/"], ["http://169.254.169.25/"]):
        _host_error(storage.LocationPolicy.from_roots(roots), host)
    named = host.rstrip(".").split("%")[0]
    if ":" in named:  # an IPv6 root is written out in full: fsspec reads "::" as a chain of file systems
        named = f"[{ipaddress.ip_address(named).exploded}]"
    storage.LocationPolicy.from_roots([f"http://{named}/"]).check_host(host)
    storage.LocationPolicy.from_roots([f"https://{named}:8443/computeMetadata"]).check_host(host)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "10.0.0.1", "example.com", "169.254.example.com", None])
def test_other_hosts_are_left_to_the_roots(host: str | None) -> None:
    storage.LocationPolicy().check_host(host)
    storage.LocationPolicy.from_roots(["gs://bucket"]).check_host(host)


def test_a_name_that_resolved_to_a_metadata_address_is_refused() -> None:
    _host_error(storage.LocationPolicy(), "images.example.com", ("93.184.216.34", "169.254.169.254"))
    _host_error(storage.LocationPolicy(), "images.example.com", ("fe80::1%eth0",))
    storage.LocationPolicy().check_host("images.example.com", ("93.184.216.34", "2606:2800::1"))
    # named by its root, the name may resolve there: the user asked for it
    storage.LocationPolicy.from_roots(["http://images.example.com/"]).check_host("images.example.com", ("fe80::1",))


def _resolve(policy: storage.LocationPolicy, host: str) -> list[str]:
    async def resolve() -> list[str]:
        return [found["host"] for found in await storage.PolicyResolver(policy).resolve(host, 80)]

    return asyncio.run(resolve())


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "2852039166",  # 169.254.169.254 as one decimal number: a name to aiohttp, an address to the resolver
        "0251.0376.0251.0376",  # the same in octal
    ],
)
def test_the_resolver_refuses_the_address_a_name_resolves_to(host: str) -> None:
    """The address is judged as resolved, when the connection is made: a name that passed a check
    of its text, or that resolves elsewhere by the time of the request, is still caught."""
    with pytest.raises(FetchError) as info:
        _resolve(storage.LocationPolicy.from_roots(["http://"]), host)
    assert info.value.error_type == "location_not_allowed"


def test_the_resolver_allows_what_the_roots_name() -> None:
    assert _resolve(storage.LocationPolicy(), "127.0.0.1") == ["127.0.0.1"]
    named = storage.LocationPolicy.from_roots(["http://169.254.169.254/latest"])
    assert _resolve(named, "169.254.169.254") == ["169.254.169.254"]
    with pytest.raises(FetchError):
        _resolve(named, "2852039166")  # the address was named, not this name for it


@pytest.fixture
def loopback_as_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    """127.0.0.1 refused as a metadata address would be, so that each refusal can be followed
    through a real request to a real server without a packet leaving this machine."""
    refused = storage._METADATA_ADDRESSES | {ipaddress.ip_address("127.0.0.1")}
    monkeypatch.setattr(storage, "_METADATA_ADDRESSES", refused)


@pytest.mark.usefixtures("loopback_as_metadata")
def test_a_refused_address_is_refused_wherever_a_request_meets_it(server: RedirectingServer) -> None:
    by_name = f"http://localhost:{server.server_address[1]}"  # /etc/hosts: 127.0.0.1, no DNS query
    # an address in the URL skips the resolver: refused before the request is sent
    assert _fetch_error(f"{server.url}/media/a.png").error_type == "location_not_allowed"
    # a name: refused once resolved, before a connection is made
    assert _fetch_error(f"{by_name}/media/a.png").error_type == "location_not_allowed"
    assert server.requested == []
    # a redirect from a host a root names to the address: refused before it is followed
    named = storage.LocationPolicy.from_roots([f"{by_name}/"])
    server.redirects["/media/b.png"] = (302, f"{server.url}/media/a.png")
    assert _fetch_error(f"{by_name}/media/b.png", policy=named).error_type == "location_not_allowed"
    assert "/media/a.png" not in server.requested
    assert storage.read_bytes(f"{by_name}/media/a.png", policy=named) == b"the image"


# -- through the job ---------------------------------------------------------------------------


def test_hostile_media_references_are_error_rows_in_a_run(
    tmp_path: Path, fifo: Path, server: RedirectingServer, tiny_model_options: list[str]
) -> None:
    (tmp_path / "good.png").write_bytes(_png(0))
    (tmp_path / "folder.png").mkdir()
    os.symlink(fifo, tmp_path / "link.png")
    server.files["/media/c.png"] = _png(1)
    server.redirects["/media/d.png"] = (302, "c.png")
    server.redirects["/media/loop.png"] = (302, "/media/loop.png")
    rows = {
        "good": "good.png",
        "fifo": str(fifo),
        "fifo-link": "link.png",
        "zeros": "/dev/zero",
        "folder": "folder.png",
        "redirected": f"{server.url}/media/d.png",
        "loop": f"{server.url}/media/loop.png",
    }
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": key, "image": image}) + "\n" for key, image in rows.items()))
    out = tmp_path / "out"

    run(["--input", str(manifest), "--output", str(out), *tiny_model_options])

    errors = {row["id"]: row["error_type"] for row in pq.read_table(out / "errors").to_pylist()}
    assert errors == {
        "fifo": "not_a_file",
        "fifo-link": "not_a_file",
        "zeros": "not_a_file",
        "folder": "not_a_file",
        "loop": "too_many_redirects",
    }
    embedded = {row["id"] for row in schema.read_features(str(out / "features")).to_pylist() if row["has_image"]}
    assert embedded == {"good", "redirected"}
    with open(out / "_run.json") as handle:
        assert json.load(handle)["reconciles"]

    # Under --allowed-roots, a redirect out of them is refused in the run as in a single read.
    server.redirects["/media/escape.png"] = (302, "/private/key.pem")
    rows = {"redirected": f"{server.url}/media/d.png", "escape": f"{server.url}/media/escape.png"}
    manifest.write_text("".join(json.dumps({"id": key, "image": image}) + "\n" for key, image in rows.items()))
    run(["--input", str(manifest), "--output", str(out), "--allowed-roots", f"{server.url}/media", *tiny_model_options])
    errors = {row["id"]: row["error_type"] for row in schema.read_features(str(out / "errors")).to_pylist()}
    assert errors == {"escape": "location_not_allowed"}
    assert "/private/key.pem" not in server.requested


@pytest.mark.parametrize("chain", ["simplecache::file://{folder}/a.png", "blockcache::http://169.254.169.254/latest"])
def test_an_fsspec_chain_is_refused_as_media_even_without_roots(tmp_path: Path, chain: str) -> None:
    """A chain reads through a file system none of the checks above hold: never as media."""
    (tmp_path / "a.png").write_bytes(b"the image")
    assert _fetch_error(chain.format(folder=tmp_path)).error_type == "location_not_allowed"
