"""Measure masks against COCO-format ground truth: matched-mask mIoU, object recall at IoU 0.5 and
0.8, precision at 0.5, per object size.

    python -m jobs.evaluate --ground-truth gt.json --predictions out/run          # our tables
    python -m jobs.evaluate --ground-truth gt.json --predictions coco_results.json --json report.json

Works for automatic (jobs.generate) and prompted (jobs.prompt) output alike; see
pipeline/evaluate.py for the matching rules. Exit status 0 unless the inputs cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.evaluate import evaluate, format_report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ground-truth", required=True, help="COCO instance-segmentation JSON (polygons or RLE)")
    ap.add_argument("--predictions", required=True,
                    help="output folder of jobs.generate / jobs.prompt, or a COCO JSON with RLE masks")
    ap.add_argument("--json", help="also write the report to this JSON file")
    ap.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// URIs")
    args = ap.parse_args(argv)
    storage = {"client_kwargs": {"endpoint_url": args.s3_endpoint_url}} if args.s3_endpoint_url else {}
    try:
        report = evaluate(args.ground_truth, args.predictions, storage)
    except (ValueError, FileNotFoundError) as e:  # EvaluationError, an unreadable file or folder: say which
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
