"""Parity helpers: the official model with seeded random weights, and ours with the same weights.

Needs the ``segment-anything`` package (the ``test`` extra). Used by the tests and benchmarks.
"""

from __future__ import annotations

import torch

from .build import build_sam
from .config import get_config


def official_sam(model_type: str, seed: int = 0, perturb: float = 0.02) -> torch.nn.Module:
    """The official model for ``model_type`` (tiny included), seeded, in eval mode.

    The official init leaves relative-position tables, position embedding and biases at zero;
    ``perturb`` adds seeded noise of that scale to every parameter so those paths are exercised.
    """
    from segment_anything.build_sam import _build_sam

    cfg = get_config(model_type)
    torch.manual_seed(seed)
    sam = _build_sam(
        encoder_embed_dim=cfg.encoder_embed_dim,
        encoder_depth=cfg.encoder_depth,
        encoder_num_heads=cfg.encoder_num_heads,
        encoder_global_attn_indexes=list(cfg.encoder_global_attn_indexes),
    )
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in sam.parameters():
                p.add_(torch.randn(p.shape, generator=g) * perturb)
    return sam.eval()


def ours_from(official: torch.nn.Module, model_type: str, **build_kwargs) -> torch.nn.Module:
    """Our model of ``model_type`` loaded strictly from the official model's state dict."""
    model = build_sam(model_type, **build_kwargs)
    model.load_state_dict(official.state_dict(), strict=True)
    return model


def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """The "heavy load" weights: many masks pass the default filters (in place, either package):
    IoU head's last bias +0.9, hypernetwork MLPs' last layer weight and bias x300."""
    with torch.no_grad():
        model.mask_decoder.iou_prediction_head.layers[-1].bias += 0.9
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight *= 300
            mlp.layers[-1].bias *= 300
    return model
