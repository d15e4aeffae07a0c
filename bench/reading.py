"""Reading a shard of loose images from an object store: the decode stage's reader
(``pipeline.reading.decode_rows``: each file in one GET, ``READ_AHEAD`` read while the ones
before them decode) against the reader it replaced (``open`` and ``read``, a file at a time:
a HEAD and a GET, in turn with the decoding), in one run on the same store and images.

    python -m bench.reading                                   # a local moto S3 server, 0 and 30 ms a request
    python -m bench.reading --input s3://bucket/bench-reading # a real bucket (an empty prefix)

It writes ``--images`` JPEGs of 2250x1500 (SA-1B's size, from the bundled coffee.jpg) under
the input, then decodes them as one shard both ways: images/s, and S3 requests per image. A
local moto server answers in ~1 ms, far sooner than S3 (tens of ms to a first byte), so by
default it is measured as it is and with ``--latency-ms`` added to each request. One process
decodes (a decode task of the pipeline does the same, one shard at a time). The images are
removed at the end.
"""

from __future__ import annotations

import argparse
import io
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional

from PIL import Image

from pipeline.decode import decode_image
from pipeline.reading import decode_rows
from pipeline.shards import READ_AHEAD, Shard
from pipeline.single_machine import SAMPLE_IMAGES
from pipeline.storage import filesystem, open_uri, remove

from .common import machine
from .stores import moto_bucket, print_and_write, refuse_a_prefix_with_files, s3_calls, s3_options


def sample_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.open(f"{SAMPLE_IMAGES}/coffee.jpg").convert("RGB").resize((2250, 1500)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def one_at_a_time(shard: Shard, opts: Optional[Dict[str, Any]]) -> int:
    """The reader before: each file opened and read, then decoded, in turn."""
    for uri in shard.uris:
        with open_uri(uri, "rb", opts) as f:
            decode_image(f.read())
    return len(shard.uris)


def decode_stage(shard: Shard, opts: Optional[Dict[str, Any]]) -> int:
    rows = [r for r in decode_rows(shard, opts, 10**8) if r["image_index"] >= 0]
    assert all(r.get("pixels") for r in rows), "an image did not decode"
    return len(rows)


def measured(fn: Callable[[], int], calls: List[str]) -> Dict[str, Any]:
    calls.clear()
    start = time.perf_counter()
    images = fn()
    seconds = time.perf_counter() - start
    counts = Counter(calls)
    return {"seconds": round(seconds, 2), "images_per_s": round(images / seconds, 1),
            "requests_per_image": {k: round(v / images, 2) for k, v in sorted(counts.items())}}


def run(uri: str, opts: Optional[Dict[str, Any]], images: int, latency_ms: float) -> Dict[str, Any]:
    fs, path = filesystem(uri, opts)
    path = path.rstrip("/")
    refuse_a_prefix_with_files(fs, path, uri)
    data = sample_jpeg()
    uris = [f"s3://{path}/{i:05d}.jpg" for i in range(images)]
    fs.pipe({u[len("s3://"):]: data for u in uris})
    try:
        with s3_calls(fs) as calls:
            shard = Shard("files-00000", "files", tuple(uris), f"s3://{path}")
            warm = Shard("warm", "files", tuple(uris[:2]), f"s3://{path}")
            one_at_a_time(warm, opts), decode_stage(warm, opts)  # a client, botocore's models: once a process
            before = measured(lambda: one_at_a_time(shard, opts), calls)
            ours = measured(lambda: decode_stage(shard, opts), calls)
    finally:
        remove(fs, path, recursive=True)
    return {"input": uri, "images": images, "jpeg_bytes": len(data), "added_latency_ms": latency_ms,
            "read_ahead": READ_AHEAD, "one_at_a_time": before, "decode_rows": ours,
            "ratio": round(ours["images_per_s"] / before["images_per_s"], 2), "machine": machine()}


def report(result: Dict[str, Any]) -> None:
    added = f", {result['added_latency_ms']:g} ms added to each request" if result["added_latency_ms"] else ""
    print(f"{result['input']}: {result['images']} JPEGs of {result['jpeg_bytes'] / 1e6:.2f} MB{added}")
    for key in ("one_at_a_time", "decode_rows"):
        r = result[key]
        requests = ", ".join(f"{v} {k}" for k, v in r["requests_per_image"].items())
        print(f"  {key:>13}: {r['images_per_s']:.1f} images/s ({r['seconds']:.2f} s), per image: {requests}")
    print(f"  decode_rows / one_at_a_time: {result['ratio']}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="an empty S3 prefix to write the images under (default: a local moto S3 server)")
    ap.add_argument("--s3-endpoint-url", help="an S3-compatible store's endpoint, for --input")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--latency-ms", type=float, default=30.0, help="added to each request of the local server "
                                                                   "(it is also measured without)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    results = []
    if args.input:
        results.append(run(args.input, s3_options(args.s3_endpoint_url), args.images, 0.0))
    else:
        for latency_ms in sorted({0.0, args.latency_ms}):
            with moto_bucket(latency_ms / 1000) as opts:
                results.append(run("s3://bench/reading", opts, args.images, latency_ms))
    print_and_write(results, report, args.json)


if __name__ == "__main__":
    main()
