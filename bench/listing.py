"""The driver's memory for listing an input folder: ``pipeline.storage.list_input`` (what a run
lists) against fsspec's whole ``find`` of the same folder, in one run on the same store.

    python -m bench.listing                            # a local moto S3 server and a local folder, 20k files
    python -m bench.listing --input s3://bucket/bench-listing --files 200000   # a real bucket
    python -m bench.listing --input /mnt/shared/bench-listing                  # a shared filesystem

It writes ``--files`` one-byte files in ``--folders`` folders under ``--input`` (which must hold
nothing yet; on S3 with a console-style "folder/" placeholder per folder), then measures each way
of listing them (on one filesystem instance, its cache dropped between): seconds, LIST requests
(S3), the Python heap's peak during the listing and what stays held afterwards (tracemalloc), per
file. The moto server runs in a process of its own, so its memory is not counted. The files are
removed at the end.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc
from typing import Any, Callable, Dict, Optional

from fsspec.implementations.local import LocalFileSystem

from pipeline.storage import filesystem, fingerprint, full_uri, list_input, remove

from .common import machine
from .stores import moto_bucket, print_and_write, refuse_a_prefix_with_files, s3_calls, s3_options


def measured(fn: Callable[[], Any], files: int, requests: Callable[[], int]) -> Dict[str, Any]:
    """Seconds, requests, and the heap's peak and held growth (MB, and KB a file) of ``fn()``."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    before = requests()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    held, peak = (m - base for m in tracemalloc.get_traced_memory())
    tracemalloc.stop()
    assert len(result) == files, (len(result), files)  # every file listed, no placeholder among them
    return {"seconds": round(seconds, 2), "requests": requests() - before, "peak_bytes": peak, "held_bytes": held,
            "peak_mb": round(peak / 1e6, 1), "held_mb": round(held / 1e6, 1),
            "peak_kb_per_file": round(peak / 1e3 / files, 3), "held_kb_per_file": round(held / 1e3 / files, 3)}


def run(uri: str, opts: Optional[Dict[str, Any]], files: int, folders: int) -> Dict[str, Any]:
    fs, path = filesystem(uri, opts)
    path = path.rstrip("/")
    refuse_a_prefix_with_files(fs, path, uri)
    names = [f"{path}/d{i % folders:03d}/img_{i:07d}.jpg" for i in range(files)]
    if isinstance(fs, LocalFileSystem):
        for folder in {n.rsplit("/", 1)[0] for n in names}:
            os.makedirs(folder, exist_ok=True)
    else:
        fs.pipe({f"{path}/d{i:03d}/": b"" for i in range(folders)})  # what "Create folder" of a console writes
    fs.pipe({n: b"x" for n in names})
    try:
        def find_whole():  # what list_input did before: fsspec's find, whole, then the fingerprints
            found = {full_uri(fs, p): fingerprint(i) for p, i in fs.find(path, detail=True).items()
                     if not p.endswith("/")}
            fs.invalidate_cache()
            return found

        with s3_calls(fs) as calls:
            lists = lambda: sum(c.startswith("list_") for c in calls)  # noqa: E731
            list_input(uri, opts)  # once unmeasured: what a process loads once (botocore's API models, a client)
            whole = measured(find_whole, files, lists)
            ours = measured(lambda: list_input(uri, opts).fingerprints, files, lists)
    finally:
        remove(fs, path, recursive=True)
    return {"input": uri, "files": files, "folders": folders, "fsspec_find": whole, "list_input": ours,
            "peak_ratio": round(whole["peak_bytes"] / ours["peak_bytes"], 1), "machine": machine()}


def report(result: Dict[str, Any]) -> None:
    print(f"{result['input']}: {result['files']} files in {result['folders']} folders")
    for key in ("fsspec_find", "list_input"):
        r = result[key]
        print(f"  {key:>12}: {r['seconds']:.2f} s, {r['requests']} LIST requests, peak {r['peak_mb']} MB "
              f"({r['peak_kb_per_file']} KB a file), held {r['held_mb']} MB ({r['held_kb_per_file']} KB a file)")
    page = " (list_input's holds one page of up to 1,000 keys, ~3 MB when full)" if "://" in result["input"] else ""
    print(f"  peak of find / peak of list_input: {result['peak_ratio']}{page}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="an empty prefix to write the files under (default: a local moto S3 "
                                    "server and a local temporary folder)")
    ap.add_argument("--s3-endpoint-url", help="an S3-compatible store's endpoint, for --input s3://...")
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--folders", type=int, default=40)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    results = []
    if args.input:
        results.append(run(args.input, s3_options(args.s3_endpoint_url), args.files, args.folders))
    else:
        with moto_bucket() as opts:
            results.append(run("s3://bench/listing", opts, args.files, args.folders))
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run(os.path.join(tmp, "listing"), None, args.files, args.folders))
    print_and_write(results, report, args.json)


if __name__ == "__main__":
    main()
