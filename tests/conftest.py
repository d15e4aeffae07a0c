"""Shared fixtures: the official package and ours on identical random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_core import build_sam, get_config




def official_sam(model_type: str, seed: int = 0, perturb: float = 0.02):
    """Build the official model for ``model_type`` (tiny included) with seeded random weights.

    The official init leaves relative-position tables, position embedding and biases at zero;
    ``perturb`` adds seeded noise to every parameter so those code paths are exercised too.
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


def ours_from(official, model_type: str, **kwargs):
    """Our model of ``model_type`` loaded strictly from the official model's state dict."""
    model = build_sam(model_type, **kwargs)
    model.load_state_dict(official.state_dict(), strict=True)
    return model


@pytest.fixture(scope="session")
def tiny_official():
    return official_sam("tiny")


@pytest.fixture(scope="session")
def tiny_ours(tiny_official):
    return ours_from(tiny_official, "tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_official, tmp_path_factory):
    """An official-format checkpoint file written by the official package's model."""
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth"
    torch.save(tiny_official.state_dict(), path)
    return path


def photo(name: str, size=None) -> np.ndarray:
    """A real RGB photo from scikit-image, optionally cropped to (H, W)."""
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = np.ascontiguousarray(img[..., :3])
    if size is not None:
        img = np.ascontiguousarray(img[: size[0], : size[1]])
    return img


def sharpen(official):
    """Make many masks survive the default filters (on the official model, in place):
    IoU head's last bias +0.9, hypernetwork MLPs' last layer weight and bias x300."""
    with torch.no_grad():
        official.mask_decoder.iou_prediction_head.layers[-1].bias += 0.9
        for mlp in official.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight *= 300
            mlp.layers[-1].bias *= 300
    return official


def assert_records_identical(expected, got):
    """Official and our generator records: same count, order, keys, values and mask pixels."""
    assert len(got) == len(expected)
    for i, (e, g) in enumerate(zip(expected, got)):
        assert list(g) == list(e), i
        for key in e:
            a, b = e[key], g[key]
            if isinstance(a, np.ndarray):
                assert a.dtype == b.dtype and np.array_equal(a, b), (i, key)
            else:
                assert a == b, (i, key, a, b)
