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
    masks         binary  postprocess -> collector: the image's ``masks`` rows as an Arrow IPC
                          stream (``pipeline.output.masks_to_ipc``); null if it has none
    prompts       str     decode -> model, jobs.prompt only (``pipeline.prompted.BoxStage``, which
                          also makes ``masks``): JSON of the image's boxes; null otherwise
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import torch

from sam_core import SamAutomaticMaskGenerator, build_sam
from sam_core.amg.generator import finish_mask_data, mask_records
from sam_core.amg.mask_data import MaskData
from sam_core.precision import compute_dtype_name

from .config import PipelineConfig
from .output import ShardWriter, masks_from_ipc, masks_to_ipc
from .reading import END, Row, decode_rows, to_table
from .run_records import written_shard
from .shards import Shard
from .worker_deaths import NO_GUARD, DeathGuard

log = logging.getLogger(__name__)


def build_generator(config: PipelineConfig, device: str) -> SamAutomaticMaskGenerator:
    if config.checkpoint is None:
        torch.manual_seed(config.seed)
    model = build_sam(config.model_type, config.checkpoint, device=device, storage_options=dict(config.storage_options))
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

    def __init__(self, config: PipelineConfig, ledger: Optional[Any] = None) -> None:
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.generator = build_generator(config, device)
        self.guard = DeathGuard(ledger)  # see pipeline.worker_deaths

    def __call__(self, batch: pa.Table) -> pa.Table:
        return to_table(self.process(batch.to_pylist()))

    def process(self, rows: List[Row]) -> List[Row]:
        batch_then_each([r for r in rows if r.get("pixels") is not None], self.guard, self._generate,
                        "generating this image's masks")
        for r in rows:
            r["pixels"] = r["height"] = r["width"] = None
        return rows

    def _generate(self, rows: List[Row]) -> None:
        """Sets ``candidates``, ``generate_s`` and ``compute_dtype`` of decoded image rows (one
        generator call)."""
        images = [np.frombuffer(r["pixels"], np.uint8).reshape(r["height"], r["width"], 3) for r in rows]
        t0 = time.perf_counter()
        candidates = self.generator.generate_candidates_batch(images)
        seconds = (time.perf_counter() - t0) / len(rows)  # the call's time, shared equally
        dtype = compute_dtype_name(self.generator.amp_dtype)
        for r, data in zip(rows, candidates):
            r["candidates"] = pickle.dumps(dict(data.items()), protocol=pickle.HIGHEST_PROTOCOL)
            r["image"] = json.dumps(dict(json.loads(r["image"]), generate_s=seconds, compute_dtype=dtype))


def batch_then_each(rows: List[Row], guard: DeathGuard, work: Callable[[List[Row]], None], what: str) -> None:
    """``work(rows)``: one model call for the decoded image rows of a batch, noted with ``guard``.
    If it raises (out of memory on one large image, ...), or a worker process died on this batch
    before, ``work([row])`` for each row instead: an image a process died on twice is passed over
    (``worker_died``), one that raises gets ``generate_failed``; the others are done. ``what``:
    the work, for the messages ("generating this image's masks")."""
    ids = [json.loads(r["image"])["image_id"] for r in rows]
    if rows and guard.died_on(ids):
        log.warning("a worker process died on a batch with %s; %s one image at a time", ids, what)
    elif rows:
        try:
            with guard.attempt(ids):
                work(rows)
            return
        except Exception as e:  # e.g. out of memory on one large image: retry one by one
            log.warning("a batch of %d images failed (%s: %s); retrying them one by one", len(rows), type(e).__name__, e)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # give the failed call's cached memory back
    for r in rows:  # one by one: after the batch raised, or a process died on it
        image = json.loads(r["image"])
        if guard.passed_over(image, what):
            r["image"] = json.dumps(image)
            continue
        try:
            with guard.attempt([image["image_id"]]):
                work([r])
        except Exception as e1:
            log.exception("%s failed for %s", what, image["uri"])
            r["image"] = json.dumps(failed(image, "generate_failed", e1))


# ---------------------------------------------------------------------- stage 3: postprocess (CPU)
class PostprocessStage:
    """Ray stage: candidate rows -> rows with the image's final ``masks`` rows (small-region
    removal and its NMS, COCO RLE strings, record assembly) and its completed ``images`` row."""

    def __init__(self, config: PipelineConfig, ledger: Optional[Any] = None) -> None:
        self.guard = DeathGuard(ledger)  # see pipeline.worker_deaths
        settings = config.resolved_generator_settings()
        self.min_area = int(settings["min_mask_region_area"])
        self.nms_thresh = max(settings["box_nms_thresh"], settings["crop_nms_thresh"])
        self.model_id = config.model_id()
        self.settings_hash = config.settings_hash()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return to_table(self.process(batch.to_pylist()))

    def process(self, rows: List[Row]) -> List[Row]:
        todo = [r for r in rows if r.get("candidates") is not None]
        ids = [json.loads(r["image"])["image_id"] for r in todo]
        # The batch is noted as a whole (one ledger call); image by image once a process died on it.
        whole, each = (NO_GUARD, self.guard) if self.guard.died_on(ids) else (self.guard, NO_GUARD)
        with whole.attempt(ids):
            for r in todo:
                self._finish(r, each)
        return rows

    def _finish(self, r: Row, guard: DeathGuard) -> None:
        """Sets ``masks`` and completes the ``images`` row of one image's candidate row."""
        t0 = time.perf_counter()
        image = json.loads(r["image"])
        if guard.passed_over(image, "post-processing this image's masks"):
            r.update(candidates=None, image=json.dumps(image))
            return
        try:
            with guard.attempt([image["image_id"]]):
                data = finish_mask_data(MaskData(**pickle.loads(r["candidates"])), self.min_area, self.nms_thresh)
                masks = self.mask_rows(image["image_id"], mask_records(data, "coco_rle"))
        except Exception as e:  # recorded on the image, as the model stage does
            log.exception("post-processing failed for %s", image["uri"])
            failed(image, "postprocess_failed", e)
            masks = []
        else:
            image.update(mask_count=len(masks), status="ok")
        image.update(postprocess_s=time.perf_counter() - t0)
        r.update(candidates=None, image=json.dumps(image), masks=masks_to_ipc(masks) if masks else None)

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
    """Gathers the rows of each shard as they arrive, in any order, and writes them in file order:
    an image's masks go to the shard's writer as soon as every earlier image of the shard is in
    (so only images that arrived ahead of their turn wait in memory, as compact Arrow buffers),
    and the shard is finished (images table, then marker) once its end row and all its images
    are in. Repeated rows (a retried batch) are ignored: the stages are deterministic.

    ``open_shard(shard)`` returns the shard's writer (:class:`pipeline.output.ShardWriter`, or
    anything with its ``add_masks``, ``finish`` and ``abort``)."""

    def __init__(self, shards: Iterable[Shard], open_shard: Callable[[Shard], ShardWriter]) -> None:
        self.shards = {s.shard_id: s for s in shards}
        self.open_shard = open_shard
        self.expected: Dict[str, int] = {}  # files per shard, from its end row
        self.waiting: Dict[str, Dict[int, Tuple[str, Optional[bytes]]]] = {}  # ahead of their turn
        self.next_index: Dict[str, int] = {}  # the image each shard waits for
        self.images: Dict[str, List[Row]] = {}  # images rows passed on, in file order
        self.writers: Dict[str, ShardWriter] = {}
        self.written: List[Dict[str, Any]] = []  # per written shard: id, counts, summed stage times
        self.done: set = set()  # ids of written shards
        self.total = len(self.shards)  # for the progress line logged per written shard
        self.images_written = 0  # images of the written shards (a running count: no sum per shard)
        self.started = time.perf_counter()

    def add(self, rows: Iterable[Row]) -> None:
        touched = set()
        for r in rows:
            shard_id = r["shard_id"]
            if shard_id in self.done:
                continue  # a late repeat (a retried task re-yields its blocks)
            if shard_id not in self.shards:
                raise ValueError(f"Row of unknown shard {shard_id!r}.")
            index = int(r["image_index"])
            if index == END:
                self.expected[shard_id] = int(r["shard_images"])
            elif index >= self.next_index.get(shard_id, 0):  # else passed on already: a repeat
                self.waiting.setdefault(shard_id, {}).setdefault(index, (r["image"], r.get("masks")))
            touched.add(shard_id)
        for shard_id in sorted(touched):
            self._pass_on(shard_id)

    def _pass_on(self, shard_id: str) -> None:
        """Hand the shard's images that are next in file order to its writer; finish it if whole."""
        waiting = self.waiting.get(shard_id, {})
        index = self.next_index.get(shard_id, 0)
        while index in waiting:
            image, masks = waiting.pop(index)
            if shard_id not in self.writers:
                self.writers[shard_id] = self.open_shard(self.shards[shard_id])
            self.images.setdefault(shard_id, []).append(json.loads(image))
            if masks is not None:
                self.writers[shard_id].add_masks(masks_from_ipc(masks))
            index += 1
        self.next_index[shard_id] = index
        if self.expected.get(shard_id) == index:
            self._finish(shard_id)

    def _finish(self, shard_id: str) -> None:
        shard = self.shards.pop(shard_id)
        writer = self.writers.pop(shard_id) if shard_id in self.writers else self.open_shard(shard)  # no files
        images = self.images.pop(shard_id, [])
        writer.finish(images)
        for state in (self.expected, self.waiting, self.next_index):
            state.pop(shard_id, None)
        self.done.add(shard_id)
        self.written.append(written_shard(shard_id, images, writer.masks))
        self.images_written += len(images)
        log.info("%s", self.progress())

    def progress(self) -> str:
        """One line on the last written shard and the run so far, e.g. "shard files-00003 written
        (4 of 40): 64 images (1 error), 5123 masks; run: 2.31 images/s, about 12 min left"."""
        last, n = self.written[-1], len(self.written)
        elapsed = time.perf_counter() - self.started
        errors = f" ({last['images_error']} error{'s' * (last['images_error'] != 1)})" if last["images_error"] else ""
        left = (self.total - n) * elapsed / n  # by shards: tar shards' image counts are known only once read
        eta = f", about {_duration(left)} left" if n < self.total else ""
        return (f"shard {last['shard_id']} written ({n} of {self.total}): "
                f"{last['images_ok'] + last['images_error']} images{errors}, {last['masks']} masks; "
                f"run: {self.images_written / max(elapsed, 1e-9):.2f} images/s{eta}")

    def abort(self) -> None:
        """The run failed: drop the partial files of shards being written (none gets a marker)."""
        for writer in self.writers.values():
            writer.abort()
        self.writers.clear()

    def unfinished(self) -> List[str]:
        """Shards not written (after the whole stream, a bug or lost rows: never silently)."""
        return sorted(self.shards)


def _duration(seconds: float) -> str:
    """"40 s", "12 min", "3.5 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


class RowsWriter:
    """A shard writer that keeps the rows (for :class:`ShardWorker`): ``masks`` and ``images``
    are set by ``finish``."""

    def __init__(self) -> None:
        self.tables: List[pa.Table] = []
        self.masks = 0
        self.rows: Optional[Tuple[List[Row], List[Row]]] = None

    def add_masks(self, table: pa.Table) -> None:
        self.tables.append(table)
        self.masks += table.num_rows

    def finish(self, images: Sequence[Row]) -> None:
        self.rows = ([m for t in self.tables for m in t.to_pylist()], list(images))

    def abort(self) -> None:
        self.tables = []


class ShardWorker:
    """The same stages in one process, shard by shard (no Ray): the reference for the Ray run and
    a way to fill an output folder from a notebook or a test."""

    def __init__(self, config: PipelineConfig, model_stage: type = ModelStage) -> None:
        self.config = config
        self.model = model_stage(config)
        self.postprocess = PostprocessStage(config)
        self.output = config.output()

    @property
    def generator(self) -> SamAutomaticMaskGenerator:
        return self.model.generator

    def process(self, shard: Shard) -> Tuple[List[Row], List[Row]]:
        """Rows of the masks and images tables for one shard, in file order."""
        writer = RowsWriter()
        collector = ShardCollector([shard], lambda s: writer)
        batch: List[Row] = []
        for row in decode_rows(shard, self.config.storage_options, self.config.max_pixels,
                               short_side=self.config.resize_short_side):
            batch.append(row)
            if len(batch) >= self.config.images_per_batch or row["image_index"] == END:
                collector.add(self.postprocess.process(self.model.process(batch)))
                batch = []
        return writer.rows
