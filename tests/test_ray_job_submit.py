"""The main job through a real Ray head: ``ray start --head`` + ``ray job submit --working-dir .``.

Runs after tests/test_pipeline.py has shut its in-process Ray down (modules run in file order);
``ray stop`` at the end stops every Ray process on the machine, as CI machines run nothing else.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from pipeline.output import OutputDir
from pipeline.single_machine import SAMPLE_IMAGES

from .conftest import official_sam, sharpen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # `ray start --head` enables token authentication (token in ~/.ray/auth_token); clients opt in.
    env["RAY_AUTH_MODE"] = "token"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.fixture()
def ray_head():
    port, dashboard = free_port(), free_port()
    started = ray_cli("start", "--head", f"--port={port}", f"--dashboard-port={dashboard}",
                      "--dashboard-host=127.0.0.1", "--num-cpus=2", "--disable-usage-stats")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        ray_cli("stop", "--force")


def test_ray_job_submit(ray_head, tmp_path):
    checkpoint = tmp_path / "sam_tiny_sharp.pth"
    torch.save(sharpen(official_sam("tiny", perturb=0.0)).state_dict(), checkpoint)
    out = tmp_path / "out"
    job = ray_cli("job", "submit", "--address", ray_head, "--working-dir", ".", "--",
                  "python", "-m", "jobs.generate", "--output", str(out), "--checkpoint", str(checkpoint),
                  "--points-per-side", "4", "--pred-iou-thresh", "0.8", "--stability-score-thresh", "0.8",
                  "--box-nms-thresh", "1.0", timeout=600)
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-4000:]
    n = len(os.listdir(SAMPLE_IMAGES))
    assert f"images ok: {n}, errors: 0" in log and "succeeded" in log
    images = OutputDir(str(out)).read_table("images")
    assert images.column("status").to_pylist() == ["ok"] * n
    assert OutputDir(str(out)).read_table("masks").num_rows > 0


def test_ray_job_stop_ends_the_run_cleanly(ray_head, tmp_path):
    """``ray job stop`` sends the driver SIGTERM (then SIGKILL after 3 s): the run stops as on an
    error, within that time. Its record says how it ended, the lease is released, and no shard is
    left half-written: every masks file has its marker."""
    import json
    import shutil
    import time

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        for name in os.listdir(SAMPLE_IMAGES):
            shutil.copy(os.path.join(SAMPLE_IMAGES, name), photos / f"{i}-{name}")
    out = tmp_path / "out"
    job = ray_cli("job", "submit", "--address", ray_head, "--working-dir", ".", "--submission-id", "stop-me",
                  "--no-wait", "--", "python", "-m", "jobs.generate", "--input", str(photos), "--output", str(out),
                  "--model-type", "tiny", "--points-per-side", "16", "--images-per-shard", "1",
                  "--images-per-batch", "1")
    assert job.returncode == 0, job.stdout + job.stderr
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("_done/*.json")):
        time.sleep(0.1)
    stopped = ray_cli("job", "stop", "--address", ray_head, "stop-me")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    logs = ray_cli("job", "logs", "--address", ray_head, "stop-me").stdout
    assert "error: the run was stopped by SIGTERM; the shards it completed are kept" in logs, logs[-3000:]
    done = sorted(p.stem for p in out.glob("_done/*.json"))
    assert 1 <= len(done) < len(os.listdir(photos)), "the stop should land mid-run"
    assert sorted(p.stem for p in out.glob("masks/*.parquet")) == done
    assert not (out / "_lease.json").exists()
    [record] = [json.loads(p.read_text()) for p in out.glob("_runs/*.json")]
    assert (record["status"], record["error"]) == ("stopped", "Terminated: stopped by SIGTERM")
    assert record["shards_written"] == done
