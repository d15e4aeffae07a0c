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
