"""Mask decoder: two-way transformer over prompt tokens and image embedding, hypernetwork masks, IoU head."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, LayerNorm2d
from .factored import FactoredRows, run_factored


def _pixel_blocks(conv: nn.ConvTranspose2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """A 2x2 stride-2 transposed convolution as the linear map of each input pixel to its 2x2
    output block: weight (C_in, 2*2*C_out) and bias (2*2*C_out,), columns ordered (i, j, C_out)."""
    if conv.kernel_size != (2, 2) or conv.stride != (2, 2) or conv.padding != (0, 0):
        raise ValueError(f"expected a 2x2 stride-2 transposed convolution, got {conv}")
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.in_channels, 4 * conv.out_channels)
    return weight, conv.bias.repeat(4)


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
            masks = self.masks_from_rows(hs, rows, image_embeddings.shape[-2:])
        else:
            hs, src = self.run_transformer(*args)
            masks = self.masks_from_tokens(hs, src)
        return masks, self.iou_from_tokens(hs)

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

    def _hyper_in(self, hs: torch.Tensor) -> torch.Tensor:
        """Output tokens Bx(1+T+N)xC -> each mask token's weights over the upscaled channels: BxTx(C/8)."""
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]  # (B, T, C)
        return torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )

    def masks_from_tokens(self, hs: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """Output tokens Bx(1+T+N)xC and image embedding BxCxHxW -> mask logits BxTx(4H)x(4W)."""
        upscaled = self.output_upscaling(src)  # (B, C/8, 4H, 4W)
        hyper_in = self._hyper_in(hs)
        b, c, h, w = upscaled.shape
        return (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)

    def masks_from_rows(self, hs: torch.Tensor, rows: FactoredRows, size: Tuple[int, int],
                        dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``masks_from_tokens(hs, image_tokens(rows, size))`` without making the image tokens:
        output tokens Bx(1+T+N)xC and B prompts' factored rows (HW of them, ``size`` = HxW) ->
        mask logits BxTx(4H)x(4W). The same values up to rounding, for less work: both
        upscaling convolutions (2x2, stride 2) are per-pixel linear maps, so the first acts on the
        factors and the second is one product over all pixels, each pixel's 4x4 block in rows.

        ``dtype``: what the upscaling computes in, whatever the autocast; default: the autocast
        dtype where it is on (for ``hs``'s device), else ``hs``'s."""
        device = hs.device.type
        if dtype is None:
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hs.dtype
        conv1, norm, act1, conv2, act2 = self.output_upscaling
        c1, c2 = conv1.out_channels, conv2.out_channels
        hyper_in = self._hyper_in(hs)  # (B, T, C2), under the caller's autocast as in masks_from_tokens
        b, n = rows.coeffs.shape[0], rows.shared.shape[0]
        with torch.autocast(device, enabled=False):
            up = rows.matmul(*_pixel_blocks(conv1)).dense(dtype=dtype)  # (B, N, 2*2*C1)
            up = act1(F.layer_norm(up.view(b, n, 4, c1), (c1,), norm.weight.to(dtype), norm.bias.to(dtype), norm.eps))
            weight, bias = _pixel_blocks(conv2)
            up = act2(torch.addmm(bias.to(dtype), up.view(b * n * 4, c1), weight.to(dtype)))  # (B*N*4, 2*2*C2)
            logits = hyper_in.to(dtype) @ up.view(b, n * 16, c2).transpose(1, 2)  # (B, T, 16N)
        # Logit (y, x, i, j, k, l) is pixel (4y + 2i + k, 4x + 2j + l).
        h, w = size
        logits = logits.view(b, -1, h, w, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
        return logits.reshape(b, -1, 4 * h, 4 * w)
