"""Transient storage faults (5xx answers, resets, stalled reads) are retried with backoff and
nothing is lost; permanent ones become error rows. Media are served over HTTP by a fault-injecting
server on 127.0.0.1."""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmfeatures import storage
from mmfeatures.errors import FetchError
from mmfeatures.sample import build_sample_dataset
from pipelines.extract_features import run
from tests.loopback_http import send_body, serving

FAILURES_BEFORE_SUCCESS = 2


STALL_SECONDS = 2.0  # longer than the fetch timeout the tests set (FETCH_TIMEOUT)
FETCH_TIMEOUT = 0.5


class FaultyServer(http.server.ThreadingHTTPServer):
    """Serves files from ``root``. Paths containing ``flaky`` fail their first requests (503,
    then a reset connection); ``slow`` stalls its first request past the client's timeout;
    ``stalled`` always does; ``down`` always answers 503; anything missing is a 404."""

    def __init__(self, root: str):
        self.root = root
        self.requests: Counter[str] = Counter()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FaultyServer

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests[self.path] += 1
            attempt = self.server.requests[self.path]
        if "stalled" in self.path or ("slow" in self.path and attempt == 1):
            time.sleep(STALL_SECONDS)  # the client has given up by now
            return
        if "down" in self.path or ("flaky" in self.path and attempt == 1):
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if "flaky" in self.path and attempt <= FAILURES_BEFORE_SUCCESS:
            # An abrupt reset: SO_LINGER with a zero timeout makes close() send RST.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            return
        path = os.path.join(self.server.root, re.sub(r"^(flaky|slow)-", "", self.path.lstrip("/")))
        send_body(self, Path(path).read_bytes() if os.path.isfile(path) else None)

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyServer]:
    monkeypatch.setattr(storage, "FETCH_TIMEOUT_SECONDS", FETCH_TIMEOUT)
    root = tmp_path / "media"
    build_sample_dataset(str(root), n=12, seed=2)
    with serving(FaultyServer(str(root))) as server:
        yield server


def test_transient_faults_are_retried_and_permanent_ones_become_error_rows(server, tmp_path) -> None:
    with open(os.path.join(server.root, "manifest.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    with open(os.path.join(server.root, "expected_errors.json")) as handle:
        broken = json.load(handle)
    for record in records:  # every medium behind a flaky link, one behind a dead server
        for key in ("image", "audio"):
            if record.get(key):
                record[key] = f"{server.url}/flaky-{record[key]}"
    records[0]["image"] = f"{server.url}/down/{os.path.basename(records[0]['image'] or 'x.png')}"
    records[1]["audio"] = f"{server.url}/no-such-file.wav"
    # One image's first request stalls past the client's timeout: retried like any transient fault.
    slow = next(r for r in records[2:] if r.get("image") and broken.get(r["id"]) != "image")
    slow["image"] = slow["image"].replace("/flaky-", "/slow-")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))

    run(["--input", str(manifest), "--output", str(tmp_path / "out")])

    errors = {(e["id"], e["modality"]): e for e in pq.read_table(tmp_path / "out" / "errors").to_pylist()}
    assert errors[(records[0]["id"], "image")]["error_type"] == "storage_unavailable"
    assert errors[(records[1]["id"], "audio")]["error_type"] == "missing_file"
    expected_failures = set(broken.items()) | {(records[0]["id"], "image"), (records[1]["id"], "audio")}
    assert set(errors) == expected_failures  # every flaky file made it: nothing else failed
    with open(tmp_path / "out" / "_run.json") as handle:
        summary = json.load(handle)
    assert summary["reconciles"] and summary["feature_rows"] == len(records)
    flaky = [path for path in server.requests if "flaky" in path]
    assert flaky and all(server.requests[path] > FAILURES_BEFORE_SUCCESS for path in flaky)
    slow_requests = [server.requests[path] for path in server.requests if "slow" in path]
    assert len(slow_requests) == 1 and slow_requests[0] >= 2  # stalled once, then served


def test_read_bytes_classifies_what_still_fails(server) -> None:
    with pytest.raises(FetchError) as down:
        storage.read_bytes(f"{server.url}/down/a.png")
    assert down.value.error_type == "storage_unavailable"
    assert server.requests["/down/a.png"] > storage.FETCH_RETRIES
    with pytest.raises(FetchError) as missing:
        storage.read_bytes(f"{server.url}/nothing-here.png")
    assert missing.value.error_type == "missing_file"
    assert storage.read_bytes(f"{server.url}/flaky-manifest.jsonl").startswith(b"{")
    assert storage.read_bytes(f"{server.url}/slow-manifest.jsonl").startswith(b"{")
    with pytest.raises(FetchError) as stalled:
        storage.read_bytes(f"{server.url}/stalled/a.png")
    assert stalled.value.error_type == "storage_unavailable"
    assert server.requests["/stalled/a.png"] > storage.FETCH_RETRIES
