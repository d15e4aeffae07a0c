"""Stage 1 of the pipeline (read and decode shards into image rows) and the row format that all
stages pass on; see :mod:`pipeline.stages`. Free of torch, so decode workers start fast."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from .decode import ImageDecodeError, decode_first_frame
from .shards import Shard, iter_shard_files, read_error_reason
from .worker_deaths import NO_GUARD, DeathGuard

log = logging.getLogger(__name__)

Row = Dict[str, Any]
END = -1  # image_index of a shard's end row

STAGE_SCHEMA = pa.schema([
    ("shard_id", pa.string()),
    ("image_index", pa.int64()),
    ("shard_images", pa.int64()),
    ("image", pa.string()),
    ("pixels", pa.large_binary()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("candidates", pa.large_binary()),
    ("masks", pa.large_binary()),
    ("prompts", pa.string()),
])


def to_table(rows: Sequence[Row]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=STAGE_SCHEMA)


def decoded_images(
    shard: Shard, storage_options: Optional[Mapping[str, Any]], max_pixels: int, guard: DeathGuard = NO_GUARD,
    short_side: Optional[int] = None,
) -> Iterator[Tuple[Row, Optional[np.ndarray]]]:
    """Per file of the shard, in order: its ``images`` row and the decoded HxWx3 image.

    The image is None when the file could not be read or decoded; the row (status "error") then
    holds the reason. For decoded images the row has the size and decode time and still says
    "error" until the caller fills in the result. A name met again in the shard (a tar can hold
    one twice) is an error (``duplicate_name``, image_id ``<shard>/<name>#<position>``): its masks
    could not be told from the first one's. ``guard``: each decode is noted in the run's ledger,
    and a file a process died on twice is ``worker_died`` (see :mod:`pipeline.worker_deaths`).
    ``short_side``: images downsampled so their shorter side is at most that (the row's size is
    the downsampled one). Of a file with several frames or pages, the first is the image; the
    row's ``frames`` says how many the file has.
    """
    first: Dict[str, int] = {}  # name -> position of the first image with it
    for index, (name, uri, data, read_error, member_range) in enumerate(iter_shard_files(shard, storage_options)):
        repeat = first.setdefault(name, index) != index
        offset, size = member_range or (None, None)
        row: Row = dict(image_id=f"{shard.shard_id}/{name}" + (f"#{index}" if repeat else ""), uri=uri,
                        shard=shard.shard_id, width=None, height=None, mask_count=None, status="error",
                        error_reason=None, error_detail=None, decode_s=None, generate_s=None, postprocess_s=None,
                        compute_dtype=None, member_offset=offset, member_size=size)
        if read_error is not None:
            row.update(error_reason=read_error_reason(read_error), error_detail=read_error)
        elif repeat:
            row.update(error_reason="duplicate_name", error_detail=f"image {first[name]} of the shard has this name too")
        if row["error_reason"] is not None or guard.passed_over(row, "decoding this file"):
            yield row, None
            continue
        t0 = time.perf_counter()
        try:
            with guard.attempt([row["image_id"]]):
                image, frames = decode_first_frame(data, max_pixels, short_side)
        except ImageDecodeError as e:
            row.update(error_reason=e.reason, error_detail=e.detail, decode_s=time.perf_counter() - t0)
            log.warning("%s: %s", uri, e)
            yield row, None
            continue
        row.update(width=image.shape[1], height=image.shape[0], frames=frames, decode_s=time.perf_counter() - t0)
        if frames > 1:
            log.warning("%s: %d frames or pages; only the first is masked", uri, frames)
        yield row, image


# ---------------------------------------------------------------------- stage 1: decode (CPU tasks)
def decode_rows(shard: Shard, storage_options: Optional[Mapping[str, Any]], max_pixels: int,
                prompts: Optional[Sequence[Any]] = None, guard: DeathGuard = NO_GUARD,
                short_side: Optional[int] = None) -> Iterator[Row]:
    """One row per file of ``shard`` (pixels set if it decoded), then the shard's end row.
    ``prompts``: per file of a "files" shard, what the model stage is to prompt it with (JSON-able;
    passed on as the rows' ``prompts``). ``guard``, ``short_side``: as for :func:`decoded_images`."""
    count = 0
    for index, (row, image) in enumerate(decoded_images(shard, storage_options, max_pixels, guard, short_side)):
        count += 1
        out: Row = dict(shard_id=shard.shard_id, image_index=index, shard_images=END, image=json.dumps(row))
        if prompts is not None:
            out["prompts"] = json.dumps(prompts[index])
        if image is not None:
            out.update(pixels=image.tobytes(), height=image.shape[0], width=image.shape[1])
        yield out
    yield dict(shard_id=shard.shard_id, image_index=END, shard_images=count)


def decode_shards(batch: Dict[str, Any], storage_options: Mapping[str, Any], max_pixels: int,
                  rows_per_output: int = 4, ledger: Optional[Any] = None,
                  short_side: Optional[int] = None) -> Iterator[pa.Table]:
    """Ray stage (a task per shard): shards (``shard_id``, ``kind``, ``uris``, ``root``, and
    ``prompts`` as JSON if the model stage prompts) -> image rows, yielded a few at a time so that
    a large tar never sits decoded in memory at once.

    ``ledger`` (:mod:`pipeline.worker_deaths`): a shard's decode is noted as a whole; once a
    process has died decoding it, its retries note every file, so a file that kills the
    process (a crash in an image library) is found and passed over rather than retried forever."""
    guard = DeathGuard(ledger)
    prompts_column = batch.get("prompts", [None] * len(batch["shard_id"]))
    for shard_id, kind, uris, root, prompts in zip(batch["shard_id"], batch["kind"], batch["uris"], batch["root"],
                                                   prompts_column):
        shard = Shard(str(shard_id), str(kind), tuple(str(u) for u in uris), None if root is None else str(root))
        whole = [f"{shard.shard_id} (decode)"]
        per_file = guard if guard.died_on(whole) else NO_GUARD  # a ledger call per file only after a death
        rows: List[Row] = []
        with guard.attempt(whole):
            for row in decode_rows(shard, storage_options, max_pixels, None if prompts is None else json.loads(prompts),
                                   per_file, short_side):
                rows.append(row)
                if len(rows) >= rows_per_output:
                    yield to_table(rows)
                    rows = []
        if rows:
            yield to_table(rows)
