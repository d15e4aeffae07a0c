"""Model configuration: a small frozen dataclass plus the named presets.

The official checkpoints differ only in the image encoder; everything else (prompt dim 256, image
1024, patch 16, window 14, decoder) is shared. ``tiny`` keeps those shared parts official so the
official package can build the very same network for parity tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class SamConfig:
    encoder_embed_dim: int  # ViT width
    encoder_depth: int  # number of ViT blocks
    encoder_num_heads: int  # attention heads per ViT block
    encoder_global_attn_indexes: Tuple[int, ...]  # blocks with global (not windowed) attention
    prompt_embed_dim: int = 256  # channels of image embedding and prompt tokens
    image_size: int = 1024  # side of the square, padded encoder input
    patch_size: int = 16  # ViT patch side; embedding grid is image_size // patch_size
    window_size: int = 14  # window side for windowed-attention blocks
    mlp_ratio: float = 4.0  # ViT MLP hidden width / embed dim
    mask_in_chans: int = 16  # hidden channels of the mask-prompt downscaler
    decoder_depth: int = 2  # two-way transformer layers
    decoder_mlp_dim: int = 2048  # two-way transformer MLP width
    decoder_num_heads: int = 8  # two-way transformer heads
    num_multimask_outputs: int = 3  # masks returned with multimask_output=True
    iou_head_depth: int = 3  # layers of the IoU prediction MLP
    iou_head_hidden_dim: int = 256  # width of the IoU prediction MLP
    pixel_mean: Tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB, 0-255 scale
    pixel_std: Tuple[float, float, float] = (58.395, 57.12, 57.375)  # RGB, 0-255 scale

    @property
    def image_embedding_size(self) -> int:
        return self.image_size // self.patch_size


PRESETS: Dict[str, SamConfig] = {
    "vit_h": SamConfig(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamConfig(768, 12, 12, (2, 5, 8, 11)),
    # For tests only: official everywhere but a 2-block, 64-wide encoder.
    "tiny": SamConfig(64, 2, 2, (1,)),
    # The bundled demo model (sam_core/weights/sam_demo.pth, trained on procedural scenes by
    # `python -m jobs.train --demo`): 256-pixel input, 8-pixel patches (a 32x32 embedding, as cheap
    # as tiny), everything narrower, 1.9 M parameters (7.5 MB).
    "demo": SamConfig(
        128, 4, 4, (1, 3), prompt_embed_dim=128, image_size=256, patch_size=8, window_size=8,
        decoder_mlp_dim=512, iou_head_hidden_dim=128,
    ),
}

# The official registry's "default" is vit_h.
PRESET_ALIASES: Dict[str, str] = {"default": "vit_h"}


def get_config(name: str, **overrides) -> SamConfig:
    """Preset ``name`` (vit_b, vit_l, vit_h, tiny, default) with field overrides applied."""
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        known = ", ".join(sorted(list(PRESETS) + list(PRESET_ALIASES)))
        raise ValueError(f"Unknown SAM model type {name!r}; choose one of: {known}.")
    return dataclasses.replace(PRESETS[key], **overrides)
