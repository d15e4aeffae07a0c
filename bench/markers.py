"""Reading an output's shard markers with and without the marker index (pipeline.marker_index),
as a run does at its start and end, in one run on the same store.

    python -m bench.markers                                   # a local moto S3 server, 3000 shards
    python -m bench.markers --output s3://bucket/bench-markers --shards 20000   # a real bucket
    python -m bench.markers --output /mnt/shared/bench-markers      # a shared filesystem (NFS, EFS)

It writes ``--shards`` markers of ``--files-per-shard`` loose files each (as a run over a folder
writes them: members, fingerprints, counts, model and settings) under ``--output``, then times
``OutputDir.markers()`` with no index (one GET per marker, fetched concurrently), the run that
writes the index, and a reader with the index current (one listing and one GET). The markers and
the index it wrote are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Dict, Optional

from pipeline.marker_index import INDEX_FILE
from pipeline.output import OutputDir
from pipeline.storage import remove

from .common import machine
from .stores import moto_bucket, s3_options, write_json


def marker(i: int, files: int) -> Dict[str, Any]:
    uris = [f"s3://photos/2026/cam{i % 50:03d}/img_{i:07d}_{k:02d}.jpg" for k in range(files)]
    return {"members": uris, "root": "s3://photos/2026", "images": files, "masks": 60 * files,
            "errors": {}, "first_frame_only": 0, "compute_dtypes": {"bfloat16": files},
            "digests": {u: f"{2_000_000 + k}:\"{i:016x}{k:016x}\"" for k, u in enumerate(uris)},
            "run_id": "0123456789abcdef0123456789abcdef", "model": "vit_h:sam_vit_h_4b8939.pth",
            "weights": "zip-crc32:459fd963b87967e0", "settings_hash": "674b4ddd29fd4582",
            "settings": {"points_per_side": 32, "pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}}


def timed_read(uri: str, opts: Optional[Dict[str, Any]], lease: bool = False) -> Dict[str, Any]:
    """``markers()`` of a fresh reader (no listing cache), its seconds and the markers it fetched
    one by one."""
    out = OutputDir(uri, opts)
    out.fs = type(out.fs)(skip_instance_cache=True, **(opts or {}))
    fetched, cat = [], out.fs.cat_ranges

    def counting(paths, *args, **kwargs):
        fetched.extend(paths)
        return cat(paths, *args, **kwargs)

    out.fs.cat_ranges = counting
    start = time.perf_counter()
    if lease:
        with out.hold_lease():  # the run: it writes the index
            start = time.perf_counter()  # the lease's settling is not the markers' cost
            n = len(out.markers())
    else:
        n = len(out.markers())
    return {"markers": n, "seconds": round(time.perf_counter() - start, 3), "fetched": len(fetched)}


def run(uri: str, opts: Optional[Dict[str, Any]], shards: int, files: int) -> Dict[str, Any]:
    out = OutputDir(uri, opts)
    if out.shard_ids() or out.fs.exists(f"{out.path}/{INDEX_FILE}"):
        raise SystemExit(f"error: {uri} already holds markers; give an empty prefix (the benchmark removes its own).")
    blobs = {f"{out.path}/_done/files-{i:05d}.json": json.dumps(marker(i, files)).encode() for i in range(shards)}
    out.fs.makedirs(f"{out.path}/_done", exist_ok=True)
    out.fs.pipe(blobs)
    try:
        no_index = timed_read(uri, opts)
        writing = timed_read(uri, opts, lease=True)
        with_index = timed_read(uri, opts)
        index_bytes = out.fs.size(f"{out.path}/{INDEX_FILE}")
    finally:
        remove(out.fs, f"{out.path}/_done", recursive=True)
        if out.fs.exists(f"{out.path}/{INDEX_FILE}"):
            remove(out.fs, f"{out.path}/{INDEX_FILE}")
    return {"output": uri, "shards": shards, "files_per_shard": files,
            "marker_bytes": sum(len(b) for b in blobs.values()), "index_bytes": index_bytes,
            "no_index": no_index, "writing_index": writing, "with_index": with_index,
            "speedup": round(no_index["seconds"] / max(with_index["seconds"], 1e-9), 1), "machine": machine()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", help="where to write the markers (default: a bucket of a local moto S3 server)")
    ap.add_argument("--s3-endpoint-url", help="an S3-compatible store's endpoint, for --output s3://...")
    ap.add_argument("--shards", type=int, default=3000)
    ap.add_argument("--files-per-shard", type=int, default=64)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.output:
        result = run(args.output, s3_options(args.s3_endpoint_url), args.shards, args.files_per_shard)
    else:
        with moto_bucket() as opts:
            result = run("s3://bench/markers", opts, args.shards, args.files_per_shard)
    for key in ("no_index", "writing_index", "with_index"):
        r = result[key]
        print(f"{key:>14}: {r['markers']} markers in {r['seconds']:.2f} s, {r['fetched']} fetched one by one")
    print(f"markers {result['marker_bytes'] / 1e6:.1f} MB, index {result['index_bytes'] / 1e6:.2f} MB; "
          f"with the index {result['speedup']}x faster")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
