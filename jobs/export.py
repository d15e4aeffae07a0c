"""Export the masks/images Parquet tables of a generate run.

    python -m jobs.export --tables out/demo --format sa1b-json --dest out/demo-sa1b
    python -m jobs.export --tables out/demo --format sa1b-tar --dest out/demo-tars
    python -m jobs.export --tables out/demo --format coco --dest out/demo-coco.json
    python -m jobs.export --tables out/prompted --format coco --prompts dets.json --images photos/ --dest dets-masks.json
    python -m jobs.export --tables out/prompted --format parquet --prompts boxes.parquet --dest boxes-masks.parquet
    ray job submit --working-dir . -- python -m jobs.export --ray --tables s3://b/masks --format sa1b-tar --dest s3://b/sa1b

sa1b-json and sa1b-tar export only the shards not exported yet (or whose tables changed since):
run again after the output grew, or after an export was stopped, and it goes on from there.
--prune also removes the exported files of shards the tables no longer hold.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.run_args import stopped_exit
from pipeline.driver import Terminated, stopped_cleanly
from pipeline.export import FORMATS, export_coco, export_prompted_coco, export_prompted_table, export_shards
from pipeline.lease import OutputBusyError
from pipeline.output import READ_WORKERS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", required=True, help="output folder of a generate run (local path or fsspec URI)")
    ap.add_argument("--format", required=True, choices=FORMATS + ("parquet",),
                    help="sa1b-json: one SA-1B JSON per image under --dest; sa1b-tar: one tar of jpg+json "
                         "pairs per shard under --dest; coco: one COCO JSON file --dest; parquet (with a "
                         "Parquet/CSV --prompts): that table with each row's mask")
    ap.add_argument("--dest", required=True, help="destination folder (sa1b-json, sa1b-tar) or file (coco)")
    ap.add_argument("--workers", type=int, default=None,
                    help=f"shards exported (or read ahead, for coco) at once: threads of this process (default "
                         f"{READ_WORKERS}), or Ray tasks with --ray (default: the cluster's CPUs)")
    ap.add_argument("--ray", action="store_true",
                    help="sa1b-json/sa1b-tar: export the shards as Ray tasks over the cluster this job runs in (or "
                         "a local Ray): one CPU each, so the JSON encoding and image copying use every node")
    ap.add_argument("--overwrite", action="store_true",
                    help="sa1b-json/sa1b-tar: export every shard again and number ids afresh, instead of only "
                         "the shards not exported yet (or changed since)")
    ap.add_argument("--prune", action="store_true",
                    help="sa1b-json/sa1b-tar: remove the exported files of shards that the tables no longer hold "
                         "(the run was redone with --overwrite into other shards), so that --dest holds the "
                         "tables' shards only; their ids stay reserved")
    ap.add_argument("--prompts", help="for the tables of a jobs.prompt run: its prompts file, written back with "
                                      "each box's mask (coco: a COCO file, ids and categories kept, instead of a "
                                      "class-agnostic one; parquet: a Parquet/CSV table, every column kept)")
    ap.add_argument("--images", help="with --prompts: the folder its file names are under (as jobs.prompt's)")
    ap.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// URIs")
    args = ap.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        ap.error(f"--workers must be >= 1, got {args.workers}")
    if args.images and not args.prompts:
        ap.error("--images goes with --prompts (the folder its file names are under)")
    if args.prompts:
        wanted = "coco" if args.prompts.endswith(".json") else "parquet"
        if args.format != wanted:
            ap.error(f"--prompts {args.prompts} is written back as --format {wanted}, not {args.format}")
    elif args.format == "parquet":
        ap.error("--format parquet writes a Parquet/CSV --prompts table back with its masks: name it with --prompts")
    if args.prune and (args.format not in ("sa1b-json", "sa1b-tar") or args.prompts):
        ap.error("--prune applies to sa1b-json and sa1b-tar exports (a coco or parquet file is rewritten whole)")
    if args.ray and args.format == "coco":
        ap.error("--ray exports shards in parallel; a coco export is one file, written by this process")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    storage = {"client_kwargs": {"endpoint_url": args.s3_endpoint_url}} if args.s3_endpoint_url else {}
    try:  # tables that are not a run's output, or a destination that cannot be opened: say which
        with stopped_cleanly():
            if args.prompts:
                write_back = export_prompted_coco if args.format == "coco" else export_prompted_table
                counts = write_back(args.tables, args.prompts, args.dest, args.images, storage,
                                    args.workers or READ_WORKERS)
                reasons = ", ".join(f"{r} {n}" for r, n in sorted(counts["reasons"].items()))
                where = "listed under unmasked_annotations" if args.format == "coco" else "in their mask_status"
                print(f"wrote {args.dest}: {counts['annotations']} boxes of {args.prompts}, {counts['masked']} with "
                      f"their mask, {counts['unmasked']} without" + (f" ({reasons}; {where})" if reasons else ""))
                return 0
            if args.format == "coco":
                summary = export_coco(args.tables, args.dest, storage, args.workers or READ_WORKERS)
            else:
                summary = export_shards(args.tables, args.dest, args.format, storage, args.workers, args.overwrite,
                                        on_ray=args.ray, prune=args.prune)
    except (KeyboardInterrupt, Terminated) as e:
        return stopped_exit(e, "export")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OutputBusyError as e:  # another export into the same --dest
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
