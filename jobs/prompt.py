"""Masks from existing boxes (auto-annotation): a COCO detection JSON or a Parquet/CSV table of
boxes in, the same masks/images Parquet tables as jobs.generate out, one mask per box.

    python -m jobs.prompt --prompts detections.json --images photos/ --output out/prompted \\
        --model-type vit_h --checkpoint sam_vit_h_4b8939.pth
    python -m jobs.prompt --prompts boxes.parquet --output s3://bucket/prompted --s3-endpoint-url URL

A table has a `uri` column and `bbox` (XYWH) or `x`, `y`, `w`, `h`. Re-running resumes; an image
whose boxes are unusable gets an images row with reason `bad_prompt`.
"""

from __future__ import annotations

import argparse
import sys

from jobs.model_args import add_model_args, resolve_model
from pipeline.decode import DEFAULT_MAX_PIXELS
from pipeline.prompted import BoxPrompter, read_prompts, run_prompted


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.prompt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True, help="COCO .json, or .parquet/.csv table of boxes")
    ap.add_argument("--images", help="folder/URI that relative file names in --prompts are under")
    ap.add_argument("--output", required=True, help="output folder of the masks/images tables")
    add_model_args(ap)
    ap.add_argument("--device", help="torch device (default: cuda if available)")
    ap.add_argument("--images-per-shard", type=int, default=64, help="images per output file (default 64)")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are errors")
    ap.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// URIs")
    ap.add_argument("--overwrite", action="store_true", help="discard previous results under --output")
    args = ap.parse_args(argv)
    storage = {"client_kwargs": {"endpoint_url": args.s3_endpoint_url}} if args.s3_endpoint_url else {}
    if args.images_per_shard < 1:
        ap.error("--images-per-shard must be >= 1")
    try:  # bad prompts, checkpoint or an output made with another model: say which
        prompts = read_prompts(args.prompts, args.images, storage)
        resolve_model(args)
        prompter = BoxPrompter(args.model_type, args.checkpoint, args.device, args.seed, args.max_pixels)
        summary = run_prompted(prompts, args.output, prompter, args.images_per_shard, args.overwrite, storage)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary)
    print(f"tables: {args.output.rstrip('/')}/masks/*.parquet and images/*.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
