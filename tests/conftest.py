"""Shared fixtures: the official package and ours on identical random weights."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch

from sam_core.testing import official_sam, ours_from, sharpen  # noqa: F401  (re-exported to tests)

# Checkpoints read from object storage are cached here, not in ~/.cache (Ray workers inherit it).
os.environ.setdefault("SAM_DATAGEN_CACHE", tempfile.mkdtemp(prefix="sam_datagen_cache_"))
# gcsfs's experimental filesystem (its default from 2026.10) first asks a bucket's type over gRPC,
# which the GCS emulator does not serve (a minute of retries per bucket): the tests use its plain one.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


@pytest.fixture(scope="session")
def tiny_official():
    return official_sam("tiny")


@pytest.fixture(scope="session")
def tiny_ours(tiny_official):
    return ours_from(tiny_official, "tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_official, tmp_path_factory):
    """An official-format checkpoint file written by the official package's model."""
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth"
    torch.save(tiny_official.state_dict(), path)
    return path


def photo(name: str, size=None) -> np.ndarray:
    """A real RGB photo from scikit-image, optionally cropped to (H, W)."""
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = np.ascontiguousarray(img[..., :3])
    if size is not None:
        img = np.ascontiguousarray(img[: size[0], : size[1]])
    return img


def assert_records_identical(expected, got):
    """Official and our generator records: same count, order, keys, values and mask pixels."""
    assert len(got) == len(expected)
    for i, (e, g) in enumerate(zip(expected, got)):
        assert list(g) == list(e), i
        for key in e:
            a, b = e[key], g[key]
            if isinstance(a, np.ndarray):
                assert a.dtype == b.dtype and np.array_equal(a, b), (i, key)
            else:
                assert a == b, (i, key, a, b)


@pytest.fixture(scope="session")
def scheme_without_package():
    """A URI scheme fsspec knows but whose package is not installed, as ``gs://`` is without gcsfs."""
    import fsspec

    fsspec.register_implementation("nopkgfs", "no_such_package_xyz.FileSystem", clobber=True,
                                   errtxt="Please install no_such_package_xyz to access nopkgfs")
    return "nopkgfs"


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray of 2 CPUs for the tests of one module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on 127.0.0.1, as s3fs's own test suite runs it."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def gcs_bucket():
    """A bucket "gcsbucket" on gcp-storage-emulator (in memory, on 127.0.0.1); the storage
    options that reach it."""
    import socket

    from gcp_storage_emulator.server import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="gcsbucket")
    server.start()
    yield {"endpoint_url": f"http://127.0.0.1:{port}", "token": "anon", "project": "test"}
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """``s3_bucket(name)``: create that bucket on the moto server; the storage options that reach it."""
    import boto3

    def create(name: str) -> dict:
        boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket=name)
        return {"key": "testing", "secret": "testing",
                "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"}}

    return create
