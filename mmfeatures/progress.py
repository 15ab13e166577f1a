"""Progress lines for long runs: each worker logs its running count and rate now and then."""

from __future__ import annotations

import logging
import time

_LOG = logging.getLogger("mmfeatures.progress")


class Progress:
    """Counts items and logs ``"<what>: N (rate/s)"`` every time the count passes a multiple of
    ``every``. The clock starts at the first item, on the worker, not where the job was built."""

    def __init__(self, what: str, every: int):
        self.what = what
        self.every = every
        self.count = 0
        self.started: float | None = None

    def add(self, items: int = 1) -> None:
        if self.started is None:
            self.started = time.monotonic()
        before, self.count = self.count, self.count + items
        if before // self.every != self.count // self.every:
            rate = self.count / max(time.monotonic() - self.started, 1e-9)
            _LOG.info("%s: %d by this worker (%.1f/s)", self.what, self.count, rate)
