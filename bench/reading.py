"""Reading a shard from an object store, as the decode stage reads it against the readers it
replaced, in one run on the same store and images, each through ``decode_rows`` (the decode
stage's work: read, decode, the rows):

- loose files: ``pipeline.reading.decode_rows`` (each file in one GET, ``READ_AHEAD`` read while
  the ones before them decode) against ``open`` and ``read`` a file at a time (a HEAD and a GET,
  in turn with the decoding);
- a tar: ``decode_rows`` (``pipeline.storage.open_stream``: blocks of ``STREAM_RANGE_BYTES``, the
  next fetched while the members before it decode) against fsspec's default file of the tar (a
  block fetched when the reader reaches it).

    python -m bench.reading                                   # a local moto S3 server, as it is and slowed
    python -m bench.reading --input s3://bucket/bench-reading # a real bucket (an empty prefix)

It writes ``--images`` JPEGs of 2250x1500 (SA-1B's size, from the bundled coffee.jpg) under the
input, and a tar of them, then decodes them each way: images/s, and S3 requests per image. A
local moto server answers in ~1 ms and as fast as a socket goes, far sooner than S3 (tens of ms
to a first byte, tens of MB/s a connection), so by default it is measured as it is and with
``--latency-ms`` added to each request and its answers paced at ``--mb-per-s``. One process
decodes, as a decode task of the pipeline does (one shard at a time); each reader runs
``--repeats`` times, taking turns, and the median is reported. The files are removed at the end.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import time
from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional

from PIL import Image

from pipeline import shards, storage
from pipeline.reading import decode_rows
from pipeline.shards import READ_AHEAD, Shard
from pipeline.single_machine import SAMPLE_IMAGES
from pipeline.storage import STREAM_RANGE_BYTES, filesystem, open_uri, remove

from .common import machine
from .stores import moto_bucket, print_and_write, refuse_a_prefix_with_files, s3_calls, s3_options


def sample_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.open(f"{SAMPLE_IMAGES}/coffee.jpg").convert("RGB").resize((2250, 1500)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def tar_of(data: bytes, images: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(images):
            info = tarfile.TarInfo(f"{i:05d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def one_at_a_time(shard: Shard, opts: Optional[Dict[str, Any]]) -> int:
    """``decode_rows`` with the loose files' reader before: each file opened and read (fsspec
    asks for its size first), one at a time, in turn with the decoding."""
    def open_and_read(uri: str, storage_options: Any = None) -> bytes:
        with open_uri(uri, "rb", storage_options) as f:
            return f.read()

    with patched(shards, read_file=open_and_read, READ_AHEAD=1):
        return decode_stage(shard, opts)


def one_stream(shard: Shard, opts: Optional[Dict[str, Any]]) -> int:
    """``decode_rows`` with the tar's reader before: fsspec's file of it, a block (s3fs: 50 MB)
    fetched when the reader reaches it."""
    with patched(storage, RANGED_PROTOCOLS=frozenset()):
        return decode_stage(shard, opts)


@contextmanager
def patched(module: Any, **values: Any) -> Iterator[None]:
    kept = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in kept.items():
            setattr(module, name, value)


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


def median_of(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The run of median images/s, with every run's images/s."""
    middle = sorted(runs, key=lambda r: r["images_per_s"])[len(runs) // 2]
    return {**middle, "images_per_s_each": [r["images_per_s"] for r in runs]}


def compared(before: Callable[[Shard, Any], int], shard: Shard, opts: Optional[Dict[str, Any]],
             calls: List[str], repeats: int) -> Dict[str, Any]:
    """Each reader ``repeats`` times, taking turns (so that a slower spell of the machine falls on both)."""
    warm = Shard("warm", shard.kind, shard.uris[:2] if shard.kind == "files" else shard.uris, shard.root)
    before(warm, opts), decode_stage(warm, opts)  # a client, botocore's models: once a process
    was, now = [], []
    for _ in range(repeats):
        was.append(measured(lambda: before(shard, opts), calls))
        now.append(measured(lambda: decode_stage(shard, opts), calls))
    was_median, now_median = median_of(was), median_of(now)
    return {"before": before.__name__, before.__name__: was_median, "decode_rows": now_median,
            "ratio": round(now_median["images_per_s"] / was_median["images_per_s"], 2)}


def run(uri: str, opts: Optional[Dict[str, Any]], images: int, latency_ms: float, mb_per_s: float,
        repeats: int = 3) -> Dict[str, Any]:
    fs, path = filesystem(uri, opts)
    path = path.rstrip("/")
    refuse_a_prefix_with_files(fs, path, uri)
    data = sample_jpeg()
    loose = [f"s3://{path}/loose/{i:05d}.jpg" for i in range(images)]
    fs.pipe({u[len("s3://"):]: data for u in loose})
    fs.pipe(f"{path}/sa_000000.tar", tar_of(data, images))
    try:
        with s3_calls(fs) as calls:
            files = compared(one_at_a_time, Shard("files-00000", "files", tuple(loose), f"s3://{path}/loose"),
                             opts, calls, repeats)
            tar = compared(one_stream, Shard("sa_000000", "tar", (f"s3://{path}/sa_000000.tar",)), opts, calls,
                           repeats)
    finally:
        remove(fs, path, recursive=True)
    return {"input": uri, "images": images, "repeats": repeats, "jpeg_bytes": len(data), "added_latency_ms": latency_ms,
            "mb_per_s_per_connection": mb_per_s, "read_ahead": READ_AHEAD, "stream_range_bytes": STREAM_RANGE_BYTES,
            "loose_files": files, "tar": tar, "machine": machine()}


def report(result: Dict[str, Any]) -> None:
    slowed = (f", {result['added_latency_ms']:g} ms added to each request, {result['mb_per_s_per_connection']:g} MB/s "
              "a connection" if result["added_latency_ms"] or result["mb_per_s_per_connection"] else ", as it answers")
    print(f"{result['input']}: {result['images']} JPEGs of {result['jpeg_bytes'] / 1e6:.2f} MB{slowed}")
    for kind in ("loose_files", "tar"):
        r = result[kind]
        for key in (r["before"], "decode_rows"):
            requests = ", ".join(f"{v} {k}" for k, v in r[key]["requests_per_image"].items())
            each = ", ".join(f"{x:g}" for x in r[key]["images_per_s_each"])
            print(f"  {kind:>11} {key:>13}: {r[key]['images_per_s']:5.1f} images/s (median of {each}), "
                  f"per image: {requests}")
        print(f"  {kind:>11} decode_rows / {r['before']}: {r['ratio']}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="an empty S3 prefix to write the images under (default: a local moto S3 server)")
    ap.add_argument("--s3-endpoint-url", help="an S3-compatible store's endpoint, for --input")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each reader, taking turns; the median is reported")
    ap.add_argument("--latency-ms", type=float, default=30.0, help="added to each request of the local server")
    ap.add_argument("--mb-per-s", type=float, default=80.0, help="the local server's answers paced at this, "
                                                                 "a connection (0: unpaced)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    results = []
    if args.input:
        results.append(run(args.input, s3_options(args.s3_endpoint_url), args.images, 0.0, 0.0, args.repeats))
    else:
        for latency_ms, mb_per_s in sorted({(0.0, 0.0), (args.latency_ms, args.mb_per_s)}):
            with moto_bucket(latency_ms / 1000, mb_per_s * 1e6) as opts:
                results.append(run("s3://bench/reading", opts, args.images, latency_ms, mb_per_s, args.repeats))
    print_and_write(results, report, args.json)


if __name__ == "__main__":
    main()
