"""Our masks/images tables as fine-tuning samples (``python -m jobs.train --tables``)."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

import numpy as np
from pycocotools import mask as mask_utils

from sam_core.training import Sample

from .decode import decode_image
from .export import images_with_masks
from .output import OutputDir
from .shards import read_source


def table_samples(tables_uri: str, storage_options: Optional[Mapping[str, Any]] = None, seed: int = 0) -> Iterator[Sample]:
    """Endless shuffled passes over the ok images with at least one mask; each image is read from
    its source URI and decoded as the pipeline does (EXIF orientation applied), so masks line up."""
    tables = OutputDir.of_run(tables_uri, storage_options)
    entries = [(image["uri"], [m["counts"] for m in masks], (image["height"], image["width"]))
               for image, masks in images_with_masks(tables) if masks]
    if not entries:
        raise ValueError(f"{tables_uri} has no ok image with masks to train on.")
    rng = np.random.default_rng(seed)
    while True:
        for i in rng.permutation(len(entries)):
            uri, counts, (h, w) = entries[i]
            image = decode_image(read_source(uri, storage_options))
            if image.shape[:2] != (h, w):
                raise ValueError(f"{uri} decodes to {image.shape[1]}x{image.shape[0]}, the tables say {w}x{h}.")
            masks = [mask_utils.decode({"size": [h, w], "counts": c.encode()}).astype(bool) for c in counts]
            yield Sample(image, masks)
