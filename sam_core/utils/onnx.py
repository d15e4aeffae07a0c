"""``segment_anything.utils.onnx``: the prompt encoder, mask decoder and mask upsampling of a
:class:`~sam_core.modeling.Sam` as one module of tensors only, for ``torch.onnx.export`` (the
browser demo's decoder). Same constructor, inputs and outputs as the official ``SamOnnxModel``
(checked equal in ``tests/test_predictor_api.py``); written without data-dependent Python
control flow, so it traces.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..modeling import Sam
from .amg import calculate_stability_score


class SamOnnxModel(nn.Module):
    """Inputs of :meth:`forward` (N prompt points, labels as floats):

    image_embeddings (1, C, h, w); point_coords (1, N, 2) in the encoder's input frame (the image
    resized to a longest side of ``img_size``), point_labels (1, N): 1 foreground, 0 background,
    2/3 box corners, -1 padding; mask_input (1, 1, 4h, 4w) and has_mask_input (1,) (0 or 1);
    orig_im_size (2,) the image's (H, W).

    Returns masks (1, K, H, W) logits at the image's size, scores (1, K) and the low-res logits
    (1, K, 4h, 4w); K is 1 with ``return_single_mask`` (the best mask, or the single-mask output
    when the prompt has more than one point), else all mask tokens. ``use_stability_score``
    scores the low-res masks by stability instead of predicted IoU; ``return_extra_metrics``
    returns (masks, scores, stability of the upscaled masks, their areas, low-res logits).
    """

    def __init__(self, model: Sam, return_single_mask: bool, use_stability_score: bool = False,
                 return_extra_metrics: bool = False) -> None:
        super().__init__()
        self.mask_decoder = model.mask_decoder
        self.model = model
        self.img_size = model.image_encoder.img_size
        self.return_single_mask = return_single_mask
        self.use_stability_score = use_stability_score
        self.stability_score_offset = 1.0
        self.return_extra_metrics = return_extra_metrics

    @staticmethod
    def resize_longest_image_size(input_image_size: torch.Tensor, longest_side: int) -> torch.Tensor:
        """(2,) (H, W) -> (2,) int64 size with the longest side scaled to ``longest_side``, rounded."""
        size = input_image_size.to(torch.float32)
        return torch.floor(longest_side / torch.max(size) * size + 0.5).to(torch.int64)

    def _embed_points(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        """(1, N, 2), (1, N) -> (1, N, C): label embeddings selected by arithmetic, not indexing."""
        encoder = self.model.prompt_encoder
        embedding = encoder.pe_layer._pe_encoding((point_coords + 0.5) / self.img_size)
        labels = point_labels.unsqueeze(-1).expand_as(embedding)
        embedding = embedding * (labels != -1)
        embedding = embedding + encoder.not_a_point_embed.weight * (labels == -1)
        for i in range(encoder.num_point_embeddings):
            embedding = embedding + encoder.point_embeddings[i].weight * (labels == i)
        return embedding

    def _embed_masks(self, input_mask: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """The mask prompt's embedding where ``has_mask_input`` is 1, the no-mask embedding where 0."""
        encoder = self.model.prompt_encoder
        embedding = has_mask_input * encoder.mask_downscaling(input_mask)
        return embedding + (1 - has_mask_input) * encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """(1, K, 4h, 4w) logits -> (1, K, H, W): to the padded input, unpadded, to the image."""
        masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        unpadded = self.resize_longest_image_size(orig_im_size, self.img_size)
        masks = masks[..., : int(unpadded[0]), : int(unpadded[1])]
        size = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)

    def select_masks(self, masks: torch.Tensor, iou_preds: torch.Tensor,
                     num_points: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The single-mask output for prompts of 3 points or more (one click and its padding
        point are 2), else the best-scored multimask output; by score weighting, no control flow."""
        weights = torch.tensor([[1000] + [0] * (self.model.mask_decoder.num_mask_tokens - 1)]).to(iou_preds.device)
        best = torch.argmax(iou_preds + (num_points - 2.5) * weights, dim=1)
        rows = torch.arange(masks.shape[0])
        return masks[rows, best, :, :].unsqueeze(1), iou_preds[rows, best].unsqueeze(1)

    @torch.no_grad()
    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor, orig_im_size: torch.Tensor):
        masks, scores = self.model.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=self._embed_points(point_coords, point_labels),
            dense_prompt_embeddings=self._embed_masks(mask_input, has_mask_input),
        )
        threshold = self.model.mask_threshold
        if self.use_stability_score:
            scores = calculate_stability_score(masks, threshold, self.stability_score_offset)
        if self.return_single_mask:
            masks, scores = self.select_masks(masks, scores, point_coords.shape[1])
        upscaled = self.mask_postprocessing(masks, orig_im_size)
        if self.return_extra_metrics:
            stability = calculate_stability_score(upscaled, threshold, self.stability_score_offset)
            areas = (upscaled > threshold).sum(-1).sum(-1)
            return upscaled, scores, stability, areas, masks
        return upscaled, scores, masks
