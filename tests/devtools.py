"""A real headless Chromium, driven over the Chrome DevTools Protocol (CDP), for tests that must see
a page the way a browser does: console errors, uncaught exceptions, what it fetched, and whether
each image actually decoded. Only ``websockets`` is needed on the Python side.

The browser listens on 127.0.0.1 alone, on a port it picks itself (``--remote-debugging-port=0``;
the address it announces is checked), with a throwaway profile, and runs in a process group of its
own, so that ``close`` ends it and every helper process it started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from websockets.sync.client import ClientConnection, connect

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0
LOOPBACK = "127.0.0.1"
LISTENING = re.compile(r"DevTools listening on (ws://\S+)")

# Evaluated in the page: every <img>, whether it finished loading and decoded to real pixels.
IMAGES_SCRIPT = """Array.from(document.images).map(image => ({
    alt: image.alt, complete: image.complete, naturalWidth: image.naturalWidth,
    naturalHeight: image.naturalHeight, scheme: image.currentSrc.split(':')[0]}))"""


def find_chromium() -> str | None:
    """The first Chromium-family browser on PATH, or None."""
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


class DevToolsError(RuntimeError):
    """The browser did not start, or answered a command with an error."""


class Chromium:
    """A headless Chromium with its own throwaway profile, reachable over CDP on loopback only."""

    def __init__(self, binary: str, profile: Path) -> None:
        self.profile = profile
        self.log_path = profile / "chromium.log"
        arguments = [
            binary,
            "--headless=new",
            f"--remote-debugging-address={LOOPBACK}",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-dev-shm-usage",
            "about:blank",
        ]
        if os.geteuid() == 0:  # Chromium refuses to run its sandbox as root
            arguments.insert(2, "--no-sandbox")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                arguments, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        try:
            self.websocket_url = self._wait_for_endpoint()
        except BaseException:
            self.close()
            raise

    def _wait_for_endpoint(self) -> str:
        """The browser's CDP WebSocket URL, as it announces it, once it is listening on loopback."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DevToolsError(f"chromium exited with {self.process.returncode}: {self.log()[-2000:]}")
            announced = LISTENING.search(self.log())
            if announced:
                if urlsplit(announced.group(1)).hostname != LOOPBACK:
                    raise DevToolsError(f"chromium's DevTools listen beyond loopback: {announced.group(1)}")
                return announced.group(1)
            time.sleep(0.05)
        raise DevToolsError(f"chromium did not open DevTools within {START_TIMEOUT_S} s: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        """End the browser and its helper processes (its own process group), politely, then not."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


class DevTools:
    """A CDP connection: numbered commands, with every event kept for the checks afterwards."""

    def __init__(self, websocket_url: str) -> None:
        # proxy=None: the browser is on loopback; a proxy from the environment must not be asked.
        self.socket: ClientConnection = connect(websocket_url, max_size=None, open_timeout=CALL_TIMEOUT_S, proxy=None)
        self.events: list[dict[str, Any]] = []
        self._next_id = 0

    def call(self, method: str, session_id: str | None = None, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session_id:
            message["sessionId"] = session_id
        self.socket.send(json.dumps(message))
        while True:
            answer = self._receive()
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise DevToolsError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def wait_for(self, method: str, session_id: str, since: int) -> dict[str, Any]:
        """The first event ``method`` of the session from ``self.events[since:]`` on, waiting if need be."""
        seen = since
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == session_id:
                    return event
            seen = len(self.events)
            self._receive()

    def _receive(self) -> dict[str, Any]:
        message = json.loads(self.socket.recv(timeout=CALL_TIMEOUT_S))
        if "id" not in message:
            self.events.append(message)
        return message

    def close(self) -> None:
        self.socket.close()


@dataclass
class PageVisit:
    """What a browser saw while loading one page."""

    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    requested_urls: list[str] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    title: str = ""

    @property
    def problems(self) -> list[str]:
        return self.console_errors + self.exceptions + self.log_errors + self.dialogs


def visit(devtools: DevTools, url: str) -> PageVisit:
    """Load ``url`` in a fresh tab until its load event, then read back its images and title."""
    target = devtools.call("Target.createTarget", url="about:blank")["targetId"]
    session = devtools.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    try:
        for domain in ("Page", "Runtime", "Log", "Network"):
            devtools.call(f"{domain}.enable", session)
        start = len(devtools.events)
        devtools.call("Page.navigate", session, url=url)
        devtools.wait_for("Page.loadEventFired", session, start)
        images = devtools.call("Runtime.evaluate", session, expression=IMAGES_SCRIPT, returnByValue=True)
        title = devtools.call("Runtime.evaluate", session, expression="document.title", returnByValue=True)
        result = _page_visit([e for e in devtools.events[start:] if e.get("sessionId") == session])
        result.images = images["result"]["value"]
        result.title = title["result"]["value"]
        return result
    finally:
        devtools.call("Target.closeTarget", targetId=target)


def _page_visit(events: list[dict[str, Any]]) -> PageVisit:
    result = PageVisit()
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            arguments = params.get("args", [])
            result.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in arguments))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            result.exceptions.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            result.log_errors.append(params["entry"].get("text", ""))
        elif method == "Page.javascriptDialogOpening":
            result.dialogs.append(params.get("message", ""))
        elif method == "Network.requestWillBeSent":
            result.requested_urls.append(params["request"]["url"])
    return result
