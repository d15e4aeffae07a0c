"""The marker index: a compacted copy of an output's shard markers, so that a run's start and end,
``jobs.stats`` and ``jobs.export`` read one file rather than one marker per shard.

    <output>/_done_index.parquet     shard_id, fingerprint, marker (its JSON text); zstd
    <dest>/.export/_index.parquet    the same for an export's markers

10M loose images at 64 per shard are 156k markers: on an object store 156k GETs at each run's
start and end, on a shared filesystem (NFS, EFS, a PVC) 156k opens, one after another.

The index is a cache, never the truth. Each entry carries the fingerprint its marker had in the
listing of ``_done/`` when it was read (size and ETag on S3, generation on GCS, size and mtime on
a local or mounted filesystem: :func:`pipeline.storage.fingerprint`, as for input files), and is
used only while the listing still shows that fingerprint. A marker written, rewritten or removed
since is read, or left out, as the listing says, so a stale, partial or unreadable index costs
reads, never a wrong marker. Only the run holding the output's lease rewrites it (readers may
have read-only credentials); the name starts with "_", so Parquet readers of the output folder
(``pyarrow.dataset``, Spark) pass over it.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import files_in, read_files, write_whole

log = logging.getLogger(__name__)

INDEX_FILE = "_done_index.parquet"
FORMAT_KEY, FORMAT = b"sam_datagen.marker_index", b"1"
SCHEMA = pa.schema([("shard_id", pa.string()), ("fingerprint", pa.string()),
                    ("marker", pa.large_string())],  # 10M loose files: ~2 GB of markers, past 32-bit offsets
                   metadata={FORMAT_KEY: FORMAT})
ROWS = 1024  # markers per row group, read a group at a time: Arrow holds ~12 MB of 64-file markers at once
FEW = 32  # a reader wanting at most this many markers (a gallery's shards) reads them, not the index

Entry = Tuple[str, str]  # (fingerprint, marker JSON text)


def list_markers(fs: Any, marker_dir: str) -> Dict[str, Optional[str]]:
    """The markers in ``marker_dir`` by shard id, with their fingerprints (None where the listing
    has none: such a marker is always read), from one listing."""
    return {name[: -len(".json")]: fp for name, fp in files_in(fs, marker_dir, ".json").items()}


def read_index(fs: Any, path: str) -> Dict[str, Entry]:
    """The entries of the index at ``path`` by shard id; {} where there is none, or one this
    version cannot read (logged: the markers are then read one by one)."""
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return {}
    entries: Dict[str, Entry] = {}
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        found = (parquet.schema_arrow.metadata or {}).get(FORMAT_KEY)
        if found != FORMAT:
            raise ValueError(f"format {found!r}, this version reads {FORMAT!r}")
        for batch in parquet.iter_batches(batch_size=ROWS, columns=SCHEMA.names):
            columns = [batch.column(name).to_pylist() for name in SCHEMA.names]
            entries.update((shard, (fp, marker)) for shard, fp, marker in zip(*columns))
    except (pa.ArrowException, KeyError, ValueError) as e:
        log.warning("Passing over the marker index %s (%s): reading every marker instead.", path, e)
        return {}
    return entries


def write_index(fs: Any, path: str, entries: Mapping[str, Entry]) -> None:
    """Write ``entries`` (shard id -> fingerprint, marker text) as the index at ``path``, whole: on
    a local or mounted filesystem to a name of its own and then renamed into place, so a reader
    never sees half of it (object stores replace an object whole anyway)."""
    shards = sorted(entries)
    table = pa.table([shards, [entries[s][0] for s in shards], [entries[s][1] for s in shards]], schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=ROWS)
    write_whole(fs, path, buf.getvalue())


def load_markers(fs: Any, marker_dir: str, index_path: str, shard_ids: Optional[Sequence[str]] = None,
                 update: bool = False) -> Dict[str, Dict[str, Any]]:
    """The markers in ``marker_dir`` (``<shard id>.json``; those of ``shard_ids`` if given) by
    shard id: one listing, the index at ``index_path``, and one concurrent read of the markers it
    does not hold as listed. ``update`` (the lease holder): rewrite the index when it was not
    current, from a full view only."""
    listed = list_markers(fs, marker_dir)
    wanted = sorted(listed if shard_ids is None else set(listed) & set(shard_ids))
    if not wanted:
        return {}
    index = read_index(fs, index_path) if shard_ids is None or len(wanted) > FEW else {}
    cached = {s: index[s][1] for s in wanted if s in index and listed[s] is not None and index[s][0] == listed[s]}
    unread = [s for s in wanted if s not in cached]
    stale = len(index) != len(cached)
    del index
    texts = cached
    if unread:
        blobs = read_files(fs, [posixpath.join(marker_dir, f"{s}.json") for s in unread])
        while blobs:  # each marker's bytes let go of as it is decoded: memory holds one copy
            path, data = blobs.popitem()
            texts[posixpath.basename(path)[: -len(".json")]] = data.decode()
    if update and shard_ids is None and (unread or stale):
        entries = {s: (listed[s], texts[s]) for s in wanted if listed[s] is not None}
        try:
            write_index(fs, index_path, entries)
        except Exception:  # a cache: a failed write costs the next run reads, not the run
            log.warning("Could not write the marker index %s.", index_path, exc_info=True)
        del entries
    return {s: one_copy_of_each_uri(json.loads(texts.pop(s))) for s in wanted}  # each text let go of as parsed


def one_copy_of_each_uri(marker: Dict[str, Any]) -> Dict[str, Any]:
    """``marker`` with its ``digests`` keyed by the strings of its ``members``: parsed, each URI
    is two strings (a list item and a key), and a driver resuming 10M loose files holds every
    marker (64-file markers: 343 -> 252 bytes a file)."""
    digests = marker.get("digests")
    if isinstance(digests, dict):
        members = {uri: uri for uri in marker.get("members", ())}
        marker["digests"] = {members.get(uri, uri): digest for uri, digest in digests.items()}
    return marker
