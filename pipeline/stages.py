"""The pipeline's stages, as Ray Data runs them and as one process runs them (``ShardWorker``).

    shards --decode (CPU tasks, pipeline.reading)--> images --model (actor pool, GPU if given)--> candidates
           --postprocess (CPU actor pool)--> mask rows --ShardCollector (driver)--> Parquet per shard

Between stages every row is one image of a shard, or the shard's end row, which says how many
files the shard had (tars are only counted once read) so the collector knows when a shard is
whole, however the images were spread over actors. Columns (Arrow):

    shard_id      str
    image_index   int64   position of the file in its shard; -1 on the end row
    shard_images  int64   the end row: files in the shard; -1 on image rows
    image         str     JSON of the image's ``images`` table row, filled in stage by stage
    pixels        binary  decode -> model: HxWx3 uint8 RGB, C order (null if not decoded)
    height/width  int32   decode -> model: shape of ``pixels``
    candidates    binary  model -> postprocess: pickled numpy columns of the image's masks
                          before small-region removal (null if not decoded); produced and read
                          only by these stages
    masks         str     postprocess -> collector: JSON list of the image's ``masks`` rows
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

import numpy as np
import pyarrow as pa
import torch

from sam_core import SamAutomaticMaskGenerator, build_sam
from sam_core.amg.generator import finish_mask_data, mask_records
from sam_core.amg.mask_data import MaskData

from .config import PipelineConfig
from .output import OutputDir
from .reading import END, Row, decode_rows, to_table
from .shards import Shard

log = logging.getLogger(__name__)


def build_generator(config: PipelineConfig, device: str) -> SamAutomaticMaskGenerator:
    if config.checkpoint is None:
        torch.manual_seed(config.seed)
    model = build_sam(config.model_type, config.checkpoint, device=device)
    return SamAutomaticMaskGenerator(model, **config.generator_settings())


def failed(image: Row, reason: str, error: Exception) -> Row:
    """Record on an ``images`` row (status stays "error") why a stage could not finish it."""
    image.update(error_reason=reason, error_detail=f"{type(error).__name__}: {error}"[:1000])
    return image


# ---------------------------------------------------------------------- stage 2: model (actor pool)
class ModelStage:
    """Ray stage: image rows -> candidate rows. Loads the model once per actor; the decoded images
    of a batch go through one ``generate_candidates_batch`` call (their crops share encoder
    batches; decoding, filtering, NMS and RLE of the kept masks run on the actor's device)."""

    def __init__(self, config: PipelineConfig) -> None:
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.generator = build_generator(config, device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return to_table(self.process(batch.to_pylist()))

    def process(self, rows: List[Row]) -> List[Row]:
        todo = [r for r in rows if r.get("pixels") is not None]
        if todo:
            try:
                self._generate(todo)
            except Exception as e:  # e.g. out of memory on one large image: retry one by one
                log.warning("a batch of %d images failed (%s: %s); retrying them one by one",
                            len(todo), type(e).__name__, e)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # give the failed call's cached memory back
                for r in todo:
                    try:
                        self._generate([r])
                    except Exception as e1:
                        log.exception("generation failed for %s", json.loads(r["image"])["uri"])
                        r["image"] = json.dumps(failed(json.loads(r["image"]), "generate_failed", e1))
        for r in rows:
            r["pixels"] = r["height"] = r["width"] = None
        return rows

    def _generate(self, rows: List[Row]) -> None:
        """Sets ``candidates`` and ``generate_s`` of decoded image rows (one generator call)."""
        images = [np.frombuffer(r["pixels"], np.uint8).reshape(r["height"], r["width"], 3) for r in rows]
        t0 = time.perf_counter()
        candidates = self.generator.generate_candidates_batch(images)
        seconds = (time.perf_counter() - t0) / len(rows)  # the call's time, shared equally
        for r, data in zip(rows, candidates):
            r["candidates"] = pickle.dumps(dict(data.items()), protocol=pickle.HIGHEST_PROTOCOL)
            r["image"] = json.dumps(dict(json.loads(r["image"]), generate_s=seconds))


# ---------------------------------------------------------------------- stage 3: postprocess (CPU)
class PostprocessStage:
    """Ray stage: candidate rows -> rows with the image's final ``masks`` rows (small-region
    removal and its NMS, COCO RLE strings, record assembly) and its completed ``images`` row."""

    def __init__(self, config: PipelineConfig) -> None:
        settings = config.resolved_generator_settings()
        self.min_area = int(settings["min_mask_region_area"])
        self.nms_thresh = max(settings["box_nms_thresh"], settings["crop_nms_thresh"])
        self.model_id = config.model_id()
        self.settings_hash = config.settings_hash()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return to_table(self.process(batch.to_pylist()))

    def process(self, rows: List[Row]) -> List[Row]:
        for r in rows:
            if r.get("candidates") is None:
                continue
            t0 = time.perf_counter()
            image = json.loads(r["image"])
            try:
                data = finish_mask_data(MaskData(**pickle.loads(r["candidates"])), self.min_area, self.nms_thresh)
                masks = self.mask_rows(image["image_id"], mask_records(data, "coco_rle"))
            except Exception as e:  # recorded on the image, as the model stage does
                log.exception("post-processing failed for %s", image["uri"])
                failed(image, "postprocess_failed", e)
                masks = []
            else:
                image.update(mask_count=len(masks), status="ok")
            image.update(postprocess_s=time.perf_counter() - t0)
            r.update(candidates=None, image=json.dumps(image), masks=json.dumps(masks))
        return rows

    def mask_rows(self, image_id: str, records: Sequence[Dict[str, Any]]) -> List[Row]:
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


# ---------------------------------------------------------------------- stage 4: writer (driver)
class ShardCollector:
    """Gathers the rows of each shard as they arrive, in any order, and writes the shard (data,
    then marker) as soon as its end row and all its images are in. Repeated rows (a retried
    batch) are ignored: the stages are deterministic."""

    def __init__(self, shards: Iterable[Shard], write: Callable[[Shard, List[Row], List[Row]], None]) -> None:
        self.shards = {s.shard_id: s for s in shards}
        self.write = write
        self.expected: Dict[str, int] = {}
        self.rows: Dict[str, Dict[int, Tuple[Row, List[Row]]]] = {}
        self.written: List[Dict[str, Any]] = []  # per written shard: id, counts, summed stage times
        self.done: set = set()  # ids of written shards

    def add(self, rows: Iterable[Row]) -> None:
        touched = set()
        for r in rows:
            shard_id = r["shard_id"]
            if shard_id in self.done:
                continue  # a late repeat (a retried task re-yields its blocks)
            if shard_id not in self.shards:
                raise ValueError(f"Row of unknown shard {shard_id!r}.")
            if r["image_index"] == END:
                self.expected[shard_id] = int(r["shard_images"])
            else:
                masks = json.loads(r["masks"]) if r.get("masks") else []
                self.rows.setdefault(shard_id, {}).setdefault(int(r["image_index"]), (json.loads(r["image"]), masks))
            touched.add(shard_id)
        for shard_id in sorted(touched):
            if len(self.rows.get(shard_id, {})) == self.expected.get(shard_id, -1):
                self._write(shard_id)

    def _write(self, shard_id: str) -> None:
        by_index = self.rows.pop(shard_id, {})
        del self.expected[shard_id]
        images = [by_index[i][0] for i in sorted(by_index)]
        masks = [m for i in sorted(by_index) for m in by_index[i][1]]
        self.write(self.shards.pop(shard_id), masks, images)
        self.done.add(shard_id)
        ok = sum(r["status"] == "ok" for r in images)
        self.written.append(dict(
            shard_id=shard_id, images_ok=ok, images_error=len(images) - ok, masks=len(masks),
            **{f"{stage}_s": sum(r.get(f"{stage}_s") or 0.0 for r in images)
               for stage in ("decode", "generate", "postprocess")}))

    def unfinished(self) -> List[str]:
        """Shards not written (after the whole stream, a bug or lost rows: never silently)."""
        return sorted(self.shards)


class ShardWorker:
    """The same stages in one process, shard by shard (no Ray): the reference for the Ray run and
    a way to fill an output folder from a notebook or a test."""

    def __init__(self, config: PipelineConfig, model_stage: type = ModelStage) -> None:
        self.config = config
        self.model = model_stage(config)
        self.postprocess = PostprocessStage(config)
        self.output = OutputDir(config.output_uri, config.storage_options)

    @property
    def generator(self) -> SamAutomaticMaskGenerator:
        return self.model.generator

    def process(self, shard: Shard) -> Tuple[List[Row], List[Row]]:
        """Rows of the masks and images tables for one shard, in file order."""
        result: Dict[str, Tuple[List[Row], List[Row]]] = {}
        collector = ShardCollector([shard], lambda s, masks, images: result.update(rows=(masks, images)))
        batch: List[Row] = []
        for row in decode_rows(shard, self.config.storage_options, self.config.max_pixels):
            batch.append(row)
            if len(batch) >= self.config.images_per_batch or row["image_index"] == END:
                collector.add(self.postprocess.process(self.model.process(batch)))
                batch = []
        return result["rows"]
