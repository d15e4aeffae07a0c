"""infra/: manifests parse and hold what a cluster needs; their commands are ones our jobs accept;
the local S3 script really serves the sample images."""

from __future__ import annotations

import math
import os
import re
import shlex
import signal
import socket
import subprocess
from pathlib import Path

import yaml

from jobs.generate import parse_args as generate_args
from pipeline.build import load_spec

INFRA = Path(__file__).resolve().parents[1] / "infra"


def load(name):
    return yaml.safe_load((INFRA / name).read_text())


def containers(pod_template):
    return pod_template["spec"]["containers"]


def ray_version_of_image() -> str:
    (line,) = [l for l in (INFRA / "docker/Dockerfile").read_text().splitlines() if l.startswith("FROM ")]
    match = re.fullmatch(r"FROM rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-gpu", line)
    assert match, line
    return match.group(1)


def check_cluster_spec(spec, version):
    assert spec["rayVersion"] == version  # the image's Ray, or head and workers will not talk
    groups = spec["workerGroupSpecs"]
    gpu = [g for g in groups if containers(g["template"])[0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu, "no GPU worker group"
    for g in gpu:
        c = containers(g["template"])[0]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/models" in mounts  # where checkpoints are read from
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    images = {containers(spec["headGroupSpec"]["template"])[0]["image"]} | {
        containers(g["template"])[0]["image"] for g in groups}
    assert len(images) == 1  # one image everywhere


def test_dockerfile_installs_the_package():
    text = (INFRA / "docker/Dockerfile").read_text()
    ray_version_of_image()
    for folder in ("sam_core", "pipeline", "jobs"):
        assert f"COPY --chown=ray:users {folder} ./{folder}" in text
    assert "torch" in text
    # The package, with the extras of --build-arg EXTRAS (heif, gcs) if given: what the shell makes of it.
    (arg,) = re.findall(r'pip install --no-cache-dir -e ("[^"]*")', text)
    for extras, target in (("", "."), ("heif", ".[heif]"), ("gcs,heif", ".[gcs,heif]")):
        out = subprocess.run(["sh", "-c", f"EXTRAS={extras}; printf %s {arg}"], capture_output=True, text=True)
        assert out.stdout == target
    assert "build-essential" in text  # --compile needs a compiler (sam_core.compiler_check)


def test_raycluster_has_a_gpu_worker_group():
    doc = load("kuberay/raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head = containers(doc["spec"]["headGroupSpec"]["template"])[0]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265}  # GCS, dashboard/job API
    check_cluster_spec(doc["spec"], ray_version_of_image())


def test_rayjob_runs_a_generate_command_the_job_accepts():
    doc = load("kuberay/rayjob-generate.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    check_cluster_spec(doc["spec"]["rayClusterSpec"], ray_version_of_image())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.generate"]
    args = generate_args(argv[3:])  # argparse exits on an unknown or malformed flag
    workers = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert args.workers * args.num_gpus_per_worker <= workers["replicas"]
    assert args.checkpoint.startswith("/models/")
    # Every stage must find CPUs on the GPU pods (the head offers none): a model actor, its share
    # of the post-processing actors and at least one decode task per pod, or the pipeline waits forever.
    pod_cpus = float(containers(workers["template"])[0]["resources"]["requests"]["cpu"])
    assert doc["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    post_per_pod = math.ceil((args.postprocess_workers or args.workers) / workers["replicas"])
    assert (args.num_cpus_per_worker + post_per_pod * args.num_cpus_per_postprocessor
            + args.num_cpus_per_decoder) <= pod_cpus


def test_cronjob_submits_an_incremental_build():
    doc = load("kuberay/cronjob-build.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "CronJob")
    assert len(doc["spec"]["schedule"].split()) == 5
    assert doc["spec"]["concurrencyPolicy"] == "Forbid"
    pod = doc["spec"]["jobTemplate"]["spec"]["template"]
    command = containers(pod)[0]["command"]
    assert command[:3] == ["ray", "job", "submit"]
    tail = command[command.index("--") + 1:]
    assert tail[:3] == ["python", "-m", "jobs.build"] and tail[3] == "--spec"
    head_svc = load("kuberay/raycluster.yaml")["metadata"]["name"] + "-head-svc"
    assert command[command.index("--address") + 1] == f"http://{head_svc}:8265"


def test_cluster_launcher_config():
    doc = load("cluster-launcher.yaml")
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert doc["max_workers"] >= max(t.get("max_workers", 0) for t in types.values())
    assert doc["docker"]["image"] == containers(load("kuberay/raycluster.yaml")["spec"]["headGroupSpec"]["template"])[0]["image"]


def test_example_build_spec_builds_masks_of_the_samples_and_exports_them(tmp_path, monkeypatch):
    """The README's build example, as a new user runs it (its worker's work without Ray): the
    bundled demo model with filters it passes, so the build has masks to show."""
    from dataclasses import replace

    from pipeline.build import run_build

    from .test_build import local_run

    monkeypatch.chdir(INFRA.parent)  # the spec names its input relative to the repository
    spec = load_spec(str(INFRA / "build-spec.example.toml"))
    assert spec.inputs == ("pipeline/sample_images",)
    result = run_build(replace(spec, output=str(tmp_path / "built")), run=local_run)
    summary = result.tables["pipeline/sample_images"]
    assert summary.images_ok == 6 and summary.masks >= 6
    assert result.exports["pipeline/sample_images"].annotations == summary.masks


def test_local_scripts_parse_and_s3_serves_the_samples():
    for script in (INFRA / "local").glob("*.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PORT=str(port))
    repo = INFRA.parent
    out = subprocess.run(["bash", str(INFRA / "local/start-s3.sh")], cwd=repo, env=env, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    pid = int(Path(f"/tmp/sam-datagen-s3-{port}.pid").read_text())
    try:
        assert f"http://127.0.0.1:{port}" in out
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="samples")["Contents"])
        expected = sorted(f"images/{p.name}" for p in (repo / "pipeline/sample_images").glob("*.[jp][pn]g"))
        assert keys == expected and keys
    finally:
        os.kill(pid, signal.SIGTERM)
