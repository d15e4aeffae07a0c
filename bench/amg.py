"""Automatic mask generation, ours against the official generator, in one run.

    python -m bench.amg                                  # CPU-sized defaults (tiny, 750x1125, 16x16)
    python -m bench.amg --model-type vit_h --height 1500 --width 2250 --points-per-side 32 --device cuda

Loads (as in the project's REFERENCE): "light" = random weights as they are (nothing survives the
filters), "heavy" = the same weights sharpened (IoU head's last bias +0.9, hypernetwork MLPs' last
layer x300) so many candidates pass. Both packages get the same weights and image; our records
are checked against the official ones in the same run (identical with --attention reference,
the default; a summary of the differences otherwise).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from sam_core import SamAutomaticMaskGenerator
from sam_core.amg.fidelity import compare_records
from sam_core.build import ATTENTION_BACKENDS
from sam_core.testing import sharpen

from .common import official_and_ours, report, sync


def photo(height: int, width: int) -> np.ndarray:
    from skimage import data

    return np.array(Image.fromarray(data.coffee()).resize((width, height), Image.BILINEAR))


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def records_equal(a, b) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        for k in x:
            if isinstance(x[k], np.ndarray):
                if not np.array_equal(x[k], y[k]):
                    return False
            elif x[k] != y[k]:
                return False
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-type", default="tiny", help="tiny, vit_b, vit_l or vit_h")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--height", type=int, default=750)
    ap.add_argument("--width", type=int, default=1125)
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--loads", default="light,heavy", help="comma-separated: light, heavy")
    ap.add_argument("--attention", choices=list(ATTENTION_BACKENDS), default="reference",
                    help="our attention backend (reference = bit-identical records)")
    ap.add_argument("--mode", choices=["exact", "fast"], default="exact", help="our generator mode")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    from segment_anything import SamAutomaticMaskGenerator as OfficialGenerator

    image = photo(args.height, args.width)
    rows, extra = [], {"model_type": args.model_type, "device": args.device, "image": [args.height, args.width],
                       "points_per_side": args.points_per_side, "attention": args.attention, "mode": args.mode}
    for load in args.loads.split(","):
        official, ours = official_and_ours(args.model_type, args.device, attention_backend=args.attention)
        if load == "heavy":
            sharpen(official)
            ours.load_state_dict(official.state_dict())
        settings = dict(points_per_side=args.points_per_side, output_mode="binary_mask")
        og = OfficialGenerator(official, **settings)
        ours_gen = SamAutomaticMaskGenerator(ours, mode=args.mode, **settings)
        try:
            official_s, expected = timed(lambda: og.generate(image), args.device)
        except IndexError as e:  # the official crash when nothing survives with crop layers
            official_s, expected = float("nan"), None
            print(f"official generator failed: {e!r}")
        ours_s, got = timed(lambda: ours_gen.generate(image), args.device)
        if expected is not None:
            same = records_equal(expected, got)
            fid = compare_records(expected, got)
            print(f"{load}: official {len(expected)} masks, ours {len(got)}; records identical: {same}; "
                  f"median matched IoU {fid.median_matched_iou:.4f}, matched@0.9 {fid.matched_at_0_9:.3f}")
            extra[f"{load}_records_identical"] = same
            extra[f"{load}_masks"] = len(got)
        rows.append((f"AMG {load}, s/img", official_s, ours_s))
        if args.device.startswith("cuda"):
            extra[f"{load}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
    report(f"AMG {args.model_type} {args.points_per_side}x{args.points_per_side} on {args.device}, "
           f"image {args.height}x{args.width}", rows, extra, args.json)
    print("images/s: " + ", ".join(f"{n}: official {1 / o:.3f}, ours {1 / u:.3f}" for n, o, u in rows))


if __name__ == "__main__":
    main()
