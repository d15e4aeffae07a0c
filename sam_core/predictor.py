"""``SamPredictor``: encode an image once, then predict masks for any number of prompts.

Drop-in for ``segment_anything.SamPredictor`` (same signatures, defaults, dtypes and shapes), plus
batched multi-image encoding (:meth:`SamPredictor.set_images`), switching between encoded images
without re-encoding (:meth:`SamPredictor.set_embedding`), optional autocast (``amp_dtype``) and an
optional ``torch.compile``d image encoder (``compile_encoder``).
Bad input raises ``ValueError`` with what was expected, where the official package asserts.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .compiler_check import require_compiler
from .modeling import Sam
from .transforms import ResizeLongestSide


@dataclass(frozen=True)
class ImageEmbedding:
    """One encoded image: features 1xCxHxW, the resized ``input_size`` and ``original_size`` (H, W)."""

    features: torch.Tensor
    input_size: Tuple[int, int]
    original_size: Tuple[int, int]


class SamPredictor:
    def __init__(self, sam_model: Sam, *, amp_dtype: Optional[torch.dtype] = None,
                 compile_encoder: bool = False, factored_decoder: bool = False) -> None:
        """``amp_dtype`` (e.g. ``torch.bfloat16`` on CUDA) runs encoder and decoder under autocast;
        outputs are always float32. ``None`` (default) computes in the model's own dtype.

        ``compile_encoder``: run the image encoder through ``torch.compile`` (fused LayerNorm,
        GELU and residual adds; the batch size is dynamic, so batches of 2 or more share one
        compilation and a batch of 1 has its own). The first encodes pay the compilation
        (minutes for vit_h on a GPU); the values differ from eager by rounding, not bit for bit.
        Without a system compiler for inductor it raises ``RuntimeError`` here, not at the first encode.

        ``factored_decoder``: decode prompts without mask inputs with the image tokens factored
        (``MaskDecoder.run_transformer_factored``): the same masks up to rounding, less work
        when many prompts are decoded at once."""
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.image_encoder.img_size)
        self.amp_dtype = amp_dtype
        if compile_encoder:
            require_compiler(next(sam_model.parameters()).device)
        self._encoder = torch.compile(sam_model.image_encoder) if compile_encoder else sam_model.image_encoder
        self.compile_encoder = bool(compile_encoder)
        self.factored_decoder = bool(factored_decoder)
        self.reset_image()

    # ------------------------------------------------------------------ images
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encode ``image`` (HxWx3 uint8, RGB or BGR) for the following ``predict`` calls."""
        self.set_embedding(self.set_images([image], image_format)[0])

    def set_images(
        self, images: Sequence[np.ndarray], image_format: str = "RGB"
    ) -> List[ImageEmbedding]:
        """Encode several HxWx3 uint8 images (any sizes) in one encoder batch.

        Returns one :class:`ImageEmbedding` per image; the first becomes the current image, and
        :meth:`set_embedding` switches to any other without encoding again.
        """
        return self.set_resized_images(self.resize_images(images, image_format), [im.shape[:2] for im in images])

    def resize_images(self, images: Sequence[np.ndarray], image_format: str = "RGB") -> List[np.ndarray]:
        """The host-side half of :meth:`set_images`: each HxWx3 uint8 image checked, put in the
        model's channel order and resized so its long side is the encoder's input size (PIL, as
        the official package). Several images are resized on as many threads as torch may use
        (``torch.get_num_threads()``: a Ray actor's CPUs); PIL lets other threads run while it
        resizes, so a caller may also resize the next images on another thread while the device
        encodes these."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}.")
        if len(images) == 0:
            raise ValueError("set_images needs at least one image.")
        for i, image in enumerate(images):
            check_image(image, i if len(images) > 1 else None)
        flip = image_format != self.model.image_format

        def resize(image: np.ndarray) -> np.ndarray:
            return self.transform.apply_image(np.ascontiguousarray(image[..., ::-1] if flip else image))

        workers = min(len(images), torch.get_num_threads())
        if workers <= 1:
            return [resize(image) for image in images]
        with ThreadPoolExecutor(workers, thread_name_prefix="sam-resize") as pool:
            return list(pool.map(resize, images))

    def set_resized_images(self, resized: Sequence[np.ndarray], original_sizes: Sequence[Tuple[int, ...]]
                           ) -> List[ImageEmbedding]:
        """The device half of :meth:`set_images`: images from :meth:`resize_images` (of the
        ``original_sizes``, H, W) encoded in one batch; the first becomes the current image."""
        tensors = [torch.as_tensor(r, device=self.device).permute(2, 0, 1) for r in resized]
        embeddings = self.encode(tensors, [tuple(s) for s in original_sizes])
        self.set_embedding(embeddings[0])
        return embeddings

    @torch.no_grad()
    def set_torch_image(
        self, transformed_image: torch.Tensor, original_image_size: Tuple[int, ...]
    ) -> None:
        """Encode an already resized 1x3xHxW image (long side = encoder size)."""
        size = self.model.image_encoder.img_size
        shape = tuple(transformed_image.shape)
        if len(shape) != 4 or shape[0] != 1 or shape[1] != 3 or max(shape[2:]) != size:
            raise ValueError(
                f"set_torch_image expects a 1x3xHxW tensor with long side {size} "
                f"(see ResizeLongestSide), got shape {shape}."
            )
        self.set_embedding(self.encode([transformed_image[0]], [tuple(original_image_size)])[0])

    @torch.no_grad()
    def encode(
        self, images: Sequence[torch.Tensor], original_sizes: Sequence[Tuple[int, ...]]
    ) -> List[ImageEmbedding]:
        """Encode resized 3xhxw tensors (0-255 values) in one batch; one embedding per image."""
        batch = torch.stack([self.model.preprocess(x.to(self.device).float()) for x in images])
        if self.compile_encoder:
            torch._dynamo.maybe_mark_dynamic(batch, 0)  # one compilation for every batch size > 1
        with self._autocast():
            features = self._encoder(batch)  # (B, C, H, W)
        features = features.float()
        return [
            ImageEmbedding(
                features=features[i : i + 1],
                input_size=tuple(int(s) for s in images[i].shape[-2:]),
                original_size=tuple(int(s) for s in original_sizes[i]),
            )
            for i in range(len(images))
        ]

    def set_embedding(self, embedding: ImageEmbedding) -> None:
        """Make a previously computed :class:`ImageEmbedding` the current image."""
        self.reset_image()
        self.features = embedding.features
        self.input_size = embedding.input_size
        self.original_size = embedding.original_size
        self.is_image_set = True

    # ---------------------------------------------------------------- prompts
    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt set on the current image.

        point_coords: Nx2 (x, y) pixels of the original image; point_labels: N of 1 (foreground),
        0 (background) or -1 (ignored); box: 4 XYXY pixels; mask_input: 1x256x256 logits from a
        previous call. Returns masks CxHxW (bool, or float32 logits with ``return_logits``),
        IoU predictions C and low-res logits Cx256x256, C = 3 if ``multimask_output`` else 1.
        """
        self._require_image()
        coords_t = labels_t = box_t = mask_t = None
        if point_coords is not None or point_labels is not None:
            coords, labels = _check_points(point_coords, point_labels)
            coords = self.transform.apply_coords(coords, self.original_size)
            coords_t = torch.as_tensor(coords, dtype=torch.float, device=self.device)[None]
            labels_t = torch.as_tensor(labels, dtype=torch.int, device=self.device)[None]
        if box is not None:
            b = np.asarray(box, dtype=float)
            if b.size != 4 or not np.all(np.isfinite(b)):
                raise ValueError(f"box must be 4 finite numbers x0, y0, x1, y1; got {box!r}.")
            b = self.transform.apply_boxes(b.reshape(1, 4), self.original_size)
            box_t = torch.as_tensor(b, dtype=torch.float, device=self.device)
        if mask_input is not None:
            m = np.asarray(mask_input)
            expected = (1, *self.model.prompt_encoder.mask_input_size)
            if m.shape != expected:
                raise ValueError(f"mask_input must have shape {expected}, got {m.shape}.")
            mask_t = torch.as_tensor(m, dtype=torch.float, device=self.device)[None]
        masks, iou, low_res = self.predict_torch(
            coords_t, labels_t, box_t, mask_t, multimask_output, return_logits=return_logits
        )
        return masks[0].cpu().numpy(), iou[0].cpu().numpy(), low_res[0].cpu().numpy()

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prompts already in the input frame (see ``ResizeLongestSide``).

        point_coords: BxNx2, point_labels: BxN, boxes: Bx4, mask_input: Bx1x256x256.
        Returns masks BxCxHxW (bool, or logits), IoU BxC and low-res logits BxCx256x256.
        """
        self._require_image()
        _check_torch_prompts(point_coords, point_labels, boxes, mask_input,
                             self.model.prompt_encoder.mask_input_size)
        points = None if point_coords is None else (point_coords, point_labels)
        with self._autocast():
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
            low_res, iou = self.model.mask_decoder(
                image_embeddings=self.features,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
                factored=self.factored_decoder,
            )
        low_res, iou = low_res.float(), iou.float()
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res

    def get_image_embedding(self) -> torch.Tensor:
        """Features of the current image: 1xCxHxW (C=256, H=W=64 for SAM)."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
        return self.features

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Forget the current image."""
        self.is_image_set = False
        self.features = None
        self.orig_h = self.orig_w = self.input_h = self.input_w = None
        self.original_size = self.input_size = None

    # ---------------------------------------------------------------- helpers
    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def check_image(image: np.ndarray, index: Optional[int]) -> None:
    where = "" if index is None else f" (image {index})"
    if not isinstance(image, np.ndarray):
        raise ValueError(f"Expected an HxWx3 uint8 numpy array{where}, got {type(image).__name__}.")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"Expected an HxWx3 image{where}, got shape {image.shape}; convert grayscale or RGBA "
            "images to RGB first."
        )
    if image.dtype != np.uint8:
        raise ValueError(f"Expected uint8 pixels in [0, 255]{where}, got dtype {image.dtype}.")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"Image{where} is empty: shape {image.shape}.")


def _check_points(point_coords, point_labels) -> Tuple[np.ndarray, np.ndarray]:
    if point_coords is None or point_labels is None:
        raise ValueError("point_coords and point_labels must be given together.")
    coords = np.asarray(point_coords, dtype=float)
    labels = np.asarray(point_labels)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"point_coords must be Nx2 (x, y), got shape {coords.shape}.")
    if labels.shape != (coords.shape[0],):
        raise ValueError(
            f"point_labels must have shape ({coords.shape[0]},) to match point_coords, "
            f"got {labels.shape}."
        )
    if not np.all(np.isfinite(coords)):
        raise ValueError("point_coords contain NaN or infinite values.")
    if not np.all(np.isin(labels, (-1, 0, 1))):
        raise ValueError(
            "point_labels must be 1 (foreground), 0 (background) or -1 (ignored), "
            f"got {sorted(set(labels.tolist()))}."
        )
    return coords, labels


def _check_torch_prompts(coords, labels, boxes, mask_input, mask_size) -> None:
    batch = set()
    if (coords is None) != (labels is None):
        raise ValueError("point_coords and point_labels must be given together.")
    if coords is not None:
        if coords.ndim != 3 or coords.shape[-1] != 2:
            raise ValueError(f"point_coords must be BxNx2, got shape {tuple(coords.shape)}.")
        if tuple(labels.shape) != tuple(coords.shape[:2]):
            raise ValueError(
                f"point_labels must be BxN = {tuple(coords.shape[:2])}, got {tuple(labels.shape)}."
            )
        batch.add(coords.shape[0])
    if boxes is not None:
        if boxes.shape[-1] != 4 or boxes.ndim not in (2, 3) or boxes.numel() != boxes.shape[0] * 4:
            raise ValueError(f"boxes must be Bx4 (XYXY), got shape {tuple(boxes.shape)}.")
        batch.add(boxes.shape[0])
    if mask_input is not None:
        if mask_input.ndim != 4 or tuple(mask_input.shape[1:]) != (1, *mask_size):
            raise ValueError(
                f"mask_input must be Bx1x{mask_size[0]}x{mask_size[1]}, got {tuple(mask_input.shape)}."
            )
        batch.add(mask_input.shape[0])
    if len(batch) > 1:
        raise ValueError(f"Prompt batch sizes disagree: {sorted(batch)}.")
