"""``SamAutomaticMaskGenerator``: every object in an image as masks, from a grid of point prompts.

Same constructor, defaults, outputs and records as ``segment_anything.SamAutomaticMaskGenerator``.
In ``mode="exact"`` (default) the arithmetic is the official one, in the same order, so a model
with ``attention_backend="reference"`` gives bit-identical records; what changes is where work
is done and how much of it:

- the predicted-IoU filter runs on the low-res decoder output, so only survivors are upsampled;
- stability, binarisation, boxes and RLE run on survivors in chunks whose full-resolution
  size is bounded (``max_chunk_pixels``), with one host transfer per chunk; a crop's masks are
  run-length encoded as masks of the image without being padded to it;
- crops are encoded several at a time (``encoder_batch_size``);
- crop layers with no surviving mask do not crash;
- with ``compile=True`` the stability and box reductions run as one compiled function (same
  values) and, in fast mode, the encoder and the decoder are compiled too.

``mode="fast"`` adds bf16 autocast for encoder and decoder where the device multiplies bf16 in
hardware (``fast_dtype="auto"``, see ``sam_core/precision.py``; fp32 elsewhere; in bf16 the
encoder's relative-position bias is folded into flash attention), decodes the grid in larger batches
(``fast_points_per_batch``) and keeps the decoder's image tokens factored instead of copying them
per prompt, the masks made from the factors (``modeling/factored.py``); its deviation from exact is measured by ``tests/test_amg_fast_mode.py``
and ``bench/harness.py``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision.ops.boxes import batched_nms, box_area

from ..compiler_check import require_compiler
from ..modeling import Sam
from ..precision import check_fast_dtype, fast_amp_dtype
from ..predictor import ImageEmbedding, SamPredictor, check_image
from .mask_data import MaskData
from .masks import (
    area_from_rle,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    coco_encode_rle,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_statistics,
    mask_to_rle,
    mask_to_rle_numpy,
    remove_small_regions_boxed,
    rle_box,
    rle_to_mask,
    uncrop_boxes_xyxy,
    uncrop_points,
)

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
MODES = ("exact", "fast")

# The settings of the SA-1B release (see shared REFERENCE): 32x32 points, two crop layers
# (1 + 4 + 16 crops) with points halved per layer, official thresholds, masks covering 95% of the
# image or more dropped, holes/islands < 100 px removed.
SA1B_PRESET: Dict[str, Any] = dict(
    points_per_side=32,
    pred_iou_thresh=0.88,
    stability_score_thresh=0.95,
    stability_score_offset=1.0,
    box_nms_thresh=0.7,
    crop_n_layers=2,
    crop_nms_thresh=0.7,
    crop_overlap_ratio=512 / 1500,
    crop_n_points_downscale_factor=2,
    min_mask_region_area=100,
    max_mask_area_fraction=0.95,
)
PRESETS: Dict[str, Dict[str, Any]] = {"sa1b": SA1B_PRESET}


def _empty_candidates(device: torch.device) -> MaskData:
    """A candidate table with no rows: masks as low-res logits (M, h, w) instead of RLEs."""
    data = MaskData.empty(device)
    del data["rles"]
    data["low_res"] = torch.zeros(0, 0, 0, device=device)
    return data


def check_generator_settings(*, points_per_side: Optional[int] = 32, point_grids: Optional[List[np.ndarray]] = None,
                             output_mode: str = "binary_mask", mode: str = "exact", points_per_batch: int = 64,
                             encoder_batch_size: int = 4, fast_points_per_batch: int = 256,
                             max_chunk_pixels: int = 64 * 1024 * 1024, crop_n_layers: int = 0,
                             crop_n_points_downscale_factor: int = 1,
                             max_mask_area_fraction: Optional[float] = None, fast_dtype: str = "auto",
                             **_: Any) -> None:
    """Raise ``ValueError`` for :class:`SamAutomaticMaskGenerator` settings it cannot run with,
    without a model (drivers check a run's settings before starting workers). Settings not
    named here are free values (thresholds, NMS IoUs) and pass."""
    if (points_per_side is None) == (point_grids is None):
        raise ValueError("Give exactly one of points_per_side or point_grids.")
    if output_mode not in OUTPUT_MODES:
        raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}.")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    check_fast_dtype(mode, fast_dtype)
    for name, value in (("points_per_batch", points_per_batch), ("encoder_batch_size", encoder_batch_size),
                        ("fast_points_per_batch", fast_points_per_batch),
                        ("crop_n_points_downscale_factor", crop_n_points_downscale_factor),
                        ("max_chunk_pixels", max_chunk_pixels)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if crop_n_layers < 0:
        raise ValueError(f"crop_n_layers must be >= 0, got {crop_n_layers}.")
    if max_mask_area_fraction is not None and not 0 < max_mask_area_fraction <= 1:
        raise ValueError(f"max_mask_area_fraction must be in (0, 1] or None, got {max_mask_area_fraction}.")
    if points_per_side is not None:
        if points_per_side < 1:
            raise ValueError(f"points_per_side must be >= 1, got {points_per_side}.")
        return
    if len(point_grids) < crop_n_layers + 1:
        raise ValueError(
            f"point_grids has {len(point_grids)} grids; crop_n_layers={crop_n_layers} "
            f"needs {crop_n_layers + 1} (one per layer)."
        )
    for i, grid in enumerate(point_grids):
        g = np.asarray(grid)
        if g.ndim != 2 or g.shape[1] != 2 or not np.all((g >= 0) & (g <= 1)):
            raise ValueError(f"point_grids[{i}] must be Nx2 (x, y) in [0, 1].")


class SamAutomaticMaskGenerator:
    def __init__(
        self,
        model: Sam,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        *,
        mode: str = "exact",
        encoder_batch_size: int = 4,
        fast_points_per_batch: int = 256,
        max_chunk_pixels: int = 64 * 1024 * 1024,
        compile: bool = False,
        max_mask_area_fraction: Optional[float] = None,
        fast_dtype: str = "auto",
    ) -> None:
        """Arguments as the official generator's; beyond them (keyword-only):

        mode: "exact" (fp32, official arithmetic) or "fast" (bf16 autocast where native, large
            prompt batches, factored decoder tokens; close to exact, not equal).
        encoder_batch_size: crops encoded per encoder forward.
        fast_points_per_batch: prompts per decoder forward in fast mode, if larger than
            ``points_per_batch`` (exact mode keeps ``points_per_batch``, as the official batching).
        max_chunk_pixels: bound on full-resolution mask pixels held at once (memory cap).
        compile: ``torch.compile`` the stability and box reductions over the upsampled candidates
            (one fused pass instead of five; identical values) and, in fast mode only, the image
            encoder and the mask decoder (bf16 values then differ from eager by rounding; exact
            mode keeps the official arithmetic). The first calls pay the compilation (seconds on
            CPU for the reductions, a minute or more for the decoder on CPU and for a vit_h
            encoder on a GPU): for long runs, not one image. Needs a system compiler for
            inductor (C++ on CPU, C on CUDA): without one, ``RuntimeError`` here.
        max_mask_area_fraction: drop candidates covering this fraction of the image or more
            (the SA-1B release dropped masks covering >= 95%: mostly the whole scene or its
            background); checked with the stability filter, before NMS, so a dropped mask
            suppresses nothing. None (the default, as the official generator): no such filter.
        fast_dtype: fast mode's autocast: "auto" (bf16 on devices that multiply it in hardware:
            CUDA from Ampere on, CPUs with avx512_bf16/AMX; fp32 elsewhere, where emulated bf16 is
            several times slower than fp32), or a pin: "bfloat16", "float16" (GPUs without bf16
            but with fp16 tensor cores: V100, T4) or "float32" (fast mode only: exact mode refuses
            a pin). The dtype chosen is ``self.amp_dtype`` (None: fp32).
        """
        check_generator_settings(points_per_side=points_per_side, point_grids=point_grids, output_mode=output_mode,
                                 mode=mode, points_per_batch=points_per_batch, encoder_batch_size=encoder_batch_size,
                                 fast_points_per_batch=fast_points_per_batch, max_chunk_pixels=max_chunk_pixels,
                                 crop_n_layers=crop_n_layers,
                                 crop_n_points_downscale_factor=crop_n_points_downscale_factor,
                                 max_mask_area_fraction=max_mask_area_fraction, fast_dtype=fast_dtype)
        if points_per_side is not None:
            self.point_grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        else:
            self.point_grids = point_grids
        if output_mode == "coco_rle":
            from pycocotools import mask as _  # noqa: F401  (fail early if missing)
        if min_mask_region_area > 0:
            import cv2  # noqa: F401

        if compile:
            require_compiler(next(model.parameters()).device)
        amp = fast_amp_dtype(next(model.parameters()).device, fast_dtype) if mode == "fast" else None
        compile_model = bool(compile) and mode == "fast"
        self.predictor = SamPredictor(model, amp_dtype=amp, compile_encoder=compile_model)
        # The decoder's two halves as _process_batch calls them; compiled with the prompt batch
        # dynamic (the grid's last batch and the prompts with a survivor vary in number). Fast
        # mode keeps the image tokens factored, not one copy per prompt (modeling/factored.py).
        decoder = model.mask_decoder
        self.factored_decoder = mode == "fast"
        self._run_transformer = decoder.run_transformer_factored if self.factored_decoder else decoder.run_transformer
        self._masks = decoder.masks_from_rows if self.factored_decoder else decoder.masks_from_tokens
        if compile_model:
            self._run_transformer = torch.compile(self._run_transformer, dynamic=True)
            self._masks = torch.compile(self._masks, dynamic=True)
        self.points_per_batch = points_per_batch
        # Prompts per decoder forward: the grid in few large batches in fast mode.
        self.decoder_batch = points_per_batch if mode == "exact" else max(points_per_batch, fast_points_per_batch)
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.max_mask_area_fraction = max_mask_area_fraction
        self.output_mode = output_mode
        self.mode = mode
        self.fast_dtype = fast_dtype
        self.amp_dtype = amp
        self.encoder_batch_size = encoder_batch_size
        self.max_chunk_pixels = max_chunk_pixels
        self.compile = bool(compile)

    @classmethod
    def from_preset(cls, preset: str, model: Sam, **overrides: Any) -> "SamAutomaticMaskGenerator":
        """A generator with a named preset's settings (``"sa1b"``), ``overrides`` applied on top."""
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
        return cls(model, **{**PRESETS[preset], **overrides})

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        """Masks for an HxWx3 uint8 RGB image, as a list of records (official keys and types):

        segmentation (HxW bool array, or RLE dict per ``output_mode``), area (int),
        bbox (XYWH), predicted_iou (float), point_coords ([[x, y]]), stability_score (float),
        crop_box (XYWH).
        """
        check_image(image, None)
        return self.records(self.generate_mask_data(image))

    @torch.no_grad()
    def generate_batch(self, images: Sequence[np.ndarray]) -> List[List[Dict[str, Any]]]:
        """:meth:`generate` for several images, their crops sharing encoder batches
        (``encoder_batch_size`` crops per forward, across images). One record list per image."""
        for i, image in enumerate(images):
            check_image(image, i)
        return [self.records(data) for data in self.generate_mask_data_batch(images)]

    @torch.no_grad()
    def generate_mask_data(self, image: np.ndarray) -> MaskData:
        """All masks of ``image`` after NMS and small-region removal, as numpy columns + RLEs."""
        return self.generate_mask_data_batch([image])[0]

    @torch.no_grad()
    def generate_mask_data_batch(self, images: Sequence[np.ndarray]) -> List[MaskData]:
        """:meth:`generate_mask_data` of each image, crops of all of them batched through the encoder."""
        return [self.finish_mask_data(data) for data in self.generate_candidates_batch(images)]

    # The two halves of generation, for callers that run them in different places (the Ray
    # pipeline runs the first on a GPU actor and the second on CPU workers):
    # generate_mask_data_batch(images) == [finish_mask_data(d) for d in generate_candidates_batch(images)].

    def finish_mask_data(self, data: MaskData) -> MaskData:
        """Host-only work on :meth:`generate_candidates_batch` output: small-region removal and
        its NMS when ``min_mask_region_area`` > 0 (see :func:`finish_mask_data`)."""
        return finish_mask_data(data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh))

    def records(self, data: MaskData) -> List[Dict[str, Any]]:
        """Official-format records from the columns of :meth:`generate_mask_data`."""
        return mask_records(data, self.output_mode)

    @torch.no_grad()
    def generate_candidates_batch(self, images: Sequence[np.ndarray]) -> List[MaskData]:
        """Device work for each image: candidates of every crop, NMS within and across crops,
        then RLEs of the kept masks only (numpy columns + uncompressed RLEs, one table per image).

        Crops of all images are encoded ``encoder_batch_size`` at a time. Masks are kept as low-res
        logits until NMS has decided; the kept ones are upsampled again (the same arithmetic, so
        the same pixels) and encoded, so RLE work scales with the output.

        """
        for i, image in enumerate(images):
            check_image(image, i)
        jobs: List[Tuple[int, List[int], int]] = []  # (image index, crop box XYXY, layer) per crop
        crop_boxes: List[List[List[int]]] = []
        for i, image in enumerate(images):
            boxes, layers = generate_crop_boxes(image.shape[:2], self.crop_n_layers, self.crop_overlap_ratio)
            crop_boxes.append(boxes)
            jobs += [(i, box, layer) for box, layer in zip(boxes, layers)]
        device = self.predictor.device
        tables = [_empty_candidates(device) for _ in images]
        embeddings: List[List[ImageEmbedding]] = [[] for _ in images]  # per crop, for its mask sizes
        batches = [jobs[start : start + self.encoder_batch_size] for start in range(0, len(jobs), self.encoder_batch_size)]
        for batch, (sizes, resized) in zip(batches, self._resized_ahead(images, batches)):
            for (i, box, layer), embedding in zip(batch, self.predictor.set_resized_images(resized, sizes)):
                crop_data = self._process_crop(embedding, box, layer, images[i].shape[:2])
                crop_data["crop_idx"] = torch.full((len(crop_data),), len(embeddings[i]), device=device)
                tables[i].cat(crop_data)
                embeddings[i].append(ImageEmbedding(None, embedding.input_size, embedding.original_size))
        self.predictor.reset_image()

        for image, data, boxes, crop_embeddings in zip(images, tables, crop_boxes, embeddings):
            if len(boxes) > 1 and len(data) > 0:
                # Across crops, prefer masks from smaller (more zoomed-in) crops.
                scores = 1 / box_area(data["crop_boxes"])
                keep = batched_nms(data["boxes"].float(), scores, torch.zeros_like(scores),
                                   iou_threshold=self.crop_nms_thresh)
                data.filter(keep)
            data["rles"] = self._encode(data, boxes, crop_embeddings, image.shape[:2])
            del data["low_res"], data["crop_idx"]
            data.to_numpy()
        return tables

    def _resized_ahead(self, images: Sequence[np.ndarray], batches: Sequence[Sequence[Tuple[int, List[int], int]]]
                       ) -> Iterator[Tuple[List[Tuple[int, int]], List[np.ndarray]]]:
        """(crop sizes, crops resized for the encoder) of each batch of crop jobs (image index,
        crop box XYXY, layer). The next batch is resized on a worker thread while the caller runs
        this one through the model, so the host's resizing (PIL, ~10 ms a crop of a 1500x2250
        photo on one core: ~0.2 s for the SA-1B preset's 21) is off the device's path. Same
        resizes, same pixels, as :meth:`SamPredictor.set_images`."""
        def resize(batch):
            crops = [images[i][y0:y1, x0:x1, :] for i, (x0, y0, x1, y1), _ in batch]
            return [c.shape[:2] for c in crops], self.predictor.resize_images(crops)

        if len(batches) <= 1:  # nothing to overlap with
            yield from (resize(batch) for batch in batches)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="amg-resize") as pool:
            ahead = pool.submit(resize, batches[0])
            for k in range(len(batches)):
                current = ahead.result()
                if k + 1 < len(batches):
                    ahead = pool.submit(resize, batches[k + 1])
                yield current

    def _process_crop(
        self, embedding: ImageEmbedding, crop_box: List[int], layer_idx: int, orig_size: Tuple[int, int]
    ) -> MaskData:
        """Candidates of one crop after its box NMS; boxes and points in image coordinates."""
        self.predictor.set_embedding(embedding)
        crop_h, crop_w = embedding.original_size
        points_for_image = self.point_grids[layer_idx] * np.array([[crop_w, crop_h]])
        data = _empty_candidates(self.predictor.device)
        for start in range(0, len(points_for_image), self.decoder_batch):
            points = points_for_image[start : start + self.decoder_batch]
            data.cat(self._process_batch(points, (crop_h, crop_w), crop_box, orig_size))
        if len(data) > 0:
            keep = batched_nms(data["boxes"].float(), data["iou_preds"],
                               torch.zeros_like(data["iou_preds"]), iou_threshold=self.box_nms_thresh)
            data.filter(keep)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box], device=data["boxes"].device).repeat(len(data), 1)
        return data

    def _process_batch(
        self, points: np.ndarray, im_size: Tuple[int, int], crop_box: List[int], orig_size: Tuple[int, int]
    ) -> MaskData:
        """Decode one batch of point prompts; the candidates that pass every filter, as low-res logits."""
        p = self.predictor
        model = p.model
        device = p.device
        # float64 points as the official code passes them (normalised in float64, then cast).
        in_points = torch.as_tensor(p.transform.apply_coords(points, im_size), device=device)
        in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=device)
        decoder = model.mask_decoder
        with p._autocast():
            sparse, dense = model.prompt_encoder(points=(in_points[:, None, :], in_labels[:, None]),
                                                 boxes=None, masks=None)
            hs, image_tokens = self._run_transformer(p.features, model.prompt_encoder.get_dense_pe(), sparse, dense)
            iou_preds = decoder.iou_from_tokens(hs)[:, 1:].float()  # (B, 3) multimask outputs
        # IoU filter first: it needs no pixels, and most candidates fail it. Masks are then
        # decoded only for prompts with a survivor, and upsampled only for survivors. Rows are
        # picked by index tensors (two nonzeros: the batch's only host syncs besides one per
        # chunk in _filter) rather than by boolean masks (a sync each on a GPU).
        if self.pred_iou_thresh > 0.0:
            keep = iou_preds > self.pred_iou_thresh
        else:
            keep = torch.ones_like(iou_preds, dtype=torch.bool)
        prompts = keep.any(dim=1).nonzero().flatten()  # (K,) prompts with a survivor
        if prompts.numel() == 0:
            return _empty_candidates(device)
        with p._autocast():
            if self.factored_decoder:  # the masks straight from the factors, in the autocast dtype
                logits = self._masks(hs[prompts], image_tokens.select(prompts), p.features.shape[-2:], p.amp_dtype)
            else:
                # Indexing (not index_select) keeps src's memory layout, and with it the
                # convolution's arithmetic, as the official code has it.
                logits = self._masks(hs[prompts], image_tokens[prompts])
        # Survivors in row-major (prompt, output) order, as the official flatten.
        kept = keep[prompts].flatten().nonzero().flatten()  # (M,) into (K, 3)
        outputs = keep.shape[1]
        prompt, output = kept // outputs, kept % outputs
        low_res = logits[prompt, output + 1].float()  # (M, h, w)
        iou_preds = iou_preds[prompts[prompt], output]  # (M,)
        points_t = torch.as_tensor(points, device=device)[prompts[prompt]]  # (M, 2) float64

        out = _empty_candidates(device)
        embedding = ImageEmbedding(None, p.input_size, p.original_size)
        for part in self._chunks(low_res.shape[0], im_size):
            out.cat(self._filter(low_res[part], iou_preds[part], points_t[part], embedding, crop_box, orig_size))
        return out

    def _chunks(self, n: int, mask_size: Tuple[int, int]) -> List[slice]:
        """Slices of ``n`` masks of ``mask_size`` (a crop's) whose full-resolution pixels stay
        under ``max_chunk_pixels``."""
        # Full-resolution pixels per mask: the encoder-size intermediate or the crop, if larger.
        pixels = max(self.predictor.model.image_encoder.img_size**2, mask_size[0] * mask_size[1])
        chunk = max(1, self.max_chunk_pixels // pixels)
        return [slice(i, i + chunk) for i in range(0, n, chunk)]

    def _upsample(self, low_res: torch.Tensor, embedding: ImageEmbedding) -> torch.Tensor:
        """(M, h, w) low-res logits -> (M, crop_h, crop_w) logits, as the official postprocessing."""
        model = self.predictor.model
        return model.postprocess_masks(low_res[:, None], embedding.input_size, embedding.original_size)[:, 0]

    def _filter(self, low_res, iou_preds, points, embedding, crop_box, orig_size) -> MaskData:
        """Upsample candidates to the crop, score stability, box the binary masks, drop crop-edge masks."""
        threshold = self.predictor.model.mask_threshold
        masks = self._upsample(low_res, embedding)
        with_area = self.max_mask_area_fraction is not None
        stability, boxes, *area = mask_statistics(masks, threshold, self.stability_score_offset,
                                                  compiled=self.compile, with_area=with_area)
        keep = torch.ones_like(stability, dtype=torch.bool)
        if self.stability_score_thresh > 0.0:
            keep = stability >= self.stability_score_thresh
        orig_h, orig_w = orig_size
        keep &= ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
        if with_area:  # the crop's mask has the pixels of the image's
            keep &= area[0] < self.max_mask_area_fraction * orig_h * orig_w
        data = MaskData(iou_preds=iou_preds, points=points, stability_score=stability, boxes=boxes, low_res=low_res)
        data.filter(keep)  # one nonzero for the five columns
        return data

    def _encode(self, data: MaskData, crop_boxes: List[List[int]], embeddings: List[ImageEmbedding],
                orig_size: Tuple[int, int]) -> List[Dict[str, Any]]:
        """Uncompressed RLEs (in row order) of the kept masks, upsampled again from their logits."""
        rles: List[Optional[Dict[str, Any]]] = [None] * len(data)
        crop_idx = data["crop_idx"].cpu().numpy()  # one host transfer for the grouping by crop
        threshold = self.predictor.model.mask_threshold
        for c in np.unique(crop_idx).tolist():
            rows = np.flatnonzero(crop_idx == c)
            rows_t = torch.as_tensor(rows, device=data["low_res"].device)
            for part in self._chunks(len(rows), embeddings[c].original_size):
                masks = self._upsample(data["low_res"][rows_t[part]], embeddings[c]) > threshold
                encoded = mask_to_rle(masks, crop_boxes[c], orig_size)  # of the image, from the crop
                for row, rle in zip(rows[part].tolist(), encoded):
                    rles[row] = rle
        return rles

    @staticmethod
    def postprocess_small_regions(mask_data: MaskData, min_area: int, nms_thresh: float) -> MaskData:
        """Fill holes and drop islands smaller than ``min_area``, then NMS again, preferring masks
        that did not change. Edits ``mask_data`` (numpy columns) in place and returns it."""
        if len(mask_data["rles"]) == 0:
            return mask_data
        changed_masks: Dict[int, np.ndarray] = {}  # only these are kept at full resolution
        boxes = np.zeros((len(mask_data["rles"]), 4), dtype=np.int64)
        scores = []
        final_boxes: Dict[int, Optional[Tuple[int, int, int, int]]] = {}  # of the changed masks
        for i, rle in enumerate(mask_data["rles"]):
            # Boxes from the runs, then from the window labelled: no pass over the whole image.
            box = rle_box(rle)
            mask = rle_to_mask(rle, box)
            mask, changed_holes, box = remove_small_regions_boxed(mask, min_area, "holes", box)
            mask, changed_islands, box = remove_small_regions_boxed(mask, min_area, "islands", box)
            boxes[i] = box if box is not None else (0, 0, 0, 0)
            if changed_holes or changed_islands:
                changed_masks[i], final_boxes[i] = mask, box
            scores.append(float(not (changed_holes or changed_islands)))
        scores_t = torch.as_tensor(scores)
        keep = batched_nms(torch.as_tensor(boxes).float(), scores_t, torch.zeros(len(boxes)),
                           iou_threshold=nms_thresh)
        for i in keep.tolist():
            if i in changed_masks:
                mask_data["rles"][i] = mask_to_rle_numpy(changed_masks[i], final_boxes[i])
                mask_data["boxes"][i] = boxes[i]
        mask_data.filter(keep)
        return mask_data


def finish_mask_data(data: MaskData, min_mask_region_area: int, nms_thresh: float) -> MaskData:
    """Candidates of one image (:meth:`SamAutomaticMaskGenerator.generate_candidates_batch`) ->
    its final masks: holes and islands under ``min_mask_region_area`` pixels removed and NMS run
    again at ``nms_thresh``; unchanged when ``min_mask_region_area`` is 0. CPU only."""
    if min_mask_region_area > 0:
        data = SamAutomaticMaskGenerator.postprocess_small_regions(data, min_mask_region_area, nms_thresh)
    return data


def mask_records(data: MaskData, output_mode: str) -> List[Dict[str, Any]]:
    """Official-format records (``segmentation`` per ``output_mode``, area, bbox XYWH,
    predicted_iou, point_coords, stability_score, crop_box XYWH) from an image's final masks."""
    if output_mode == "coco_rle":
        segmentations = [coco_encode_rle(rle) for rle in data["rles"]]
    elif output_mode == "binary_mask":
        segmentations = [rle_to_mask(rle) for rle in data["rles"]]
    else:
        segmentations = data["rles"]
    boxes = box_xyxy_to_xywh(data["boxes"]).tolist()
    crop_boxes = box_xyxy_to_xywh(data["crop_boxes"]).tolist()
    return [
        {
            "segmentation": segmentations[i],
            "area": area_from_rle(data["rles"][i]),
            "bbox": boxes[i],
            "predicted_iou": data["iou_preds"][i].item(),
            "point_coords": [data["points"][i].tolist()],
            "stability_score": data["stability_score"][i].item(),
            "crop_box": crop_boxes[i],
        }
        for i in range(len(segmentations))
    ]
