"""Fine-tune SAM on your masks, or reproduce the bundled demo model.

    python -m jobs.train --coco train.json --images images/ --model-type vit_b \\
        --checkpoint sam_vit_b_01ec64.pth --output sam_vit_b_tuned.pth --steps 2000
    python -m jobs.train --tables out/reviewed --checkpoint sam_vit_b_01ec64.pth --output tuned.pth
    python -m jobs.train --demo --output sam_core/weights/sam_demo.pth          # the demo checkpoint

The SAM paper's recipe (sam_core.training.finetune): simulated point/box prompts with error-region
correction rounds, focal + dice loss on the best output, MSE on the IoU prediction. The decoder always
trains; --train-prompt-encoder and --train-encoder add those parts. The output is a state dict in the
official key layout (loads with sam_model_registry, --checkpoint of every job, and segment_anything).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from jobs.model_args import add_model_args, resolve_model
from sam_core.build import build_sam
from sam_core.training import TrainConfig, finetune, save_checkpoint
from sam_core.training.data import coco_samples, scene_samples
from sam_core.training.demo import DEMO_STAGES, scaled_stages, train_demo


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--coco", help="COCO instance-segmentation JSON (polygons or RLE)")
    src.add_argument("--tables", help="output folder of jobs.generate/jobs.prompt (masks + images tables)")
    src.add_argument("--scenes", action="store_true", help="procedural scenes (endless, seeded)")
    src.add_argument("--demo", action="store_true", help="reproduce the bundled demo checkpoint")
    ap.add_argument("--images", help="image folder for --coco (default: the JSON's folder)")
    ap.add_argument("--output", required=True, help="where to write the trained .pth")
    add_model_args(ap)  # starting weights: --checkpoint (type read from it), or the demo model
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d = TrainConfig()
    demo_steps = sum(c.steps for c in DEMO_STAGES)
    ap.add_argument("--steps", type=int, help=f"optimiser steps (default {d.steps}; --demo: {demo_steps} in "
                                              "its stages, or this many split in the same proportion)")
    ap.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    ap.add_argument("--images-per-step", type=int, default=d.images_per_step)
    ap.add_argument("--masks-per-image", type=int, default=d.masks_per_image)
    ap.add_argument("--rounds", type=int, default=d.rounds, help="prompt rounds per mask")
    ap.add_argument("--box-fraction", type=float, default=d.box_fraction, help="share of masks first prompted by a box")
    ap.add_argument("--focal-alpha", type=float, default=d.focal_alpha,
                    help=f"focal-loss weight of foreground pixels (default {d.focal_alpha})")
    ap.add_argument("--background-points", type=int, default=d.background_points,
                    help="per image and step, point prompts outside every mask that train only the IoU "
                         "head (toward each output's best IoU with any mask), so the automatic generator "
                         "scores masks of unannotated regions low; only for exhaustively annotated data "
                         f"(default {d.background_points})")
    ap.add_argument("--train-encoder", action="store_true", help="also train the image encoder")
    ap.add_argument("--train-prompt-encoder", action="store_true", help="also train the prompt encoder")
    ap.add_argument("--from-stage", type=int, default=0,
                    help="--demo only: resume at this stage from the model --output holds after the one before")
    ap.add_argument("--history", help="write the loss history to this JSON file")
    ap.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for --tables on s3://")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def log(entry):
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()), flush=True)

    try:
        history = _train(args, log)
    except (ValueError, FileNotFoundError) as e:  # bad data, flags or checkpoint: say which
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.history:
        with open(args.history, "w") as f:
            json.dump(history, f, indent=1)
    print(f"wrote {args.output}")
    return 0


def _train(args: argparse.Namespace, log):
    if args.demo:
        stages = DEMO_STAGES if args.steps is None else scaled_stages(args.steps)
        if not 0 <= args.from_stage < len(stages):
            raise ValueError(f"--from-stage must be within 0..{len(stages) - 1}.")
        return train_demo(args.output, stages, device=args.device, log=log, start_stage=args.from_stage)
    config = TrainConfig(
        steps=args.steps or TrainConfig().steps, lr=args.lr, images_per_step=args.images_per_step,
        masks_per_image=args.masks_per_image, rounds=args.rounds, box_fraction=args.box_fraction,
        focal_alpha=args.focal_alpha, background_points=args.background_points, train_encoder=args.train_encoder,
        train_prompt_encoder=args.train_prompt_encoder, seed=args.seed)
    if args.coco:
        samples = coco_samples(args.coco, args.images, seed=args.seed)
    elif args.tables:
        from pipeline.training_data import table_samples
        storage = {"client_kwargs": {"endpoint_url": args.s3_endpoint_url}} if args.s3_endpoint_url else {}
        samples = table_samples(args.tables, storage, seed=args.seed)
    else:
        samples = scene_samples(args.seed)
    resolve_model(args)
    if args.checkpoint is None:
        torch.manual_seed(args.seed)
    model = build_sam(args.model_type, args.checkpoint, device=args.device)
    history = finetune(model, samples, config, log=log)
    save_checkpoint(model, args.output)
    return history


if __name__ == "__main__":
    sys.exit(main())
