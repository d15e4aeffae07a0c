"""The two Parquet tables, written per shard, and the completion markers that make runs resumable.

Layout under the output URI::

    masks/<shard>.parquet    one row per mask
    images/<shard>.parquet   one row per input file (ok or error)
    _done/<shard>.json       written last: the shard's members (and their digests: jobs.prompt's
                             boxes), counts (errors by reason), model and settings
    _done_index.parquet      the markers in one file, a cache (pipeline.marker_index)

A shard whose marker exists is complete; data files without a marker are leftovers of an
interrupted run (or a shard being written): readers skip them and the next run rewrites them.
Which shards a run still has to do is :mod:`pipeline.resuming`'s; completed shards made with
another model or settings are refused, so an output never mixes masks of two configurations.
A shard's masks are streamed into its file as row groups while its images arrive
(:class:`ShardWriter`), so a large shard (an SA-1B tar: ~11k images, ~1M masks) is never held
whole in memory.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from .lease import RunLease
from .marker_index import INDEX_FILE, list_markers, load_markers
from .shards import Shard
from .storage import filesystem, remove

MASKS_SCHEMA = pa.schema([
    ("image_id", pa.string()),  # "<shard>/<file name>"
    ("mask_id", pa.int32()),  # index of the mask within its image
    ("counts", pa.string()),  # COCO RLE counts (pycocotools' compressed string)
    ("height", pa.int32()),  # RLE size[0]
    ("width", pa.int32()),  # RLE size[1]
    ("area", pa.int64()),
    ("bbox", pa.list_(pa.float64(), 4)),  # XYWH
    ("predicted_iou", pa.float64()),
    ("stability_score", pa.float64()),
    ("point_coords", pa.list_(pa.float64(), 2)),  # the prompt point (x, y)
    ("crop_box", pa.list_(pa.float64(), 4)),  # XYWH
    ("model", pa.string()),  # model type and checkpoint file name
    ("settings_hash", pa.string()),  # hash of the generator settings
])

IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("uri", pa.string()),  # source file, or "<tar uri>#<member>"
    ("shard", pa.string()),
    ("width", pa.int32()),  # null for errors
    ("height", pa.int32()),
    ("frames", pa.int32()),  # frames or pages in the file (only the first is masked); null for
    # errors and in tables written before this column
    ("mask_count", pa.int32()),
    ("status", pa.string()),  # "ok" or "error"
    ("error_reason", pa.string()),  # short code (see pipeline.decode), null when ok
    ("error_detail", pa.string()),
    ("decode_s", pa.float64()),  # seconds per stage for this image
    ("generate_s", pa.float64()),  # model stage (encoder, decoder, filters, NMS, RLE)
    ("postprocess_s", pa.float64()),  # small-region removal, COCO strings, records
    ("compute_dtype", pa.string()),  # what the model computed in: "float32", "bfloat16" or "float16" (fast
    # mode's "auto" picks by each worker's device); null for errors and in earlier tables
    ("member_offset", pa.int64()),  # a member of an uncompressed tar: where its data lies in the tar,
    ("member_size", pa.int64()),  # for one ranged read (shards.read_source); null for files,
    # gzipped tars and in earlier tables
])
# images columns that tables of earlier versions lack: read as nulls
LATER_COLUMNS = ("frames", "compute_dtype", "member_offset", "member_size")


def first_frame_only(frames: Optional[int]) -> bool:
    """Whether an image's file has frames or pages beyond the one masked (``frames``; None:
    not known)."""
    return frames is not None and frames > 1


def compute_dtypes(images: Sequence[Mapping[str, Any]]) -> Dict[str, int]:
    """The ok images of ``images`` rows by the dtype their masks were computed in
    (``compute_dtype``; "unknown" for rows without it)."""
    counts = Counter(r.get("compute_dtype") or "unknown" for r in images if r.get("status") == "ok")
    return dict(sorted(counts.items()))


def resized_short_side(marker: Optional[Mapping[str, Any]]) -> Optional[int]:
    """The shorter side a completed shard's images were downsampled to (its run's
    ``resize_short_side``), None if they were used as they are: readers of the sources decode
    them as the run did (``decode_image(data, short_side=...)``)."""
    return ((marker or {}).get("settings") or {}).get("resize_short_side")


def masks_to_ipc(rows: Sequence[Dict[str, Any]]) -> bytes:
    """Mask rows as an Arrow IPC stream of ``MASKS_SCHEMA`` (how the stages pass an image's masks)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, MASKS_SCHEMA) as stream:
        stream.write_table(pa.Table.from_pylist(list(rows), schema=MASKS_SCHEMA))
    return sink.getvalue().to_pybytes()


def masks_from_ipc(data: bytes) -> pa.Table:
    """The table of :func:`masks_to_ipc` (no copy of the buffers)."""
    return pa.ipc.open_stream(data).read_all()


T = TypeVar("T")
READ_WORKERS = 8  # shards read at once by the readers (object-store latency, not CPU, bounds them)
READ_AHEAD_BYTES = 64 * 1024 * 1024  # a masks file larger than this is streamed, not read ahead whole

IDENTITY_KEYS = ("model", "settings_hash")  # a marker's and a resuming run's must be equal
# ... and these where both have them (markers of earlier versions; a checkpoint the driver does not see)
OPTIONAL_IDENTITY_KEYS = ("weights",)


def _identity_differs(before: Mapping[str, Any], now: Mapping[str, Any]) -> bool:
    return (any(before[k] != now.get(k) for k in IDENTITY_KEYS) or
            any(k in before and k in now and before[k] != now[k] for k in OPTIONAL_IDENTITY_KEYS))


def _identity_change(before: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """What differs between two identities, e.g. "model vit_h:a.pth -> vit_b:b.pth, points_per_side 32 -> 16"."""
    changes = [f"model {before.get('model')} -> {now.get('model')}"] if before.get("model") != now.get("model") else []
    if before.get("weights") and now.get("weights") and before["weights"] != now["weights"]:
        changes.append(f"weights of the checkpoint {before['weights']} -> {now['weights']} (same name, other tensors)")
    old, new = before.get("settings"), now.get("settings")
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        changes += settings_changes(old, new)
    return ", ".join(changes) or f"settings hash {before.get('settings_hash')} -> {now.get('settings_hash')}"


def settings_changes(before: Mapping[str, Any], now: Mapping[str, Any]) -> List[str]:
    """Settings that differ, e.g. ["points_per_side 32 -> 16", "box_nms_thresh (unset) -> 0.7"]."""
    return [f"{k} {before.get(k, '(unset)')} -> {now.get(k, '(unset)')}"
            for k in sorted(set(before) | set(now)) if str(before.get(k)) != str(now.get(k))]


# Arrow and Python file objects: pyarrow reads a Python file (an fsspec file) from its own IO
# threads (Parquet pre-buffering, CSV read-ahead), and such a thread may hold the last reference
# to it. Releasing it takes the GIL; once the interpreter is finalizing, Python ends the thread with
# pthread_exit, whose unwinding through Arrow's C++ frames is std::terminate: "terminate called
# without an active exception", exit 134 after a run that did all its work (apache/arrow#34314,
# #45017). So Arrow is given bytes in its own memory, or reads the file on the calling thread only.


def arrow_reader(data: bytes) -> pa.BufferReader:
    """``data`` copied into Arrow's memory (no Python object for Arrow's threads to release)."""
    buffer = pa.allocate_buffer(len(data))
    memoryview(buffer).cast("B")[:] = memoryview(data).cast("B")
    return pa.BufferReader(buffer)


BYTES = (bytes, bytearray, memoryview)


def _parquet_file(source: Any) -> Tuple[pq.ParquetFile, bool]:
    """(the Parquet file of ``source``, whether Arrow's threads may read it): bytes are copied into
    Arrow's memory; a file object is read on the calling thread only (no pre-buffering)."""
    if isinstance(source, BYTES):
        return pq.ParquetFile(arrow_reader(source)), True
    return pq.ParquetFile(source, pre_buffer=False), False


def read_parquet(source: Any, columns: Optional[Sequence[str]] = None, optional: Sequence[str] = ()) -> pa.Table:
    """A Parquet file (a file object or its bytes) as a table: all of it (a file object is read
    in one piece, then decoded in Arrow's threads), or only ``columns``, in that order (of a file
    object, only their column chunks are read). ``optional``: columns that a file may lack (added
    in a later version), then read as nulls."""
    if columns is None:
        file, threads = _parquet_file(source if isinstance(source, BYTES) else source.read())
        table = file.read(use_threads=threads)
    else:
        file, threads = _parquet_file(source)
        present = set(file.schema_arrow.names)
        table = file.read(columns=[c for c in columns if c in present or c not in optional], use_threads=threads)
    for name in optional:
        if name not in table.column_names and (columns is None or name in columns):
            table = table.append_column(name, pa.nulls(table.num_rows))
    return table if columns is None else table.select(list(columns))


def iter_parquet(source: Any, batch_rows: int, columns: Optional[Sequence[str]] = None) -> Iterator[pa.RecordBatch]:
    """A Parquet file's record batches (``columns`` or all), ``batch_rows`` at a time, from its
    bytes or streamed from a file object (one too big to hold)."""
    file, threads = _parquet_file(source)
    return file.iter_batches(batch_size=batch_rows, columns=None if columns is None else list(columns),
                             use_threads=threads)


def read_csv(source: Any) -> pa.Table:
    """A CSV file (a file object or its bytes) as a table, read in one piece."""
    import pyarrow.csv as pacsv

    return pacsv.read_csv(arrow_reader(source if isinstance(source, BYTES) else source.read()))


class OutputDir:
    def __init__(self, output_uri: str, storage_options: Optional[Mapping[str, Any]] = None,
                 identity: Optional[Mapping[str, Any]] = None) -> None:
        """``identity``: what decides the masks of the run writing here (``model``,
        ``settings_hash`` and, for messages, ``settings``; see ``PipelineConfig.identity``). It is
        written into every marker and checked against completed shards' markers when resuming.
        Readers leave it out."""
        self.uri = output_uri.rstrip("/")
        self.fs, self.path = filesystem(self.uri, storage_options)
        self.identity = dict(identity) if identity is not None else None
        self.lease: Optional[RunLease] = None  # held by the run writing here (see hold_lease)

    @classmethod
    def of_run(cls, output_uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> "OutputDir":
        """The output folder of a run, for reading its tables. Raises ``FileNotFoundError`` if it
        holds no completed shard: a mistyped path would otherwise read as a run with no images."""
        out = cls(output_uri, storage_options)
        if not out.shard_ids():
            what = "does not exist" if not out.fs.exists(out.path) else "holds no completed shard (no _done/*.json)"
            raise FileNotFoundError(f"{output_uri!r} {what}: expected the output folder of a jobs.generate or "
                                    "jobs.prompt run that has written at least one shard.")
        return out

    @contextmanager
    def hold_lease(self) -> Iterator[RunLease]:
        """Hold the output's lease for the block (:mod:`pipeline.lease`: one run at a time writes
        here; :class:`~pipeline.lease.OutputBusyError` if another does). Shards are marked complete
        only while this run still holds it."""
        with RunLease(self.fs, self.path) as lease:
            self.lease = lease
            try:
                yield lease
            finally:
                self.lease = None

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def marker(self, shard_id: str) -> Optional[Dict[str, Any]]:
        path = self._p("_done", f"{shard_id}.json")
        if not self.fs.exists(path):
            return None
        return json.loads(self.fs.cat_file(path))

    def markers(self, shard_ids: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
        """The markers of the completed shards (of those of ``shard_ids`` if given), by shard id:
        one listing of ``_done/``, the marker index and one concurrent read of the markers it
        does not hold as listed (:mod:`pipeline.marker_index`; one request per shard would make
        resuming a large run slow). The run holding the lease brings the index up to date."""
        return load_markers(self.fs, self._p("_done"), self._p(INDEX_FILE), shard_ids, update=self.lease is not None)

    def is_complete(self, shard: Shard) -> bool:
        """True if ``shard`` was written; raises as :meth:`check_marker` if it cannot be resumed."""
        done = self.marker(shard.shard_id)
        if done is not None:
            self.check_marker(shard, done)
        return done is not None

    def check_marker(self, shard: Shard, done: Mapping[str, Any]) -> None:
        """:meth:`check_members` and :meth:`check_identity`."""
        self.check_members(shard, done)
        self.check_identity(shard.shard_id, done)

    def check_members(self, shard: Shard, done: Mapping[str, Any]) -> None:
        """Raise if the completed shard of ``shard``'s id (its marker ``done``) was written from
        other input files (a tar of the same name elsewhere)."""
        if tuple(done["members"]) != shard.uris:
            members = ", ".join(done["members"][:2]) + (", ..." if len(done["members"]) > 2 else "")
            raise ValueError(
                f"Shard {shard.shard_id} under {self.uri!r} was completed from other input files ({members}) than "
                f"this input's ({', '.join(shard.uris[:2])}{', ...' if len(shard.uris) > 2 else ''}): two inputs "
                "with one name cannot share an output. Write to a new output, or re-run with overwrite "
                "(--overwrite) to redo everything from this input."
            )

    def check_identity(self, shard_id: str, done: Mapping[str, Any]) -> None:
        """Raise if completed shard ``shard_id`` (its marker ``done``) was made with another model
        or settings than this output's ``identity`` (markers written before identities were
        recorded are not checked)."""
        if self.identity is not None and all(k in done for k in IDENTITY_KEYS):
            if _identity_differs(done, self.identity):
                raise ValueError(
                    f"Shard {shard_id} under {self.uri!r} was made with another model or settings than "
                    f"this run ({_identity_change(done, self.identity)}); resuming would mix the two in one "
                    "output. Re-run with overwrite (--overwrite) to redo everything, or write to a new output."
                )

    def count_reasons(self, shard_id: str, reasons: Sequence[str], marker: Optional[Mapping[str, Any]] = None) -> int:
        """Images of a completed shard whose ``error_reason`` is one of ``reasons``: from its
        marker's ``errors`` counts (``marker`` if given), else from its images table."""
        marker = self.marker(shard_id) if marker is None else marker
        if marker is not None and "errors" in marker:
            return sum(n for reason, n in marker["errors"].items() if reason in reasons)
        column = self.read_shard("images", shard_id, ["error_reason"]).column("error_reason").to_pylist()
        return sum(r in reasons for r in column)

    def reopen(self, shard: Shard) -> None:
        """Forget that ``shard`` was completed (remove its marker) before it is written again, so
        that a run stopped while rewriting it leaves no marker over half-written files."""
        path = self._p("_done", f"{shard.shard_id}.json")
        if self.fs.exists(path):
            remove(self.fs, path)

    def clear(self) -> None:
        for sub in ("masks", "images", "_done", INDEX_FILE):
            if self.fs.exists(self._p(sub)):
                remove(self.fs, self._p(sub), recursive=True)

    def open_shard(self, shard: Shard) -> "ShardWriter":
        """A writer for ``shard``'s tables (masks streamed, then images, then the marker)."""
        return ShardWriter(self, shard)

    def write_shard(self, shard: Shard, masks: Sequence[Dict[str, Any]], images: Sequence[Dict[str, Any]]) -> None:
        """Both tables of ``shard`` from rows, then its marker."""
        writer = self.open_shard(shard)
        writer.add_masks(pa.Table.from_pylist(list(masks), schema=MASKS_SCHEMA))
        writer.finish(images)

    def _write_table(self, path: str, rows: Sequence[Dict[str, Any]], schema: pa.Schema) -> None:
        table = pa.Table.from_pylist(list(rows), schema=schema)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self._put(path, buf.getvalue())

    def _put(self, path: str, data: bytes) -> None:
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.fs.pipe_file(path, data)

    def shard_ids(self) -> List[str]:
        """Completed shards, sorted (from one listing, not kept in the filesystem's cache)."""
        return sorted(list_markers(self.fs, self._p("_done")))

    def read_shard(self, name: str, shard_id: str, columns: Optional[Sequence[str]] = None) -> pa.Table:
        """One completed shard's ``masks`` or ``images`` table, or only its ``columns`` (a masks
        table's ``counts`` are most of its bytes: leave them out where they are not needed)."""
        schema = MASKS_SCHEMA if name == "masks" else IMAGES_SCHEMA
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns])
        optional = LATER_COLUMNS if name == "images" else ()
        with self.fs.open(self._p(name, f"{shard_id}.parquet"), "rb") as fh:
            return read_parquet(fh, columns, optional).select(schema.names).cast(schema)

    def masks_file(self, shard_id: str, max_bytes: int = READ_AHEAD_BYTES) -> Optional[bytes]:
        """A completed shard's masks Parquet file, as stored, to read ahead (:meth:`iter_masks`);
        None if it is over ``max_bytes`` (an SA-1B tar's: it is then streamed when its turn comes,
        so that a few shards read ahead do not hold gigabytes)."""
        path = self._p("masks", f"{shard_id}.parquet")
        return None if self.fs.size(path) > max_bytes else self.fs.cat_file(path)

    def iter_masks(self, shard_id: str, data: Optional[bytes] = None, batch_rows: int = 4096) -> Iterator[Dict[str, Any]]:
        """A completed shard's mask rows, in file order, decoded ``batch_rows`` at a time (an SA-1B
        tar's ~1M masks are never held as Python rows at once); from ``data`` (its
        :meth:`masks_file`) if given, else read from the output."""
        path = self._p("masks", f"{shard_id}.parquet")
        with (nullcontext(data) if data is not None else self.fs.open(path, "rb")) as source:
            for batch in iter_parquet(source, batch_rows, MASKS_SCHEMA.names):
                yield from batch.to_pylist()

    def each_shard(self, read: Callable[[str], T], shard_ids: Optional[Sequence[str]] = None,
                   workers: int = READ_WORKERS) -> Iterator[Tuple[str, T]]:
        """(shard id, ``read(shard id)``) for every completed shard (or ``shard_ids``), in order,
        ``workers`` reads at a time in threads: one read after another costs an object store's
        latency per shard (~40 ms: over an hour for 100k shards). At most ``2 * workers`` results
        are held ahead of the consumer."""
        ids = iter(self.shard_ids() if shard_ids is None else shard_ids)
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="read-shards") as pool:
            ahead: deque = deque()
            for shard_id in ids:
                ahead.append((shard_id, pool.submit(read, shard_id)))
                if len(ahead) >= 2 * max(1, workers):
                    shard_id, future = ahead.popleft()
                    yield shard_id, future.result()
            while ahead:
                shard_id, future = ahead.popleft()
                yield shard_id, future.result()

    def masks_of(self, image_ids: Sequence[str], columns: Sequence[str],
                 workers: int = READ_WORKERS) -> Dict[str, List[Dict[str, Any]]]:
        """The mask rows (``columns``, in mask_id order) of ``image_ids`` (``<shard>/<name>``),
        reading the masks tables of their shards only: a reader that needs a few images' masks
        does not read the whole output."""
        wanted = set(image_ids)
        out: Dict[str, List[Dict[str, Any]]] = {i: [] for i in wanted}
        cols = list(dict.fromkeys(["image_id", "mask_id", *columns]))
        shards = sorted({i.split("/", 1)[0] for i in wanted} & set(self.shard_ids()))
        for _, rows in self.each_shard(lambda s: self.read_shard("masks", s, cols).to_pylist(), shards, workers):
            for row in rows:
                if row["image_id"] in wanted:
                    out[row["image_id"]].append(row)
        for rows in out.values():
            rows.sort(key=lambda r: r["mask_id"])
        return out

    def read_table(self, name: str) -> pa.Table:
        """All completed shards' ``masks`` or ``images`` as one table (empty with the schema if none).
        Files of shards without a marker (interrupted or still being written) are left out."""
        schema = MASKS_SCHEMA if name == "masks" else IMAGES_SCHEMA
        tables = [self.read_shard(name, shard_id) for shard_id in self.shard_ids()]
        return pa.concat_tables(tables) if tables else schema.empty_table()


class ShardWriter:
    """Writes one shard: masks as they come (in image order), then the images table, then the
    marker. Masks are buffered up to ``row_group_rows`` and then written as a Parquet row group;
    the file is opened at the first row group, so a small shard is written in one piece."""

    def __init__(self, output: OutputDir, shard: Shard, row_group_rows: int = 65536) -> None:
        self.output, self.shard, self.row_group_rows = output, shard, row_group_rows
        self.masks = 0  # rows added
        self._path = output._p("masks", f"{shard.shard_id}.parquet")
        self._buffer: List[pa.Table] = []
        self._buffered = 0
        self._file = None
        self._writer: Optional[pq.ParquetWriter] = None

    def add_masks(self, table: pa.Table) -> None:
        """Append mask rows (a table of ``MASKS_SCHEMA``)."""
        if table.schema != MASKS_SCHEMA:
            raise ValueError(f"mask rows of shard {self.shard.shard_id} do not have the masks schema: {table.schema}")
        self._buffer.append(table)
        self._buffered += table.num_rows
        self.masks += table.num_rows
        if self._buffered >= self.row_group_rows:
            self._write_buffer()

    def _write_buffer(self) -> None:
        if self._writer is None:
            self.output.fs.makedirs(posixpath.dirname(self._path), exist_ok=True)
            self._file = self.output.fs.open(self._path, "wb")
            self._writer = pq.ParquetWriter(self._file, MASKS_SCHEMA)
        if self._buffered:
            self._writer.write_table(pa.concat_tables(self._buffer), row_group_size=self.row_group_rows)
        self._buffer, self._buffered = [], 0

    def finish(self, images: Sequence[Dict[str, Any]]) -> None:
        """Close the masks file, write the images table and then the marker."""
        self._write_buffer()
        self._writer.close()
        self._file.close()
        if self.output.lease is not None:
            self.output.lease.check()  # another run took the output over: do not mark the shard complete
        self.output._write_table(self.output._p("images", f"{self.shard.shard_id}.parquet"), images, IMAGES_SCHEMA)
        errors = Counter(r.get("error_reason") for r in images if r.get("status") != "ok")
        marker = {"members": list(self.shard.uris), "root": self.shard.root, "images": len(images), "masks": self.masks,
                  "errors": {str(reason): n for reason, n in sorted(errors.items(), key=str)},
                  "first_frame_only": sum(r.get("status") == "ok" and first_frame_only(r.get("frames")) for r in images),
                  "compute_dtypes": compute_dtypes(images),
                  **({"digests": dict(zip(self.shard.uris, self.shard.digests))} if self.shard.digests else {}),
                  **({"run_id": self.output.lease.run_id} if self.output.lease is not None else {}),
                  **(self.output.identity or {})}
        self.output._put(self.output._p("_done", f"{self.shard.shard_id}.json"),
                         json.dumps(marker, default=str).encode())

    def abort(self) -> None:
        """Give up on the shard (the run failed): close and remove its partial masks file."""
        if self._writer is None:
            return
        for close in (self._writer.close, self._file.close):
            try:
                close()
            except Exception:  # already failing; the file is removed (or rewritten next run) anyway
                pass
        if self.output.fs.exists(self._path):
            remove(self.output.fs, self._path)
