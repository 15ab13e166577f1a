"""The worker process's share of its machine: the cores it may use, the turns that a CPU model and
the threads preparing records take at them, and the memory settings of a long-lived worker.

Everything here is per process, and set up where a worker starts using it (the model handler, the
prepare step), so that it holds on Dataflow and Spark workers as on a laptop.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import platform
import threading
from collections.abc import Iterator

_LOG = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h) and the values set (see ``_keep_large_buffers``).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit systems
_TRIM_THRESHOLD = 256 << 20


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0))


class CoreTurns:
    """Lets a CPU model and the threads preparing records take turns at the cores.

    Both want every core. Interleaved by the scheduler, each of torch's OpenMP parallel regions
    waits at its barrier for whichever of its threads was descheduled, so the model runs much
    slower beside the preparing threads than alone. Taking turns gives each stage all the cores,
    which is what the benchmark's combined ceiling 1/(1/r1 + 1/r2) assumes. A model on a GPU takes
    no turn: there the stages overlap.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._models_running = 0

    @contextlib.contextmanager
    def model_turn(self) -> Iterator[None]:
        with self._changed:
            self._models_running += 1
        try:
            yield
        finally:
            with self._changed:
                self._models_running -= 1
                self._changed.notify_all()

    def wait_for_cores(self) -> None:
        """Block while a CPU model is running in this process."""
        with self._changed:
            self._changed.wait_for(lambda: self._models_running == 0)


CPU_TURNS = CoreTurns()  # one per process: the cores are the process's


_settled = False


def settle_worker_process() -> None:
    """Once per worker process, where its stages start (the prepare step, the model handler):
    memory settings for a process that holds large libraries and passes large buffers around."""
    global _settled
    if _settled:
        return
    _keep_large_buffers()
    # The objects alive now (the modules of torch, transformers, Beam, with their classes and
    # functions: hundreds of thousands) live as long as the process. Frozen, they are left out of
    # every full collection, each of which would scan them all. Objects created later are
    # collected as usual.
    gc.freeze()
    _settled = True


def _keep_large_buffers() -> None:
    """Have glibc's malloc reuse freed buffers of up to 32 MB instead of returning them to the system.

    By default malloc hands buffers over 128 KB to the kernel on free, and adapts that bound only
    for its main arena: the model's activations (megabytes each) and decoded images, allocated in
    the worker's other threads, would be page-faulted in afresh on every pass, and the model's
    passes would take markedly longer in the job than alone (docs/throughput.md). Freed memory up
    to 256 MB is kept for reuse, so the process's footprint stays bounded by its batches. Nothing
    on other C libraries.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    applied = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    if not applied:
        _LOG.warning("glibc refused the malloc settings for large buffers; the models may run slower")
