"""What the tests' HTTP servers on 127.0.0.1 share: answering with a file's bytes, and serving
in a thread for as long as a test needs."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from typing import TypeVar

Server = TypeVar("Server", bound=http.server.HTTPServer)


def send_body(handler: http.server.BaseHTTPRequestHandler, body: bytes | None) -> None:
    """Answer with ``body`` (a HEAD request with its length only), or 404 where there is none."""
    if body is None:
        handler.send_error(404)
        return
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if handler.command == "GET":
        handler.wfile.write(body)


@contextlib.contextmanager
def serving(server: Server) -> Iterator[Server]:
    """``server`` answering in a thread of its own until the block ends, then closed."""
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
