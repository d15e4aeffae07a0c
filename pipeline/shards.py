"""Inputs as shards: deterministic groups of images that are processed, written and resumed whole.

- a folder or glob of image files: sorted, grouped ``images_per_shard`` at a time (``files-00000``);
- tar shards (``sa_000000.tar``, also gzipped: ``.tar.gz``, ``.tgz``): one shard per tar, named after
  its path under the input folder (``sa_000000``; ``2026-12-01/00000.tar`` is ``2026-12-01__00000``);
- a manifest (``.parquet`` or ``.csv`` with a ``uri`` column): rows grouped like loose files,
  named ``<manifest stem>-00000``.

A shard id names the output's files (``masks/<shard>.parquet``), so it is one file name a local
filesystem takes: at most :data:`SHARD_ID_BYTES` long (a longer one keeps its start and a digest).

An image's name in its shard (its ``image_id`` is ``<shard>/<name>``) is its path under the
input folder (``cam1/0001.jpg``; the file name for a flat folder; for a glob or a manifest, under
the deepest folder its files share) or its path inside its tar, so that two files with one file
name in different folders stay two images.
"""

from __future__ import annotations

import functools
import inspect
import logging
import posixpath
import re
import tarfile
import threading
import time
import zlib
from collections import Counter, OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from .names import name_digest, short_part
from .storage import failure, filesystem, is_glob, list_input, not_there, open_stream, open_uri

log = logging.getLogger(__name__)

TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")  # a file with one of these is a shard of its own
MANIFEST_EXTENSIONS = (".parquet", ".csv")  # an input path with one of these is a manifest
TAR_SIDECAR_EXTENSIONS = (".json",)  # SA-1B tars pair each jpg with its annotation json
READ_ATTEMPTS = 3  # tries per file before its read error is recorded
RETRY_BASE_DELAY_S = 0.5  # doubled after every failed try
# A shard's files are read this many at a time, in threads, while the ones before them decode: an
# object store's latency (tens of ms a request) would otherwise be paid once per image, in turn.
READ_AHEAD = 8
READ_AHEAD_BYTES = 256 * 1024 * 1024  # ...and no more are started while those read hold this much
# Of a shard id: a local output stages "masks/<id>.parquet" as "<id>.parquet.<32 hex>.tmp" (45 bytes
# more; a file name may be 255), and a manifest's shards add "-00000" to its name.
SHARD_ID_BYTES = 160
LOOSE_FILES_ID = re.compile(r"files-\d{5,}")  # the loose files' shards of a listing, numbered as they come


@dataclass(frozen=True)
class Shard:
    shard_id: str  # unique within the run; names the output files
    kind: str  # "files" (uris are images) or "tar" (uris is one tar file)
    uris: Tuple[str, ...]
    root: Optional[str] = None  # "files": images are named by their path under it (None: file name)
    # Per uri, what besides the uri decides its masks: jobs.prompt, the image's boxes; jobs.generate,
    # the file's listing fingerprint (size and ETag or modification time, see pipeline.storage.fingerprint).
    digests: Optional[Tuple[Optional[str], ...]] = None

    def name_of(self, uri: str) -> str:
        """The name of the image at ``uri`` (a member of a "files" shard) within the shard."""
        if self.root is None:
            return posixpath.basename(uri)
        return uri[len(self.root) + 1 :] if uri.startswith(self.root + "/") else uri


def common_root(uris: Sequence[str]) -> str:
    """The deepest folder that holds every one of ``uris`` ("" if they share none)."""
    folders = [u.split("/")[:-1] for u in uris]
    common: List[str] = []
    for parts in zip(*folders):
        if any(p != parts[0] for p in parts):
            break
        common.append(parts[0])
    return "/".join(common)


def naming_root(folder: Optional[str], uris: Sequence[str]) -> str:
    """The folder the images of an input (its files ``uris``) are named under: the input folder
    itself (``folder``, its full URI: :attr:`pipeline.storage.Listing.folder`), so that names stay as the folder
    gains subfolders (a bucket holding only ``2026-11-24/`` names its images ``2026-11-24/a.jpg``,
    as it will once ``2026-11-25/`` arrives); for a glob or a single file (``folder`` None), the
    deepest folder common to ``uris``."""
    return folder if folder is not None else common_root(uris)


def discover_shards(
    input_uri: str, images_per_shard: int = 64, storage_options: Optional[Mapping[str, Any]] = None,
    output_uri: Optional[str] = None,
) -> List[Shard]:
    """Shards of ``input_uri``: a folder, a glob, a single tar/manifest, or a folder of tars
    (files under ``output_uri`` left out: see :func:`pipeline.storage.list_input`). The shards of a listing carry
    each file's :func:`fingerprint` as its digest (a manifest's do not: it is not listed)."""
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}.")
    if input_uri.endswith(MANIFEST_EXTENSIONS) and (not is_glob(input_uri) or _is_file(input_uri, storage_options)):
        return _manifest_shards(input_uri, images_per_shard, storage_options)  # "list [2024].csv" too
    listing = list_input(input_uri, storage_options, output_uri)
    fingerprints = listing.fingerprints
    uris = list(fingerprints)
    tars = [u for u in uris if u.endswith(TAR_EXTENSIONS)]
    others = [u for u in uris if not u.endswith(TAR_EXTENSIONS)]
    root = naming_root(listing.folder, others)
    groups = [tuple(others[i : i + images_per_shard]) for i in range(0, len(others), images_per_shard)]
    files = [Shard(f"files-{n:05d}", "files", members, root, tuple(fingerprints[u] for u in members))
             for n, members in enumerate(groups)]
    ids = tar_shard_ids(tars, naming_root(listing.folder, tars))
    shards = [Shard(i, "tar", (u,), digests=(fingerprints[u],)) for i, u in zip(ids, tars)] + files
    ids = [s.shard_id for s in shards]
    if len(set(ids)) != len(ids):  # only where two digests of ten hex digits meet
        raise ValueError(f"Two input shards share a name: {sorted(i for i in ids if ids.count(i) > 1)}.")
    return shards


def tar_shard_ids(tars: Sequence[str], root: str) -> List[str]:
    """The shard ids of the tars at ``tars`` (full URIs under the folder ``root``): each tar's
    path under ``root`` without its extension, its folders joined by "__" (``sa_000000.tar`` is
    ``sa_000000``, ``2026-12-01/00000.tar`` is ``2026-12-01__00000``), at most
    :data:`SHARD_ID_BYTES` long (:func:`pipeline.names.short_part`). Where ids would meet (each
    other's: ``a/b.tar`` and ``a__b.tar``; the loose files' shards': ``files-00003.tar``), each
    of those tars gets "~" and a digest of its path after its id."""
    paths = [u[len(root) + 1 :] if root and u.startswith(root + "/") else posixpath.basename(u) for u in tars]
    plain = [short_part("__".join(p for p in _tar_stem(path).split("/") if p not in ("", ".")) or "_",
                        SHARD_ID_BYTES - 11) for path in paths]
    count = Counter(plain)
    return [i if count[i] == 1 and not LOOSE_FILES_ID.fullmatch(i) else f"{i}~{name_digest(path)}"
            for i, path in zip(plain, paths)]


def _is_file(uri: str, storage_options: Optional[Mapping[str, Any]]) -> bool:
    fs, path = filesystem(uri, storage_options)
    return fs.isfile(path)


def _manifest_shards(uri: str, images_per_shard: int, storage_options) -> List[Shard]:
    import pyarrow as pa

    from .output import read_csv, read_parquet

    try:
        with open_uri(uri, "rb", storage_options) as f:
            table = read_parquet(f) if uri.endswith(".parquet") else read_csv(f)
    except pa.ArrowInvalid as e:  # not a table of that format: name the file
        raise ValueError(f"Manifest {uri!r}: {e}") from None
    if "uri" not in table.column_names:
        raise ValueError(f"Manifest {uri!r} has no 'uri' column (columns: {table.column_names}).")
    uris = [u for u in table.column("uri").to_pylist()]
    if any(not u for u in uris):
        raise ValueError(f"Manifest {uri!r} has empty 'uri' values.")
    repeated = [u for u, n in Counter(uris).items() if n > 1]
    if repeated:
        raise ValueError(f"Manifest {uri!r} lists {len(repeated)} uri(s) more than once (e.g. {repeated[:3]}); "
                         "each image must be listed once.")
    stem = short_part(posixpath.splitext(posixpath.basename(uri))[0], SHARD_ID_BYTES - 8)  # "-00000" after it
    root = common_root(uris)
    return [
        Shard(f"{stem}-{i // images_per_shard:05d}", "files", tuple(uris[i : i + images_per_shard]), root)
        for i in range(0, len(uris), images_per_shard)
    ]


MISSING = "FileNotFoundError: "  # how the read error of a file that is not there begins


def read_error_reason(read_error: str) -> str:
    """The ``error_reason`` of a file that could not be read: "missing" (it is not there: a
    manifest or prompts file naming a file not yet uploaded, or deleted), else "unreadable" (a
    storage or network error after retries, a tar cut short)."""
    return "missing" if read_error.startswith(MISSING) else "unreadable"


def _read_with_retries(uri: str, opts: Dict[str, Any]) -> Tuple[Optional[bytes], Optional[str]]:
    """(bytes, None), or (None, reason) after READ_ATTEMPTS failures; a file not there fails at
    once (:func:`~pipeline.storage.not_there`: over HTTP, a 404 or 410, not a 503)."""
    delay = RETRY_BASE_DELAY_S
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return read_file(uri, opts), None
        except Exception as e:  # transient object-store and network errors, unless the file is not there
            if not_there(e):
                return None, _missing(uri, e)
            error = failure(e)
        if attempt == READ_ATTEMPTS:
            return None, f"{type(error).__name__} after {attempt} attempts: {error}"
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def _missing(uri: str, error: BaseException) -> str:
    return f"{MISSING}{error}" if isinstance(error, FileNotFoundError) else f"{MISSING}{uri} ({error})"


def read_file(uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> bytes:
    """The bytes of the file at ``uri`` in one request: an object store's GET, where an ``open``
    and ``read`` would ask for its size first (a HEAD, a second round trip), and so would s3fs's
    ``cat_file`` since its parallel downloads (fsspec/s3fs#1007, 2026), to fetch a file over its
    block size in parts, unless told ``max_concurrency=1``."""
    fs, path = filesystem(uri, storage_options)
    return fs.cat_file(path, **_one_request(type(fs)))


@functools.lru_cache(maxsize=None)
def _one_request(fs_class: type) -> Dict[str, Any]:
    """What a filesystem class's ``cat_file`` needs to read a file in one request."""
    try:
        takes = "max_concurrency" in inspect.signature(fs_class._cat_file).parameters
    except (AttributeError, TypeError, ValueError):  # not an async filesystem
        takes = False
    return {"max_concurrency": 1} if takes else {}


def read_ahead(uris: Sequence[str], opts: Dict[str, Any]) -> Iterator[Tuple[Optional[bytes], Optional[str]]]:
    """:func:`_read_with_retries` of each uri, in order, with up to ``READ_AHEAD`` read at once in
    threads, fewer while those read ahead hold ``READ_AHEAD_BYTES`` (a read not yet done counted
    as the largest file read so far). Reads not yet started when the caller stops are cancelled."""
    pool = ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="read-ahead")
    window: Deque[Future] = deque()
    todo = iter(uris)
    largest = 0
    try:
        while True:
            while len(window) < READ_AHEAD:
                sizes = [len(f.result()[0] or b"") if f.done() else None for f in window]
                largest = max([largest] + [n for n in sizes if n is not None])
                if sum(largest if n is None else n for n in sizes) >= READ_AHEAD_BYTES:
                    break
                uri = next(todo, None)
                if uri is None:
                    break
                window.append(pool.submit(_read_with_retries, uri, opts))
            if not window:
                return
            yield window.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


MemberRange = Optional[Tuple[int, int]]  # (offset, size) of a tar member's data in its uncompressed tar
ShardFile = Tuple[str, str, Optional[bytes], Optional[str], MemberRange]  # name, uri, bytes, read error, range


def iter_shard_files(shard: Shard, storage_options: Optional[Mapping[str, Any]] = None) -> Iterator[ShardFile]:
    """(name, uri, bytes, read_error, member_range) for every image of the shard, in order;
    ``member_range``: where a member of an uncompressed tar lies in it (for ranged reads later,
    :func:`read_source`), else None.

    A file that cannot be read gives ``bytes=None`` and the reason; tar sidecar ``.json`` files
    (SA-1B annotations) are not images and are passed over. A tar that cannot be read to its end
    (missing, truncated, corrupt) gives its readable members and then one such record for itself.
    """
    opts: Dict[str, Any] = dict(storage_options or {})
    if shard.kind == "files":
        for uri, (data, error) in zip(shard.uris, read_ahead(shard.uris, opts)):
            yield shard.name_of(uri), uri, data, error, None
        return
    (tar_uri,) = shard.uris
    yield from _iter_tar(tar_uri, opts)


class _CheckedTarInfo(tarfile.TarInfo):
    """A TarInfo that notes on its archive (``bad_end``) a partial or invalid header after the
    first member: ``tarfile`` takes either as the end of the archive and stops without a word,
    which would drop the rest of a truncated or corrupt tar silently. A zero block (the proper
    end) or nothing at all at a block boundary (tar tools accept that too) is an end."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
            tar.bad_end = e
            raise


def _iter_tar(tar_uri: str, opts: Dict[str, Any]) -> Iterator[ShardFile]:
    """:func:`iter_shard_files` for a tar: its image members in order and, if the tar cannot be
    read to its end, one more record named after the tar with the reason (the members before it
    are kept). Errors other than missing or corrupt data are retried (``READ_ATTEMPTS`` reads
    from the start, members already given passed over)."""
    name = posixpath.basename(tar_uri)
    ranged = tar_uri.endswith(".tar")  # a gzipped tar's offsets are of its uncompressed stream
    given, member_name = 0, None  # image members yielded; the member being read
    delay = RETRY_BASE_DELAY_S
    for attempt in range(1, READ_ATTEMPTS + 1):
        seen = 0
        try:
            with open_stream(tar_uri, opts) as f, \
                    tarfile.open(fileobj=f, mode="r|*", tarinfo=_CheckedTarInfo) as tar:
                for member in tar:
                    if not member.isfile() or member.name.endswith(TAR_SIDECAR_EXTENSIONS):
                        continue
                    seen += 1
                    if seen <= given:
                        continue
                    member_name = member.name
                    data = tar.extractfile(member).read()
                    given, member_name = given + 1, None
                    yield (_member_path(member.name), f"{tar_uri}#{member.name}", data, None,
                           (member.offset_data, member.size) if ranged else None)
                bad_end = getattr(tar, "bad_end", None)
            if bad_end is not None:
                yield name, tar_uri, None, _tar_error(given, member_name, bad_end, "truncated or corrupt"), None
            return
        except (tarfile.TarError, EOFError, zlib.error) as e:  # the bytes are bad: reading again would not help
            yield name, tar_uri, None, _tar_error(given, member_name, e, "truncated or corrupt"), None
            return
        except Exception as e:  # transient object-store and network errors, unless the tar is not there
            if not_there(e):
                yield name, tar_uri, None, _missing(tar_uri, e), None
                return
            error = failure(e)
        if attempt == READ_ATTEMPTS:
            yield name, tar_uri, None, _tar_error(given, member_name, error, f"unreadable after {attempt} attempts"), None
            return
        time.sleep(delay)
        delay *= 2


def _tar_stem(name: str) -> str:
    """A tar's name or path without its extension ("d/sa_000000.tar.gz" -> "d/sa_000000")."""
    return name[: -len(next(e for e in TAR_EXTENSIONS if name.endswith(e)))]


def _member_path(name: str) -> str:
    """A tar member's path as its image name ("./a/b.jpg" -> "a/b.jpg")."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _tar_error(given: int, member: Optional[str], error: BaseException, what: str) -> str:
    where = f"reading member {member!r}" if member else "reading a member header"
    return f"tar {what}: {given} image(s) read, then {where}: {type(error).__name__}: {error}"


_TAR_INDEXES: "OrderedDict[str, Dict[str, Tuple[int, int]]]" = OrderedDict()  # tar uri -> member -> (offset, size)
TAR_INDEXES_KEPT = 16
_TAR_INDEXES_LOCK = threading.Lock()


def tar_index(tar_uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> Dict[str, Tuple[int, int]]:
    """{member name: (offset of its data, size)} of an uncompressed tar, from one scan of its
    headers (the data in between is seeked over), kept for the last ``TAR_INDEXES_KEPT`` tars. A
    name that repeats maps to its first member, the one the run took (later ones are
    ``duplicate_name`` rows)."""
    with _TAR_INDEXES_LOCK:
        if tar_uri in _TAR_INDEXES:
            _TAR_INDEXES.move_to_end(tar_uri)
            return _TAR_INDEXES[tar_uri]
    index: Dict[str, Tuple[int, int]] = {}
    with open_uri(tar_uri, "rb", storage_options) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
            if m.isfile():
                index.setdefault(m.name, (m.offset_data, m.size))
    with _TAR_INDEXES_LOCK:
        _TAR_INDEXES[tar_uri] = index
        while len(_TAR_INDEXES) > TAR_INDEXES_KEPT:
            _TAR_INDEXES.popitem(last=False)
    return index


def member_range(image: Mapping[str, Any]) -> MemberRange:
    """The recorded ``(offset, size)`` of an images-table row's tar member, or None (a file, a
    gzipped tar, a table of an earlier version)."""
    offset, size = image.get("member_offset"), image.get("member_size")
    return None if offset is None or size is None else (int(offset), int(size))


def _read_recorded_member(tar_uri: str, member: str, member_range: Tuple[int, int],
                          opts: Dict[str, Any]) -> Optional[bytes]:
    """The data of ``member`` at its recorded ``(offset, size)`` in ``tar_uri``, read with the
    header block before it in one ranged read; None where that header is not the member's (the
    tar was rewritten since the run) or cannot be read there."""
    offset, size = member_range
    if offset < tarfile.BLOCKSIZE:
        return None
    fs, path = filesystem(tar_uri, opts)
    try:
        block = fs.cat_file(path, start=offset - tarfile.BLOCKSIZE, end=offset + size)
        info = tarfile.TarInfo.frombuf(block[: tarfile.BLOCKSIZE], tarfile.ENCODING, "surrogateescape")
    except (OSError, ValueError, tarfile.HeaderError):
        return None
    # A name over 100 bytes has its whole form in a header before this one; this one holds its start.
    names_it = info.name == member or (len(info.name) >= 99 and member.startswith(info.name))
    if len(block) != tarfile.BLOCKSIZE + size or info.size != size or not names_it:
        return None
    return block[tarfile.BLOCKSIZE :]


def tar_of_member(uri: str) -> Optional[str]:
    """The tar of an images-table ``uri`` of a tar member (``<tar uri>#<member>``), else None:
    the ``uri`` up to the first "#" that follows a tar's extension, since a folder's name may hold
    a "#" too (``batch #3/sa_000.tar#a.jpg``), and so may the member's."""
    for cut in (i for i, c in enumerate(uri) if c == "#"):
        if uri[:cut].endswith(TAR_EXTENSIONS):
            return uri[:cut]
    return None


def read_source(uri: str, storage_options: Optional[Mapping[str, Any]] = None,
                member_range: MemberRange = None) -> bytes:
    """Bytes of an images-table ``uri``: a file, or ``<tar uri>#<member>``. A member of an
    uncompressed tar is read at its offset: ``member_range`` as the run recorded it (the images
    table's ``member_offset``, ``member_size``), one ranged read that also takes the member's
    header and checks that it still names the member; without it, or where the tar changed
    since, :func:`tar_index` (one scan of the tar's headers: on an object store, about the whole
    tar's bytes), then one ranged read per image. A gzipped tar has no offsets, so it is read
    from its start up to the member."""
    opts = dict(storage_options or {})
    tar_uri = tar_of_member(uri)
    if tar_uri is not None:
        member = uri[len(tar_uri) + 1 :]
        if tar_uri.endswith(".tar"):
            if member_range is not None:
                data = _read_recorded_member(tar_uri, member, member_range, opts)
                if data is not None:
                    return data
            if member not in tar_index(tar_uri, opts):
                raise FileNotFoundError(f"{member} not in {tar_uri}")
            offset, size = tar_index(tar_uri, opts)[member]
            fs, path = filesystem(tar_uri, opts)
            return fs.cat_file(path, start=offset, end=offset + size)  # one ranged read, no read-ahead
        with open_stream(tar_uri, opts) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for m in tar:
                if m.name == member:
                    return tar.extractfile(m).read()
        raise FileNotFoundError(f"{member} not in {tar_uri}")
    return read_file(uri, opts)
