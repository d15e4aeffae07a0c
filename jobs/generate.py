"""Generate SA-1B-style masks for every image under --input into Parquet tables under --output.

    python -m jobs.generate --output out/demo --points-per-side 16       # bundled samples, demo model
    python -m jobs.generate --input s3://bucket/sa1b/ --output s3://bucket/masks/ \\
        --model-type vit_h --checkpoint sam_vit_h_4b8939.pth --preset sa1b --workers 8 --num-gpus-per-worker 1 \\
        --num-cpus-per-worker 4 --postprocess-workers 16 --num-cpus-per-postprocessor 1

Runs on the Ray cluster this process is attached to (``ray job submit``, or RAY_ADDRESS), or starts a
local one, as a streaming pipeline: read-and-decode tasks, model actors (GPU), post-processing actors
(CPU), and the driver writing each shard. Every stage needs CPUs: leave room beside the model actors. Re-running into the same output resumes: completed shards are skipped.
Without --model-type and --checkpoint it runs the bundled demo model (trained on procedural scenes:
real masks on the bundled scenes, rough ones on photos). A model type without a checkpoint (other
than demo) gets seeded random weights: the run exercises everything, but masks are meaningless.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.model_args import add_model_args, resolve_model
from jobs.run_args import EXIT_FAILED_IMAGES, EXIT_STATUS_HELP, add_run_args, run_config_args, run_job
from pipeline.config import PipelineConfig
from pipeline.point_grids import with_point_grids
from pipeline.render import render_gallery
from pipeline.run import plan_run, run_pipeline
from pipeline.single_machine import SAMPLE_IMAGES
from sam_core.amg import PRESETS
from sam_core.precision import FAST_DTYPES

AMG_FLAGS = ("points_per_side", "points_per_batch", "encoder_batch_size", "pred_iou_thresh", "stability_score_thresh",
             "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh", "crop_overlap_ratio",
             "crop_n_points_downscale_factor", "min_mask_region_area", "max_mask_area_fraction", "compile",
             "fast_dtype", "point_grids")


def fraction_or_none(text: str):
    """``--max-mask-area-fraction``: a float, or "none" (no such filter, also under a preset)."""
    return "none" if text.lower() == "none" else float(text)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__, epilog=EXIT_STATUS_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default=SAMPLE_IMAGES,
                    help="folder, glob, tar shard(s) or .parquet/.csv manifest with a 'uri' column "
                         "(local path or fsspec URI); default: the bundled sample photos")
    ap.add_argument("--output", required=True, help="output folder (local path or fsspec URI)")
    add_model_args(ap)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="named AMG settings (sa1b: the SA-1B release)")
    ap.add_argument("--mode", choices=["exact", "fast"], default="exact",
                    help="exact: official fp32 arithmetic; fast: bf16 autocast where the device has bf16 "
                         "(see --fast-dtype), large prompt batches, factored decoder tokens")
    ap.add_argument("--fast-dtype", choices=FAST_DTYPES,
                    help="autocast of --mode fast, which it needs (default auto: bf16 on GPUs from Ampere on "
                         "and CPUs with avx512_bf16/AMX, fp32 elsewhere, where emulated bf16 is several times "
                         "slower; each image's compute_dtype records which); float16 for GPUs with fp16 tensor "
                         "cores but no bf16 (V100, T4)")
    ap.add_argument("--points-per-side", type=int, help="grid points per side (official default 32)")
    ap.add_argument("--point-grids", metavar="FILE",
                    help="prompt grids of your own instead of --points-per-side's: one per crop layer, N x 2 points "
                         "(x, y) in [0, 1] of the crop, as .npy (N x 2, or L x N x 2), .npz (an array per layer) "
                         "or .json (a list of grids); local path or fsspec URI")
    ap.add_argument("--points-per-batch", type=int, help="prompts per decoder batch (default 64)")
    ap.add_argument("--pred-iou-thresh", type=float, help="predicted-IoU filter (default 0.88)")
    ap.add_argument("--stability-score-thresh", type=float, help="stability filter (default 0.95)")
    ap.add_argument("--stability-score-offset", type=float,
                    help="logit offset of the stability score's two thresholds (default 1.0)")
    ap.add_argument("--box-nms-thresh", type=float, help="box NMS IoU within a crop (default 0.7)")
    ap.add_argument("--crop-n-layers", type=int, help="crop layers (default 0)")
    ap.add_argument("--crop-nms-thresh", type=float, help="box NMS IoU across crops (default 0.7)")
    ap.add_argument("--crop-overlap-ratio", type=float,
                    help="overlap of neighbouring crops, as a fraction of the image's shorter side (default 512/1500)")
    ap.add_argument("--crop-n-points-downscale-factor", type=int, help="points reduction per layer (default 1)")
    ap.add_argument("--min-mask-region-area", type=int, help="remove holes/islands below this area (default 0)")
    ap.add_argument("--max-mask-area-fraction", type=fraction_or_none,
                    help="drop masks covering this fraction of the image or more, before NMS (sa1b preset: 0.95; "
                         "default: none, as the official generator)")
    ap.add_argument("--encoder-batch-size", type=int, help="crops per encoder forward (default 4)")
    ap.add_argument("--resize-short-side", type=int,
                    help="downsample images whose shorter side is longer to this (SA-1B: 1500); masks, sizes "
                         "and exports are then of the downsampled images (default: images as they are)")
    ap.add_argument("--compile", action="store_true", default=None,
                    help="torch.compile the candidate reductions (same masks) and, with --mode fast, the "
                         "encoder and decoder; each model actor compiles on its first images (minutes for vit_h)")
    ap.add_argument("--postprocess-workers", type=int,
                    help="CPU actors for small-region removal and records (default: as many as --workers)")
    ap.add_argument("--num-cpus-per-postprocessor", type=float, default=0.5,
                    help="CPUs per post-processing actor (default 0.5)")
    add_run_args(ap)
    ap.add_argument("--redo-changed", action="store_true",
                    help="also redo completed shards holding files replaced under their names since (their size "
                         "and ETag or modification time differ from the listing the shard was made from; without "
                         "it such files are only counted in a warning)")
    ap.add_argument("--gallery", help="also render mask overlays of (up to 12) images and an HTML page "
                                      "into this folder (as jobs.render does)")
    return ap.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    run_args = run_config_args(args)
    resolve_model(args, run_args["storage_options"])
    return PipelineConfig(
        input_uri=args.input, output_uri=args.output, model_type=args.model_type,
        checkpoint=args.checkpoint, seed=args.seed, preset=args.preset, mode=args.mode,
        amg=with_point_grids({k: None if getattr(args, k) == "none" else getattr(args, k)
                              for k in AMG_FLAGS if getattr(args, k) is not None}, run_args["storage_options"]),
        postprocess_workers=args.postprocess_workers, num_cpus_per_postprocessor=args.num_cpus_per_postprocessor,
        resize_short_side=args.resize_short_side, redo_changed=args.redo_changed, **run_args,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def start():
        config = config_from_args(args)
        return plan_run(config) if args.dry_run else run_pipeline(config)

    rc = run_job(start, args.output, args.fail_on)
    if rc in (0, EXIT_FAILED_IMAGES) and args.gallery and not args.dry_run:  # the run ended
        render_gallery(args.output, args.gallery, storage_options=run_config_args(args)["storage_options"])
        print(f"overlays: {args.gallery.rstrip('/')}/index.html")
    return rc


if __name__ == "__main__":
    sys.exit(main())
