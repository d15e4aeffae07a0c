"""A record of every run into an output, for provenance: ``<output>/_runs/<started>-<run>.json``.

Written when a run has taken the output's lease and knows its shards (``status`` "running"), and
rewritten when it ends: "finished" with what it wrote, or "failed" with the error and what it
wrote before ("stopped" when the error was Ctrl-C or SIGTERM). Each shard's completion marker
names the run that wrote it (``run_id``), so the code version, host and settings behind any
shard can be looked up, and the shards written by a version later found faulty can be found
(``python -m jobs.stats --tables <output> --runs`` lists the runs) and redone (``--redo-run
<id>``, :mod:`pipeline.resuming`)::

    {"run_id": "3f2a9c01...", "job": "generate", "status": "finished",
     "started": "2026-11-24T21:50:03+00:00", "ended": "...", "seconds": 812.4,
     "host": "node-1", "pid": 4242, "versions": {"sam-datagen": "0.1.0", "torch": "...", ...},
     "config": {...the run's settings and resources, without storage options...},
     "identity": {"model": ..., "settings_hash": ...}, "shards_todo": 12,
     "shards_written": ["files-00000", ...], "images": 768, "images_error": 3,
     "error_reasons": {"corrupt": 3}, "masks": 80211, "stage_seconds": {...}}

Storage options (endpoints, credentials) are never recorded.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import posixpath
import socket
import time
from collections import Counter
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence

from .storage import files_in, read_files

if TYPE_CHECKING:
    from .output import OutputDir
    from .shards import Shard

log = logging.getLogger(__name__)

RUNS = "_runs"  # folder of the run records under an output
VERSIONED = ("sam-datagen", "torch", "ray", "pyarrow", "numpy", "pillow", "segment-anything")


def versions() -> Dict[str, str]:
    """Python's and the installed versions of the packages that decide a run's output (the
    driver's: a cluster's nodes run one container image)."""
    from importlib import metadata

    import torch

    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    found["torch"] = torch.__version__  # with its build's tag (2.14.1+cu130)
    return found


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class RunRecord:
    """The record of one run (see the module's docstring): :meth:`finish` or :meth:`fail` at its
    end. A record that cannot be written is logged, never the run's failure."""

    def __init__(self, output: "OutputDir", run_id: str, job: str, config: Mapping[str, Any],
                 todo: Sequence["Shard"]) -> None:
        """``config``: the run's settings and resources (``asdict`` of a ``PipelineConfig``);
        its ``storage_options`` are left out."""
        self.output = output
        self.started = time.perf_counter()
        started = _now()
        self.path = output._p(RUNS, f"{started.replace(':', '')[:17]}-{run_id[:8]}.json")
        settings = {k: v for k, v in config.items() if k != "storage_options"}
        self.record: Dict[str, Any] = {
            "run_id": run_id, "job": job, "status": "running", "started": started, "ended": None,
            "host": socket.gethostname(), "pid": os.getpid(), "versions": versions(), "config": settings,
            "identity": {k: v for k, v in (output.identity or {}).items() if k != "settings"},
            "shards_todo": len(todo),
        }
        self._write()

    @property
    def uri(self) -> str:
        """Where the record is, as the output's URI names it (``s3://bucket/out/_runs/...json``)."""
        return posixpath.join(self.output.uri.rstrip("/"), RUNS, posixpath.basename(self.path))

    def finish(self, written: Sequence[Mapping[str, Any]]) -> None:
        """The run ended: ``written`` holds a dict per shard it wrote (``shard_id``,
        ``images_ok``, ``images_error``, ``errors`` by reason, ``masks``, ``<stage>_s``)."""
        self._end("finished", written)

    def fail(self, error: BaseException, written: Sequence[Mapping[str, Any]]) -> None:
        """The run ended on ``error`` after writing ``written``: "stopped" by Ctrl-C or SIGTERM,
        else "failed"."""
        from .driver import Terminated

        stopped = isinstance(error, (KeyboardInterrupt, Terminated))
        self._end("stopped" if stopped else "failed", written, error=f"{type(error).__name__}: {error}")

    def _end(self, status: str, written: Sequence[Mapping[str, Any]], **extra: Any) -> None:
        reasons: Counter = Counter()
        for shard in written:
            reasons.update(shard.get("errors") or {})
        self.record.update(
            status=status, ended=_now(), seconds=round(time.perf_counter() - self.started, 3),
            shards_written=sorted(s["shard_id"] for s in written),
            images=int(sum(s["images_ok"] + s["images_error"] for s in written)),
            images_error=int(sum(s["images_error"] for s in written)),
            error_reasons=dict(sorted(reasons.items())), masks=int(sum(s["masks"] for s in written)),
            stage_seconds={stage: round(float(sum(s.get(f"{stage}_s", 0.0) for s in written)), 3)
                           for stage in ("decode", "generate", "postprocess")},
            **extra)
        self._write()

    def _write(self) -> None:
        try:
            self.output._put(self.path, json.dumps(self.record, indent=1, default=str).encode())
        except Exception:  # provenance must not fail the run it describes
            log.exception("could not write the run record %s", self.path)


@contextmanager
def recorded(output: "OutputDir", job: str, config: Mapping[str, Any], todo: Sequence["Shard"],
             written: Sequence[Mapping[str, Any]]) -> Iterator[Optional[RunRecord]]:
    """Record the run of the block under ``output`` if it has shards to do and holds the output's
    lease (its id is the run's): finished, or failed with the error the block raised. ``written``:
    the list the block fills with :func:`written_shard` entries. Yields the record (None when
    not recorded)."""
    lease = output.lease
    record = RunRecord(output, lease.run_id, job, config, todo) if todo and lease is not None else None
    try:
        yield record
    except BaseException as e:
        if record is not None:
            record.fail(e, written)
        raise
    if record is not None:
        record.finish(written)


def written_shard(shard_id: str, images: Sequence[Mapping[str, Any]], masks: int) -> Dict[str, Any]:
    """What a run wrote of one shard, from its images rows: the entry :meth:`RunRecord.finish` takes."""
    errors = Counter(str(r.get("error_reason")) for r in images if r.get("status") != "ok")
    return dict(shard_id=shard_id, images_ok=len(images) - sum(errors.values()), images_error=sum(errors.values()),
                errors=dict(sorted(errors.items())), masks=masks,
                **{f"{stage}_s": sum(r.get(f"{stage}_s") or 0.0 for r in images)
                   for stage in ("decode", "generate", "postprocess")})


def read_runs(output: "OutputDir") -> List[Dict[str, Any]]:
    """The run records of an output, oldest first."""
    folder = output._p(RUNS)
    paths = [posixpath.join(folder, name) for name in sorted(files_in(output.fs, folder, ".json"))]
    blobs = read_files(output.fs, paths)
    return [json.loads(blobs[p]) for p in paths]


def shards_by_run(markers: Mapping[str, Mapping[str, Any]]) -> Dict[Optional[str], List[str]]:
    """Completed shard ids by the run that wrote them (None: markers of earlier versions)."""
    by_run: Dict[Optional[str], List[str]] = {}
    for shard_id, marker in sorted(markers.items()):
        by_run.setdefault(marker.get("run_id"), []).append(shard_id)
    return by_run


def runs_report(output: "OutputDir", runs: Sequence[Mapping[str, Any]]) -> List[str]:
    """A line per recorded run, oldest first (``jobs.stats --runs``): when, which job, how it
    ended, what it wrote and how much of that the output still holds as it wrote it (a later
    ``--retry-failed`` or ``--overwrite`` run rewrites shards), and the versions it ran with.
    A record still "running" whose run no longer holds the lease was stopped without ending
    (killed, or its node lost). ``runs``: the output's records (:func:`read_runs`)."""
    from .lease import RunLease

    by_run = shards_by_run(output.markers())
    holder = RunLease(output.fs, output.path).holder_id()
    lines = []
    for r in runs:
        status = r["status"]
        if status == "running" and r["run_id"] != holder:
            status = "stopped without ending (killed, or its node lost)"
        elif status in ("failed", "stopped"):
            status = f"{status} ({r.get('error')})"
        kept = len(by_run.get(r["run_id"], []))
        wrote = ""
        if "shards_written" in r:
            reasons = ", ".join(f"{k} {n}" for k, n in r["error_reasons"].items())
            wrote = (f": {len(r['shards_written'])} of {r['shards_todo']} shards written, {r['images']} images "
                     f"({r['images_error']} errors{': ' + reasons if reasons else ''}), {r['masks']} masks, "
                     f"{r['seconds']:.0f} s")
        versions = ", ".join(f"{k} {r['versions'][k]}" for k in ("sam-datagen", "torch", "ray") if k in r["versions"])
        lines.append(f"{r['started']} {r['job']} run {r['run_id'][:8]} on {r['host']}, {status}{wrote}; "
                     f"the output holds {kept} shard{'s' * (kept != 1)} as it wrote them; {versions}")
    before = len(by_run.get(None, []))
    if before:
        lines.append(f"{before} completed shard{'s' * (before != 1)} written before runs were recorded")
    return lines or ["no runs recorded"]

