"""Mask decoder: two-way transformer over prompt tokens and image embedding, hypernetwork masks, IoU head."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .common import MLP, LayerNorm2d
from .factored import FactoredRows, run_factored


def _shares_image_tokens(image_embeddings: torch.Tensor, dense: torch.Tensor) -> bool:
    """One image embedding, and one dense embedding broadcast over the batch (no mask prompt)."""
    return image_embeddings.shape[0] == 1 and (dense.shape[0] == 1 or dense.stride(0) == 0)


class MaskDecoder(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1  # token 0 is the single-mask output
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        factored: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings: 1xCxHxW (shared) or BxCxHxW (one per prompt); image_pe: 1xCxHxW;
        sparse: BxNxC; dense: BxCxHxW. ``factored``: run the transformer with factored image
        tokens where the prompts share them (``run_transformer_factored``; same values up to
        rounding, less work for many prompts).

        Returns mask logits Bxkx(4H)x(4W) and IoU predictions Bxk, k = 3 if multimask else 1.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, factored
        )
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice], iou_pred[:, mask_slice]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        factored: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """All mask tokens: logits Bx(1+k)x(4H)x(4W) and IoU Bx(1+k)."""
        args = (image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        if factored and _shares_image_tokens(image_embeddings, dense_prompt_embeddings):
            hs, rows = self.run_transformer_factored(*args)
            src = self.image_tokens(rows, image_embeddings.shape[-2:])
        else:
            hs, src = self.run_transformer(*args)
        return self.masks_from_tokens(hs, src), self.iou_from_tokens(hs)

    def run_transformer(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns output tokens Bx(1+T+N)xC and the updated image embedding BxCxHxW."""
        B = sparse_prompt_embeddings.shape[0]
        tokens = self._tokens(sparse_prompt_embeddings)
        dense = dense_prompt_embeddings
        if _shares_image_tokens(image_embeddings, dense):
            # No mask prompts: the dense embedding is one vector broadcast over the batch, so every
            # prompt sees the same image tokens and the transformer computes their image-side
            # projections once (same numbers as B copies, a fraction of the work).
            dense = dense[:1]
        src = image_embeddings + dense  # (B or 1, C, H, W)
        pos_src = image_pe.expand(src.shape[0], -1, -1, -1)
        _, c, h, w = src.shape
        hs, keys = self.transformer(src, pos_src, tokens)  # keys: (B, HW, C)
        return hs, keys.transpose(1, 2).reshape(B, c, h, w)

    def run_transformer_factored(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> Tuple[torch.Tensor, FactoredRows]:
        """``run_transformer`` for prompts that share the image tokens (one image embedding 1xCxHxW,
        no mask prompt), with the updated image tokens kept factored (``factored.py``): the
        tokens Bx(1+T+N)xC and ``FactoredRows`` of HW rows; ``image_tokens`` makes BxCxHxW of them.
        The same values up to rounding, without B copies of the image tokens."""
        if not _shares_image_tokens(image_embeddings, dense_prompt_embeddings):
            raise ValueError("factored image tokens need one image embedding and no mask prompt")
        src = image_embeddings + dense_prompt_embeddings[:1]
        return run_factored(self.transformer, src, image_pe, self._tokens(sparse_prompt_embeddings))

    @staticmethod
    def image_tokens(rows: FactoredRows, size: Tuple[int, int], prompts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The image tokens of every prompt, or of ``prompts`` (K,) only, as ``run_transformer``
        returns them: (B or K)xCxHxW, HxW = ``size``."""
        return rows.dense(prompts).transpose(1, 2).unflatten(2, size)

    def _tokens(self, sparse_prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """Output tokens then prompt tokens: BxNxC -> Bx(1+T+N)xC."""
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.shape[0], -1, -1)
        return torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

    def iou_from_tokens(self, hs: torch.Tensor) -> torch.Tensor:
        """Output tokens Bx(1+T+N)xC -> IoU predictions of every mask token: BxT."""
        return self.iou_prediction_head(hs[:, 0, :])

    def masks_from_tokens(self, hs: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """Output tokens Bx(1+T+N)xC and image embedding BxCxHxW -> mask logits BxTx(4H)x(4W)."""
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]  # (B, T, C)
        upscaled = self.output_upscaling(src)  # (B, C/8, 4H, 4W)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )  # (B, T, C/8)
        b, c, h, w = upscaled.shape
        return (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
