"""Masks from existing boxes (auto-annotation): a COCO detection JSON or a Parquet/CSV table of
boxes in, the same masks/images Parquet tables as jobs.generate out, one mask per box.

    python -m jobs.prompt --prompts detections.json --images photos/ --output out/prompted \\
        --model-type vit_h --checkpoint sam_vit_h_4b8939.pth
    python -m jobs.prompt --prompts boxes.parquet --output s3://bucket/prompted --s3-endpoint-url URL

A table has a `uri` column and `bbox` (XYWH) or `x`, `y`, `w`, `h`. Runs as jobs.generate does, on
the Ray cluster it is attached to or a local one: read-and-decode tasks, --workers model actors
(--num-gpus-per-worker each), the driver writing each shard. Re-running resumes; an image whose
boxes are unusable gets an images row with reason `bad_prompt`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.model_args import add_model_args, resolve_model
from jobs.run_args import EXIT_STATUS_HELP, add_run_args, run_config_args, run_job
from pipeline.config import PipelineConfig
from pipeline.prompted import plan_prompted, read_prompts, run_prompted_on_ray
from sam_core.precision import FAST_DTYPES


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.prompt", description=__doc__, epilog=EXIT_STATUS_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True, help="COCO .json, or .parquet/.csv table of boxes")
    ap.add_argument("--images", help="folder/URI that relative file names in --prompts are under")
    ap.add_argument("--output", required=True, help="output folder of the masks/images tables")
    add_model_args(ap)
    ap.add_argument("--mode", choices=["exact", "fast"], default="exact",
                    help="exact: fp32, as SamPredictor; fast: factored decoder tokens and, where the device "
                         "multiplies bf16 in hardware (GPUs from Ampere on, CPUs with avx512_bf16/AMX), bf16 "
                         "autocast for encoder and decoder (masks close to exact ones, see the README; an "
                         "output keeps one mode)")
    ap.add_argument("--fast-dtype", choices=FAST_DTYPES,
                    help="autocast of --mode fast, which it needs (default auto: bf16 where the device "
                         "multiplies it in hardware, fp32 elsewhere; float16 for GPUs with fp16 tensor cores but "
                         "no bf16: V100, T4); a pin is part of the output's identity")
    add_run_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def start():  # bad prompts, flags, checkpoint, resources or an output made with another model: say which
        run_args = run_config_args(args)
        resolve_model(args, run_args["storage_options"])
        # No post-processing actors here: their CPUs are not asked for.
        config = PipelineConfig(input_uri=args.prompts, output_uri=args.output, model_type=args.model_type,
                                checkpoint=args.checkpoint, seed=args.seed, mode=args.mode, num_cpus_per_postprocessor=0.0,
                                amg={"fast_dtype": args.fast_dtype} if args.fast_dtype else {}, **run_args)
        prompts = read_prompts(args.prompts, args.images, config.storage_options)
        return plan_prompted(prompts, config) if args.dry_run else run_prompted_on_ray(prompts, config)

    return run_job(start, args.output, args.fail_on)


if __name__ == "__main__":
    sys.exit(main())
