"""The model flags every inference job shares, and how they resolve to a model type and weights."""

from __future__ import annotations

import argparse
import warnings
from typing import Any, Mapping, Optional

from sam_core.checkpoint import CheckpointError, bundled_checkpoint, guess_preset, read_checkpoint

DEFAULT_MODEL_TYPE = "demo"


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model-type",
                    help="demo, tiny, vit_b, vit_l or vit_h (default: read from --checkpoint; without "
                         "one, demo: the bundled small model trained on procedural scenes)")
    ap.add_argument("--checkpoint", help="official SAM checkpoint (.pth), or Hugging Face's (model.safetensors, "
                                         "pytorch_model.bin or their folder): a path or an fsspec URI "
                                         "(s3://...: each node copies it once into ~/.cache/sam_datagen or "
                                         "$SAM_DATAGEN_CACHE; default for demo: the bundled weights)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights without a checkpoint")


def resolve_model(args: argparse.Namespace, storage_options: Optional[Mapping[str, Any]] = None) -> None:
    """Fill in ``args.model_type`` (from the checkpoint's shapes, or ``demo``) and ``args.checkpoint``
    (the bundled weights of the model type when none was given); warn when the model still ends up
    with random weights."""
    if args.model_type is None:
        if args.checkpoint is None:
            args.model_type = DEFAULT_MODEL_TYPE
        else:
            args.model_type = guess_preset(read_checkpoint(args.checkpoint, storage_options, shapes_only=True))
            if args.model_type is None:
                raise CheckpointError(f"{args.checkpoint} matches no known model type; name it with --model-type.")
    args.checkpoint = bundled_checkpoint(args.model_type, args.checkpoint)
    if args.checkpoint is None:
        warnings.warn(f"No --checkpoint: {args.model_type} with random weights (seed {args.seed}); "
                      "the masks are not meaningful.", stacklevel=2)
