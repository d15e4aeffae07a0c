"""One run at a time writes into an output: a lease file it holds while it runs.

Two runs into one output (a job submitted twice, a retried submitter while the first driver still
runs) would do every pending shard twice and write the same files at once: on a shared filesystem
two writers of one masks file leave it corrupt, under a marker that says it is complete; an
``--overwrite`` run would delete the other's shards as it writes them. So a run takes the output's
lease before it looks at what is pending (and before ``--overwrite`` clears anything):

    <output>/_lease.json   {"run_id", "host", "pid", "pid_start" (see process_start), "started",
                            "renewed" (unix seconds)}

The holder renews it every ``RENEW_S`` seconds and removes it at the end, whatever the outcome. A
lease whose run has ended without removing it (its driver was killed) is taken over with a
warning: at once when that run was on this host (its process is gone; drivers of ``ray job
submit`` all run on the head node), else once it has not been renewed for ``EXPIRY_S`` seconds
(its node was lost). Two runs starting together both write theirs; after ``SETTLE_S`` seconds each
reads the file back and only the one it names goes on. Before each shard is marked complete the
holder checks that the lease is still its own (a driver that stalled past the expiry and was
taken over stops there). Timestamps are compared across machines, so their clocks must agree to
well within ``EXPIRY_S`` (NTP does).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from typing import Any, Dict, Optional

from .storage import remove, write_whole

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
RENEW_S = 20.0
EXPIRY_S = 120.0
SETTLE_S = 1.0


class OutputBusyError(RuntimeError):
    """Another run holds the output's lease, or took it over from this run."""


class RunLease:
    """The lease of one run on the output folder ``path`` of filesystem ``fs`` (see the module).
    Use as a context manager: acquired on entry, renewed in a background thread, released on exit."""

    def __init__(self, fs: Any, path: str, renew_s: float = RENEW_S, expiry_s: float = EXPIRY_S,
                 settle_s: float = SETTLE_S) -> None:
        self.fs, self.path = fs, posixpath.join(path.rstrip("/"), LEASE_FILE)
        self.renew_s, self.expiry_s, self.settle_s = renew_s, expiry_s, settle_s
        self.run_id = uuid.uuid4().hex
        self.record = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                       "pid_start": process_start(os.getpid()), "started": time.time()}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lost: Optional[Dict[str, Any]] = None  # the lease that replaced ours

    def __enter__(self) -> "RunLease":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def holder(self) -> Optional[str]:
        """The run that holds the lease now, as :func:`describe` says it; None if no run does (none
        wrote one, or its run ended or stopped renewing it: a new run would take it over)."""
        held = self._read()
        if held is None or self._lapse(held):
            return None
        return f"{describe(held)}, lease renewed {time.time() - held['renewed']:.0f} s ago"

    def holder_id(self) -> Optional[str]:
        """The id of the run that holds the lease now, None if no run does (as :meth:`holder`)."""
        held = self._read()
        return None if held is None or self._lapse(held) else held["run_id"]

    def _lapse(self, held: Dict[str, Any]) -> Optional[str]:
        """Why lease ``held`` no longer holds ("ended without removing it": its run on this host
        has ended; "stopped renewing it 130 s ago"), or None while its run holds it."""
        if held.get("host") == socket.gethostname() and not process_alive(held.get("pid"), held.get("pid_start")):
            return "ended without removing it"
        age = time.time() - held["renewed"]
        return f"stopped renewing it {age:.0f} s ago" if age >= self.expiry_s else None

    def acquire(self) -> None:
        """Take the lease, or raise :class:`OutputBusyError` naming the run that holds it."""
        held = self._read()
        if held is not None:
            age = time.time() - held["renewed"]
            lapse = self._lapse(held)
            if lapse is None:
                here = held.get("host") == socket.gethostname()
                raise OutputBusyError(
                    f"Another run is writing into this output ({describe(held)}, lease renewed {age:.0f} s ago; "
                    f"{self.path}). Two runs into one output would write the same shards at once. Wait for it to "
                    "finish" + (f" or stop it (process {held.get('pid')} on this host)." if here else
                                f"; if it was killed, its lease lapses {self.expiry_s - age:.0f} s from now and a "
                                "new run takes over."))
            log.warning("Taking over the lease of a run that %s (%s).", lapse, describe(held))
        self._write()
        time.sleep(self.settle_s)  # a run that started with us has written its lease by now
        held = self._read()
        if held is None or held["run_id"] != self.run_id:
            raise OutputBusyError(f"Another run started writing into this output at the same time "
                                  f"({describe(held) if held else 'its lease is gone'}; {self.path}); it goes on, "
                                  "this one stops.")
        self._thread = threading.Thread(target=self._renew, name="run-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise :class:`OutputBusyError` if another run has taken the lease from this one."""
        if self._lost is not None:
            raise OutputBusyError(f"This run stopped renewing its lease on the output for over {self.expiry_s:.0f} s "
                                  f"and another run took it over ({describe(self._lost)}); this run stops so that the "
                                  "two do not write the same shards. The other run completes the output.")

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            held = self._read()
            if held is not None and held["run_id"] == self.run_id:
                remove(self.fs, self.path)
        except Exception:  # never hide the run's own outcome; the lease lapses on its own
            log.warning("Could not remove the lease %s; it lapses in %.0f s.", self.path, self.expiry_s, exc_info=True)

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                held = self._read()
                if held is not None and held["run_id"] != self.run_id:
                    self._lost = held
                    return
                self._write()
            except Exception:  # a storage hiccup: try again at the next renewal
                log.warning("Could not renew the lease %s.", self.path, exc_info=True)

    def _write(self) -> None:
        """Write the lease whole (:func:`pipeline.storage.write_whole`), so that two runs writing
        at once leave one run's lease, not a mix of their bytes."""
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        write_whole(self.fs, self.path, json.dumps(dict(self.record, renewed=time.time())).encode())

    def _read(self) -> Optional[Dict[str, Any]]:
        """The lease in the file, or None if there is none. A file caught mid-write is read again."""
        for attempt in range(3):
            try:
                held = json.loads(self.fs.cat_file(self.path))
                if isinstance(held, dict) and {"run_id", "renewed"} <= set(held):
                    return held
            except FileNotFoundError:
                return None
            except ValueError:
                pass
            time.sleep(0.2 * (attempt + 1))
        raise OutputBusyError(f"The lease file {self.path} is not a lease this code wrote; remove it if no run is "
                              "writing into this output.")


def check_holder(fs: Any, path: str, run_id: str) -> None:
    """Raise :class:`OutputBusyError` unless the lease on the folder ``path`` is run ``run_id``'s:
    :meth:`RunLease.check` for a worker process of that run (a Ray task), read from the file."""
    lease = RunLease(fs, path)
    held = lease._read()
    if held is None or held["run_id"] != run_id:
        raise OutputBusyError(f"The lease {lease.path} is no longer this run's ({describe(held) if held else 'it is gone'})"
                              "; this run stops so that the two do not write the same files.")


def describe(held: Dict[str, Any]) -> str:
    """A lease as "run 3f2a... on host node-1, pid 4242, started 2026-11-24 07:30:00 UTC"."""
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(held.get("started", 0)))
    return f"run {str(held.get('run_id'))[:8]} on host {held.get('host')}, pid {held.get('pid')}, started {started}"


def process_start(pid: int) -> Optional[int]:
    """When process ``pid`` started (clock ticks after boot, from /proc; None where there is none):
    with the pid, it names a process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: Any, start: Optional[int]) -> bool:
    """Whether process ``pid`` of this host, started at ``start`` (:func:`process_start`; None:
    not known), is still running (a zombie, killed and not yet reaped, is not)."""
    if not isinstance(pid, int) or pid <= 0:
        return True  # not ours to judge: left to the expiry
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
    except (OSError, IndexError):
        pass
    return start is None or process_start(pid) in (None, start)
