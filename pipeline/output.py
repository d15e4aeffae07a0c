"""The two Parquet tables, written per shard, and the completion markers that make runs resumable.

Layout under the output URI::

    masks/<shard>.parquet    one row per mask
    images/<shard>.parquet   one row per input file (ok or error)
    _done/<shard>.json       written last: the shard's members and counts

A shard whose marker exists is complete; data files without a marker are leftovers of an
interrupted run and are rewritten.
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Any, Dict, List, Mapping, Optional, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .shards import Shard

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
    ("mask_count", pa.int32()),
    ("status", pa.string()),  # "ok" or "error"
    ("error_reason", pa.string()),  # short code (see pipeline.decode), null when ok
    ("error_detail", pa.string()),
    ("decode_s", pa.float64()),  # seconds per stage for this image
    ("generate_s", pa.float64()),  # model stage (encoder, decoder, filters, NMS, RLE)
    ("postprocess_s", pa.float64()),  # small-region removal, COCO strings, records
])


class OutputDir:
    def __init__(self, output_uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> None:
        self.uri = output_uri.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.uri, **dict(storage_options or {}))

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def marker(self, shard_id: str) -> Optional[Dict[str, Any]]:
        path = self._p("_done", f"{shard_id}.json")
        if not self.fs.exists(path):
            return None
        return json.loads(self.fs.cat_file(path))

    def is_complete(self, shard: Shard) -> bool:
        """True if ``shard`` was written; raises if it was written from other members."""
        done = self.marker(shard.shard_id)
        if done is None:
            return False
        if tuple(done["members"]) != shard.uris:
            raise ValueError(
                f"Shard {shard.shard_id} was completed from other input files than it has now (the "
                "input changed since the last run into this output). Re-run with overwrite, or write "
                "to a new output."
            )
        return True

    def clear(self) -> None:
        for sub in ("masks", "images", "_done"):
            if self.fs.exists(self._p(sub)):
                self.fs.rm(self._p(sub), recursive=True)

    def write_shard(self, shard: Shard, masks: Sequence[Dict[str, Any]], images: Sequence[Dict[str, Any]]) -> None:
        """Data first, then the marker: a crash in between leaves the shard incomplete."""
        self._write_table(self._p("masks", f"{shard.shard_id}.parquet"), masks, MASKS_SCHEMA)
        self._write_table(self._p("images", f"{shard.shard_id}.parquet"), images, IMAGES_SCHEMA)
        marker = {"members": list(shard.uris), "images": len(images), "masks": len(masks)}
        self._put(self._p("_done", f"{shard.shard_id}.json"), json.dumps(marker).encode())

    def _write_table(self, path: str, rows: Sequence[Dict[str, Any]], schema: pa.Schema) -> None:
        table = pa.Table.from_pylist(list(rows), schema=schema)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self._put(path, buf.getvalue())

    def _put(self, path: str, data: bytes) -> None:
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.fs.pipe_file(path, data)

    def shard_ids(self) -> List[str]:
        """Completed shards, sorted."""
        return sorted(posixpath.basename(p)[: -len(".json")] for p in self.fs.glob(self._p("_done", "*.json")))

    def read_shard(self, name: str, shard_id: str) -> pa.Table:
        """One completed shard's ``masks`` or ``images`` table."""
        schema = MASKS_SCHEMA if name == "masks" else IMAGES_SCHEMA
        with self.fs.open(self._p(name, f"{shard_id}.parquet"), "rb") as fh:
            return pq.read_table(fh, schema=schema)

    def read_table(self, name: str) -> pa.Table:
        """All shards of ``masks`` or ``images`` as one table (empty with the schema if none)."""
        schema = MASKS_SCHEMA if name == "masks" else IMAGES_SCHEMA
        files = sorted(self.fs.glob(self._p(name, "*.parquet")))
        tables: List[pa.Table] = []
        for f in files:
            with self.fs.open(f, "rb") as fh:
                tables.append(pq.read_table(fh, schema=schema))
        return pa.concat_tables(tables) if tables else schema.empty_table()
