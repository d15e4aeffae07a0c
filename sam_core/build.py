"""Model builders and the drop-in ``sam_model_registry``."""

from __future__ import annotations

import os
from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from .checkpoint import check_state_dict, load_state_dict_strict, read_checkpoint
from .config import PRESET_ALIASES, PRESETS, SamConfig, get_config
from .modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

ATTENTION_BACKENDS = ("sdpa", "folded", "reference")


def build_sam(
    config: Union[SamConfig, str] = "vit_h",
    checkpoint: "Optional[os.PathLike[str] | str]" = None,
    *,
    device: "Optional[torch.device | str]" = None,
    attention_backend: str = "sdpa",
    storage_options: Optional[Dict[str, Any]] = None,
) -> Sam:
    """Build SAM from a preset name or :class:`SamConfig`, optionally loading a checkpoint.

    The model is returned in eval mode on ``device`` (default CPU). Checkpoints (a local path or
    an fsspec URI, ``storage_options`` for its filesystem) are read with ``weights_only=True``
    and loaded strictly; see :mod:`sam_core.checkpoint` for the errors. As the official
    ``build_sam(checkpoint)``, a checkpoint path as the only argument builds vit_h.
    """
    if checkpoint is None and _is_checkpoint_path(config):
        config, checkpoint = "vit_h", config
    config, preset = _config_and_preset(config)
    if checkpoint is None:
        sam = _assemble(config)
    else:
        # float32 like the official load_state_dict copy would make them (a half checkpoint too).
        state_dict = {k: v.float() if v.is_floating_point() else v
                      for k, v in read_checkpoint(checkpoint, storage_options).items()}
        # Build without allocating or initialising weights, then adopt the checkpoint's tensors.
        with torch.device("meta"):
            sam = _assemble(config)
        load_state_dict_strict(sam, state_dict, expected=preset, assign=True)
        sam.pixel_mean = torch.tensor(config.pixel_mean).view(-1, 1, 1)
        sam.pixel_std = torch.tensor(config.pixel_std).view(-1, 1, 1)
    sam.eval()
    set_attention_backend(sam, attention_backend)
    if device is not None:
        sam.to(device)
    return sam


def check_checkpoint(config: Union[SamConfig, str], checkpoint: "os.PathLike[str] | str",
                     storage_options: Optional[Dict[str, Any]] = None) -> None:
    """Raise what :func:`build_sam` would raise about ``checkpoint`` (missing, unreadable, holding
    pickled code, another model size, keys or shapes that do not match) while reading only its
    tensor names and shapes: kB of a GB file, also from object storage. For drivers that check
    a run's model before starting workers."""
    config, preset = _config_and_preset(config)
    with torch.device("meta"):
        sam = _assemble(config)
    check_state_dict(sam, read_checkpoint(checkpoint, storage_options, shapes_only=True), expected=preset)


def _is_checkpoint_path(config: Any) -> bool:
    """Whether ``build_sam``'s first argument is a checkpoint (the official signature) rather
    than a model type: a path object, or a string that names no model type and looks like a file."""
    if isinstance(config, os.PathLike):
        return True
    if not isinstance(config, str) or config in PRESETS or config in PRESET_ALIASES:
        return False
    return config.endswith((".pth", ".pt")) or "/" in config or os.sep in config or os.path.exists(config)


def _config_and_preset(config: Union[SamConfig, str]) -> Tuple[SamConfig, Optional[str]]:
    """The config, and the preset name when ``config`` names one (for "is a vit_l model" errors)."""
    if isinstance(config, str):
        return get_config(config), PRESET_ALIASES.get(config, config)
    return config, None


def _assemble(c: SamConfig) -> Sam:
    grid = c.image_embedding_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=c.image_size,
            patch_size=c.patch_size,
            embed_dim=c.encoder_embed_dim,
            depth=c.encoder_depth,
            num_heads=c.encoder_num_heads,
            mlp_ratio=c.mlp_ratio,
            out_chans=c.prompt_embed_dim,
            window_size=c.window_size,
            global_attn_indexes=c.encoder_global_attn_indexes,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=c.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(c.image_size, c.image_size),
            mask_in_chans=c.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=c.prompt_embed_dim,
            transformer=TwoWayTransformer(
                depth=c.decoder_depth,
                embedding_dim=c.prompt_embed_dim,
                mlp_dim=c.decoder_mlp_dim,
                num_heads=c.decoder_num_heads,
            ),
            num_multimask_outputs=c.num_multimask_outputs,
            iou_head_depth=c.iou_head_depth,
            iou_head_hidden_dim=c.iou_head_hidden_dim,
        ),
        pixel_mean=c.pixel_mean,
        pixel_std=c.pixel_std,
    )


def set_attention_backend(model: torch.nn.Module, backend: str) -> None:
    """Switch every attention layer: ``sdpa`` (fused; the encoder's rel-pos bias as a dense mask),
    ``folded`` (fused; the rel-pos bias folded into q and k, no N x N tensor, flash-eligible on GPU)
    or ``reference`` (explicit softmax, the official arithmetic)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}.")
    for module in model.modules():
        if hasattr(module, "use_sdpa"):  # decoder attention
            module.use_sdpa = backend != "reference"
        if hasattr(module, "backend"):  # encoder attention
            module.backend = backend


def _registry() -> Dict[str, Callable[..., Sam]]:
    names = list(PRESET_ALIASES) + list(PRESETS)
    return {name: partial(build_sam, name) for name in names}


# Drop-in for ``segment_anything.sam_model_registry``: ``sam_model_registry["vit_b"](checkpoint=p)``.
sam_model_registry: Dict[str, Callable[..., Sam]] = _registry()
build_sam_vit_h = sam_model_registry["vit_h"]
build_sam_vit_l = sam_model_registry["vit_l"]
build_sam_vit_b = sam_model_registry["vit_b"]
