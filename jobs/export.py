"""Export the masks/images Parquet tables of a generate run.

    python -m jobs.export --tables out/demo --format sa1b-json --dest out/demo-sa1b
    python -m jobs.export --tables out/demo --format sa1b-tar --dest out/demo-tars
    python -m jobs.export --tables out/demo --format coco --dest out/demo-coco.json
"""

from __future__ import annotations

import argparse
import sys

from pipeline.export import export_coco, export_sa1b_json, export_sa1b_tar


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", required=True, help="output folder of a generate run (local path or fsspec URI)")
    ap.add_argument("--format", required=True, choices=["sa1b-json", "sa1b-tar", "coco"],
                    help="sa1b-json: one SA-1B JSON per image under --dest; sa1b-tar: one tar of jpg+json "
                         "pairs per shard under --dest; coco: one COCO JSON file --dest")
    ap.add_argument("--dest", required=True, help="destination folder (sa1b-json, sa1b-tar) or file (coco)")
    ap.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// URIs")
    args = ap.parse_args(argv)
    storage = {"client_kwargs": {"endpoint_url": args.s3_endpoint_url}} if args.s3_endpoint_url else {}
    try:  # tables that are not a run's output, or a destination that cannot be opened: say which
        if args.format == "sa1b-json":
            print(f"wrote {export_sa1b_json(args.tables, args.dest, storage)} SA-1B JSON files under {args.dest}")
        elif args.format == "sa1b-tar":
            print(f"wrote {export_sa1b_tar(args.tables, args.dest, storage)} images in SA-1B tar shards under {args.dest}")
        else:
            counts = export_coco(args.tables, args.dest, storage)
            print(f"wrote {args.dest}: {counts['images']} images, {counts['annotations']} annotations")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
