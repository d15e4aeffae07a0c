"""One GPU session's measurements in one command: the harness's sections in the order that
matters most, each in its own process under a time cap, all inside one time budget.

    python -m bench.session --device cuda --budget-s 480 --json $OUT/harness_cuda.json

A lent GPU machine comes for minutes (this project's tasks get 15 of device time, the machine's
start included, and one command may run 10), and the full ``python -m bench.harness --device cuda
--compile`` takes longer than that. So the plan (``PLANS``) runs first what the open predictions
in ``bench/notes/gpu_h100.md`` need: the AMG loads with the current fast mode, then the decoder,
the encoder, the compiled generator, the rest. Each step is a ``bench.harness`` process with
``--json`` of its own; a step that outlives its cap or the budget is killed and keeps the
sections it finished (the harness writes its JSON after each one); a step that cannot start with
``--min-step-s`` left is skipped. Everything lands in one JSON: the harness's keys, AMG and
encoder rows tagged with their step, the issue's targets (best figure of any step) and
``session.steps`` (status and wall time of each). The summary is printed last.

The official package must be importable on the machine: it has none and cannot download it, so
carry its wheel (here, in the repository root, once; ``.whl/`` is ignored by git):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux2014_x86_64 -d .whl segment-anything==1.0

and start the device command with the install the device README gives (the README's
*Performance* section has the whole command).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import harness


@dataclass(frozen=True)
class Step:
    name: str
    args: Tuple[str, ...]  # bench.harness flags, besides --device and --json
    cap_s: float  # the most seconds it may run
    why: str  # what it measures, or which prediction it checks


# Caps from the last H100 runs (bench/results/harness_h100*.json) with room for model building
# (vit_h is initialised on the host: ~20 s) and for compiling where --compile is on.
PLANS: Dict[str, List[Step]] = {
    "cuda": [
        Step("amg light and sa1b", ("--sections", "light,sa1b", "--profile"), 200,
             "light vit_h fast generate_batch(8): 0.159 -> ~0.11 s/img predicted (factored decoder); SA-1B "
             "fast 1.26 s/img before; stage profile of the fast generator"),
        Step("amg heavy", ("--sections", "heavy", "--profile"), 200,
             "heavy vit_b fast 0.644 s/img before (official ~93 s, one call); where its GPU time goes"),
        Step("decoder", ("--sections", "decoder"), 60,
             "the transformer and mask head on 256 prompts: dense vs factored, fp32 and bf16"),
        Step("encoder", ("--sections", "encoder", "--compile"), 150,
             "vit_b and vit_h encoders, eager and compiled (60.8 img/s vit_h compiled before; target 70)"),
        Step("amg light compiled", ("--sections", "light", "--compile"), 180,
             "the generator with compile=True (encoder, decoder, reductions): ~0.10 s/img predicted"),
        Step("filter, rle, resize", ("--sections", "filter,rle,resize"), 90,
             "the heavy load's candidate filter, RLE and crop resizing on the GPU machine"),
    ],
    # A few seconds a step on 2 cores: tests, and a look at the plan's output without a GPU.
    "cpu": [
        Step("decoder", ("--sections", "decoder", "--decoder-prompts", "4", "--repeats", "1"), 120,
             "the decoder rows"),
        Step("amg light", ("--sections", "light", "--size", "120x180", "--points-per-side", "4", "--repeats", "1"),
             180, "the AMG rows"),
    ],
}

LIST_SECTIONS = ("amg", "encoder")  # rows from every step, tagged with it
Runner = Callable[[Step, float, Path], Tuple[str, Optional[int]]]  # -> (status, return code)


def run_harness(device: str) -> Runner:
    """A runner that runs a step as ``python -m bench.harness`` (its output passed through),
    killed after ``timeout`` seconds."""
    def run(step: Step, timeout: float, json_path: Path) -> Tuple[str, Optional[int]]:
        cmd = [sys.executable, "-m", "bench.harness", "--device", device, *step.args, "--json", str(json_path)]
        print(f"\n== step {step.name!r}: {' '.join(cmd[1:])} (at most {timeout:.0f} s)\n   {step.why}", flush=True)
        try:
            code = subprocess.run(cmd, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return "timed_out", None
        return ("ok" if code == 0 else "failed"), code
    return run


def merge(report: Dict[str, Any], step: Step, part: Dict[str, Any]) -> None:
    """Add one step's harness JSON to the session ``report``: list sections appended with each
    row tagged ``step``, the others set (a later step's replaces an earlier one's)."""
    for key, value in part.items():
        if key in ("machine", "device"):
            report.setdefault(key, value)
        elif key == "profile":
            report.setdefault("profiles", {})[step.name] = value
        elif key in LIST_SECTIONS:
            report.setdefault(key, []).extend(dict(row, step=step.name) for row in value)
        elif key != "targets":
            report[key] = dict(value, step=step.name) if isinstance(value, dict) else value


def preflight(device: str) -> None:
    """Fail in seconds, not after the budget, when the machine cannot run the harness: the
    official package missing (its wheel not carried) or no CUDA device."""
    try:
        import segment_anything  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"bench.session: the official package is not importable ({e}); carry its wheel "
                         "(see python -m bench.session --help)") from e
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"bench.session: --device {device} but torch {torch.__version__} sees no CUDA device")


def run_session(plan: Sequence[Step], device: str, budget_s: float, json_path: Optional[Path] = None,
                min_step_s: float = 30.0, runner: Optional[Runner] = None,
                clock: Callable[[], float] = time.monotonic) -> Dict[str, Any]:
    """Run ``plan`` in order within ``budget_s`` seconds: each step gets the smaller of its cap
    and what is left, and is skipped when less than ``min_step_s`` is left. Returns the merged
    report (also written to ``json_path`` after every step)."""
    runner = runner or run_harness(device)
    start = clock()
    report: Dict[str, Any] = {"device": device, "session": {"budget_s": budget_s, "steps": []}}
    steps = report["session"]["steps"]

    def save() -> None:
        if json_path is not None:
            json_path.write_text(json.dumps(report, indent=2, default=str))

    with tempfile.TemporaryDirectory(prefix="bench-session-") as tmp:
        for i, step in enumerate(plan):
            left = budget_s - (clock() - start)
            row: Dict[str, Any] = {"name": step.name, "args": list(step.args), "why": step.why}
            steps.append(row)
            if left < min_step_s:
                row.update(status="skipped", reason=f"{left:.0f} s of the budget left, under {min_step_s:.0f} s")
                print(f"\n== step {step.name!r} skipped: {row['reason']}", flush=True)
                continue
            part_path = Path(tmp) / f"step{i}.json"
            t0 = clock()
            status, code = runner(step, min(step.cap_s, left), part_path)
            row.update(status=status, returncode=code, wall_s=round(clock() - t0, 1))
            if part_path.exists():  # what the step finished, cut short or not
                part = json.loads(part_path.read_text())
                merge(report, step, part)
                row["sections"] = [k for k in part if k not in ("machine", "device", "profile", "targets")
                                   and part[k] not in ([], None)]
            save()
    report["session"]["wall_s"] = round(clock() - start, 1)
    if device.startswith("cuda"):
        report["targets"] = harness.targets(report)
    save()
    return report


def print_session(report: Dict[str, Any]) -> None:
    """The harness summary of everything measured, then a line per step."""
    if "machine" in report:
        harness.summary(report)
    print(f"\n== session: {report['session']['wall_s']:.0f} s of a {report['session']['budget_s']:.0f} s budget")
    for row in report["session"]["steps"]:
        detail = f"{row['wall_s']:.0f} s, sections: {', '.join(row.get('sections', [])) or 'none'}" \
            if "wall_s" in row else row["reason"]
        print(f"  {row['name']:<24} {row['status']:<10} {detail}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (the GPU plan) or cpu (a small plan, for a look)")
    ap.add_argument("--budget-s", type=float, default=480,
                    help="seconds for all steps together; leave the device command's limit some room")
    ap.add_argument("--min-step-s", type=float, default=30, help="a step does not start with less left")
    ap.add_argument("--steps", help="comma-separated step numbers of the plan to run, from 1 (default: all)")
    ap.add_argument("--json", help="the merged report, rewritten after every step")
    return ap


def main(argv=None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    plan = PLANS["cuda" if args.device.startswith("cuda") else "cpu"]
    if args.steps:
        picked = [int(s) for s in args.steps.split(",")]
        if not all(1 <= s <= len(plan) for s in picked):
            ap.error(f"--steps: numbers 1 to {len(plan)} ({', '.join(s.name for s in plan)})")
        plan = [plan[s - 1] for s in picked]
    preflight(args.device)
    report = run_session(plan, args.device, args.budget_s, Path(args.json) if args.json else None, args.min_step_s)
    print_session(report)
    if args.json:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
