"""Encoder and predictor timings, ours against the official segment-anything, in one run.

    python -m bench.predictor                       # CPU, vit_b
    python -m bench.predictor --device cuda --model-type vit_h --amp bf16 --batch-size 8

Both packages get the same random weights. "official" is segment-anything 1.0 as it is
(fp32; with --amp it runs under the same autocast, so only the implementation differs).
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np
import torch

from sam_core import SamPredictor

from .common import official_and_ours, report, timeit


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-type", default="vit_b", help="tiny, vit_b, vit_l or vit_h")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                    help="autocast dtype for both packages")
    ap.add_argument("--batch-size", type=int, default=4, help="images per batched encoder call (ours)")
    ap.add_argument("--prompts", type=int, default=64, help="point prompts per predict_torch call")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    official, ours = official_and_ours(args.model_type, args.device)
    from segment_anything import SamPredictor as OfficialPredictor

    op = OfficialPredictor(official)
    pp = SamPredictor(ours, amp_dtype=amp)
    autocast = (lambda: torch.autocast(torch.device(args.device).type, dtype=amp)) if amp else contextlib.nullcontext

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(1500, 2250, 3), dtype=np.uint8)
    images = [image] * args.batch_size

    def official_encode():
        with autocast():
            op.set_image(image)

    rows = [
        ("encoder, 1 image (set_image)", timeit(official_encode, args.device, args.repeats),
         timeit(lambda: pp.set_image(image), args.device, args.repeats)),
    ]
    enc_batch = timeit(lambda: pp.set_images(images), args.device, args.repeats) / len(images)
    rows.append((f"encoder per image, ours batch {len(images)}", rows[0][1], enc_batch))

    point = dict(point_coords=np.array([[700.0, 500.0]]), point_labels=np.array([1]))

    def official_predict():
        with autocast():
            op.predict(**point)

    if amp is torch.bfloat16:  # the official predict hands bf16 tensors to numpy, which has no bf16
        print("predict, 1 point: not timed with --amp bf16 (the official predict cannot return bf16 arrays)")
    else:
        rows.append(("predict, 1 point", timeit(official_predict, args.device, args.repeats * 5),
                     timeit(lambda: pp.predict(**point), args.device, args.repeats * 5)))
    coords = torch.as_tensor(rng.uniform(0, 1024, size=(args.prompts, 1, 2)), dtype=torch.float,
                             device=args.device)
    labels = torch.ones(args.prompts, 1, dtype=torch.int, device=args.device)

    def official_batch():
        with autocast():
            op.predict_torch(coords, labels, return_logits=True)

    official_batch_s = timeit(official_batch, args.device, args.repeats)
    rows.append((f"predict_torch, {args.prompts} points", official_batch_s,
                 timeit(lambda: pp.predict_torch(coords, labels, return_logits=True), args.device,
                        args.repeats)))
    factored = SamPredictor(ours, amp_dtype=amp, factored_decoder=True)  # as jobs.prompt --mode fast
    factored.set_image(image)
    rows.append((f"predict_torch, {args.prompts} points, factored decoder", official_batch_s,
                 timeit(lambda: factored.predict_torch(coords, labels, return_logits=True), args.device,
                        args.repeats)))
    report(f"SAM {args.model_type} on {args.device} (amp={args.amp}), image 1500x2250",
           rows, {"model_type": args.model_type, "device": args.device, "amp": args.amp}, args.json)


if __name__ == "__main__":
    main()
