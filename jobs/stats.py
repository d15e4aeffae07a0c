"""Counts and distributions of a generate run's masks/images tables.

    python -m jobs.stats --tables out/demo
    python -m jobs.stats --tables out/demo --runs   # also each run that wrote into it (<output>/_runs/)
    python -m jobs.stats --tables s3://bucket/masks --s3-endpoint-url http://127.0.0.1:9000 --json stats.json
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.output import OutputDir
from pipeline.run_records import read_runs, runs_report
from pipeline.stats import format_stats, table_stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.stats", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", required=True, help="output folder of a generate run (local path or fsspec URI)")
    ap.add_argument("--json", help="also write the statistics to this JSON file")
    ap.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// URIs")
    ap.add_argument("--runs", action="store_true",
                    help="also list the runs that wrote into the output: when, how each ended, what it wrote, the "
                         "versions it ran with (<output>/_runs/; each shard's marker names its run)")
    args = ap.parse_args(argv)
    storage = {"client_kwargs": {"endpoint_url": args.s3_endpoint_url}} if args.s3_endpoint_url else {}
    try:
        stats = table_stats(args.tables, storage)
    except (ValueError, FileNotFoundError) as e:  # not a run's output folder (a mistyped path): say so
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_stats(stats))
    if args.runs:
        output = OutputDir(args.tables, storage)
        stats["runs"] = read_runs(output)
        print("runs:\n" + "\n".join(f"  {line}" for line in runs_report(output, stats["runs"])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(stats, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
