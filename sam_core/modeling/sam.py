"""The SAM model: image encoder + prompt encoder + mask decoder, with pre/post-processing."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder


class Sam(nn.Module):
    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # Not persistent: the official checkpoints do not store them.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @torch.no_grad()
    def forward(
        self, batched_input: List[Dict[str, Any]], multimask_output: bool
    ) -> List[Dict[str, torch.Tensor]]:
        """End-to-end prediction, as the official ``Sam.forward``.

        Each input dict holds 'image' (3xHxW, already resized), 'original_size' (H, W) and optionally
        'point_coords' (BxNx2), 'point_labels' (BxN), 'boxes' (Bx4), 'mask_inputs' (Bx1x256x256).
        Each output dict holds 'masks' (BxCxHxW bool), 'iou_predictions' (BxC) and
        'low_res_logits' (BxCx256x256).
        """
        input_images = torch.stack([self.preprocess(x["image"]) for x in batched_input], dim=0)
        image_embeddings = self.image_encoder(input_images)  # (B, C, 64, 64)
        outputs = []
        for record, embedding in zip(batched_input, image_embeddings):
            points = None
            if "point_coords" in record:
                points = (record["point_coords"], record["point_labels"])
            sparse, dense = self.prompt_encoder(
                points=points, boxes=record.get("boxes"), masks=record.get("mask_inputs")
            )
            low_res_masks, iou_predictions = self.mask_decoder(
                image_embeddings=embedding.unsqueeze(0),
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(
                low_res_masks,
                input_size=record["image"].shape[-2:],
                original_size=record["original_size"],
            )
            outputs.append(
                {
                    "masks": masks > self.mask_threshold,
                    "iou_predictions": iou_predictions,
                    "low_res_logits": low_res_masks,
                }
            )
        return outputs

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: Tuple[int, ...], original_size: Tuple[int, ...]
    ) -> torch.Tensor:
        """BxCx256x256 logits -> BxCxHxW logits at ``original_size``, padding removed.

        The official values: upsampled to the square encoder input, cropped to ``input_size``,
        upsampled to ``original_size``. The padding is not upsampled only to be cropped away:
        when the square is a power-of-two multiple of the low-res side (4x in every SAM) and the
        input fills it in one direction (as ``ResizeLongestSide`` makes it), only the low-res rows
        (or columns) that the kept pixels read are upsampled, by the same factor, which gives
        every kept pixel the same source positions, weights and inputs (checked bit for bit
        against upsampling everything, for every row count, in ``tests/test_model_parity.py``).
        """
        size = self.image_encoder.img_size
        low_h, low_w = masks.shape[-2:]
        rows, out_h, cols, out_w = low_h, size, low_w, size
        if input_size[1] == size:
            rows, out_h = _rows_to_upsample(low_h, size, input_size[0])
        elif input_size[0] == size:
            cols, out_w = _rows_to_upsample(low_w, size, input_size[1])
        masks = F.interpolate(masks[..., :rows, :cols], (out_h, out_w), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise colours and pad bottom/right to the square encoder input: ...x3xHxW."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        size = self.image_encoder.img_size
        return F.pad(x, (0, size - w, 0, size - h))


def _rows_to_upsample(low: int, size: int, keep: int) -> Tuple[int, int]:
    """Low-res rows to upsample and the size to upsample them to, so that the first ``keep`` of
    ``size`` upsampled rows come out as upsampling all ``low`` rows to ``size`` gives them.

    With a power-of-two factor f = size / low, ``n`` rows upsampled to ``n * f`` have the same
    scale, so output row i reads source position (i + 0.5) / f - 0.5 (exact in any precision, as
    are its weights) and rows floor(.) and floor(.) + 1. The kept rows read at most row
    ceil(keep / f), so n = that + 1 leaves the upper clamp (at row n - 1) untouched. Any other
    factor: all rows, because the CPU kernel picks its code path by size and (factor 3,
    measured) the paths round inexact weights differently; so it does, in the last bit, when
    both directions are cut short to a few rows, hence one direction only (the caller's).
    """
    factor = size // low
    if size % low != 0 or factor & (factor - 1) != 0:
        return low, size
    n = min(low, -(-keep // factor) + 1)
    return n, n * factor
