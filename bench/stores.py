"""The stores the storage benchmarks (bench.markers, bench.listing) write to, and their output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional


@contextmanager
def moto_bucket(latency_s: float = 0.0, bytes_per_s: float = 0.0) -> Iterator[Dict[str, Any]]:
    """A moto S3 server in a child process on 127.0.0.1 with a bucket "bench"; the storage options
    that reach it. ``latency_s``: each request is answered that much later, as a store's
    time to first byte (S3's is tens of ms; moto's own, on this machine, ~1 ms); ``bytes_per_s``
    (0: as fast as it goes): each answer's body sent at that pace, as a store's throughput per
    connection."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = (["-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)] if not (latency_s or bytes_per_s)
               else ["-c", SLOW_MOTO, str(port), str(latency_s), str(bytes_per_s)])
    server = subprocess.Popen([sys.executable, *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench",
                              aws_secret_access_key="bench", region_name="us-east-1")
        for _ in range(100):
            try:
                client.create_bucket(Bucket="bench")
                break
            except Exception:  # not listening yet
                time.sleep(0.1)
        else:
            raise RuntimeError(f"The moto server on {endpoint} did not start.")
        yield {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    finally:
        server.terminate()
        server.wait()


SLOW_MOTO = """
import sys, time
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple
app, latency, pace = DomainDispatcherApplication(create_backend_app), float(sys.argv[2]), float(sys.argv[3])
def paced(body):
    for part in body:
        for i in range(0, len(part), 65536):
            time.sleep(len(part[i:i + 65536]) / pace)
            yield part[i:i + 65536]
def slow(environ, start_response):
    time.sleep(latency)
    body = app(environ, start_response)
    return paced(body) if pace else body
run_simple("127.0.0.1", int(sys.argv[1]), slow, threaded=True)
"""  # moto's server, each answer delayed and paced


@contextmanager
def s3_calls(fs: Any) -> Iterator[List[str]]:
    """The S3 API methods (``get_object``, ``list_objects_v2``...) that every s3fs instance calls
    while in the block, in order; nothing for another filesystem."""
    calls: List[str] = []
    real = getattr(type(fs), "_call_s3", None)
    if real is None:
        yield calls
        return

    async def counting(self, method, *args, **kwargs):
        calls.append(method)
        return await real(self, method, *args, **kwargs)

    type(fs)._call_s3 = counting
    try:
        yield calls
    finally:
        type(fs)._call_s3 = real


def refuse_a_prefix_with_files(fs: Any, path: str, uri: str) -> None:
    """A benchmark writes its files under ``path`` and removes the prefix at the end: one that
    holds files already is refused."""
    if fs.exists(path) and fs.find(path):
        raise SystemExit(f"error: {uri} already holds files; give an empty prefix (the benchmark removes its own).")


def s3_options(endpoint_url: Optional[str]) -> Optional[Dict[str, Any]]:
    """Storage options that reach an S3-compatible store's ``endpoint_url`` (None: the usual AWS ones)."""
    return {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else None


def write_json(path: str, result: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def print_and_write(results: List[Dict[str, Any]], report: Callable[[Dict[str, Any]], None],
                    json_path: Optional[str]) -> None:
    """Each result printed by ``report``; all of them written to ``json_path`` if given."""
    for result in results:
        report(result)
    if json_path:
        write_json(json_path, results)
