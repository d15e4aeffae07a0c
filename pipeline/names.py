"""Names made safe to write under: a digest that tells names apart, and parts shortened to fit.

Images, tars and manifests may be named with anything an object store takes (an S3 key may be
1,024 bytes and hold "..", "//"); what we name after them (exported files, gallery overlays,
shard ids) must be a file name a local filesystem takes (255 bytes) and stay under its folder.
"""

from __future__ import annotations

import hashlib
import posixpath


def name_digest(name: str) -> str:
    """Ten hex digits of ``name``'s SHA-1: what tells apart names that come to one file name."""
    return hashlib.sha1(name.encode()).hexdigest()[:10]


PART_BYTES = 200  # of a path's part: filesystems take 255, and an export adds ".json" and a digest


def short_part(part: str, limit: int = PART_BYTES) -> str:
    """``part`` (a file or folder name), or, where it is longer than ``limit`` bytes in UTF-8 (an
    S3 key may be 1,024, a local file name 255), its start, "~" and :func:`name_digest` of it,
    then its extension (``<start>~<digest>.jpg``)."""
    if len(part.encode()) <= limit:
        return part
    stem, ext = posixpath.splitext(part)
    ext = ext if len(ext.encode()) <= 16 else ""
    room = limit - len(ext.encode()) - 11
    start = part.encode()[:room].decode(errors="ignore")  # whole characters only
    return f"{start}~{name_digest(part)}{ext}"


def relative_path(name: str) -> str:
    """``name`` as a path that stays under the folder it is joined to: without empty and "."
    parts (an S3 key's "//", "./"), a ".." part (a tar member "../../x.jpg") as "__", and each
    part at most :data:`PART_BYTES` long (:func:`short_part`)."""
    parts = [short_part("__" if p == ".." else p) for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts) or "_"
