"""A job's driver process: stopped by SIGTERM as by an error (:func:`stopped_cleanly`), and Ray
started without losing that (:func:`init_ray`)."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


class Terminated(BaseException):
    """SIGTERM (``ray job stop``, Kubernetes stopping a pod, ``kill``), raised in the main thread
    (see :func:`stopped_cleanly`). A BaseException, as KeyboardInterrupt: nothing catches it on
    its way out."""


@contextlib.contextmanager
def stopped_cleanly() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the block, so a run stopped that way ends as one
    stopped by Ctrl-C does: the shard being written is left without a marker (redone by the next
    run), the run's record says it was stopped, the output's lease is released (the next run
    starts at once, on any host). A second SIGTERM kills at once. In the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated("stopped by SIGTERM")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def init_ray() -> None:
    """``ray.init`` unless Ray is up: the cluster of ``RAY_ADDRESS`` (``ray job submit`` sets it),
    else a local one. Ray's driver replaces SIGTERM's handler with its own, which exits at once
    (after killing a local Ray's processes); a handler the job had installed
    (:func:`stopped_cleanly`) is put back. A local Ray's processes are still stopped when the driver
    exits (Ray's atexit hook)."""
    import ray

    if ray.is_initialized():
        return
    main = threading.current_thread() is threading.main_thread()
    ours = signal.getsignal(signal.SIGTERM) if main else None
    ray.init(ignore_reinit_error=True, log_to_driver=False)
    if main and callable(ours):
        signal.signal(signal.SIGTERM, ours)
