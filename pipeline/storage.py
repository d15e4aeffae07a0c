"""Reaching and listing storage through fsspec: filesystems of URIs, an input folder's files
with their fingerprints, listed as the listing pages in, and files streamed with a block read ahead.

A driver lists its whole input before a run and keeps ~0.2 KB of each file (its URI and
fingerprint). fsspec's ``find`` builds its full entry for every file first (~1.4 KB on S3, ~0.8
KB locally: 14 GB at once for 10M files on S3), and s3fs keeps them in its cache for the
instance's life; :func:`files_under` keeps only what a run needs, a page (S3, GCS: 1,000
objects) or a directory entry (local and mounted filesystems) at a time. Other filesystems are
listed with their ``find``, whole, and their cache dropped after.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import uuid
from dataclasses import dataclass
from itertools import islice
from typing import Any, AsyncIterator, BinaryIO, Callable, Dict, List, Mapping, Optional, Tuple

import fsspec
from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)


def _wrappers() -> Tuple[type, ...]:
    try:  # fsspec >= 2025: the base of the filesystems it chains (caches, dirfs, async wrappers)
        from fsspec.implementations.chained import ChainedFileSystem
        return (ChainedFileSystem,)
    except ImportError:
        from fsspec.implementations.cached import CachingFileSystem
        from fsspec.implementations.dirfs import DirFileSystem
        return (CachingFileSystem, DirFileSystem)


def chained(uri: str) -> bool:
    """Whether ``uri`` chains filesystems with "::" as fsspec reads it: its first link is a
    filesystem that wraps the next (``simplecache::s3://b/k``, ``zip://a.csv::s3://b/a.zip``: a
    cache, or an archive opened from a file). Otherwise a "::" is part of a file's name
    (``s3://b/12::30.jpg``, ``/data/x::/y.jpg``), which fsspec would take for a chain and fail
    to open."""
    if "::" not in uri:
        return False
    first = uri.split("::", 1)[0]
    protocol = fsspec.core.split_protocol(first)[0]
    if protocol is None:  # "simplecache::...", or a local path
        return first in fsspec.available_protocols()
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        return False
    return issubclass(cls, _wrappers()) or "fo" in inspect.signature(cls.__init__).parameters


def filesystem(uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> Tuple[Any, str]:
    """``(fsspec filesystem, path)`` of ``uri``; a scheme whose package is not installed
    (``gs://`` without gcsfs) is a ``ValueError`` naming it, before any work is done. A "::" in
    a name is part of the name (:func:`chained`)."""
    opts = dict(storage_options or {})
    try:
        if "::" in uri and not chained(uri):
            cls = fsspec.get_filesystem_class(fsspec.core.split_protocol(uri)[0] or "file")
            return fsspec.filesystem(cls.protocol if isinstance(cls.protocol, str) else cls.protocol[0],
                                     **{**cls._get_kwargs_from_urls(uri), **opts}), cls._strip_protocol(uri)
        return fsspec.core.url_to_fs(uri, **opts)
    except ImportError as e:  # fsspec: "Please install gcsfs to access Google Storage"
        raise ValueError(f"Cannot open {uri!r}: {e} (in every node's environment).") from None


def open_uri(uri: str, mode: str = "rb", storage_options: Optional[Mapping[str, Any]] = None):
    """``fsspec.open(uri, mode)``, with :func:`filesystem`'s ``ValueError`` for a scheme whose
    package is not installed, and a "::" in a name taken as part of it (:func:`chained`)."""
    fs, path = filesystem(uri, storage_options)
    if "::" in uri and not chained(uri):
        return fs.open(path, mode)
    return fsspec.open(uri, mode, **dict(storage_options or {}))


# A file read front to back from S3 or GCS (a tar shard) comes in ranged GETs of this size, the
# next one fetched in a thread while the reader is in the one before: its members decode while the
# next ones download.
STREAM_RANGE_BYTES = 8 * 1024 * 1024
RANGED_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs"})  # stores whose files fsspec reads in ranged GETs


def open_stream(uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> BinaryIO:
    """``uri`` opened to be read front to back. On S3 and GCS with fsspec's "background" cache
    (``STREAM_RANGE_BYTES`` blocks, the next fetched ahead, 2 kept): its default file fetches a
    block (s3fs: 50 MB) only when the reader reaches it, so decoding and downloading would take
    turns. Elsewhere (local, HTTP, chained), :func:`open_uri`."""
    fs, path = filesystem(uri, storage_options)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol not in RANGED_PROTOCOLS:
        return open_uri(uri, "rb", storage_options)
    return fs.open(path, "rb", block_size=STREAM_RANGE_BYTES, cache_type="background", cache_options={"maxblocks": 2})


NOT_FOUND_STATUSES = (404, 410)  # HTTP statuses that say a file is not there


def not_there(error: BaseException) -> bool:
    """Whether a read's ``error`` says the file is not there: a ``FileNotFoundError``, or an
    HTTP 404 or 410 however raised. fsspec's HTTP filesystem raises ``FileNotFoundError`` for any
    HEAD or GET that fails (a 503, a refused connection, a DNS failure, a timeout), with that
    failure as its cause: those are network errors, to be retried, not a missing file."""
    cause = error.__cause__ if isinstance(error, FileNotFoundError) else error
    status = getattr(cause, "status", None)
    if isinstance(status, int):
        return status in NOT_FOUND_STATUSES
    if not isinstance(error, FileNotFoundError):
        return False
    network = isinstance(cause, (OSError, TimeoutError)) or type(cause).__module__.split(".")[0] == "aiohttp"
    return not network or isinstance(cause, FileNotFoundError)


def failure(error: BaseException) -> BaseException:
    """The error to report of a failed read that is not :func:`not_there`: the network error
    behind a ``FileNotFoundError``, else ``error`` itself."""
    if isinstance(error, FileNotFoundError) and error.__cause__ is not None:
        return error.__cause__
    return error


def full_uri(fs: Any, path: str) -> str:
    """``path`` of ``fs`` as a URI that names its filesystem (a local path stays a path)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


FINGERPRINT_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "generation", "mtime", "LastModified", "last_modified",
                    "updated")  # S3, GCS, local and others' listings


def fingerprint(info: Mapping[str, Any]) -> Optional[str]:
    """What tells a stored file's content from another's without reading it, from its listing
    entry: its size and its ETag (S3), checksum or generation (GCS) or modification time (local);
    None where the listing has none of them."""
    for key in FINGERPRINT_KEYS:
        if info.get(key) is not None:
            return f"{info.get('size')}:{info[key]}"
    return None


def forget_listings(fs: Any) -> None:
    """Drop the listings ``fs`` keeps: s3fs and gcsfs cache every entry a ``find``, ``glob`` or
    ``ls`` returned (~1.4 KB per file on S3) for as long as the filesystem instance lives, which
    is the driver's whole run."""
    fs.invalidate_cache()


def _visible(relative: str) -> bool:
    """Whether a file at ``relative`` (its path under the listed folder) is not hidden: no part
    of it starts with "." (``.git/``, an export's ``.export/``)."""
    return not any(part.startswith(".") for part in relative.split("/"))


def files_under(fs: Any, folder: str) -> Dict[str, Optional[str]]:
    """Every file under ``folder`` (a path of ``fs``; subfolders included, hidden files and
    folders left out) as its full URI (:func:`full_uri`) -> :func:`fingerprint`, in the listing's
    order; {} for a folder that holds none, or for a path that is no folder.

    S3 and GCS are listed in one paginated listing (1,000 objects a request, no delimiter), each
    page reduced to what is kept before the next comes in; keys ending in "/" are the
    placeholders a console's "Create folder" writes, folders rather than files, and are left
    out. A local or mounted filesystem is walked a directory entry at a time, hidden folders
    not entered.
    """
    folder = folder.rstrip("/")
    if isinstance(fs, LocalFileSystem):
        return _local_files(fs, folder)
    s3fs, gcsfs = sys.modules.get("s3fs"), sys.modules.get("gcsfs")  # imported where a URI of theirs was opened
    if s3fs is not None and isinstance(fs, s3fs.S3FileSystem):
        return _s3_files(fs, folder)
    if gcsfs is not None and isinstance(fs, gcsfs.core.GCSFileSystem):
        return _gcs_files(fs, folder)
    found = fs.find(folder, detail=True)
    forget_listings(fs)
    base = folder + "/"
    return {full_uri(fs, p): fingerprint(info) for p, info in found.items()
            if p.startswith(base) and not p.endswith("/") and _visible(p[len(base):])}


def _local_files(fs: LocalFileSystem, folder: str) -> Dict[str, Optional[str]]:
    """A symlink to a folder is followed (as ``torchvision``'s ``ImageFolder`` does: datasets
    assembled from links to camera folders), unless it leads back into a folder it lies in."""
    found: Dict[str, Optional[str]] = {}
    if not os.path.isdir(folder):
        return found
    pending: List[Tuple[str, Tuple[str, ...]]] = [(folder, (os.path.realpath(folder),))]  # (folder, real paths to it)
    while pending:
        current, within = pending.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    info = fs.info(entry)  # as fsspec's own listing has it: the same fingerprint
                except FileNotFoundError:  # removed while being listed: not in the input
                    continue
                linked_folder = info["islink"] and entry.is_dir()
                if info["type"] == "directory" or linked_folder:
                    real = os.path.realpath(entry.path)
                    if real in within:
                        log.warning("Not following %s: it links to %s, a folder it lies in.", entry.path, real)
                        continue
                    pending.append((entry.path, within + (real,)))
                else:
                    found[info["name"]] = fingerprint(info)
    return found


def _store_files(fs: Any, folder: str, entries: Callable[[str, str], AsyncIterator[Dict[str, Any]]]
                 ) -> Dict[str, Optional[str]]:
    """The files under ``folder`` of an object store, from ``entries(bucket, prefix)`` (its
    listing entries, a page at a time), each reduced to URI and fingerprint as it comes in."""
    bucket, key, _ = fs.split_path(folder)
    prefix = f"{key}/" if key else ""
    start = len(bucket) + 1 + len(prefix)  # an entry's "name" is "<bucket>/<key>"

    async def collect() -> Dict[str, Optional[str]]:
        found: Dict[str, Optional[str]] = {}
        async for entry in entries(bucket, prefix):
            name = entry["name"]
            if entry["type"] == "file" and not name.endswith("/") and _visible(name[start:]):
                found[full_uri(fs, name)] = fingerprint(entry)
        return found

    return sync(fs.loop, collect)


def _s3_files(fs: Any, folder: str) -> Dict[str, Optional[str]]:
    return _store_files(fs, folder, lambda bucket, prefix: fs._iterdir(bucket, delimiter="", prefix=prefix))


def _gcs_files(fs: Any, folder: str) -> Dict[str, Optional[str]]:
    """GCS's objects.list a page at a time, as gcsfs's ``find`` requests it, each object made the
    entry ``find`` would give (so its fingerprint is the same)."""

    async def entries(bucket: str, prefix: str) -> AsyncIterator[Dict[str, Any]]:
        token = None
        while True:
            page = await fs._call("GET", "b/{}/o", bucket, json_out=True, prefix=prefix or None, maxResults=1000,
                                  pageToken=token)
            for item in page.get("items", []):
                yield fs._process_object(bucket, item)
            token = page.get("nextPageToken")
            if not token:
                return

    return _store_files(fs, folder, entries)


# -- literal paths: fsspec's cat(list), rm and glob take a path holding "*", "?" or "[" for a glob --

def is_glob(path: str) -> bool:
    """Whether fsspec takes ``path`` for a glob: it holds "*", "?" or "["."""
    return any(c in path for c in "*?[")


def files_in(fs: Any, folder: str, suffix: str = "") -> Dict[str, Optional[str]]:
    """The files directly in ``folder`` (not in its subfolders) whose names end with ``suffix``,
    by name, with their fingerprints: one listing (:func:`files_under`), where a glob
    ``<folder>/*<suffix>`` would take ``masks [v2]`` for a pattern (and list ``masks v``)."""
    start = len(full_uri(fs, folder.rstrip("/"))) + 1
    return {uri[start:]: fp for uri, fp in files_under(fs, folder).items()
            if uri.endswith(suffix) and "/" not in uri[start:]}


def read_files(fs: Any, paths: List[str]) -> Dict[str, bytes]:
    """The bytes of each of ``paths`` (of ``fs``) by path, read concurrently where ``fs`` reads
    so (S3): ``cat_ranges`` takes each path as it is, where ``fs.cat`` would glob."""
    paths = list(paths)
    blobs = fs.cat_ranges(paths, None, None) if paths else []
    for blob in blobs:
        if isinstance(blob, BaseException):  # S3 returns a read's error in its place
            raise blob
    return dict(zip(paths, blobs))


def remove(fs: Any, paths: Any, recursive: bool = False) -> None:
    """Remove ``paths`` (a path or a list; with ``recursive``, folders and all under them) as
    the paths they are. On S3 (and other object stores) fsspec's ``rm`` takes a path holding
    "*", "?" or "[" for a glob and removes what that matches: ``out [v2]/masks`` matched, and
    removed, ``out v/masks``. Such paths are listed literally and removed in batches of 1,000
    (S3), or a file at a time."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        return
    if isinstance(fs, LocalFileSystem) or not any(map(is_glob, paths)):  # the local rm takes paths as they are
        fs.rm(paths, recursive=recursive)
        return
    files = sorted({f for p in paths for f in (fs.find(p) if recursive else [p])})
    s3fs = sys.modules.get("s3fs")
    if s3fs is not None and isinstance(fs, s3fs.S3FileSystem):
        for i in range(0, len(files), 1000):  # one bucket: an output's or an export's
            sync(fs.loop, fs._bulk_delete, files[i : i + 1000])
    else:
        for f in files:
            fs.rm_file(f)
    fs.invalidate_cache()


def write_whole(fs: Any, path: str, data: bytes) -> None:
    """Write ``data`` as the file at ``path``, whole: on a local or mounted filesystem to a name
    of its own, then renamed into place, so that a reader never sees half of it and two writers
    at once leave one's bytes, not a mix; an object store replaces an object whole anyway, so
    there it is one PUT (fsspec's ``mv`` there is a copy and an ``rm``, which globs)."""
    if isinstance(fs, LocalFileSystem):
        staged = f"{path}.{uuid.uuid4().hex}.tmp"
        fs.pipe_file(staged, data)
        fs.mv(staged, path)  # os.replace-like, of the paths as they are
    else:
        fs.pipe_file(path, data)


@dataclass(frozen=True)
class Listing:
    """An input's files, sorted, as full URIs with their fingerprints (:func:`fingerprint`), and the input
    folder's full URI when the input is a folder (None for a glob or a single file)."""
    fingerprints: Dict[str, Optional[str]]
    folder: Optional[str]


def list_files(input_uri: str, storage_options: Optional[Mapping[str, Any]] = None,
               output_uri: Optional[str] = None) -> List[str]:
    """Every file under ``input_uri`` (a folder, glob or single file), sorted, as full URIs
    (:func:`list_input` without the fingerprints)."""
    return list(list_input(input_uri, storage_options, output_uri).fingerprints)


def list_input(input_uri: str, storage_options: Optional[Mapping[str, Any]] = None,
               output_uri: Optional[str] = None) -> Listing:
    """Every file under ``input_uri`` (a folder, glob or single file), sorted, as full URIs, with
    its :func:`fingerprint` (from the same listing: no request per file). A folder is listed once
    (:func:`files_under`); a path under which nothing is listed is looked up as a single file.

    Hidden files and folders (names starting with ".") under a folder are skipped; anything else
    is returned, so that a file that is not an image is reported as such rather than silently
    ignored. Files under ``output_uri`` (a run's output
    folder, when it lies inside its input) are the run's own tables, not inputs: left out.
    """
    fs, path = filesystem(input_uri, storage_options)
    folder = None
    fingerprints: Dict[str, Optional[str]] = {}
    if is_glob(path):
        fingerprints = {full_uri(fs, p): fingerprint(i) for p, i in fs.glob(path, detail=True).items()
                        if i.get("type") != "directory" and not p.endswith("/")}
        forget_listings(fs)
    if not fingerprints:  # not a glob, or one matching no file: a folder or file by that name ("photos [2024]")
        fingerprints = files_under(fs, path)
        if fingerprints:
            folder = path.rstrip("/")
        else:
            try:
                info = fs.info(path)
            except FileNotFoundError:
                info = None
            forget_listings(fs)
            if info is not None and info.get("type") != "directory":
                fingerprints = {full_uri(fs, info["name"]): fingerprint(info)}
    if any(a > b for a, b in zip(fingerprints, islice(fingerprints, 1, None))):  # S3 lists in order already
        fingerprints = {u: fingerprints[u] for u in sorted(fingerprints)}
    if output_uri is not None:
        out_fs, out_path = filesystem(output_uri, storage_options)
        inside = full_uri(out_fs, out_path.rstrip("/")) + "/"
        inner = [u for u in fingerprints if u.startswith(inside)]
        if inner:
            log.info("Leaving out %d files under the output folder %s (this run's tables), which lies in the input.",
                     len(inner), output_uri)
            for u in inner:
                del fingerprints[u]
    if not fingerprints:
        raise FileNotFoundError(f"No input files at {input_uri!r}.")
    return Listing(fingerprints, full_uri(fs, folder) if folder is not None else None)
