"""The mask-generation stage: a stateful callable that loads the model once and turns a shard of
image files into its two Parquet tables. Unit-testable without Ray."""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch

from sam_core import SamAutomaticMaskGenerator, build_sam

from .config import PipelineConfig
from .decode import ImageDecodeError, decode_image
from .output import OutputDir
from .shards import Shard, iter_shard_files

log = logging.getLogger(__name__)


def build_generator(config: PipelineConfig, device: str) -> SamAutomaticMaskGenerator:
    if config.checkpoint is None:
        torch.manual_seed(config.seed)
    model = build_sam(config.model_type, config.checkpoint, device=device)
    return SamAutomaticMaskGenerator(model, **config.generator_settings())


def decoded_images(
    shard: Shard, storage_options: Optional[Mapping[str, Any]], max_pixels: int
) -> Iterator[Tuple[Dict[str, Any], Optional[np.ndarray]]]:
    """Per file of the shard, in order: its ``images`` row and the decoded HxWx3 image.

    The image is None when the file could not be read or decoded; the row (status "error") then
    holds the reason. For decoded images the row has the size and decode time and still says
    "error" until the caller fills in the result.
    """
    for name, uri, data, read_error in iter_shard_files(shard, storage_options):
        row: Dict[str, Any] = dict(image_id=f"{shard.shard_id}/{name}", uri=uri, shard=shard.shard_id, width=None,
                                   height=None, mask_count=None, status="error", error_reason=None,
                                   error_detail=None, decode_s=None, generate_s=None)
        if read_error is not None:
            row.update(error_reason="unreadable", error_detail=read_error)
            yield row, None
            continue
        t0 = time.perf_counter()
        try:
            image = decode_image(data, max_pixels)
        except ImageDecodeError as e:
            row.update(error_reason=e.reason, error_detail=e.detail, decode_s=time.perf_counter() - t0)
            log.warning("%s: %s", uri, e)
            yield row, None
            continue
        row.update(width=image.shape[1], height=image.shape[0], decode_s=time.perf_counter() - t0)
        yield row, image


class ShardWorker:
    """``{"shard_id": [...], "kind": [...], "uris": [...]}`` batch -> per-shard summary rows."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.generator = build_generator(config, device)
        self.output = OutputDir(config.output_uri, config.storage_options)
        self.model_id = config.model_id()
        self.settings_hash = config.settings_hash()

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, List[Any]]:
        out: Dict[str, List[Any]] = {"shard_id": [], "images_ok": [], "images_error": [], "masks": [],
                                     "decode_s": [], "generate_s": []}
        for shard_id, kind, uris in zip(batch["shard_id"], batch["kind"], batch["uris"]):
            shard = Shard(str(shard_id), str(kind), tuple(str(u) for u in uris))
            masks, images = self.process(shard)
            self.output.write_shard(shard, masks, images)
            ok = sum(r["status"] == "ok" for r in images)
            out["shard_id"].append(shard.shard_id)
            out["images_ok"].append(ok)
            out["images_error"].append(len(images) - ok)
            out["masks"].append(len(masks))
            out["decode_s"].append(sum(r["decode_s"] or 0.0 for r in images))
            out["generate_s"].append(sum(r["generate_s"] or 0.0 for r in images))
        return {k: np.asarray(v) for k, v in out.items()}

    def process(self, shard: Shard):
        """Rows of the masks and images tables for one shard, in file order."""
        masks: List[Dict[str, Any]] = []
        images: List[Dict[str, Any]] = []
        pending: List[Tuple[Dict[str, Any], np.ndarray]] = []  # decoded, waiting for a generator call
        for row, image in decoded_images(shard, self.config.storage_options, self.config.max_pixels):
            images.append(row)
            if image is None:
                continue
            pending.append((row, image))
            if len(pending) >= self.config.images_per_batch:
                masks.extend(self.generate(pending))
                pending = []
        if pending:
            masks.extend(self.generate(pending))
        return masks, images

    def generate(self, pending: List[Tuple[Dict[str, Any], np.ndarray]]) -> List[Dict[str, Any]]:
        """Masks of several decoded images in one generator call; completes their image rows
        (``generate_s`` is the call's time shared equally)."""
        t0 = time.perf_counter()
        results = self.generator.generate_batch([image for _, image in pending])
        seconds = (time.perf_counter() - t0) / len(pending)
        masks: List[Dict[str, Any]] = []
        for (row, _), records in zip(pending, results):
            row.update(mask_count=len(records), status="ok", generate_s=seconds)
            masks.extend(self.mask_rows(row["image_id"], records))
        return masks

    def mask_rows(self, image_id: str, records) -> List[Dict[str, Any]]:
        return [
            dict(image_id=image_id, mask_id=i, counts=r["segmentation"]["counts"],
                 height=r["segmentation"]["size"][0], width=r["segmentation"]["size"][1],
                 area=r["area"], bbox=[float(v) for v in r["bbox"]],
                 predicted_iou=r["predicted_iou"], stability_score=r["stability_score"],
                 point_coords=[float(v) for v in r["point_coords"][0]],
                 crop_box=[float(v) for v in r["crop_box"]], model=self.model_id,
                 settings_hash=self.settings_hash)
            for i, r in enumerate(records)
        ]
