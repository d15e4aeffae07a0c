"""``bench.session``: the harness's sections in separate processes within one time budget (the
command a lent GPU machine runs), merged into one report."""

from __future__ import annotations

import json

from bench import session
from bench.session import Step


def test_session_runs_the_harness_and_keeps_what_a_killed_step_finished(tmp_path, capsys):
    """Real harness processes on CPU: the first step's figures land in the merged JSON; the
    second, capped under the time it needs to start, is killed and says so."""
    rle = Step("rle", ("--sections", "rle", "--size", "60x90", "--repeats", "1"), cap_s=120, why="cheap")
    plan = [rle, Step("too slow", rle.args, cap_s=1, why="cannot finish in 1 s")]
    out = tmp_path / "session.json"
    report = session.run_session(plan, "cpu", budget_s=600, json_path=out, min_step_s=0.5)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    ok, killed = report["session"]["steps"]
    assert ok["status"] == "ok" and ok["returncode"] == 0 and ok["sections"] == ["rle"]
    assert report["rle"]["step"] == "rle" and report["rle"]["image"] == [60, 90] and report["rle"]["identical"]
    assert killed["status"] == "timed_out" and killed["returncode"] is None and 1 <= killed["wall_s"] < 30
    assert "sections" not in killed
    session.print_session(report)
    printed = capsys.readouterr().out
    assert "RLE of the kept masks, 105 in 21 crops at 60x90" in printed and "too slow" in printed and "timed_out" in printed


def test_budget_caps_each_step_and_skips_what_cannot_start(tmp_path):
    """A fake runner on a fake clock: each step gets min(cap, what is left), steps that cannot
    start with ``min_step_s`` left are skipped, AMG rows of every step are kept and tagged, and
    the targets take the best figure of any step."""
    now = [0.0]
    given = {}

    def amg_row(img_s):
        fast = {"img_s": img_s, "s_img": 1 / img_s, "peak_gib": 9.0}
        return {"name": "light vit_h", "ours_fast": fast}

    parts = {"light": {"machine": {"gpu": "fake"}, "device": "cuda", "profile": {"image": [1, 1]},
                       "amg": [amg_row(6.0)]},
             "compiled": {"machine": {"gpu": "fake"}, "device": "cuda", "profile": {"image": [2, 2]},
                          "amg": [amg_row(9.0)], "decoder": {"prompts": 256}}}

    def runner(step, timeout, json_path):
        given[step.name] = timeout
        now[0] += min(timeout, {"light": 100, "compiled": 500}.get(step.name, 0))
        if step.name in parts:
            json_path.write_text(json.dumps(parts[step.name]))
        return ("timed_out" if step.name == "compiled" else "ok"), None if step.name == "compiled" else 0

    plan = [Step("light", (), 150, ""), Step("compiled", (), 400, ""), Step("last", (), 90, "")]
    report = session.run_session(plan, "cuda", budget_s=520, json_path=tmp_path / "s.json", min_step_s=30,
                                 runner=runner, clock=lambda: now[0])
    assert given == {"light": 150, "compiled": 400}  # 'last' had 20 s left: skipped
    light, compiled, last = report["session"]["steps"]
    assert (light["status"], compiled["status"], last["status"]) == ("ok", "timed_out", "skipped")
    assert light["wall_s"] == 100 and compiled["wall_s"] == 400 and "20 s" in last["reason"]
    assert compiled["sections"] == ["amg", "decoder"]  # what it saved before it was killed
    assert [(r["step"], r["ours_fast"]["img_s"]) for r in report["amg"]] == [("light", 6.0), ("compiled", 9.0)]
    assert report["profiles"] == {"light": {"image": [1, 1]}, "compiled": {"image": [2, 2]}}
    assert report["decoder"] == {"prompts": 256, "step": "compiled"}
    assert report["targets"]["amg_light_vit_h_img_s"]["reached"] == 9.0
    assert report["targets"]["amg_peak_gib"] == {"target": 16.0, "reached": 9.0, "met": True}
    assert report["session"]["wall_s"] == 500


def test_cuda_plan_fits_one_device_command():
    """The GPU plan's steps are harness sections that exist, the default budget leaves the
    device's 600 s per command some room, and --steps refuses numbers outside the plan."""
    import pytest

    sections = set("encoder,decoder,light,heavy,sa1b,filter,rle,postprocess,resize".split(","))
    for step in session.PLANS["cuda"]:
        i = step.args.index("--sections")
        assert set(step.args[i + 1].split(",")) <= sections, step
    assert session.build_parser().parse_args([]).budget_s <= 500
    with pytest.raises(SystemExit):
        session.main(["--device", "cuda", "--steps", "0,7"])


def test_preflight_refuses_a_machine_that_cannot_run_the_plan(monkeypatch):
    """Without the official package, or asked for CUDA where there is none, the session stops
    at once with what to do, before any step spends the device's minutes."""
    import builtins

    import pytest
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="sees no CUDA device"):
        session.preflight("cuda")
    session.preflight("cpu")
    real_import = builtins.__import__

    def no_official(name, *args, **kwargs):
        if name == "segment_anything":
            raise ImportError("No module named 'segment_anything'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_official)
    with pytest.raises(SystemExit, match="carry its wheel"):
        session.preflight("cpu")
