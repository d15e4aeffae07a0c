"""Exports of the Parquet tables: SA-1B per-image JSON files, SA-1B-style tar shards (jpg + json)
and COCO instance-segmentation JSON.

``sa1b-json`` and ``sa1b-tar`` export shard by shard, ``workers`` shards at a time (threads of
this process, or Ray tasks over a cluster), and are resumable and incremental. Each exported
shard gets a marker ``<dest>/.export/<shard>.json``, written last (hidden, so a folder of
exported tars stays a valid input folder); it records the tables' marker it was made from and
the ids it used. A run exports the shards without a marker, and those whose tables changed since
(``jobs.generate --retry-failed`` redid them); the rest are left as they are; shards the tables no
longer hold (redone with ``--overwrite``) keep their files unless ``prune`` removes them. Image and
annotation ids follow shard and file order on a first export; shards exported later get ids after
the highest ever given, so ids already handed out are never given to another image or mask.

One export at a time writes into a destination: it holds the lease ``<dest>/.export/lease/``
(:mod:`pipeline.lease`) while it plans and exports.

``coco`` is one file, rewritten whole each time, streamed: memory holds one shard's rows (and
the shards read ahead), not the whole dataset.

Memory per shard being exported: its images rows and one image's masks (mask rows are read in
batches), so an SA-1B tar of ~11k images and ~1M masks is never held whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import pyarrow.compute as pc
from PIL import Image

from sam_core.amg.sa1b import sa1b_document, validate_sa1b

from .decode import decode_image, resized_size
from .driver import init_ray
from .lease import RunLease, check_holder
from .marker_index import load_markers
from .names import name_digest, relative_path
from .output import READ_WORKERS, OutputDir, resized_short_side
from .shards import _iter_tar, read_ahead, tar_of_member
from .storage import files_in, filesystem, full_uri, remove

log = logging.getLogger(__name__)

FORMATS = ("sa1b-json", "sa1b-tar", "coco")
EXPORT_MARKERS = ".export"  # <dest>/.export/<shard>.json, per exported shard
EXPORT_INDEX = "_index.parquet"  # <dest>/.export/_index.parquet, those markers in one file
EXIF_ORIENTATION = 0x0112
COCO_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}
PROGRESS_EVERY_S = 10.0
MAX_FAILURE_LINES = 20


# -- one shard's rows --------------------------------------------------------------------------

def _record(row: Dict[str, Any]) -> Dict[str, Any]:
    """A masks-table row as a generator record (COCO RLE segmentation)."""
    return {
        "segmentation": {"size": [row["height"], row["width"]], "counts": row["counts"]},
        "area": row["area"], "bbox": row["bbox"], "predicted_iou": row["predicted_iou"],
        "stability_score": row["stability_score"],
        "point_coords": [] if row["point_coords"] is None else [row["point_coords"]],  # none: a box prompt
        "crop_box": row["crop_box"],
    }


def ok_images(tables: OutputDir, shard_id: str) -> List[Dict[str, Any]]:
    """The shard's ok images rows, in file order."""
    return [r for r in tables.read_shard("images", shard_id).to_pylist() if r["status"] == "ok"]


def shard_images_with_masks(tables: OutputDir, shard_id: str, images: Sequence[Dict[str, Any]],
                            masks_file: Optional[bytes] = None) -> Iterator[Tuple[Dict[str, Any], List[Dict[str, Any]]]]:
    """(image row, its mask rows in mask_id order) for each of ``images`` (the shard's ok rows,
    in file order). The masks file (``masks_file`` if read already) is decoded in batches; its
    rows come grouped by image in file order, as the run writes them. A mask row of an image not
    in ``images`` (or out of that order), or an image whose ``mask_count`` its rows do not match,
    raises ``ValueError``: an export never drops a mask without a word."""
    rows = tables.iter_masks(shard_id, masks_file)
    pending = next(rows, None)
    for image in images:
        masks = []
        while pending is not None and pending["image_id"] == image["image_id"]:
            masks.append(pending)
            pending = next(rows, None)
        if len(masks) != (image["mask_count"] or 0):
            raise ValueError(f"Shard {shard_id}: image {image['image_id']} has {image['mask_count']} masks in the "
                             f"images table but {len(masks)} rows in the masks table (in file order).")
        yield image, sorted(masks, key=lambda r: r["mask_id"])
    if pending is not None:
        raise ValueError(f"Shard {shard_id}: the masks table has rows of {pending['image_id']!r}, which is not an ok "
                         "image of the shard (or its rows are out of file order).")


def images_with_masks(tables: OutputDir, shard_ids: Optional[Sequence[str]] = None,
                      workers: int = READ_WORKERS) -> Iterator[Tuple[Dict[str, Any], List[Dict[str, Any]]]]:
    """(image row, its mask rows in mask_id order) for every ok image of the completed shards
    (or ``shard_ids``), in shard and file order, ``workers`` shards read ahead."""
    read = lambda s: (ok_images(tables, s), tables.masks_file(s))  # noqa: E731
    for shard_id, (images, masks_file) in tables.each_shard(read, shard_ids, workers):
        yield from shard_images_with_masks(tables, shard_id, images, masks_file)


def export_stems(names: Sequence[str]) -> Dict[str, str]:
    """Per image name of one shard (``cam1/0001.jpg``), the stem its exported files are named by:
    the name without its extension (``cam1/0001``), or the whole name where that would name two
    images alike (``a.jpg`` and ``a.png`` stay ``a.jpg`` and ``a.png``). A stem is a
    :func:`pipeline.names.relative_path`, never leading out of the shard's folder; two names that come to the same
    one (``a//b.jpg``, ``a/b.jpg``) get it once, the other a digest of its name after it."""
    whole = {n: relative_path(n) for n in names}
    stems = {n: posixpath.splitext(whole[n])[0] for n in names}
    while True:
        count = Counter(stems.values())
        clashing = [n for n, stem in stems.items() if count[stem] > 1 and stem != whole[n]]
        if not clashing:
            break
        for n in clashing:
            stems[n] = whole[n]
    count = Counter(stems.values())
    for n in names:  # whole names clash only where relative_path changed one of them
        if count[stems[n]] > 1 and whole[n] != n:
            stems[n] = f"{whole[n]}-{name_digest(n)}"
    return stems


# -- plan: which shards, which ids -------------------------------------------------------------

@dataclass(frozen=True)
class ShardExport:
    """One shard to export: the digest of its tables marker and the ids it gets (its ok images
    are numbered from ``first_image``, their masks from ``first_annotation``; ``*_slots`` ids are
    reserved for it, at least its counts)."""

    shard_id: str
    source: str
    first_image: int
    images: int
    image_slots: int
    first_annotation: int
    annotations: int
    annotation_slots: int


def _digest(marker: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(marker, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _ok_counts(tables: OutputDir, shard_id: str, marker: Mapping[str, Any]) -> Tuple[int, int]:
    """(ok images, masks) of a completed shard: from its marker, or its images table for a marker
    of an earlier version without counts."""
    if all(k in marker for k in ("images", "masks", "errors")):
        return marker["images"] - sum(marker["errors"].values()), marker["masks"]
    images = tables.read_shard("images", shard_id, ["status", "mask_count"])
    ok = images.filter(pc.equal(images.column("status"), "ok"))
    return ok.num_rows, int(pc.sum(ok.column("mask_count")).as_py() or 0)


class ExportDest:
    """The destination of an export and its per-shard markers."""

    def __init__(self, dest_uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> None:
        self.uri = dest_uri.rstrip("/")
        self.fs, self.path = filesystem(self.uri, storage_options)
        self.storage_options = dict(storage_options or {})

    def _marker_path(self, shard_id: str) -> str:
        return posixpath.join(self.path, EXPORT_MARKERS, f"{shard_id}.json")

    def markers(self, update: bool = False) -> Dict[str, Dict[str, Any]]:
        """The exported shards' markers by shard id: one listing, the index of them and one
        concurrent read of those it does not hold (:mod:`pipeline.marker_index`); ``update`` (the
        export holding the lease): bring the index up to date."""
        return load_markers(self.fs, self.full_path(EXPORT_MARKERS), self.full_path(EXPORT_MARKERS, EXPORT_INDEX),
                            update=update)

    def mark(self, plan: ShardExport, fmt: str, tables_uri: str, files: Sequence[str]) -> None:
        self.write_marker(plan.shard_id, {"format": fmt, "tables": tables_uri, **asdict(plan), "files": list(files)})

    def write_marker(self, shard_id: str, marker: Mapping[str, Any]) -> None:
        self.fs.makedirs(posixpath.dirname(self._marker_path(shard_id)), exist_ok=True)
        self.fs.pipe_file(self._marker_path(shard_id), json.dumps(marker).encode())

    def unmark(self, shard_id: str) -> None:
        if self.fs.exists(self._marker_path(shard_id)):
            remove(self.fs, self._marker_path(shard_id))

    def clear_markers(self) -> None:
        """Remove every shard's marker and their index (not the lease beside them)."""
        folder = self.full_path(EXPORT_MARKERS)
        paths = [posixpath.join(folder, name) for name in files_in(self.fs, folder, ".json")]
        remove(self.fs, paths + [p for p in [self.full_path(EXPORT_MARKERS, EXPORT_INDEX)] if self.fs.exists(p)])

    def full_path(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def file_path(self, fmt: str, shard_id: str, name: str) -> str:
        """The path of ``name``, a file a shard's export wrote (as its marker lists it): under
        ``<dest>/<shard>/`` for sa1b-json, ``<dest>/`` for sa1b-tar."""
        return self.full_path(shard_id, name) if fmt == "sa1b-json" else self.full_path(name)

    def files_to_remove(self, fmt: str, shard_id: str, names: Sequence[str]) -> List[str]:
        """:meth:`file_path` of each of ``names``, files an earlier export of the shard wrote, but
        of those that lead out of the destination or elsewhere in it (an export before
        :func:`relative_path` named "../x.json" as its image was named): those are kept, logged."""
        outside = [n for n in names if relative_path(n) != n]
        if outside:
            log.warning("Not removing %d file(s) an earlier export of %s named outside its folder: %s",
                        len(outside), shard_id, outside[:5])
        return [self.file_path(fmt, shard_id, n) for n in names if relative_path(n) == n]


def check_dest(done: Mapping[str, Mapping[str, Any]], dest_uri: str, fmt: str, tables_uri: str) -> None:
    """Raise ``ValueError`` where the destination's markers ``done`` hold another format's export,
    or an export of other tables (``tables_uri``: their full path)."""
    for shard_id, m in sorted(done.items()):
        if m.get("format") != fmt or m.get("tables") != tables_uri:
            raise ValueError(
                f"{dest_uri!r} holds a {m.get('format')} export of {m.get('tables')!r} (shard {shard_id}); this is "
                f"a {fmt} export of {tables_uri!r}. Export into another --dest, or re-run with --overwrite to "
                "replace that export.")


def gone_shards(done: Mapping[str, Mapping[str, Any]], markers: Mapping[str, Any]) -> List[str]:
    """The shards exported earlier (``done``: the destination's markers) that the tables
    (``markers``: their shard markers) no longer hold, and whose files are not pruned yet."""
    return sorted(s for s, m in done.items() if s not in markers and not m.get("pruned"))


def plan_export(tables: OutputDir, markers: Mapping[str, Mapping[str, Any]],
                done: Mapping[str, Mapping[str, Any]]) -> Tuple[List[ShardExport], int]:
    """(shards to export, shards left as they are) of the tables' shards (``markers``), given the
    destination's markers of earlier exports (``done``).

    A shard is left when its export marker was made from the same tables marker. A changed shard
    keeps its ids if its counts fit the ids reserved for it, else it gets new ones after the
    highest reserved (pruned shards' ids stay reserved)."""
    next_image = max((m["first_image"] + m["image_slots"] for m in done.values()), default=0)
    next_annotation = max((m["first_annotation"] + m["annotation_slots"] for m in done.values()), default=0)
    todo, unchanged = [], 0
    for shard_id, marker in sorted(markers.items()):
        source, prev = _digest(marker), done.get(shard_id)
        if prev is not None and prev["source"] == source:
            unchanged += 1
            continue
        images, annotations = _ok_counts(tables, shard_id, marker)
        if prev is not None and images <= prev["image_slots"] and annotations <= prev["annotation_slots"]:
            ids = (prev["first_image"], images, prev["image_slots"], prev["first_annotation"], annotations,
                   prev["annotation_slots"])
        else:
            ids = (next_image, images, images, next_annotation, annotations, annotations)
            next_image, next_annotation = next_image + images, next_annotation + annotations
        todo.append(ShardExport(shard_id, source, *ids))
    return todo, unchanged


def prune_shards(dest: ExportDest, done: Dict[str, Dict[str, Any]], shard_ids: Sequence[str]) -> None:
    """Remove the exported files of ``shard_ids`` (as their markers in ``done`` list them), and
    of a JSON export the shard's folder once it is empty. Each marker stays, with no files and
    ``pruned`` set (updated in ``done`` too): the ids it was given stay reserved, never handed to
    another image, and a shard of that name that comes back is exported again."""
    for shard_id in shard_ids:
        marker = done[shard_id]
        paths = set(dest.files_to_remove(marker["format"], shard_id, marker.get("files", [])))
        folder = dest.full_path(shard_id)
        json_export = marker["format"] == "sa1b-json"
        there = set(dest.fs.find(folder)) if json_export else {p for p in paths if dest.fs.exists(p)}  # one listing
        if paths & there:
            remove(dest.fs, sorted(paths & there))
        if json_export and there <= paths and dest.fs.exists(folder):
            remove(dest.fs, folder, recursive=True)  # only the empty folders the export made are left
        done[shard_id] = {**marker, "source": "", "files": [], "pruned": True}
        dest.write_marker(shard_id, done[shard_id])


# -- sources for the tars ----------------------------------------------------------------------

def iter_sources(uris: Sequence[str], storage_options: Optional[Mapping[str, Any]] = None) -> Iterator[bytes]:
    """The bytes of each images-table ``uri``, in order: files read as a run reads them (with its
    retries, a few ahead), the members of a tar from one pass over it (a shard's members come in
    tar order), not a pass from the start per member. A source that is gone or unreadable raises
    ``OSError`` naming it."""
    opts = dict(storage_options or {})
    tar_uri, members = None, iter(())
    files = read_ahead([uri for uri in uris if tar_of_member(uri) is None], opts)
    for uri in uris:
        tar = tar_of_member(uri)
        if tar is None:
            data, error = next(files)
            if error is not None:
                raise OSError(f"source image {uri} could not be read: {error}")
            yield data
            continue
        if tar != tar_uri:
            tar_uri, members = tar, _iter_tar(tar, opts)
        for _, member_uri, data, error, _ in members:
            if error is not None:
                raise OSError(f"source tar {tar} could not be read: {error}")
            if member_uri == uri:
                yield data
                break
        else:
            raise OSError(f"source image {uri} is not in {tar} (after the shard's members before it): the tar "
                          "changed since the run")


def _upright_jpeg(data: bytes, short_side: Optional[int] = None) -> Tuple[bytes, Tuple[int, int]]:
    """(an upright JPEG of the image, its width and height): the bytes as they are for a JPEG
    that EXIF does not rotate and the run did not downsample (``short_side``), else the decoded
    pixels (what the masks were made on) at quality 95."""
    with Image.open(io.BytesIO(data)) as im:
        if (im.format == "JPEG" and im.getexif().get(EXIF_ORIENTATION, 1) == 1
                and resized_size(*im.size, short_side) == im.size):
            return data, im.size
    pixels = decode_image(data, short_side=short_side)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue(), (pixels.shape[1], pixels.shape[0])


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# -- one shard ---------------------------------------------------------------------------------

def _documents(tables: OutputDir, plan: ShardExport, images: Sequence[Dict[str, Any]],
               ) -> Iterator[Tuple[Dict[str, Any], str, Dict[str, Any]]]:
    """(image row, file stem, SA-1B document) per ok image of the planned shard (``images``: its
    ok rows, :func:`ok_images`), with the plan's ids."""
    if len(images) != plan.images:
        raise ValueError(f"Shard {plan.shard_id}: its marker counts {plan.images} ok images, its images table "
                         f"{len(images)}.")
    stems = export_stems([image["image_id"].split("/", 1)[1] for image in images])
    image_id, annotation_id = plan.first_image, plan.first_annotation
    for image, masks in shard_images_with_masks(tables, plan.shard_id, images):  # to its end: it checks the rest
        name = image["image_id"].split("/", 1)[1]
        doc = sa1b_document(image_id, name, image["width"], image["height"], [_record(m) for m in masks],
                            first_annotation_id=annotation_id)
        image_id, annotation_id = image_id + 1, annotation_id + len(masks)
        yield image, stems[name], doc
    if annotation_id - plan.first_annotation != plan.annotations:
        raise ValueError(f"Shard {plan.shard_id}: its marker counts {plan.annotations} masks, its tables "
                         f"{annotation_id - plan.first_annotation}.")


def write_document(fs: Any, path: str, doc: Dict[str, Any]) -> None:
    """Validate an SA-1B document and write it at ``path`` of ``fs`` (its folders made): through
    the filesystem, so a "::" in an image's name is no chain of filesystems."""
    validate_sa1b(doc)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, json.dumps(doc).encode())  # one C-encoded string (json.dump: ~10x slower)


def _export_json_shard(tables: OutputDir, plan: ShardExport, dest: ExportDest,
                       previous: Optional[Mapping[str, Any]]) -> List[str]:
    """Write ``<dest>/<shard>/<stem>.json`` per ok image; remove files of an earlier export of
    the shard that this one does not write (an image that failed this time, a stem that changed).
    Returns the files written, relative to ``<dest>/<shard>``."""
    files = []
    for _, stem, doc in _documents(tables, plan, ok_images(tables, plan.shard_id)):
        files.append(f"{stem}.json")
        write_document(dest.fs, dest.file_path("sa1b-json", plan.shard_id, files[-1]), doc)
    stale = sorted(set((previous or {}).get("files", [])) - set(files))
    stale = dest.files_to_remove("sa1b-json", plan.shard_id, stale)
    if stale:
        remove(dest.fs, stale)
    return files


def _export_tar_shard(tables: OutputDir, plan: ShardExport, dest: ExportDest,
                      previous: Optional[Mapping[str, Any]]) -> List[str]:
    """Write ``<dest>/<shard>.tar`` with ``<stem>.jpg`` + ``<stem>.json`` per ok image, as SA-1B's
    shards (an empty tar for a shard without ok images). JPEG sources are copied byte for byte
    unless EXIF rotates them; other formats (and rotated JPEGs) are written as the decoded,
    upright pixels at quality 95, so the masks always match the pixels. Returns the tar's name."""
    images = ok_images(tables, plan.shard_id)
    short_side = resized_short_side(tables.marker(plan.shard_id))
    name = f"{plan.shard_id}.tar"
    dest.fs.makedirs(dest.path, exist_ok=True)
    try:
        with dest.fs.open(dest.full_path(name), "wb") as handle, tarfile.open(fileobj=handle, mode="w") as tar:
            sources = iter_sources([image["uri"] for image in images], dest.storage_options)
            for (image, stem, doc), data in zip(_documents(tables, plan, images), sources):
                doc["image"]["file_name"] = f"{stem}.jpg"
                validate_sa1b(doc)
                jpeg, size = _upright_jpeg(data, short_side)
                if size != (image["width"], image["height"]):
                    raise ValueError(
                        f"source image {image['uri']} is {size[0]}x{size[1]} now, {image['width']}x{image['height']} "
                        f"when its masks were made: it changed since the run. Redo its shard (remove "
                        f"_done/{plan.shard_id}.json from the tables and run again) before exporting it.")
                _add(tar, f"{stem}.jpg", jpeg)
                _add(tar, f"{stem}.json", json.dumps(doc).encode())
    except BaseException:  # closing the file above stored what was written: remove the partial tar
        if dest.fs.exists(dest.full_path(name)):
            remove(dest.fs, dest.full_path(name))
        raise
    return [name]


SHARD_EXPORTERS = {"sa1b-json": _export_json_shard, "sa1b-tar": _export_tar_shard}


# -- whole exports -----------------------------------------------------------------------------

@dataclass
class ExportSummary:
    """What an export did: shards exported, left as they were (unchanged since their last
    export), pruned (no longer in the tables) and failed (shard -> error; every other shard was
    still exported)."""

    format: str
    dest: str
    shards_exported: int = 0
    shards_unchanged: int = 0
    shards_pruned: int = 0  # exported earlier, no longer in the tables: files removed (--prune)
    images: int = 0
    annotations: int = 0
    failed: Dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        if self.format == "coco":
            return (f"wrote {self.dest}: {self.images} images, {self.annotations} annotations from "
                    f"{self.shards_exported} shards, {self.seconds:.1f} s")
        what = {"sa1b-json": "SA-1B JSON files", "sa1b-tar": "images in SA-1B tar shards"}[self.format]
        lines = [f"wrote {self.images} {what} ({self.annotations} masks) under {self.dest}: "
                 f"{self.shards_exported} shards exported, {self.shards_unchanged} unchanged since an earlier "
                 f"export, {len(self.failed)} failed, {self.seconds:.1f} s"]
        if self.shards_pruned:
            lines.append(f"  removed the files of {self.shards_pruned} shards exported earlier that the tables no "
                         "longer hold (--prune)")
        for shard_id, error in sorted(self.failed.items())[:MAX_FAILURE_LINES]:
            lines.append(f"  failed: {shard_id}: {error}")
        if len(self.failed) > MAX_FAILURE_LINES:
            lines.append(f"  ... and {len(self.failed) - MAX_FAILURE_LINES} more failed shards")
        if self.failed:
            lines.append("  a failed shard has no export marker: running the export again retries it")
        return "\n".join(lines)


def _tables(tables_uri: str, dest_uri: str, storage_options: Optional[Mapping[str, Any]]) -> OutputDir:
    """The run's tables, after checking that both they and the destination can be opened (a
    mistyped path or a missing filesystem package fails before anything is read)."""
    filesystem(dest_uri, storage_options)
    return OutputDir.of_run(tables_uri, storage_options)


def export_shards(tables_uri: str, dest_uri: str, fmt: str, storage_options: Optional[Mapping[str, Any]] = None,
                  workers: Optional[int] = None, overwrite: bool = False, on_ray: bool = False,
                  prune: bool = False) -> ExportSummary:
    """Export a run's tables as ``sa1b-json`` (``<dest>/<shard>/<stem>.json`` per ok image, the
    stem keeping the image's folders within its input: ``cam1/0001.json``) or ``sa1b-tar``
    (``<dest>/<shard>.tar``), only the shards not yet exported or changed since (see the module
    docstring). ``workers`` shards at a time: threads of this process (default
    ``READ_WORKERS``), or with ``on_ray`` Ray tasks of one CPU each over the cluster (default: as
    many as it has CPUs; JSON encoding is CPU work that threads of one process do not spread).
    A shard that fails (a source image gone, tables that disagree with their marker) is recorded
    in the summary and the others go on. Shards exported earlier that the tables no longer hold
    (the run was redone with ``--overwrite``) keep their files with a warning; ``prune`` removes
    them (:func:`prune_shards`)."""
    if fmt not in SHARD_EXPORTERS:
        raise ValueError(f"Unknown shard export format {fmt!r}; expected one of {sorted(SHARD_EXPORTERS)}.")
    start = time.monotonic()
    tables = _tables(tables_uri, dest_uri, storage_options)
    dest = ExportDest(dest_uri, storage_options)
    with RunLease(dest.fs, _lease_dir(dest)) as lease:  # one export at a time
        return _export_shards(tables, dest, fmt, storage_options, workers, overwrite, on_ray, prune, lease, start)


def _export_shards(tables: OutputDir, dest: ExportDest, fmt: str, storage_options: Optional[Mapping[str, Any]],
                   workers: Optional[int], overwrite: bool, on_ray: bool, prune: bool, lease: RunLease,
                   start: float) -> ExportSummary:
    """:func:`export_shards` under the destination's lease."""
    tables_id = full_uri(tables.fs, tables.path.rstrip("/"))  # "out/run" and "./out/run/" are one run's tables
    previous, markers = dest.markers(update=True), tables.markers()
    if not overwrite:
        check_dest(previous, dest.uri, fmt, tables_id)
    gone = gone_shards(previous, markers)
    if gone and prune:
        lease.check()
        prune_shards(dest, previous, gone)
        log.info("removed the exported files of %d shards no longer in the tables (e.g. %s)", len(gone), gone[0])
    elif gone:
        log.warning("%d shards exported into %s earlier are no longer in the tables (e.g. %s); their exported files "
                    "stay: --prune removes them.", len(gone), dest.uri, gone[0])
    if overwrite:
        dest.clear_markers()
        previous = {}
    todo, unchanged = plan_export(tables, markers, previous)
    summary = ExportSummary(fmt, dest.uri, shards_unchanged=unchanged, shards_pruned=len(gone) if prune else 0)
    jobs = [(plan, previous.get(plan.shard_id)) for plan in todo]
    done = (_on_ray(jobs, tables_id, full_uri(dest.fs, dest.path), fmt, storage_options, workers, lease.run_id)
            if on_ray else _in_threads(jobs, tables, dest, fmt, workers or READ_WORKERS, lease))
    last_log = time.monotonic()
    for plan, error in done:
        if error is not None:
            summary.failed[plan.shard_id] = error
            log.warning("Export of shard %s failed: %s", plan.shard_id, error)
            continue
        summary.shards_exported += 1
        summary.images += plan.images
        summary.annotations += plan.annotations
        if time.monotonic() - last_log >= PROGRESS_EVERY_S:
            last_log = time.monotonic()
            log.info("exported %d of %d shards (%d images), %.1f images/s", summary.shards_exported, len(todo),
                     summary.images, summary.images / (last_log - start))
    summary.seconds = time.monotonic() - start
    return summary


def _export_one(tables: OutputDir, dest: ExportDest, fmt: str, plan: ShardExport,
                previous: Optional[Mapping[str, Any]], still_held: Callable[[], None]) -> None:
    """Export one shard: its marker removed first (a run stopped while the shard is rewritten
    leaves it to be redone), its files, then its marker, once ``still_held()`` has not raised
    (the destination's lease is still this export's)."""
    dest.unmark(plan.shard_id)
    files = SHARD_EXPORTERS[fmt](tables, plan, dest, previous)
    still_held()
    dest.mark(plan, fmt, full_uri(tables.fs, tables.path.rstrip("/")), files)


def _lease_dir(dest: ExportDest) -> str:
    return posixpath.join(dest.path, EXPORT_MARKERS, "lease")


def _export_task(tables_uri: str, dest_uri: str, fmt: str, storage_options: Optional[Mapping[str, Any]],
                 plan: ShardExport, previous: Optional[Mapping[str, Any]], run_id: str) -> None:
    """:func:`_export_one` in a Ray task of export run ``run_id`` (the lease is read from its file)."""
    dest = ExportDest(dest_uri, storage_options)
    _export_one(OutputDir(tables_uri, storage_options), dest, fmt, plan, previous,
                lambda: check_holder(dest.fs, _lease_dir(dest), run_id))


Job = Tuple[ShardExport, Optional[Mapping[str, Any]]]  # a shard to export and its earlier export's marker


def _in_threads(jobs: Sequence[Job], tables: OutputDir, dest: ExportDest, fmt: str, workers: int,
                lease: RunLease) -> Iterator[Tuple[ShardExport, Optional[str]]]:
    """(plan, error or None) per job as it finishes, ``workers`` threads at a time. Stopped early
    (Ctrl-C, SIGTERM, an error of the caller), it waits for the shards being exported only: the
    others are not started."""
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="export")
    try:
        futures = {pool.submit(_export_one, tables, dest, fmt, plan, previous, lease.check): plan
                   for plan, previous in jobs}
        for future in as_completed(futures):
            error = future.exception()
            yield futures[future], None if error is None else f"{type(error).__name__}: {error}"
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _on_ray(jobs: Sequence[Job], tables_uri: str, dest_uri: str, fmt: str, storage_options: Optional[Mapping[str, Any]],
            workers: Optional[int], run_id: str) -> Iterator[Tuple[ShardExport, Optional[str]]]:
    """(plan, error or None) per job as it finishes, as Ray tasks of one CPU, at most ``workers``
    (default: the cluster's CPUs) submitted at once. A task whose process dies is retried by Ray
    (twice); an exception is the shard's error, not retried."""
    import ray

    if not jobs:
        return
    init_ray()
    task = ray.remote(num_cpus=1, max_retries=2)(_export_task)
    limit = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    waiting, running = list(reversed(jobs)), {}
    opts = dict(storage_options or {})
    while waiting or running:
        while waiting and len(running) < limit:
            plan, previous = waiting.pop()
            running[task.remote(tables_uri, dest_uri, fmt, opts, plan, previous, run_id)] = plan
        ready, _ = ray.wait(list(running), num_returns=1)
        plan = running.pop(ready[0])
        try:
            ray.get(ready[0])
            yield plan, None
        except ray.exceptions.RayTaskError as e:  # the shard's own exception
            cause = getattr(e, "cause", None) or e
            yield plan, f"{type(cause).__name__}: {cause}"
        except ray.exceptions.RayError as e:  # the task could not run (its process died 3 times, ...)
            yield plan, f"{type(e).__name__}: {e}"


def export_sa1b_json(tables_uri: str, dest_uri: str, storage_options: Optional[Mapping[str, Any]] = None,
                     workers: Optional[int] = None, overwrite: bool = False) -> ExportSummary:
    """:func:`export_shards` as SA-1B JSON files."""
    return export_shards(tables_uri, dest_uri, "sa1b-json", storage_options, workers, overwrite)


def export_sa1b_tar(tables_uri: str, dest_uri: str, storage_options: Optional[Mapping[str, Any]] = None,
                    workers: Optional[int] = None, overwrite: bool = False) -> ExportSummary:
    """:func:`export_shards` as SA-1B tar shards."""
    return export_shards(tables_uri, dest_uri, "sa1b-tar", storage_options, workers, overwrite)


def export_coco(tables_uri: str, dest_uri: str, storage_options: Optional[Mapping[str, Any]] = None,
                workers: int = READ_WORKERS) -> ExportSummary:
    """One COCO instance-segmentation JSON (class-agnostic: every mask is category 1, "object"),
    loadable by ``pycocotools.coco.COCO`` and usable as results in ``COCOeval`` (``score`` =
    predicted IoU). Streamed: the images are written from a first pass over the images tables,
    the annotations from a second over both tables, shard by shard (``workers`` read ahead), so
    memory holds a few shards' rows, not the whole dataset. Image and annotation ids count from 1
    in shard and file order."""
    start = time.monotonic()
    tables = _tables(tables_uri, dest_uri, storage_options)
    shard_ids = tables.shard_ids()
    summary = ExportSummary("coco", dest_uri)
    fs, path = filesystem(dest_uri, storage_options)
    try:
        image_id, annotation_id = _write_coco(tables, tables_uri, shard_ids, fs, path, workers)
    except BaseException:  # closing the file stored what was written: remove the partial file
        if fs.exists(path):
            remove(fs, path)
        raise
    summary.shards_exported, summary.images, summary.annotations = len(shard_ids), image_id, annotation_id
    summary.seconds = time.monotonic() - start
    return summary


def _write_coco(tables: OutputDir, tables_uri: str, shard_ids: Sequence[str], fs: Any, path: str,
                workers: int) -> Tuple[int, int]:
    """:func:`export_coco`'s file; returns (images, annotations)."""
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w") as f:
        f.write('{"info": ' + json.dumps({"description": "SAM automatic masks", "source_tables": tables_uri}))
        f.write(', "images": [')
        image_id = 0
        for _, images in tables.each_shard(lambda s: ok_images(tables, s), shard_ids, workers):
            for image in images:
                image_id += 1
                f.write((", " if image_id > 1 else "") + json.dumps({
                    "id": image_id, "file_name": image["image_id"], "width": image["width"],
                    "height": image["height"], "source_uri": image["uri"]}))
        f.write('], "annotations": [')
        image_id, annotation_id = 0, 0
        for image, masks in images_with_masks(tables, shard_ids, workers):
            image_id += 1
            for m in masks:
                annotation_id += 1
                f.write((", " if annotation_id > 1 else "") + json.dumps({
                    "id": annotation_id, "image_id": image_id, "category_id": COCO_CATEGORY["id"],
                    "segmentation": {"size": [m["height"], m["width"]], "counts": m["counts"]},
                    "area": m["area"], "bbox": m["bbox"], "iscrowd": 0, "score": m["predicted_iou"],
                    "predicted_iou": m["predicted_iou"], "stability_score": m["stability_score"]}))
        f.write('], "categories": ' + json.dumps([COCO_CATEGORY]) + "}")
    return image_id, annotation_id


def export_prompted_coco(tables_uri: str, prompts: str, dest_uri: str, images_root: Optional[str] = None,
                         storage_options: Optional[Mapping[str, Any]] = None,
                         workers: int = READ_WORKERS) -> Dict[str, Any]:
    """The COCO prompts file of a ``jobs.prompt`` run with its masks: every annotation, with its
    id, category and other fields as they were, gets its box's mask as ``segmentation`` (COCO
    RLE), ``area`` (the mask's), ``predicted_iou`` and ``stability_score`` (its ``bbox`` stays the
    box it was prompted with). An annotation without a mask (its image failed or is not in the
    tables, or the image decodes to another size than the file says) is not left out without a
    word: it moves to ``"unmasked_annotations"`` with the reason, so ``annotations`` loads in
    ``pycocotools`` as instance segmentation. Returns counts: annotations, masked, unmasked."""
    from .prompted import load_coco_prompts

    tables = _tables(tables_uri, dest_uri, storage_options)
    doc, uris = load_coco_prompts(prompts, images_root, storage_options)
    images, masks = _prompted_masks(tables, set(uris.values()), workers)
    sizes = {im["id"]: (im.get("width"), im.get("height")) for im in doc["images"]}
    annotated, unmasked, position = [], [], Counter()
    for ann in doc["annotations"]:
        k = position[ann["image_id"]]
        position[ann["image_id"]] += 1
        row = images.get(uris[ann["image_id"]])
        mask = masks.get((row["image_id"], k)) if row is not None and row["status"] == "ok" else None
        reason = _unmasked_reason(row, mask, sizes[ann["image_id"]])
        if reason is not None:
            unmasked.append({"id": ann.get("id"), "image_id": ann["image_id"], "reason": reason})
            continue
        annotated.append(dict(ann, segmentation={"size": [mask["height"], mask["width"]], "counts": mask["counts"]},
                              area=mask["area"], predicted_iou=mask["predicted_iou"],
                              stability_score=mask["stability_score"]))
    for im in doc["images"]:  # sizes the file left out: the decoded image's, which the masks have
        row = images.get(uris[im["id"]])
        if row is not None and row["status"] == "ok":
            im.setdefault("width", row["width"])
            im.setdefault("height", row["height"])
    out = dict(doc, annotations=annotated, unmasked_annotations=unmasked)
    fs, path = filesystem(dest_uri, storage_options)
    if posixpath.dirname(path):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, json.dumps(out).encode())
    return {"annotations": len(doc["annotations"]), "masked": len(annotated), "unmasked": len(unmasked),
            "reasons": dict(Counter(u["reason"].split(":", 1)[0] for u in unmasked))}


def _prompted_masks(tables: OutputDir, uris: Set[str], workers: int,
                    ) -> Tuple[Dict[str, Dict[str, Any]], Dict[Tuple[str, int], Dict[str, Any]]]:
    """(images rows by uri, mask rows by (image id, mask id)) of the prompted images ``uris``:
    the images tables, then the masks tables of the shards holding those of them that are ok."""
    images: Dict[str, Dict[str, Any]] = {}
    columns = ["image_id", "uri", "status", "error_reason", "width", "height"]
    for _, rows in tables.each_shard(lambda s: tables.read_shard("images", s, columns).to_pylist(), workers=workers):
        images.update((r["uri"], r) for r in rows if r["uri"] in uris)
    ok_ids = [r["image_id"] for r in images.values() if r["status"] == "ok"]
    columns = ["counts", "height", "width", "area", "predicted_iou", "stability_score"]
    masks = {(i, r["mask_id"]): r for i, rows in tables.masks_of(ok_ids, columns, workers).items() for r in rows}
    return images, masks


def export_prompted_table(tables_uri: str, prompts: str, dest_uri: str, images_root: Optional[str] = None,
                          storage_options: Optional[Mapping[str, Any]] = None,
                          workers: int = READ_WORKERS) -> Dict[str, Any]:
    """The Parquet/CSV prompts table of a ``jobs.prompt`` run with its masks, as Parquet: every
    row as it was (its columns and order), plus its box's mask (``mask_counts`` COCO RLE,
    ``mask_height``, ``mask_width``, ``mask_area``, ``predicted_iou``, ``stability_score``) and
    ``mask_status``: "ok", or why the row has no mask (its image failed or is not in the tables).
    Returns counts as :func:`export_prompted_coco`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .prompted import _join, load_prompt_table

    tables = _tables(tables_uri, dest_uri, storage_options)
    table = load_prompt_table(prompts, storage_options)
    row_uris = [_join(images_root, u) for u in table.column("uri").to_pylist()]
    images, masks = _prompted_masks(tables, set(row_uris), workers)
    added: Dict[str, List[Any]] = {k: [] for k in ("mask_counts", "mask_height", "mask_width", "mask_area",
                                                   "predicted_iou", "stability_score", "mask_status")}
    position: Counter = Counter()
    for uri in row_uris:
        k = position[uri]
        position[uri] += 1
        row = images.get(uri)
        mask = masks.get((row["image_id"], k)) if row is not None and row["status"] == "ok" else None
        reason = _unmasked_reason(row, mask, (None, None))
        for key, field_name in (("mask_counts", "counts"), ("mask_height", "height"), ("mask_width", "width"),
                                ("mask_area", "area"), ("predicted_iou", "predicted_iou"),
                                ("stability_score", "stability_score")):
            added[key].append(None if reason is not None else mask[field_name])
        added["mask_status"].append("ok" if reason is None else reason)
    types = {"mask_counts": pa.string(), "mask_height": pa.int32(), "mask_width": pa.int32(), "mask_area": pa.int64(),
             "predicted_iou": pa.float64(), "stability_score": pa.float64(), "mask_status": pa.string()}
    for key, values in added.items():
        table = table.append_column(key, pa.array(values, type=types[key]))
    fs, path = filesystem(dest_uri, storage_options)
    if posixpath.dirname(path):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)
    unmasked = [s for s in added["mask_status"] if s != "ok"]
    return {"annotations": table.num_rows, "masked": table.num_rows - len(unmasked), "unmasked": len(unmasked),
            "reasons": dict(Counter(u.split(":", 1)[0] for u in unmasked))}


def _unmasked_reason(row: Optional[Dict[str, Any]], mask: Optional[Dict[str, Any]],
                     size: Tuple[Optional[int], Optional[int]]) -> Optional[str]:
    """Why a prompts annotation gets no mask (None: it gets one)."""
    if row is None:
        return "image not in the tables (not prompted yet, or another prompts file's run)"
    if row["status"] != "ok":
        return f"image error: {row['error_reason']}"
    if mask is None:
        return "no mask row for this box in the tables"
    width, height = size
    if (width is not None and width != row["width"]) or (height is not None and height != row["height"]):
        return (f"size mismatch: the image decodes to {row['width']}x{row['height']} (EXIF orientation applied), "
                f"the prompts file says {width}x{height}")
    return None
