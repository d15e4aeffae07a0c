"""Masks from existing boxes (the auto-annotate use case), written to the same masks/images tables.

Prompts come from a COCO detection/instances JSON (``images`` with ``file_name``, ``annotations``
with ``bbox`` XYWH) or a Parquet/CSV table with columns ``uri`` (image path or URI) and ``bbox``
(XYWH list) or ``x``, ``y``, ``w``, ``h``. Each box gives one mask, as
``SamPredictor.predict(box=..., multimask_output=False)`` does; ``mask_id`` is the box's position
among its image's boxes in input order, ``point_coords`` is null and ``crop_box`` the whole image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
import time
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import torch

from sam_core import SamPredictor, build_sam
from sam_core.precision import check_fast_dtype, compute_dtype_name, fast_amp_dtype
from sam_core.predictor import ImageEmbedding
from sam_core.amg.masks import batched_mask_to_box, calculate_stability_score, coco_encode_rle, mask_to_rle
from sam_core.training.data import check_coco

from .config import PipelineConfig, model_id, weights_of
from .decode import DEFAULT_MAX_PIXELS
from .output import OutputDir, masks_to_ipc, read_csv, read_parquet
from .reading import Row, decoded_images, to_table
from .resuming import Todo, select_pending
from .run import RunPlan, run_stages, summarize_tables
from .run_records import recorded, written_shard
from .shards import Shard, common_root
from .storage import open_uri
from .single_machine import RunSummary
from .stages import batch_then_each
from .worker_deaths import DeathGuard


PROMPTED_SETTINGS_HASH = "prompted-boxes"  # no generator settings: one mask per box
PROMPT_MODES = ("exact", "fast")
MAX_CHUNK_PIXELS = 64 * 1024 * 1024  # full-resolution mask pixels decoded at once (the generator's default)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImagePrompts:
    uri: str  # the image file
    boxes: Tuple[Tuple[float, float, float, float], ...]  # XYWH, in input order


def _join(root: Optional[str], name: str) -> str:
    if root is None or "://" in name or name.startswith("/"):
        return name
    return posixpath.join(root.rstrip("/"), name)


def read_prompts(path: str, images_root: Optional[str] = None,
                 storage_options: Optional[Mapping[str, Any]] = None) -> List[ImagePrompts]:
    """Boxes per image from a COCO JSON or a Parquet/CSV table; file names are joined to
    ``images_root`` unless absolute. Images of a COCO file without annotations are kept (0 boxes).
    A file that lacks what names an image or a box (a COCO image without ``file_name``, an
    annotation without ``bbox``, a row without ``uri``) is refused, naming the entries; a box
    whose values are not numbers is kept (as NaN) for its image to be recorded as ``bad_prompt``.
    A table's ``bbox`` may be a list or its JSON text (``"[x, y, w, h]"``, as a CSV holds it)."""
    opts = dict(storage_options or {})
    if path.endswith(".json"):
        coco, uris = load_coco_prompts(path, images_root, opts)
        boxes: Dict[Any, List[Tuple[float, ...]]] = {i: [] for i in uris}
        for a in coco["annotations"]:
            boxes[a["image_id"]].append(_box(a["bbox"]))
        return [ImagePrompts(uri, tuple(boxes[i])) for i, uri in uris.items()]
    if path.endswith((".parquet", ".csv")):
        table = load_prompt_table(path, opts)
        cols = set(table.column_names)
        order: Dict[str, List[Tuple[float, ...]]] = {}
        for r in table.to_pylist():
            box = r["bbox"] if "bbox" in cols else [r["x"], r["y"], r["w"], r["h"]]
            order.setdefault(_join(images_root, r["uri"]), []).append(_box(box))
        return [ImagePrompts(uri, tuple(b)) for uri, b in order.items()]
    raise ValueError(f"{path}: prompts must be a COCO .json or a .parquet/.csv table of boxes.")


def load_prompt_table(path: str, storage_options: Optional[Mapping[str, Any]] = None) -> pa.Table:
    """A Parquet/CSV prompts table, checked (a ``uri`` in every row, ``bbox`` or ``x``, ``y``,
    ``w``, ``h`` columns). An image's boxes are its rows in table order: the k-th is prompted as
    the image's mask ``k``."""
    try:
        with open_uri(path, "rb", dict(storage_options or {})) as f:
            table = read_parquet(f) if path.endswith(".parquet") else read_csv(f)
    except pa.ArrowInvalid as e:  # not a table of that format: name the file
        raise ValueError(f"{path}: {e}") from None
    cols = set(table.column_names)
    if "uri" not in cols or not ({"bbox"} <= cols or {"x", "y", "w", "h"} <= cols):
        raise ValueError(f"{path}: needs a 'uri' column and 'bbox' (XYWH) or 'x', 'y', 'w', 'h' columns; "
                         f"has {sorted(cols)}.")
    empty = [i for i, u in enumerate(table.column("uri").to_pylist()) if not u]
    if empty:
        raise ValueError(f"{path}: {len(empty)} row(s) have no 'uri' (e.g. row {empty[0]}).")
    return table


def load_coco_prompts(path: str, images_root: Optional[str] = None,
                      storage_options: Optional[Mapping[str, Any]] = None) -> Tuple[Dict[str, Any], Dict[Any, str]]:
    """A COCO prompts file, checked (see :func:`read_prompts`), and each image id's URI (its
    ``file_name`` joined to ``images_root``). An image's boxes are its annotations in file order:
    the k-th is prompted as the image's mask ``k``."""
    with open_uri(path, "r", dict(storage_options or {})) as f:
        coco = json.load(f)
    check_coco(path, coco, ("id", "file_name"), ("image_id", "bbox"))
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    repeated = sorted(n for n, k in Counter(files.values()).items() if k > 1)
    if repeated:
        raise ValueError(f"{path}: {len(repeated)} file_name(s) belong to more than one image: {repeated[:10]}.")
    unknown = sorted({a["image_id"] for a in coco["annotations"] if a["image_id"] not in files}, key=str)
    if unknown:
        raise ValueError(f"{path}: annotations refer to image ids not in 'images': {unknown[:10]}.")
    return coco, {i: _join(images_root, name) for i, name in files.items()}


def _box(values: Any) -> Tuple[float, ...]:
    """A box's values as floats (a JSON list in a string is read as the list); a value that is
    not a number becomes NaN, so that :func:`bad_boxes` records its image as ``bad_prompt``."""
    if isinstance(values, str):
        try:
            values = json.loads(values)
        except ValueError:
            return (math.nan,)
    if not isinstance(values, (list, tuple)):
        return (math.nan,)
    out = []
    for v in values:
        try:
            out.append(float(v) if not isinstance(v, bool) else math.nan)
        except (TypeError, ValueError):
            out.append(math.nan)
    return tuple(out)


def bad_boxes(boxes: Sequence[Sequence[float]], width: int, height: int) -> List[str]:
    """Descriptions of boxes that cannot prompt: not 4 numbers, infinite, empty, or wholly outside the image."""
    bad = []
    for i, box in enumerate(boxes):
        if len(box) != 4:
            bad.append(f"box {i} {list(box)} does not have 4 values (x, y, w, h)")
            continue
        x, y, w, h = box
        if any(math.isnan(v) for v in box):
            bad.append(f"box {i} {[x, y, w, h]} has a value that is not a number (nan)")
        elif not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            bad.append(f"box {i} {[x, y, w, h]} is not a finite box of positive size")
        elif x >= width or y >= height or x + w <= 0 or y + h <= 0:
            bad.append(f"box {i} {[x, y, w, h]} lies outside the {width}x{height} image")
    return bad


class BoxPrompter:
    """Masks for the boxes of each image: one encoder pass per image, its boxes decoded in chunks."""

    def __init__(self, model_type: str, checkpoint: Optional[str], device: Optional[str] = None,
                 seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                 storage_options: Optional[Dict[str, Any]] = None, max_chunk_pixels: int = MAX_CHUNK_PIXELS,
                 mode: str = "exact", fast_dtype: str = "auto") -> None:
        """``max_chunk_pixels``: full-resolution mask pixels decoded at once; an image's boxes
        are decoded in chunks under it (at least one box), so a dense image (hundreds of boxes
        on a large photo: ~50 MB of float logits per box at 4000x3000) does not run out of memory.
        ``mode``: "exact" (fp32, as ``SamPredictor``) or "fast" (the decoder's image tokens
        factored and, where the device multiplies bf16 in hardware, bf16 autocast for encoder
        and decoder, as the generator's fast mode (``sam_core/precision.py``); other masks, so
        another output identity). ``fast_dtype``: fast mode's autocast, as the generator's
        ("auto", or a pin: "bfloat16", "float16", "float32"; a pin is part of the output's identity)."""
        if max_chunk_pixels < 1:
            raise ValueError(f"max_chunk_pixels must be >= 1, got {max_chunk_pixels}.")
        check_prompt_mode(mode, fast_dtype)
        self.max_chunk_pixels = max_chunk_pixels
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if checkpoint is None:
            torch.manual_seed(seed)
        self.predictor = SamPredictor(build_sam(model_type, checkpoint, device=device, storage_options=storage_options),
                                      amp_dtype=fast_amp_dtype(device, fast_dtype) if mode == "fast" else None,
                                      factored_decoder=mode == "fast")
        self.model_id = model_id(model_type, checkpoint, seed)
        self._checkpoint = (checkpoint, storage_options)
        self.mode, self.fast_dtype = mode, fast_dtype
        self.settings_hash = prompt_identity(self.model_id, mode, fast_dtype=fast_dtype)["settings_hash"]
        self.max_pixels = max_pixels

    @cached_property
    def weights(self) -> Optional[str]:
        """The checkpoint's digest (``weights_of``), for the output this prompter writes; not
        asked for in a Ray run's model actors (a file without sums is read whole for it)."""
        return weights_of(*self._checkpoint)

    def encode(self, images: Sequence[np.ndarray]) -> List[ImageEmbedding]:
        """Embeddings of HxWx3 images from one encoder batch (for :meth:`masks`)."""
        return self.predictor.set_images(list(images))

    def masks(self, image: np.ndarray, boxes: Sequence[Sequence[float]],
              embedding: Optional[ImageEmbedding] = None) -> List[Dict[str, Any]]:
        """Mask rows (without image_id) for XYWH ``boxes`` on an HxWx3 image: one encoder pass
        (none with the image's ``embedding`` from :meth:`encode`), the boxes decoded in chunks of
        at most ``max_chunk_pixels`` mask pixels."""
        p = self.predictor
        if embedding is None:
            p.set_image(image)
        else:
            p.set_embedding(embedding)
        if not boxes:
            return []
        h, w = image.shape[:2]
        xyxy = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in boxes], dtype=np.float64)
        boxes_t = torch.as_tensor(p.transform.apply_boxes(xyxy, p.original_size), dtype=torch.float,
                                  device=p.device)
        per_chunk = max(1, self.max_chunk_pixels // (h * w))
        rows: List[Dict[str, Any]] = []
        for start in range(0, len(boxes_t), per_chunk):
            rows += self._chunk_rows(boxes_t[start : start + per_chunk], h, w, first_id=start)
        return rows

    def _chunk_rows(self, boxes_t: torch.Tensor, h: int, w: int, first_id: int) -> List[Dict[str, Any]]:
        """Mask rows of (N, 4) transformed XYXY boxes on the current image, ids from ``first_id``."""
        p = self.predictor
        with torch.no_grad():
            logits, iou, _ = p.predict_torch(None, None, boxes_t, multimask_output=False, return_logits=True)
        logits = logits[:, 0]  # (N, H, W)
        threshold = p.model.mask_threshold
        stability = calculate_stability_score(logits, threshold, 1.0)
        masks = logits > threshold
        del logits
        mask_boxes = batched_mask_to_box(masks).cpu().numpy()
        rows = []
        for i, rle in enumerate(mask_to_rle(masks)):
            coco = coco_encode_rle(rle)
            x0, y0, x1, y1 = (float(v) for v in mask_boxes[i])
            rows.append(dict(mask_id=first_id + i, counts=coco["counts"], height=h, width=w,
                             area=int(sum(rle["counts"][1::2])), bbox=[x0, y0, x1 - x0, y1 - y0],
                             predicted_iou=float(iou[i, 0]), stability_score=float(stability[i]),
                             point_coords=None, crop_box=[0.0, 0.0, float(w), float(h)],
                             model=self.model_id, settings_hash=self.settings_hash))
        return rows

    def prompt(self, row: Dict[str, Any], image: np.ndarray, boxes: Sequence[Sequence[float]],
               embedding: Optional[ImageEmbedding] = None, encode_s: float = 0.0) -> List[Dict[str, Any]]:
        """Mask rows of one decoded image's ``boxes`` (``embedding``: its encoding, if done
        already, in ``encode_s`` seconds); completes its ``images`` row (ok, counts and time; or
        ``bad_prompt`` with the boxes that cannot prompt, and no masks)."""
        h, w = image.shape[:2]
        bad = bad_boxes(boxes, w, h)
        if bad:
            row.update(error_reason="bad_prompt", error_detail="; ".join(bad))
            return []
        t1 = time.perf_counter()
        rows = self.masks(image, boxes, embedding)
        row.update(status="ok", mask_count=len(rows), generate_s=encode_s + time.perf_counter() - t1,
                   compute_dtype=compute_dtype_name(self.predictor.amp_dtype))
        return [dict(r, image_id=row["image_id"]) for r in rows]

    def process(self, shard: Shard, boxes_by_uri: Mapping[str, Sequence[Sequence[float]]],
                storage_options: Optional[Mapping[str, Any]] = None):
        """Rows of the masks and images tables for one shard of prompted images."""
        masks: List[Dict[str, Any]] = []
        images: List[Dict[str, Any]] = []
        for row, image in decoded_images(shard, storage_options, self.max_pixels):
            images.append(row)
            if image is not None:
                masks.extend(self.prompt(row, image, boxes_by_uri[row["uri"]]))
        return masks, images


def check_prompt_mode(mode: str, fast_dtype: str = "auto") -> None:
    """Raise ``ValueError`` for a mode or fast dtype a prompted run cannot use (before it starts)."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"mode must be one of {PROMPT_MODES}, got {mode!r}.")
    check_fast_dtype(mode, fast_dtype)


def prompt_identity(model: str, mode: str = "exact", weights: Optional[str] = None,
                    fast_dtype: str = "auto") -> Dict[str, Any]:
    """What decides prompted masks (an output's identity, see ``OutputDir``): the model (and its
    ``weights``, see ``weights_of``), the mode and a pinned ``fast_dtype`` (outputs keep the hash
    they had before fast mode, and before the pin, existed: "prompted-boxes",
    "prompted-boxes-fast", "prompted-boxes-fast-float32")."""
    pinned = mode == "fast" and fast_dtype != "auto"
    settings_hash = "-".join([PROMPTED_SETTINGS_HASH] + [mode] * (mode != "exact") + [fast_dtype] * pinned)
    return {"model": model, **({"weights": weights} if weights else {}), "settings_hash": settings_hash,
            "settings": {"mode": mode, **({"fast_dtype": fast_dtype} if pinned else {})}}


def boxes_digest(boxes: Sequence[Sequence[float]]) -> str:
    """A digest of an image's boxes in order, recorded in its shard's marker: a later run whose
    prompts give the image other boxes redoes the shard (see :mod:`pipeline.resuming`)."""
    return hashlib.sha256(json.dumps([[float(v) for v in b] for b in boxes]).encode()).hexdigest()[:16]


def prompt_shards(prompts: Sequence[ImagePrompts], images_per_shard: int) -> List[Shard]:
    """The prompted images in input order, ``images_per_shard`` to a shard (``prompts-00000``)."""
    uris = [p.uri for p in prompts]
    root = common_root(uris)
    return [Shard(f"prompts-{i // images_per_shard:05d}", "files", tuple(uris[i : i + images_per_shard]), root)
            for i in range(0, len(uris), images_per_shard)]


def run_prompted(prompts: Sequence[ImagePrompts], output_uri: str, prompter: BoxPrompter,
                 images_per_shard: int = 64, overwrite: bool = False,
                 storage_options: Optional[Mapping[str, Any]] = None, redo_runs: Sequence[str] = (),
                 max_shards: Optional[int] = None) -> RunSummary:
    """Process every shard of prompted images not yet complete under ``output_uri``, in this
    process (:func:`run_prompted_on_ray` spreads the same work over a Ray cluster); with
    ``redo_runs``, also the shards those recorded runs wrote (run id prefixes); with
    ``max_shards``, at most that many of them."""
    start = time.perf_counter()
    out = OutputDir(output_uri, storage_options,
                    prompt_identity(prompter.model_id, prompter.mode, prompter.weights, prompter.fast_dtype))
    boxes_by_uri = {p.uri: p.boxes for p in prompts}
    written: List[Dict[str, Any]] = []
    with out.hold_lease():
        todo = select_pending(prompt_shards(prompts, images_per_shard), out, images_per_shard, overwrite,
                              digest=lambda uri: boxes_digest(boxes_by_uri[uri]), redo_runs=redo_runs,
                              max_shards=max_shards)
        settings = {"model": prompter.model_id, "mode": prompter.mode, "fast_dtype": prompter.fast_dtype,
                    "images_per_shard": images_per_shard, "overwrite": overwrite}
        with recorded(out, "prompt", settings, todo, written) as record:
            for shard in todo:
                masks, images = prompter.process(shard, boxes_by_uri, storage_options)
                out.write_shard(shard, masks, images)
                written.append(written_shard(shard.shard_id, images, len(masks)))
    summary = summarize_tables(out)
    summary.shards_processed, summary.shards_left = len(written), todo.left
    summary.run_record = record.uri if record else None
    summary.images_processed = sum(w["images_ok"] + w["images_error"] for w in written)
    summary.seconds = time.perf_counter() - start
    return summary


class BoxStage:
    """Ray model stage of :func:`run_prompted_on_ray`: decoded image rows with their ``prompts``
    (boxes) -> rows with the image's ``masks`` (one per box) and its completed ``images`` row.
    One model per actor; an image the model raises on gets ``generate_failed``."""

    def __init__(self, config: PipelineConfig, ledger: Optional[Any] = None) -> None:
        self.guard = DeathGuard(ledger)  # see pipeline.worker_deaths
        self.prompter = BoxPrompter(config.model_type, config.checkpoint, config.device, config.seed, config.max_pixels,
                                    dict(config.storage_options), mode=config.mode, fast_dtype=prompt_fast_dtype(config))

    def __call__(self, batch: pa.Table) -> pa.Table:
        return to_table(self.process(batch.to_pylist()))

    def process(self, rows: List[Row]) -> List[Row]:
        batch_then_each([r for r in rows if r.get("pixels") is not None], self.guard, self._prompt,
                        "prompting this image")
        for r in rows:
            r.update(pixels=None, height=None, width=None, prompts=None)
        return rows

    def _prompt(self, rows: List[Row]) -> None:
        """Sets ``masks`` and completes ``image`` of decoded image rows: the images whose boxes
        can prompt are encoded in one batch, then each image's boxes decoded."""
        images = [np.frombuffer(r["pixels"], np.uint8).reshape(r["height"], r["width"], 3) for r in rows]
        boxes = [json.loads(r["prompts"]) for r in rows]
        usable = [i for i, (image, b) in enumerate(zip(images, boxes))
                  if not bad_boxes(b, image.shape[1], image.shape[0])]
        t0 = time.perf_counter()
        embeddings = dict(zip(usable, self.prompter.encode([images[i] for i in usable]) if usable else []))
        encode_s = (time.perf_counter() - t0) / max(1, len(usable))  # the batch's time, shared equally
        for i, r in enumerate(rows):
            image_row = json.loads(r["image"])
            masks = self.prompter.prompt(image_row, images[i], boxes[i], embeddings.get(i), encode_s)
            r.update(image=json.dumps(image_row), masks=masks_to_ipc(masks) if masks else None)


def prompt_fast_dtype(config: PipelineConfig) -> str:
    """The fast dtype of a prompted run: ``config.amg``'s ``fast_dtype`` (``jobs.prompt
    --fast-dtype``), "auto" if not given; refused with the mode it cannot go with."""
    fast_dtype = config.amg.get("fast_dtype", "auto")
    check_prompt_mode(config.mode, fast_dtype)
    return fast_dtype


def plan_prompted(prompts: Sequence[ImagePrompts], config: PipelineConfig) -> RunPlan:
    """What :func:`run_prompted_on_ray` would do (``jobs.prompt --dry-run``): its checks, then the
    shards it would write. Starts nothing and writes nothing (see :func:`pipeline.run.plan_run`)."""
    config.check_model()
    output, boxes = _prompted_output(prompts, config)
    return RunPlan.of(output, _pending(prompts, config, output, boxes, reopen=False), config.overwrite)


def _prompted_output(prompts: Sequence[ImagePrompts], config: PipelineConfig) -> Tuple[OutputDir, Dict[str, List]]:
    """The output of a prompted run (with its identity) and each image's boxes, by URI."""
    identity = prompt_identity(config.model_id(), config.mode, weights_of(config.checkpoint, config.storage_options),
                               prompt_fast_dtype(config))
    return (OutputDir(config.output_uri, config.storage_options, identity),
            {p.uri: [list(b) for b in p.boxes] for p in prompts})


def _pending(prompts: Sequence[ImagePrompts], config: PipelineConfig, output: OutputDir, boxes: Mapping[str, List],
             reopen: bool = True) -> Todo:
    """The shards of prompted images to write (:func:`pipeline.resuming.select_pending`; images
    whose boxes changed since their shard was written count as changed files)."""
    return select_pending(prompt_shards(prompts, config.images_per_shard), output, config.images_per_shard,
                          config.overwrite, config.retry_failed, digest=lambda uri: boxes_digest(boxes[uri]),
                          reopen=reopen, redo_runs=config.redo_runs, max_shards=config.max_shards)


def run_prompted_on_ray(prompts: Sequence[ImagePrompts], config: PipelineConfig, stage: type = BoxStage) -> RunSummary:
    """:func:`run_prompted` on the Ray cluster (a local one if none is running): read-and-decode
    tasks, ``config.workers`` model actors (:class:`BoxStage`; ``num_gpus_per_worker`` each), the
    driver writing each shard as it completes. From ``config``: the model, output,
    ``images_per_shard``, ``images_per_batch``, resources, ``max_pixels``, ``overwrite`` and
    ``retry_failed`` (its ``input_uri`` and generator settings are not used). ``stage``: the model
    stage's class (:class:`BoxStage` or a subclass)."""
    start = time.perf_counter()
    config.check_model()
    output, boxes = _prompted_output(prompts, config)
    with output.hold_lease():  # one run at a time writes here
        todo = _pending(prompts, config, output, boxes)
        summary = run_stages(config, todo, output, [(stage, "model")], job="prompt",
                             item_fields=lambda shard: {"prompts": json.dumps([boxes[u] for u in shard.uris])})
    summary.seconds = time.perf_counter() - start
    return summary
