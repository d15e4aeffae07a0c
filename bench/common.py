"""Helpers shared by the benchmarks: identical random weights for both packages, timing."""

from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Callable, Dict

import torch

from sam_core.testing import official_sam, ours_from


def official_and_ours(model_type: str, device: str, seed: int = 0, attention_backend: str = "sdpa"):
    """The official model and ours, same seeded weights (every parameter perturbed), on ``device``."""
    official = official_sam(model_type, seed=seed)
    ours = ours_from(official, model_type, attention_backend=attention_backend)
    return official.to(device).eval(), ours.to(device).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_model() -> str:
    """The CPU's model name and whether it has bf16 matrix instructions (which move CPU bf16
    figures severalfold), e.g. "AMD EPYC (avx512_bf16)"."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return f"{name} ({', '.join(bf16)})" if bf16 else name


def machine() -> Dict[str, object]:
    info: Dict[str, object] = {
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def report(title: str, rows, extra: Dict[str, object], json_path=None) -> None:
    """Print rows of (name, official_s, ours_s) with the ratio, and optionally write JSON."""
    print(f"\n{title}")
    print(f"{'measurement':<44}{'official':>12}{'ours':>12}{'speed-up':>10}")
    out = []
    for name, official_s, ours_s in rows:
        ratio = official_s / ours_s if ours_s else float("nan")
        print(f"{name:<44}{official_s * 1e3:>10.1f}ms{ours_s * 1e3:>10.1f}ms{ratio:>9.2f}x")
        out.append({"name": name, "official_s": official_s, "ours_s": ours_s, "speedup": ratio})
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"title": title, **extra, "machine": machine(), "rows": out}, f, indent=2)
        print(f"wrote {json_path}")
