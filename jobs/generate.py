"""Generate SA-1B-style masks for every image under --input, written as SA-1B JSON per image.

    python -m jobs.generate --output out/demo                      # bundled sample photos
    python -m jobs.generate --input photos/ --output masks/ --model-type vit_h \\
        --checkpoint sam_vit_h_4b8939.pth --preset sa1b

Without --checkpoint the model has seeded random weights: the run exercises everything, but
masks are meaningless (with the official thresholds usually none survive).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

import torch

from pipeline.single_machine import SAMPLE_IMAGES, run_single_machine
from sam_core import SamAutomaticMaskGenerator, build_sam
from sam_core.amg import PRESETS


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default=SAMPLE_IMAGES,
                    help="folder, glob or file of images (local path or fsspec URI); default: bundled samples")
    ap.add_argument("--output", required=True, help="output folder (local path or fsspec URI)")
    ap.add_argument("--model-type", default="tiny", help="tiny, vit_b, vit_l or vit_h (default: tiny)")
    ap.add_argument("--checkpoint", help="official-format SAM checkpoint (.pth) matching --model-type")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device (default: cuda if available)")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="named AMG settings (sa1b: the SA-1B release)")
    ap.add_argument("--mode", choices=["exact", "fast"], default="exact",
                    help="exact: official fp32 arithmetic; fast: bf16 autocast")
    ap.add_argument("--points-per-side", type=int, help="grid points per side (official default 32)")
    ap.add_argument("--points-per-batch", type=int, help="prompts per decoder batch (default 64)")
    ap.add_argument("--pred-iou-thresh", type=float, help="predicted-IoU filter (default 0.88)")
    ap.add_argument("--stability-score-thresh", type=float, help="stability filter (default 0.95)")
    ap.add_argument("--box-nms-thresh", type=float, help="box NMS IoU within a crop (default 0.7)")
    ap.add_argument("--crop-n-layers", type=int, help="crop layers (default 0)")
    ap.add_argument("--crop-n-points-downscale-factor", type=int, help="points reduction per layer (default 1)")
    ap.add_argument("--min-mask-region-area", type=int, help="remove holes/islands below this area (default 0)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights when no checkpoint is given")
    return ap.parse_args(argv)


AMG_FLAGS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
             "box_nms_thresh", "crop_n_layers", "crop_n_points_downscale_factor", "min_mask_region_area")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.checkpoint is None:
        warnings.warn(f"No --checkpoint: {args.model_type} with random weights (seed {args.seed}); "
                      "the masks are not meaningful.", stacklevel=1)
        torch.manual_seed(args.seed)
    model = build_sam(args.model_type, args.checkpoint, device=args.device)
    settings = {k: getattr(args, k) for k in AMG_FLAGS if getattr(args, k) is not None}
    settings.update(output_mode="coco_rle", mode=args.mode)
    if args.preset:
        generator = SamAutomaticMaskGenerator.from_preset(args.preset, model, **settings)
    else:
        generator = SamAutomaticMaskGenerator(model, **settings)
    summary = run_single_machine(args.input, args.output, generator)
    print(summary)
    print(f"wrote SA-1B JSON per image and summary.json to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
