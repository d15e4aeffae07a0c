"""The Ray pipeline against the bare engine (SamAutomaticMaskGenerator in a loop), same machine,
model and images, in one run. Goal: the pipeline keeps >= 85% of the engine's images/s.

    python -m bench.pipeline                      # bundled demo model and images, CPU
    python -m bench.pipeline --model-type vit_h --checkpoint sam_vit_h_4b8939.pth --gpus 1

The default is the bundled demo model, which finds masks on the bundled images, so that
post-processing, passing masks between stages and writing them are part of what is timed (a
model with random weights finds none).

The engine loop decodes and generates; the pipeline runs the same work as separate stages (decode
tasks, a model actor, a post-processing actor) and adds shard reading, Parquet writing, markers
and Ray scheduling (Ray is started before the clock; actor start-up and model load are timed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import ray

from pipeline.config import PipelineConfig
from pipeline.decode import decode_image
from pipeline.run import run_pipeline
from pipeline.single_machine import SAMPLE_IMAGES
from pipeline.stages import build_generator
from sam_core.checkpoint import bundled_checkpoint

from .common import machine


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-type", default="demo")
    ap.add_argument("--checkpoint", help="official-format .pth (default for demo: the bundled weights)")
    ap.add_argument("--images", type=int, default=12, help="images (the bundled ones repeated)")
    ap.add_argument("--points-per-side", type=int, default=16)
    # The README's demo settings: the demo model's IoU predictions run low.
    ap.add_argument("--pred-iou-thresh", type=float, default=0.3)
    ap.add_argument("--stability-score-thresh", type=float, default=0.7)
    ap.add_argument("--images-per-shard", type=int, default=4)
    ap.add_argument("--gpus", type=float, default=0.0, help="GPUs for the pipeline's model actor")
    args = ap.parse_args(argv)

    work = tempfile.mkdtemp(prefix="bench-pipeline-")
    try:
        checkpoint = bundled_checkpoint(args.model_type, args.checkpoint)
        names = sorted(os.listdir(SAMPLE_IMAGES))
        for i in range(args.images):
            name = names[i % len(names)]
            shutil.copy(os.path.join(SAMPLE_IMAGES, name), os.path.join(work, f"{i:04d}{os.path.splitext(name)[1]}"))
        cpus = os.cpu_count() or 1
        cfg = PipelineConfig(input_uri=work, output_uri=os.path.join(work, "out"), model_type=args.model_type,
                             checkpoint=checkpoint, amg={"points_per_side": args.points_per_side, "pred_iou_thresh": args.pred_iou_thresh,
                                  "stability_score_thresh": args.stability_score_thresh},
                             images_per_shard=args.images_per_shard, num_cpus_per_worker=cpus,
                             num_gpus_per_worker=args.gpus)
        device = "cuda" if args.gpus else "cpu"
        t0 = time.perf_counter()
        generator = build_generator(cfg, device)
        engine_masks = 0
        for name in sorted(os.listdir(work)):
            with open(os.path.join(work, name), "rb") as f:
                engine_masks += len(generator.generate(decode_image(f.read())))
        engine_s = time.perf_counter() - t0

        # One logical CPU more than the machine has: the model actor claims every core (the engine
        # loop uses them all too), and decode tasks and the post-processing actor (0.5 each) share
        # the extra one.
        ray.init(num_cpus=cpus + 1, num_gpus=args.gpus or None, include_dashboard=False, log_to_driver=False)
        t0 = time.perf_counter()
        summary = run_pipeline(cfg)
        pipeline_s = time.perf_counter() - t0
        ray.shutdown()
        assert summary.images_ok == args.images and summary.masks == engine_masks, (summary, engine_masks)
        print(summary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    engine_ips, pipeline_ips = args.images / engine_s, args.images / pipeline_s
    print(f"\n{args.images} images, {engine_masks} masks, {args.model_type}, "
          f"{args.points_per_side}x{args.points_per_side} points, {machine()}")
    print(f"engine   {engine_ips:.3f} images/s ({engine_s:.1f} s, model load included)")
    print(f"pipeline {pipeline_ips:.3f} images/s ({pipeline_s:.1f} s, actor start and model load included)")
    print(f"pipeline / engine = {pipeline_ips / engine_ips:.1%}")


if __name__ == "__main__":
    main()
