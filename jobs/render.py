"""Overlay PNGs of the masks of chosen or sampled images, and a static HTML gallery with per-image
and whole-run statistics, viewable offline (open <dest>/index.html).

    python -m jobs.render --tables out/demo --dest out/demo-gallery            # 12 sampled images
    python -m jobs.render --tables out/demo --dest out/g --image files-00000/chelsea.jpg
"""

from __future__ import annotations

import argparse
import sys

from pipeline.render import render_gallery


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.render", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", required=True, help="output folder of a generate/prompt run")
    ap.add_argument("--dest", required=True, help="gallery folder (index.html and img/)")
    ap.add_argument("--image", action="append", dest="images",
                    help="image_id to render (repeatable); default: a sample")
    ap.add_argument("--sample", type=int, default=12, help="images to sample without --image (default 12)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample and the mask colours")
    ap.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// URIs")
    args = ap.parse_args(argv)
    storage = {"client_kwargs": {"endpoint_url": args.s3_endpoint_url}} if args.s3_endpoint_url else {}
    try:
        done = render_gallery(args.tables, args.dest, args.images, args.sample, args.seed, storage)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"rendered {len(done)} images: {args.dest.rstrip('/')}/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
