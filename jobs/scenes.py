"""Write procedural scenes with exact instance masks: PNG images and a COCO annotations file.

    python -m jobs.scenes --output scenes --count 50 --seed 1000      # scenes/*.png and scenes.json
    python -m jobs.generate --input scenes --output out/scenes --points-per-side 32
    python -m jobs.evaluate --ground-truth scenes.json --predictions out/scenes

Seeds below 1000 are kept for training streams; the default evaluation seed is 1000.
"""

from __future__ import annotations

import argparse
import sys

from sam_core.training.scenes import write_scene_dataset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.scenes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="folder for scene_NNNNN.png (only images go there)")
    ap.add_argument("--count", type=int, default=50, help="number of scenes (default 50)")
    ap.add_argument("--seed", type=int, default=1000, help="scene seed (default 1000, held out from training)")
    ap.add_argument("--annotations", help="COCO file to write (default: <output>.json, beside the folder)")
    ap.add_argument("--min-side", type=int, default=192, help="smallest image side (default 192)")
    ap.add_argument("--max-side", type=int, default=320, help="largest image side (default 320)")
    args = ap.parse_args(argv)
    if args.count < 1 or not 16 <= args.min_side <= args.max_side:
        ap.error("need --count >= 1 and 16 <= --min-side <= --max-side")
    n_objects = write_scene_dataset(args.output, args.count, args.seed, args.min_side, args.max_side,
                                    annotations_path=args.annotations)
    where = args.annotations or f"{args.output.rstrip('/')}.json"
    print(f"wrote {args.count} scenes with {n_objects} objects to {args.output}; masks: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
