"""Our masks/images tables as fine-tuning samples (``python -m jobs.train --tables``)."""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
from pycocotools import mask as mask_utils

from sam_core.training import Sample

from .decode import decode_image
from .export import ok_images
from .output import OutputDir, resized_short_side
from .shards import MemberRange, member_range, read_source

SHUFFLE_SHARDS = 8  # shards whose images are drawn from at once (memory: their masks' RLE strings)

Entry = Tuple[str, List[str], Tuple[int, int], Optional[int], MemberRange]  # (source uri, masks' COCO counts,
# (height, width), the shorter side the run downsampled the image to or None, where a tar member lies or None)


def _shard_entries(tables: OutputDir, shard_id: str, short_side: Optional[int]) -> List[Entry]:
    """The ok images with at least one mask of a shard, with their masks' counts."""
    rows: Dict[str, List[Tuple[int, str]]] = {}
    for row in tables.read_shard("masks", shard_id, ["image_id", "mask_id", "counts"]).to_pylist():
        rows.setdefault(row["image_id"], []).append((row["mask_id"], row["counts"]))
    return [(image["uri"], [c for _, c in sorted(rows[image["image_id"]])], (image["height"], image["width"]),
             short_side, member_range(image)) for image in ok_images(tables, shard_id) if rows.get(image["image_id"])]


def table_samples(tables_uri: str, storage_options: Optional[Mapping[str, Any]] = None, seed: int = 0) -> Iterator[Sample]:
    """Endless shuffled passes over the ok images with at least one mask; each image is read from
    its source URI and decoded as the pipeline does (EXIF orientation applied), so masks line up.

    A pass takes the shards in a random order, ``SHUFFLE_SHARDS`` at a time, and yields the images
    of those shards in a random order: memory holds the masks of a few shards, not of the whole
    output (a self-training run over millions of generated images would not fit otherwise)."""
    tables = OutputDir.of_run(tables_uri, storage_options)
    markers = tables.markers()
    shards = sorted(s for s, m in markers.items() if m.get("masks", 1) > 0)  # a marker without counts: maybe
    rng = np.random.default_rng(seed)
    while True:
        yielded = 0
        order = [shards[i] for i in rng.permutation(len(shards))]
        for group in (order[i : i + SHUFFLE_SHARDS] for i in range(0, len(order), SHUFFLE_SHARDS)):
            read = lambda s: _shard_entries(tables, s, resized_short_side(markers[s]))  # noqa: E731
            entries = [e for _, shard_entries in tables.each_shard(read, group) for e in shard_entries]
            for i in rng.permutation(len(entries)):
                yield _sample(entries[i], storage_options)
                yielded += 1
        if not yielded:
            raise ValueError(f"{tables_uri} has no ok image with masks to train on.")


def _sample(entry: Entry, storage_options: Optional[Mapping[str, Any]]) -> Sample:
    uri, counts, (h, w), short_side, where = entry
    image = decode_image(read_source(uri, storage_options, where), short_side=short_side)
    if image.shape[:2] != (h, w):
        raise ValueError(f"{uri} decodes to {image.shape[1]}x{image.shape[0]}, the tables say {w}x{h}.")
    masks = [mask_utils.decode({"size": [h, w], "counts": c.encode()}).astype(bool) for c in counts]
    return Sample(image, masks)
