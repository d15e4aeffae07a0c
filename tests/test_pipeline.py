"""The Ray Data job: shards, Parquet tables, bad input, resume after a crash, equality with the engine."""

from __future__ import annotations

import gzip
import io
import json
import os
import posixpath
import re
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.csv  # noqa: F401  (pa.csv)
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.config import PipelineConfig
from pipeline.decode import decode_image
from pipeline.export import export_sa1b_json
from pipeline.output import MASKS_SCHEMA, OutputDir, ShardWriter, masks_from_ipc, masks_to_ipc
from pipeline.run import StageStartError, pending_shards, run_pipeline, run_stages
from pipeline.run_records import read_runs
from pipeline.worker_deaths import MAX_WORKER_DEATHS, start_ledger
from pipeline.reading import decode_rows, decode_shards
from pipeline.shards import Shard, discover_shards, iter_shard_files, read_error_reason
from pipeline.storage import list_files
from pipeline.names import name_digest
from pipeline.single_machine import SAMPLE_IMAGES
from pipeline.stages import ModelStage, PostprocessStage, ShardCollector, ShardWorker, build_generator
from sam_core import SamAutomaticMaskGenerator
from sam_core.amg.sa1b import read_sa1b_json

from .conftest import official_sam, sharpen

AMG = dict(points_per_side=4, box_nms_thresh=1.0, pred_iou_thresh=0.8, stability_score_thresh=0.8)
SAMPLES = ("astronaut.jpg", "chelsea.jpg", "coffee.jpg")
TIMINGS = ["decode_s", "generate_s", "postprocess_s"]  # seconds per stage: differ run to run


def sample_bytes(name):
    with open(f"{SAMPLE_IMAGES}/{name}", "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A sharpened tiny model in the official checkpoint format: many masks survive."""
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny_sharp.pth"
    torch.save(sharpen(official_sam("tiny", perturb=0.0)).state_dict(), path)
    return str(path)


@pytest.fixture()
def inputs(tmp_path):
    """Three good photos and every kind of bad file, in one folder."""
    d = tmp_path / "in"
    d.mkdir()
    for name in SAMPLES:
        (d / name).write_bytes(sample_bytes(name))
    jpeg = sample_bytes("coffee.jpg")
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (d / "empty.png").write_bytes(b"")
    (d / "notes.txt").write_text("not an image")
    big = io.BytesIO()
    Image.new("RGB", (1000, 800)).save(big, format="PNG")
    (d / "too_big.png").write_bytes(big.getvalue())
    return d


def config(inputs, output, checkpoint, **kw):
    return PipelineConfig(input_uri=str(inputs), output_uri=str(output), checkpoint=checkpoint,
                          amg=AMG, images_per_shard=3, max_pixels=300_000, **kw)


def test_discover_folder_glob_tar_and_manifest(inputs, tmp_path):
    shards = discover_shards(str(inputs), images_per_shard=3)
    assert [s.shard_id for s in shards] == ["files-00000", "files-00001", "files-00002"]
    assert [len(s.uris) for s in shards] == [3, 3, 1]
    assert len(discover_shards(str(inputs / "*.jpg"), 10)[0].uris) == 4
    tar_path = tmp_path / "sa_000001.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(inputs / "chelsea.jpg", arcname="sa_1.jpg")
        tar.add(inputs / "notes.txt", arcname="sa_1.json")
    (tar_shard,) = discover_shards(str(tar_path))
    stat = tar_path.stat()
    assert tar_shard == Shard("sa_000001", "tar", (str(tar_path),), digests=(f"{stat.st_size}:{stat.st_mtime}",))
    files = list(iter_shard_files(tar_shard))
    assert [(n, u.endswith("#sa_1.jpg")) for n, u, _, _, _ in files] == [("sa_1.jpg", True)]
    manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table({"uri": [str(inputs / n) for n in SAMPLES]}), manifest)
    assert [s.shard_id for s in discover_shards(str(manifest), 2)] == ["list-00000", "list-00001"]
    bracketed = tmp_path / "list [2024].parquet"  # a glob's characters in a manifest's name: still the manifest
    bracketed.write_bytes(manifest.read_bytes())
    assert [s.uris for s in discover_shards(str(bracketed), 2)] == [s.uris for s in discover_shards(str(manifest), 2)]
    (tmp_path / "bad.csv").write_text("path\nx.jpg\n")
    with pytest.raises(ValueError, match="no 'uri' column"):
        discover_shards(str(tmp_path / "bad.csv"))
    (tmp_path / "bad.parquet").write_text("uri\nx.jpg\n")  # a CSV named .parquet: the error names it
    with pytest.raises(ValueError, match=r"Manifest '.*bad.parquet': Parquet magic bytes not found"):
        discover_shards(str(tmp_path / "bad.parquet"))
    with pytest.raises(FileNotFoundError):
        discover_shards(str(tmp_path / "nothing-here"))


def test_worker_rows_and_equality_with_the_engine(inputs, tmp_path, checkpoint):
    cfg = config(inputs, tmp_path / "out", checkpoint)
    worker = ShardWorker(cfg)
    masks, images = worker.process(discover_shards(str(inputs), 10)[0])
    by_name = {r["image_id"].split("/", 1)[1]: r for r in images}
    assert by_name["truncated.jpg"]["error_reason"] == "corrupt"
    assert by_name["empty.png"]["error_reason"] == "empty"
    assert by_name["notes.txt"]["error_reason"] == "not_an_image"
    assert by_name["too_big.png"]["error_reason"] == "too_large"
    assert all(r["status"] == "ok" for n, r in by_name.items() if n in SAMPLES)
    generator = build_generator(cfg, "cpu")
    for name in SAMPLES:
        expected = generator.generate(decode_image(sample_bytes(name)))
        rows = [m for m in masks if m["image_id"].endswith("/" + name)]
        assert len(rows) == len(expected) == by_name[name]["mask_count"] > 0
        for row, rec in zip(rows, expected):
            assert row["counts"] == rec["segmentation"]["counts"]
            assert [row["height"], row["width"]] == rec["segmentation"]["size"]
            assert (row["area"], row["predicted_iou"], row["stability_score"]) == (
                rec["area"], rec["predicted_iou"], rec["stability_score"])
            assert row["bbox"] == rec["bbox"] and row["crop_box"] == rec["crop_box"]


def test_marker_guards_changed_inputs(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    shard = Shard("files-00000", "files", ("a.jpg",))
    assert not out.is_complete(shard)
    out.write_shard(shard, [], [])
    assert out.is_complete(shard)
    with pytest.raises(ValueError, match="completed from other input files"):
        out.is_complete(Shard("files-00000", "files", ("a.jpg", "b.jpg")))


def test_a_grown_input_gets_its_new_files_in_new_shards_and_keeps_the_completed_ones(tmp_path, caplog):
    """Files added to a folder since the last run into an output (anywhere in sorted order) go
    into new shards: nothing completed is redone or refused (it was: "the input changed", leaving
    --overwrite, all of it again). An interrupted run resumes into the shards it planned; files
    gone from the input keep their masks, with a warning; --retry-failed rebuilds a shard from its
    marker after the input grew; two tars of one name are still refused."""
    photos = tmp_path / "photos"
    photos.mkdir()

    def add(*names):
        for name in names:
            (photos / name).write_bytes(b"x")

    def plan(**kw):
        return [(s.shard_id, [posixpath.basename(u) for u in s.uris]) for s in pending_shards(replace(cfg, **kw))]

    add("a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg")
    cfg = PipelineConfig(input_uri=str(photos), output_uri=str(tmp_path / "out"), amg=dict(AMG), images_per_shard=2)
    planned = pending_shards(cfg)
    assert plan() == [("files-00000", ["a.jpg", "b.jpg"]), ("files-00001", ["c.jpg", "d.jpg"]),
                      ("files-00002", ["e.jpg"])]
    for shard in planned[0], planned[2]:  # a run stopped before files-00001 was written
        cfg.output().write_shard(shard, [], [])
    assert pending_shards(cfg) == [planned[1]]  # resumed as planned, root and all
    add("b2.jpg", "f.jpg")
    assert plan() == [("files-00001", ["b2.jpg", "c.jpg"]), ("files-00003", ["d.jpg", "f.jpg"])]
    for shard in pending_shards(cfg):
        cfg.output().write_shard(shard, [], [dict(image_id=f"{shard.shard_id}/{shard.name_of(u)}", uri=u,
                                                  shard=shard.shard_id, status="error", error_reason="generate_failed")
                                             for u in shard.uris if u.endswith("f.jpg")])
    assert plan() == [] and plan(images_per_shard=7) == []
    assert sorted(u for m in cfg.output().markers().values() for u in m["members"]) == sorted(
        str(p) for p in photos.iterdir())  # every file once
    add("g.jpg", "h.jpg", "i.jpg")
    assert plan(images_per_shard=3) == [("files-00004", ["g.jpg", "h.jpg", "i.jpg"])]  # a new size for new shards
    assert plan(retry_failed=True)[0] == ("files-00003", ["d.jpg", "f.jpg"])  # from its marker, named as before
    assert pending_shards(cfg)[0].root == str(photos)
    (photos / "a.jpg").unlink()
    caplog.clear()
    assert plan() == [("files-00003", ["d.jpg", "f.jpg"]), ("files-00004", ["g.jpg", "h.jpg"]),  # retried: redone
                      ("files-00005", ["i.jpg"])]
    assert "1 files of completed shards are no longer in the input" in caplog.text
    with pytest.raises(ValueError, match=re.escape("points_per_side 4 -> 8")):  # still one configuration
        pending_shards(replace(cfg, amg=dict(AMG, points_per_side=8)))

    for folder in "ab":  # a tar shard is named after its tar: another tar of that name is refused
        (tmp_path / folder).mkdir()
        with tarfile.open(tmp_path / folder / "sa_000001.tar", "w"):
            pass
    tars = replace(cfg, input_uri=str(tmp_path / "a"), output_uri=str(tmp_path / "tars"))
    tars.output().write_shard(pending_shards(tars)[0], [], [])
    assert pending_shards(tars) == []
    with pytest.raises(ValueError, match="completed from other input files"):
        pending_shards(replace(tars, input_uri=str(tmp_path / "b")))


def test_files_replaced_under_their_names_are_found_and_redone_on_request(tmp_path, caplog):
    """Markers record each file's listing fingerprint (size and modification time here, ETag on
    S3). A file replaced under its name since its shard was written is counted in a warning, and
    with --redo-changed its shard (or tar) is redone, the others left as they are; files named by
    a manifest (not listed) are not compared."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (photos / name).write_bytes(b"x")
    with tarfile.open(photos / "sa_000001.tar", "w"):
        pass
    cfg = PipelineConfig(input_uri=str(photos), output_uri=str(tmp_path / "out"), amg=dict(AMG), images_per_shard=2)
    for shard in pending_shards(cfg):
        cfg.output().write_shard(shard, [], [])
    markers = cfg.output().markers()
    assert set(markers["files-00000"]["digests"]) == {str(photos / "a.jpg"), str(photos / "b.jpg")}
    assert markers["sa_000001"]["digests"] == {str(photos / "sa_000001.tar"): f"{(photos / 'sa_000001.tar').stat().st_size}:"
                                               f"{(photos / 'sa_000001.tar').stat().st_mtime}"}
    (photos / "c.jpg").write_bytes(b"a new photo")  # replaced under its name
    with tarfile.open(photos / "sa_000001.tar", "w") as tar:
        tar.add(photos / "a.jpg", arcname="a.jpg")
    caplog.clear()
    assert pending_shards(cfg) == []
    assert "2 files replaced under their names" in caplog.text and "--redo-changed redoes their 2 shards" in caplog.text
    redo = replace(cfg, redo_changed=True)
    assert sorted(s.shard_id for s in pending_shards(redo, reopen=False)) == ["files-00001", "sa_000001"]
    for shard in pending_shards(redo):
        cfg.output().write_shard(shard, [], [])
    caplog.clear()
    assert pending_shards(redo) == [] and "replaced" not in caplog.text  # their markers hold the new files

    manifest = tmp_path / "list.csv"
    manifest.write_text("uri\n" + "\n".join(str(photos / n) for n in ("a.jpg", "b.jpg")) + "\n")
    listed = replace(cfg, input_uri=str(manifest), output_uri=str(tmp_path / "m"), redo_changed=True)
    for shard in pending_shards(listed):
        listed.output().write_shard(shard, [], [])
    (photos / "a.jpg").write_bytes(b"another")
    assert pending_shards(listed) == []


def test_resume_refuses_another_model_or_settings(tmp_path):
    """Completed shards are resumed only by a run with the model and mask settings their markers
    record; batch sizes and compile may change. Readers and markers without them are not checked."""
    cfg = PipelineConfig(input_uri=SAMPLE_IMAGES, output_uri=str(tmp_path / "out"), amg=dict(AMG), images_per_shard=4)
    todo = pending_shards(cfg)
    assert len(todo) == 2
    for shard in todo:
        cfg.output().write_shard(shard, [], [])
    marker = OutputDir(cfg.output_uri).marker(todo[0].shard_id)
    assert marker["model"] == "tiny:random-seed0" and marker["settings_hash"] == cfg.settings_hash()
    assert marker["settings"]["points_per_side"] == 4 and "points_per_batch" not in marker["settings"]
    assert pending_shards(replace(cfg, amg=dict(AMG, points_per_batch=7, compile=True))) == []
    for changed, says in [(dict(amg=dict(AMG, points_per_side=8)), "points_per_side 4 -> 8"),
                          (dict(mode="fast"), "mode exact -> fast"),
                          (dict(preset="sa1b"), "crop_n_layers (unset) -> 2"),
                          (dict(seed=1), "model tiny:random-seed0 -> tiny:random-seed1")]:
        with pytest.raises(ValueError, match=re.escape(says)):
            pending_shards(replace(cfg, **changed))
    assert len(pending_shards(replace(cfg, seed=1, overwrite=True))) == 2  # overwrite starts afresh
    OutputDir(cfg.output_uri).write_shard(todo[0], [], [])  # a marker without model and settings
    assert pending_shards(cfg) == [todo[1]]

    # A checkpoint that keeps no sums (safetensors): the digest of its bytes. The same bytes
    # elsewhere resume; other bytes under the same name (a fine-tuned copy) are refused.
    weights = tmp_path / "hub" / "sam" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    hub = replace(cfg, checkpoint=str(weights), output_uri=str(tmp_path / "hub-out"))
    for shard in pending_shards(hub):
        hub.output().write_shard(shard, [], [])
    moved = tmp_path / "moved" / "sam" / "model.safetensors"
    moved.parent.mkdir(parents=True)
    moved.write_bytes(b"weights")
    assert pending_shards(replace(hub, checkpoint=str(moved))) == []
    moved.write_bytes(b"tuned!!")
    os.utime(moved, ns=(1, 1))  # (rewritten within the clock's tick, its mtime might not change)
    with pytest.raises(ValueError, match=r"weights of the checkpoint sha256:\w+ -> sha256:\w+ \(same name, other"):
        pending_shards(replace(hub, checkpoint=str(moved)))


def test_point_grids_from_a_file_make_that_grids_masks_and_are_recorded_by_their_digest(inputs, tmp_path,
                                                                                         checkpoint, capsys,
                                                                                         monkeypatch):
    """--point-grids reads one grid per crop layer from .npy, .npz or .json; the official 4 x 4
    grid from a file makes the masks of --points-per-side 4. Markers record the grids' digest, not
    their points; another grid under the same output is refused, the same one resumed however the
    other settings are spelled. A file that is not grids, or grids the settings cannot run with,
    is refused before anything starts, naming it."""
    from jobs.generate import main as generate_main
    from pipeline.point_grids import read_point_grids, with_point_grids
    from sam_core.amg.masks import build_point_grid

    grid, small = build_point_grid(4), build_point_grid(2)
    files = {"one.npy": lambda p: np.save(p, grid.astype(np.float32)),
             "layers.npy": lambda p: np.save(p, np.stack([grid] * 2)),
             "layers.npz": lambda p: np.savez(p, grid, small),
             "one.json": lambda p: p.write_text(json.dumps(grid.tolist())),
             "layers.json": lambda p: p.write_text(json.dumps([grid.tolist(), small.tolist()]))}
    for name, write in files.items():
        write(tmp_path / name)
    assert read_point_grids(str(tmp_path / "one.npy")) == [grid.astype(np.float32).astype(np.float64).tolist()]
    assert read_point_grids(str(tmp_path / "layers.npy")) == [grid.tolist()] * 2
    assert read_point_grids(str(tmp_path / "layers.npz")) == read_point_grids(str(tmp_path / "layers.json")) == [
        grid.tolist(), small.tolist()]
    assert read_point_grids(str(tmp_path / "one.json")) == [grid.tolist()]
    (tmp_path / "far.json").write_text(json.dumps([[0.5, 0.5], [1.5, 0.2]]))
    (tmp_path / "flat.npy").write_bytes(b"")
    np.save(tmp_path / "xyz.npy", np.zeros((4, 3)))
    for name, says in [("missing.npy", "does not exist"),
                       ("far.json", "grid 0 has points outside [0, 1] (values from 0.2 to 1.5)"),
                       ("flat.npy", "could not be read as grids: EOFError"),
                       ("xyz.npy", "grid 0 must be N x 2 points (x, y), N >= 1; got shape (4, 3)"),
                       ("grid.txt", "expected one of")]:
        with pytest.raises(ValueError, match=re.escape(f"point grids file {str(tmp_path / name)!r}") + ".*"
                           + re.escape(says)):
            read_point_grids(str(tmp_path / name))

    amg = {k: v for k, v in AMG.items() if k != "points_per_side"}
    by_side = config(inputs, tmp_path / "side", checkpoint)
    by_file = replace(config(inputs, tmp_path / "file", checkpoint), amg=with_point_grids(
        {**amg, "point_grids": str(tmp_path / "one.json")}))
    shard = discover_shards(str(inputs), 10)[0]
    side_masks, _ = ShardWorker(by_side).process(shard)
    file_masks, images = ShardWorker(by_file).process(shard)
    key = lambda rows: [(r["image_id"], r["counts"], r["predicted_iou"], r["point_coords"]) for r in rows]  # noqa: E731
    assert key(file_masks) == key(side_masks) and len(file_masks) > 0
    for s in pending_shards(by_file):
        by_file.output().write_shard(s, file_masks if s == shard else [], images if s == shard else [])
    recorded = OutputDir(by_file.output_uri).marker(shard.shard_id)["settings"]["point_grids"]
    assert re.fullmatch(r"1 grid \(16 points\), sha256 [0-9a-f]{16}", recorded)
    respelled = replace(by_file, amg={**by_file.amg, "stability_score_offset": 1.0})  # the default, written out
    assert respelled.settings_hash() != by_file.settings_hash() and pending_shards(respelled) == []
    import pipeline.run

    monkeypatch.setattr(pipeline.run, "_stream", lambda *args: None)  # the run's record, not its work
    recording = replace(by_file, output_uri=str(tmp_path / "recorded"))
    output = recording.output()
    with output.hold_lease():
        record = pipeline.run.run_stages(recording, [shard], output, []).run_record
    assert json.loads(open(record).read())["config"]["amg"]["point_grids"] == recorded  # not 16 points, one a line
    other = replace(by_file, amg=with_point_grids({**amg, "point_grids": str(tmp_path / "layers.npz")}))
    with pytest.raises(ValueError, match=re.escape(f"point_grids {recorded} -> 2 grids (16, 4 points)")):
        pending_shards(other)

    base = ["--output", str(tmp_path / "cli"), "--checkpoint", checkpoint, "--model-type", "tiny", "--dry-run"]
    capsys.readouterr()
    assert generate_main(base + ["--point-grids", str(tmp_path / "layers.npz"), "--crop-n-layers", "1"]) == 0
    for extra, says in [(["--preset", "sa1b"], "point_grids has 2 grids; crop_n_layers=2 needs 3"),
                        ([], "point_grids has 2 grids; crop_n_layers=0 uses 1 (one per layer): set crop_n_layers=1"),
                        (["--points-per-side", "4"], "Give exactly one of points_per_side or point_grids"),
                        (["--point-grids", str(tmp_path / "far.json")], "far.json': grid 0 has points outside")]:
        grids = [] if extra[:1] == ["--point-grids"] else ["--point-grids", str(tmp_path / "layers.npz")]
        assert generate_main(base + grids + extra) == 2
        assert says in capsys.readouterr().err


def test_a_dry_run_says_what_a_run_would_do_and_changes_nothing(tmp_path, capsys, monkeypatch):
    """``jobs.generate --dry-run`` (``plan_run``): the checks a run makes before Ray starts (an
    output made with other settings is refused), then the shards a run would write, new and
    redone, and the run that holds the output if one does. Ray is not started and nothing under
    the output changes: no lease is taken, no marker removed, ``--overwrite`` deletes nothing."""
    import ray

    from jobs.generate import main
    from pipeline.lease import RunLease
    from pipeline.run import plan_run

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (photos / name).write_bytes(b"x")
    cfg = PipelineConfig(input_uri=str(photos), output_uri=str(out), amg=dict(AMG), images_per_shard=2)
    plan = plan_run(cfg)
    assert [s.shard_id for s in plan.todo] == ["files-00000", "files-00001"] and not plan.completed
    assert plan.busy is None and not out.exists()
    assert str(plan).splitlines()[1:3] == [f"output {out}: no completed shards",
                                           "to do: 2 shards: 2 new (3 files), 0 redone (none)"]
    for shard in plan.todo:  # a run: files-00000 holds an image that ran out of memory
        cfg.output().write_shard(shard, [], [dict(image_id=f"{shard.shard_id}/a.jpg", uri=str(photos / "a.jpg"),
                                                  shard=shard.shard_id, status="error", error_reason="generate_failed")
                                             for u in shard.uris if u.endswith("a.jpg")])
    (photos / "d.jpg").write_bytes(b"x")

    def snapshot():
        return sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*"))

    before = snapshot()
    args = ["--input", str(photos), "--output", str(out), "--model-type", "tiny", "--images-per-shard", "2",
            "--points-per-side", "4", "--box-nms-thresh", "1.0", "--pred-iou-thresh", "0.8",
            "--stability-score-thresh", "0.8", "--dry-run"]
    assert main(args + ["--retry-failed"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines() == [
        "dry run: nothing was started or written", f"output {out}: 2 completed shards, 1 kept",
        "to do: 2 shards: 1 new (1 file), 1 redone (2 files)", "  files-00000: 2 files (redone)",
        "  files-00002: 1 file"]
    assert main(args + ["--overwrite"]) == 0
    assert "2 completed shards, all deleted by --overwrite" in capsys.readouterr().out
    assert main(args[:-2] + ["0.9", "--dry-run"]) == 2  # refused as the run would be
    assert "stability_score_thresh 0.8 -> 0.9" in capsys.readouterr().err
    assert main(args + ["--redo-run", "3f2a9c01"]) == 2  # no such recorded run (these shards' run was not)
    assert "error: --redo-run '3f2a9c01' names no recorded run of " in capsys.readouterr().err
    with RunLease(cfg.output().fs, str(out)):  # another run writes into the output
        assert main(args) == 0
        assert "another run is writing into this output now (run " in capsys.readouterr().out
    assert snapshot() == before and cfg.output().shard_ids() == ["files-00000", "files-00001"]


def test_the_exit_status_says_whether_the_output_holds_failed_images(tmp_path, capsys, monkeypatch):
    """A run that ends with images a retry may recover exits 3 (``--fail-on retriable``, the
    default) and still renders its gallery; a file that is no image fails the run only with
    ``--fail-on any``; ``--fail-on none`` always exits 0. Here every shard is complete, so the
    run only reads the output (Ray is not started)."""
    import ray

    import jobs.generate
    from jobs.run_args import EXIT_FAILED_IMAGES

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    galleries = []
    monkeypatch.setattr(jobs.generate, "render_gallery", lambda tables, dest, **kw: galleries.append(dest))
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (photos / name).write_bytes(b"x")
    cfg = PipelineConfig(input_uri=str(photos), output_uri=str(out), amg=dict(AMG), images_per_shard=1)
    todo = pending_shards(cfg)
    args = ["--input", str(photos), "--output", str(out), "--model-type", "tiny", "--images-per-shard", "1",
            "--points-per-side", "4", "--box-nms-thresh", "1.0", "--pred-iou-thresh", "0.8",
            "--stability-score-thresh", "0.8", "--gallery", str(tmp_path / "g")]

    def write(shard, reason):
        uri = shard.uris[0]
        cfg.output().write_shard(shard, [], [dict(image_id=f"{shard.shard_id}/{os.path.basename(uri)}", uri=uri,
                                                  shard=shard.shard_id, status="error", error_reason=reason)])

    write(todo[0], "not_an_image")
    write(todo[1], "not_an_image")
    assert jobs.generate.main(args) == 0
    assert capsys.readouterr().err == ""
    assert jobs.generate.main(args + ["--fail-on", "any"]) == EXIT_FAILED_IMAGES == 3
    assert capsys.readouterr().err == "exit status 3 (--fail-on any): the output holds 2 failed image(s) (not_an_image 2)\n"
    write(todo[1], "unreadable")  # a storage outage on b.jpg
    assert jobs.generate.main(args) == 3
    captured = capsys.readouterr()
    assert "1 image(s) failed for reasons another try may not meet (unreadable 1): --retry-failed redoes" in captured.out
    assert captured.err == "exit status 3 (--fail-on retriable): the output holds 1 failed image(s) (unreadable 1)\n"
    assert jobs.generate.main(args + ["--fail-on", "none"]) == 0 and capsys.readouterr().err == ""
    assert galleries == [str(tmp_path / "g")] * 4  # every run that ended rendered its gallery
    assert jobs.generate.main(args + ["--dry-run"]) == 0  # a plan is no run


def test_max_shards_does_the_first_pending_shards_and_leaves_the_others_as_they_are(tmp_path, capsys):
    """``--max-shards N``: the first N pending shards, redone ones first, then new ones; a
    completed shard beyond N keeps its marker (it stays in the output) until a later run redoes
    it, and the later runs go on with the shards the input was planned as."""
    from jobs.generate import main

    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"):
        (photos / name).write_bytes(b"x")
    cfg = PipelineConfig(input_uri=str(photos), output_uri=str(out), amg=dict(AMG), images_per_shard=1)
    planned = [s.uris for s in pending_shards(cfg)]
    assert len(planned) == 5
    first = pending_shards(replace(cfg, max_shards=2))
    assert [s.uris for s in first] == planned[:2] and first.left == 3
    for shard in first:  # both ran out of memory
        cfg.output().write_shard(shard, [], [dict(image_id=f"{shard.shard_id}/x", uri=shard.uris[0],
                                                  shard=shard.shard_id, status="error", error_reason="generate_failed")])
    args = ["--input", str(photos), "--output", str(out), "--model-type", "tiny", "--images-per-shard", "1",
            "--points-per-side", "4", "--box-nms-thresh", "1.0", "--pred-iou-thresh", "0.8",
            "--stability-score-thresh", "0.8", "--dry-run", "--retry-failed", "--max-shards", "2"]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[2:6] == [
        "to do: 2 shards: 0 new (none), 2 redone (2 files)", "  files-00000: 1 file (redone)",
        "  files-00001: 1 file (redone)", "left for a later run (--max-shards): 3 pending shards"]
    retried = pending_shards(replace(cfg, retry_failed=True, max_shards=1))
    assert [s.shard_id for s in retried] == ["files-00000"] and retried.left == 4
    assert cfg.output().shard_ids() == ["files-00001"]  # the one redone was reopened, the other kept
    rest = pending_shards(cfg)
    assert [s.uris for s in rest] == [planned[0]] + planned[2:] and rest.left == 0
    with pytest.raises(SystemExit):
        main(args[:-1] + ["0"])
    assert "--max-shards: must be >= 1, got 0" in capsys.readouterr().err


def test_an_output_inside_the_input_is_not_read_as_input(tmp_path):
    """--output photos/masks with --input photos/: the run's own tables and markers are not new
    inputs when it resumes (they were, and the shard's members changed: resuming was refused)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in SAMPLES[:2]:
        (photos / name).write_bytes(sample_bytes(name))
    cfg = PipelineConfig(input_uri=str(photos), output_uri=str(photos / "masks"), amg=dict(AMG))
    todo = pending_shards(cfg)
    assert [s.uris for s in todo] == [tuple(str(photos / n) for n in sorted(SAMPLES[:2]))]
    cfg.output().write_shard(todo[0], [], [])
    assert len(list_files(str(photos))) == 5  # the two photos, a masks and an images table, a marker
    assert pending_shards(cfg) == []


def read_tables(path):
    out = OutputDir(str(path))
    return out.read_table("masks").sort_by([("image_id", "ascending"), ("mask_id", "ascending")]), \
        out.read_table("images").sort_by("image_id")


def test_run_resume_after_crash_and_overwrite(ray_local, inputs, tmp_path, checkpoint):
    out = tmp_path / "out"
    first = run_pipeline(config(inputs, out, checkpoint))
    assert (first.images_ok, first.images_error, first.shards_processed) == (3, 4, 3)
    assert {e["reason"] for e in first.errors} == {"corrupt", "empty", "not_an_image", "too_large"}
    masks, images = read_tables(out)
    assert masks.num_rows == first.masks > 0
    assert images.num_rows == 7
    for row in masks.slice(0, 5).to_pylist():
        m = mask_utils.decode({"size": [row["height"], row["width"]], "counts": row["counts"]})
        assert int(m.sum()) == row["area"]

    again = run_pipeline(config(inputs, out, checkpoint))  # nothing left to do
    assert again.shards_processed == 0 and again.masks == first.masks

    # A crash after the data but before the marker, and one mid-write: both shards are redone.
    (out / "_done" / "files-00001.json").unlink()
    (out / "masks" / "files-00002.parquet").write_bytes(b"partial")
    (out / "_done" / "files-00002.json").unlink()
    resumed = run_pipeline(config(inputs, out, checkpoint))
    assert resumed.shards_processed == 2
    assert read_tables(out)[0].equals(masks) and read_tables(out)[1].drop_columns(
        TIMINGS).equals(images.drop_columns(TIMINGS))

    fresh = run_pipeline(config(inputs, out, checkpoint, overwrite=True))
    assert fresh.shards_processed == 3 and read_tables(out)[0].equals(masks)

    # A photo added to the input (first in sorted order): only it is done, in a shard of its own.
    (inputs / "aaa.jpg").write_bytes(sample_bytes("chelsea.jpg"))
    grown = run_pipeline(config(inputs, out, checkpoint))
    assert (grown.shards_processed, grown.images_ok, grown.images_error) == (1, 4, 4)
    new_masks, new_images = read_tables(out)
    added = pc.starts_with(new_masks.column("image_id"), "files-00003/")
    assert new_masks.filter(pc.invert(added)).equals(masks)
    chelsea = masks.filter(pc.ends_with(masks.column("image_id"), "/chelsea.jpg"))
    assert new_masks.filter(added).drop_columns(["image_id"]).equals(chelsea.drop_columns(["image_id"]))
    assert new_images.num_rows == 8

    # Every run that wrote something is recorded with what it wrote (the run with nothing to do
    # is not); each shard's marker names the run that wrote it.
    runs = read_runs(OutputDir(str(out)))
    assert [(r["job"], r["status"], r["shards_written"], r["images"], r["images_error"]) for r in runs] == [
        ("generate", "finished", ["files-00000", "files-00001", "files-00002"], 7, 4),
        ("generate", "finished", ["files-00001", "files-00002"], 4, 4),
        ("generate", "finished", ["files-00000", "files-00001", "files-00002"], 7, 4),
        ("generate", "finished", ["files-00003"], 1, 0)]
    assert runs[0]["error_reasons"] == {"corrupt": 1, "empty": 1, "not_an_image": 1, "too_large": 1}
    assert runs[0]["masks"] == first.masks and runs[2]["config"]["overwrite"] is True
    assert "storage_options" not in runs[0]["config"] and runs[0]["versions"]["torch"] == torch.__version__
    markers = OutputDir(str(out)).markers()
    assert [markers[s]["run_id"] for s in sorted(markers)] == [runs[2]["run_id"]] * 3 + [runs[3]["run_id"]]


def test_run_on_tar_shards(ray_local, tmp_path, checkpoint):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, names in enumerate([SAMPLES[:2], SAMPLES[2:]]):
        with tarfile.open(shards / f"sa_{i:06d}.tar", "w") as tar:
            for name in names:
                data = sample_bytes(name)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (shards / "sa_000002.tar").write_bytes(tar_bytes(SAMPLES)[:2000])  # truncated in its first member
    (shards / "later").mkdir()  # a tar of the same name in a subfolder: a shard of its own
    (shards / "later" / "sa_000000.tar").write_bytes(tar_bytes(SAMPLES[2:]))
    summary = run_pipeline(config(shards, tmp_path / "out", checkpoint))
    assert (summary.images_ok, summary.images_error, summary.shards_processed) == (4, 1, 4)
    assert summary.errors[0]["uri"].endswith("sa_000002.tar") and "truncated" in summary.errors[0]["detail"]
    _, images = read_tables(tmp_path / "out")
    assert images.column("image_id").to_pylist() == [
        "later__sa_000000/coffee.jpg", "sa_000000/astronaut.jpg", "sa_000000/chelsea.jpg", "sa_000001/coffee.jpg",
        "sa_000002/sa_000002.tar"]
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == [
        "later__sa_000000.parquet", "sa_000000.parquet", "sa_000001.parquet", "sa_000002.parquet"]


def test_generate_job_cli(ray_local, tmp_path, checkpoint, capsys):
    from jobs.generate import main

    out = tmp_path / "out"
    args = ["--output", str(out), "--checkpoint", checkpoint, "--points-per-side", "4",
            "--pred-iou-thresh", "0.8", "--stability-score-thresh", "0.8", "--box-nms-thresh", "1.0"]
    assert main(args) == 0  # default input: the bundled sample photos
    printed = capsys.readouterr().out
    n = len(os.listdir(SAMPLE_IMAGES))  # 3 photos and 3 procedural scenes
    assert f"images ok: {n}, errors: 0" in printed and "shards processed this run: 1" in printed
    [record] = re.findall(r"^run record: (\S+)$", printed, re.M)
    assert record.startswith(str(out / "_runs") + "/") and json.loads(open(record).read())["status"] == "finished"
    masks, images = read_tables(out)
    assert images.column("status").to_pylist() == ["ok"] * n and masks.num_rows > 0
    assert set(masks.column("model").to_pylist()) == {"tiny:sam_tiny_sharp.pth"}
    assert main(args + ["--points-per-batch", "7"]) == 0  # a throughput setting: resumed as is
    printed = capsys.readouterr().out
    assert "shards processed this run: 0" in printed and "run record:" not in printed  # nothing to do: no record
    # Defaults written out make the same masks: resumed (PipelineConfig.spelled_as).
    assert main(args + ["--crop-nms-thresh", "0.7", "--stability-score-offset", "1", "--crop-n-layers", "0"]) == 0
    assert "shards processed this run: 0" in capsys.readouterr().out
    assert main(args[:-2] + ["--box-nms-thresh", "0.5"]) == 2  # other masks: refused, not mixed
    assert "box_nms_thresh 1.0 -> 0.5" in capsys.readouterr().err
    # The checkpoint's name is its model's identity, and its tensors' digest too: the same weights
    # saved again elsewhere resume; other weights under the same name are refused.
    moved = tmp_path / "elsewhere" / os.path.basename(checkpoint)
    moved.parent.mkdir()
    state = torch.load(checkpoint, weights_only=True)
    torch.save(state, moved)
    at = args.index("--checkpoint") + 1
    args[at] = str(moved)
    assert main(args) == 0 and "shards processed this run: 0" in capsys.readouterr().out
    state["mask_decoder.iou_prediction_head.layers.2.bias"] += 1e-3  # a fine-tuned copy
    torch.save(state, moved)
    assert main(args) == 2
    assert re.search(r"weights of the checkpoint zip-crc32:\w+ -> zip-crc32:\w+ \(same name, other tensors\)",
                     capsys.readouterr().err)


def test_generate_job_cli_says_what_is_wrong(tmp_path, capsys):
    from jobs.generate import main

    assert main(["--input", str(tmp_path / "nothing-here"), "--output", str(tmp_path / "out")]) == 2
    assert "No input files at" in capsys.readouterr().err
    assert main(["--output", str(tmp_path / "out"), "--images-per-batch", "0"]) == 2
    assert "images_per_batch must be >= 1" in capsys.readouterr().err


def test_model_problems_are_refused_before_ray_starts(tmp_path, checkpoint, capsys, monkeypatch, scheme_without_package):
    """Settings the generator cannot run with and checkpoints that are missing or of another
    model fail in the driver, before Ray starts: not in every model actor, as a wall of traces."""
    import ray

    from jobs.generate import main

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = ["--output", str(tmp_path / "out")]
    for flags, says in [(["--points-per-side", "0"], "points_per_side must be >= 1, got 0"),
                        (["--crop-n-layers", "-1"], "crop_n_layers must be >= 0"),
                        (["--checkpoint", str(tmp_path / "nope.pth"), "--model-type", "vit_b"],
                         "nope.pth' does not exist or is not a file"),
                        (["--checkpoint", checkpoint, "--model-type", "vit_b"],
                         "This checkpoint is a tiny model (encoder width 64, depth 2) but model type 'vit_b'"),
                        (["--input", f"{scheme_without_package}://bucket/images"], "Please install no_such_package_xyz"),
                        (["--checkpoint", f"{scheme_without_package}://bucket/sam.pth"], "Please install no_such")]:
        assert main(out + flags) == 2, flags
        assert says in capsys.readouterr().err, flags
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="points_per_side must be >= 1"):
        run_pipeline(PipelineConfig(SAMPLE_IMAGES, str(tmp_path / "out"), amg=dict(points_per_side=0)))


def test_every_job_names_a_missing_filesystem_package_and_a_missing_tables_folder(tmp_path, capsys, scheme_without_package):
    """gs:// without gcsfs (here a scheme of a package that does not exist) and a --tables folder
    that is not a run's output: one error line and exit code 2, from every job."""
    from jobs.evaluate import main as evaluate_main
    from jobs.export import main as export_main
    from jobs.generate import main as generate_main
    from jobs.prompt import main as prompt_main
    from jobs.render import main as render_main
    from jobs.stats import main as stats_main

    remote, missing = f"{scheme_without_package}://bucket", str(tmp_path / "no-such-run")
    out = str(tmp_path / "out")
    for main, args, says in [
            (generate_main, ["--input", f"{remote}/manifest.csv", "--output", out], "Please install no_such_package"),
            (generate_main, ["--output", f"{remote}/masks"], "Please install no_such_package"),
            (prompt_main, ["--prompts", f"{remote}/boxes.json", "--output", out], "Please install no_such_package"),
            (prompt_main, ["--prompts", f"{remote}/boxes.parquet", "--output", out], "Please install no_such_package"),
            (evaluate_main, ["--ground-truth", f"{remote}/gt.json", "--predictions", out], "Please install no_such"),
            (export_main, ["--tables", out, "--format", "coco", "--dest", f"{remote}/c.json"], "Please install no_such"),
            (stats_main, ["--tables", f"{remote}/run"], "Please install no_such_package"),
            (stats_main, ["--tables", missing], "no-such-run' does not exist: expected the output folder"),
            (export_main, ["--tables", missing, "--format", "sa1b-json", "--dest", out], "does not exist"),
            (render_main, ["--tables", missing, "--dest", out], "does not exist")]:
        assert main(args) == 2, args
        assert says in capsys.readouterr().err, args
    (tmp_path / "started" / "masks").mkdir(parents=True)  # a run that has not finished a shard yet
    assert stats_main(["--tables", str(tmp_path / "started")]) == 2
    assert "holds no completed shard (no _done/*.json)" in capsys.readouterr().err


def test_a_checkpoint_the_driver_does_not_see_is_left_to_a_clusters_workers(tmp_path, caplog):
    """Attached to a cluster, the workers may mount the checkpoint where the driver does not."""
    cfg = PipelineConfig(SAMPLE_IMAGES, str(tmp_path / "out"), checkpoint="/models/sam_vit_h_4b8939.pth",
                         model_type="vit_h")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cfg.check_model()
    os.environ["RAY_ADDRESS"] = "ray://head:10001"
    try:
        cfg.check_model()
    finally:
        del os.environ["RAY_ADDRESS"]
    assert "not on this machine; the model actors will read it on theirs" in caplog.text


def test_transient_read_errors_are_retried(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    from pipeline import shards as shards_mod

    path = tmp_path / "a.jpg"
    path.write_bytes(b"abc")
    real_cat, calls = LocalFileSystem.cat_file, []

    def flaky_cat(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        return real_cat(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "cat_file", flaky_cat)
    monkeypatch.setattr(shards_mod, "READ_AHEAD", 1)  # one read at a time: the calls come in order
    monkeypatch.setattr(shards_mod, "RETRY_BASE_DELAY_S", 0.0)
    shard = Shard("files-00000", "files", (str(path), str(tmp_path / "missing.jpg")))
    (ok, missing) = list(iter_shard_files(shard))
    assert ok[2] == b"abc" and ok[3] is None and len(calls) == 4  # 2 failures, 1 success, 1 missing
    assert missing[2] is None and missing[3].startswith("FileNotFoundError")


def test_a_shards_files_are_read_ahead_in_order_and_each_in_one_request(s3_bucket, monkeypatch):
    """A shard's files are read ``READ_AHEAD`` at a time in threads while the ones before them
    decode, so an object store's latency is not paid per image in turn; they come in order
    whatever order the reads end in; no more are started while those read hold
    ``READ_AHEAD_BYTES``; a reader stopped early starts no other read. A ``sa1b-tar`` export
    reads its sources so too. On S3 a file is one GET,
    with no HEAD before it (s3fs's cat_file asks for the size first to download in parts)."""
    import random
    import time

    from pipeline import shards as shards_mod
    from pipeline.export import iter_sources
    from pipeline.storage import filesystem

    lock, active, peak, started = threading.Lock(), [0], [0], []

    def slow_read(uri, opts=None):
        with lock:
            started.append(uri)
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(random.uniform(0.02, 0.08))
        with lock:
            active[0] -= 1
        return uri.encode() * 100

    monkeypatch.setattr(shards_mod, "read_file", slow_read)
    uris = tuple(f"/in/{i:02d}.jpg" for i in range(20))
    shard = Shard("files-00000", "files", uris, "/in")
    assert [(name, data) for name, _, data, _, _ in iter_shard_files(shard)] == [
        (u[4:], u.encode() * 100) for u in uris]
    assert peak[0] == shards_mod.READ_AHEAD == 8
    peak[0] = 0  # a sa1b-tar export copies a shard's files as a run reads them
    assert list(iter_sources(uris)) == [u.encode() * 100 for u in uris] and peak[0] == 8

    def started_after(reader, step=0.3):
        next(reader)
        time.sleep(step)  # every read started has ended
        return len(started)

    started.clear()
    monkeypatch.setattr(shards_mod, "READ_AHEAD_BYTES", 2.5 * 1000)  # two and a half files
    reader = iter_shard_files(shard)
    assert [started_after(reader) for _ in range(7)] == [8, 8, 8, 8, 8, 8, 9]  # 2 held: one more
    reader.close()
    time.sleep(0.3)
    assert len(started) == 9

    monkeypatch.undo()
    opts = s3_bucket("readbucket")
    fs = filesystem("s3://readbucket", opts)[0]
    fs.pipe({f"readbucket/p/{i}.jpg": bytes([i]) * 10 for i in range(3)})

    def head(*args, **kwargs):
        raise AssertionError("a HEAD before the GET")

    monkeypatch.setattr(type(fs), "_info", head)
    got = list(iter_shard_files(Shard("files-00000", "files", tuple(f"s3://readbucket/p/{i}.jpg" for i in range(3))), opts))
    assert [(data, error) for _, _, data, error, _ in got] == [(bytes([i]) * 10, None) for i in range(3)]


def test_a_file_not_there_is_missing_and_a_read_that_keeps_failing_is_unreadable(tmp_path, monkeypatch):
    """A manifest naming a file not uploaded (or a tar gone) gets reason ``missing`` at once; a
    storage error still failing after the retries gets ``unreadable``. Both are retried by
    ``--retry-failed`` (the file may be there now, the outage over)."""
    from fsspec.implementations.local import LocalFileSystem

    from pipeline import shards as shards_mod
    from pipeline.config import RETRIED_REASONS

    (tmp_path / "a.jpg").write_bytes(sample_bytes("chelsea.jpg"))
    shard = Shard("files-00000", "files", (str(tmp_path / "a.jpg"), str(tmp_path / "gone.jpg")))
    gone_tar = Shard("gone", "tar", (str(tmp_path / "gone.tar"),))
    reasons = {json.loads(r["image"])["uri"].rsplit("/", 1)[-1]: json.loads(r["image"])["error_reason"]
               for s in (shard, gone_tar) for r in decode_rows(s, {}, 10**8) if r.get("image")}
    assert reasons == {"a.jpg": None, "gone.jpg": "missing", "gone.tar": "missing"}

    def outage(self, path, *args, **kwargs):
        raise ConnectionError("connection reset")

    monkeypatch.setattr(LocalFileSystem, "cat_file", outage)
    monkeypatch.setattr(shards_mod, "RETRY_BASE_DELAY_S", 0.0)
    (row,) = [json.loads(r["image"]) for r in decode_rows(Shard("f", "files", (str(tmp_path / "a.jpg"),)), {}, 10**8)
              if r.get("image")]
    assert row["error_reason"] == "unreadable" and "ConnectionError after 3 attempts" in row["error_detail"]
    assert {"missing", "unreadable"} <= set(RETRIED_REASONS)


def test_an_http_error_other_than_404_is_retried_not_taken_for_a_missing_file(tmp_path, monkeypatch):
    """fsspec's HTTP filesystem raises FileNotFoundError for any HEAD/GET that fails, a 503 or a
    refused connection too: a manifest of URLs must retry those (then ``unreadable``, naming the
    network error) and keep ``missing`` for a 404 or 410."""
    import http.server
    import socket

    from pipeline import shards as shards_mod

    tar = tar_bytes(["chelsea.jpg", "coffee.jpg"])
    bodies = {"/a.jpg": sample_bytes("chelsea.jpg"), "/flaky.jpg": sample_bytes("coffee.jpg"), "/flaky.tar": tar}
    hits = Counter()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.respond(body=False)

        def do_GET(self):
            self.respond(body=True)

        def respond(self, body):
            hits[self.path] += 1
            if self.path.startswith("/flaky") and hits[self.path] <= 2:  # its first two requests
                return self.send_error(503)
            if self.path not in bodies:
                return self.send_error(410 if self.path == "/removed.jpg" else 404)
            data = bodies[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as s:  # a port nothing listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}/x.jpg"
    monkeypatch.setattr(shards_mod, "RETRY_BASE_DELAY_S", 0.0)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        files = Shard("l-00000", "files", tuple(f"{url}/{n}" for n in ("a.jpg", "flaky.jpg", "gone.jpg", "removed.jpg"))
                      + (refused,))
        got = {uri.rsplit("/", 1)[-1]: (data, error) for _, uri, data, error, _ in iter_shard_files(files)}
        tar_files = list(iter_shard_files(Shard("flaky", "tar", (f"{url}/flaky.tar",))))
    finally:
        server.shutdown()
    assert got["a.jpg"] == (bodies["/a.jpg"], None) and got["flaky.jpg"] == (bodies["/flaky.jpg"], None)
    assert [read_error_reason(got[n][1]) for n in ("gone.jpg", "removed.jpg", "x.jpg")] == [
        "missing", "missing", "unreadable"]
    assert "ClientConnectorError after 3 attempts: Cannot connect to host" in got["x.jpg"][1]
    assert [(name, data, error) for name, _, data, error, _ in tar_files] == [
        ("chelsea.jpg", bodies["/a.jpg"], None), ("coffee.jpg", bodies["/flaky.jpg"], None)]


def tar_bytes(names):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in names:
            data = sample_bytes(name)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_images_are_named_by_their_path_so_one_file_name_in_two_folders_stays_two(tmp_path):
    inputs = tmp_path / "in"
    for rel in ("cam1/0001.jpg", "cam2/0001.jpg", "top.jpg"):
        (inputs / rel).parent.mkdir(parents=True, exist_ok=True)
        (inputs / rel).write_bytes(sample_bytes("coffee.jpg"))
    (shard,) = discover_shards(str(inputs))
    assert [n for n, *_ in iter_shard_files(shard)] == ["cam1/0001.jpg", "cam2/0001.jpg", "top.jpg"]
    (flat,) = discover_shards(str(inputs / "cam1"))  # a flat folder: file names, as before
    assert [n for n, *_ in iter_shard_files(flat)] == ["0001.jpg"]
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"uri\n{inputs}/cam1/0001.jpg\n{inputs}/cam2/0001.jpg\n")
    (listed,) = discover_shards(str(manifest))
    assert [n for n, *_ in iter_shard_files(listed)] == ["cam1/0001.jpg", "cam2/0001.jpg"]
    manifest.write_text(f"uri\n{inputs}/top.jpg\n{inputs}/cam1/0001.jpg\n{inputs}/top.jpg\n")
    with pytest.raises(ValueError, match=r"lists 1 uri\(s\) more than once"):
        discover_shards(str(manifest))

    # Names stay as the input grows: a folder names its images under itself even while it holds
    # one subfolder (they were named under that subfolder, and renamed once a second arrived);
    # a manifest's new shards keep the folder its completed ones were named under where they can.
    days = tmp_path / "days"
    (days / "2026-11-24").mkdir(parents=True)
    (days / "2026-11-24" / "a.jpg").write_bytes(b"x")
    cfg = PipelineConfig(input_uri=str(days), output_uri=str(tmp_path / "days-out"), amg=dict(AMG))
    (first,) = pending_shards(cfg)
    assert first.name_of(first.uris[0]) == "2026-11-24/a.jpg"
    cfg.output().write_shard(first, [], [])
    (days / "2026-11-25").mkdir()
    (days / "2026-11-25" / "b.jpg").write_bytes(b"x")
    (second,) = pending_shards(cfg)
    assert second.name_of(second.uris[0]) == "2026-11-25/b.jpg"
    manifest.write_text(f"uri\n{inputs}/cam1/0001.jpg\n{inputs}/top.jpg\n")  # named under {inputs}
    listed = replace(cfg, input_uri=str(manifest), output_uri=str(tmp_path / "listed-out"))
    listed.output().write_shard(pending_shards(listed)[0], [], [])
    manifest.write_text(f"uri\n{inputs}/cam1/0001.jpg\n{inputs}/cam1/0002.jpg\n")  # top.jpg gone
    (added,) = pending_shards(listed)
    assert [added.name_of(u) for u in added.uris] == ["cam1/0002.jpg"]  # not "0002.jpg"

    # In a tar: the member's path; a name met twice is recorded, not given the first one's id.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("a/x.jpg", "b/x.jpg", "./c.jpg", "a/x.jpg"):
            data = sample_bytes("coffee.jpg")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "sa_000009.tar").write_bytes(buf.getvalue())
    rows = [json.loads(r["image"]) for r in decode_rows(Shard("sa_000009", "tar", (str(tmp_path / "sa_000009.tar"),)),
                                                         {}, 10**8) if r["image_index"] != -1]
    assert [r["image_id"] for r in rows] == ["sa_000009/a/x.jpg", "sa_000009/b/x.jpg", "sa_000009/c.jpg",
                                             "sa_000009/a/x.jpg#3"]
    assert [r["error_reason"] for r in rows] == [None, None, None, "duplicate_name"]
    assert rows[3]["error_detail"] == "image 0 of the shard has this name too" and rows[3]["width"] is None


def test_tars_are_named_by_their_path_so_one_tar_name_in_two_folders_stays_two(tmp_path):
    """A tar's shard id is its path under the input folder (``d1/00000.tar`` is ``d1__00000``:
    dated folders of ``00000.tar`` each are one input), one file name a local output takes;
    ids that would meet get a digest; a tar completed under another id (its name alone, as
    before ids were paths) keeps it, so resuming neither redoes it nor holds it twice."""
    from pipeline.resuming import select_pending
    from pipeline.shards import SHARD_ID_BYTES

    inputs = tmp_path / "in"
    long_name = "x" * 230
    for path in ["00001.tar", "d1/00000.tar", "d2/00000.tar.gz", "a/b.tar", "a__b.tar", "files-00003.tar",
                 f"{long_name}.tar", "loose.jpg"]:
        (inputs / path).parent.mkdir(parents=True, exist_ok=True)
        (inputs / path).write_bytes(tar_bytes(SAMPLES[:1]))
    shards = discover_shards(str(inputs), 64)
    ids = {s.uris[0][len(str(inputs)) + 1 :]: s.shard_id for s in shards}
    assert ids["00001.tar"] == "00001" and ids["d1/00000.tar"] == "d1__00000" and ids["d2/00000.tar.gz"] == "d2__00000"
    assert ids["loose.jpg"] == "files-00000"
    assert re.fullmatch(r"a__b~[0-9a-f]{10}", ids["a/b.tar"]) and re.fullmatch(r"a__b~[0-9a-f]{10}", ids["a__b.tar"])
    assert ids["a/b.tar"] != ids["a__b.tar"]
    assert re.fullmatch(r"files-00003~[0-9a-f]{10}", ids["files-00003.tar"])  # never one of the loose files' ids
    assert re.fullmatch(r"x+~[0-9a-f]{10}", ids[f"{long_name}.tar"])
    assert max(len(i.encode()) for i in ids.values()) <= SHARD_ID_BYTES
    assert discover_shards(str(inputs / "d1"), 64)[0].shard_id == "00000"  # a folder of its own: its name
    manifest = tmp_path / f"{long_name}.csv"
    manifest.write_text(f"uri\n{inputs / 'loose.jpg'}\n")
    (listed,) = discover_shards(str(manifest), 64)
    assert re.fullmatch(r"x+~[0-9a-f]{10}-00000", listed.shard_id) and len(listed.shard_id.encode()) <= SHARD_ID_BYTES

    out = OutputDir(str(tmp_path / "out"))
    d1 = next(s for s in shards if s.shard_id == "d1__00000")
    before = replace(d1, shard_id="00000")  # completed when a tar's id was its file name
    out.write_shard(before, [], [dict(image_id="00000/astronaut.jpg", uri=d1.uris[0], shard="00000", status="ok")])
    todo = select_pending(shards, out, 64, reopen=False)
    assert "00000" not in [s.shard_id for s in todo] and len(todo) == len(shards) - 1
    top = inputs / "00000.tar"  # a new tar whose id is the one d1/00000.tar keeps: it gets a digest
    top.write_bytes(tar_bytes(SAMPLES[:1]))
    todo = select_pending(discover_shards(str(inputs), 64), out, 64, reopen=False)
    assert [s.shard_id for s in todo if s.uris == (str(top),)] == [f"00000~{name_digest(str(top))}"]
    assert not any(s.uris == d1.uris for s in todo)


def test_a_tar_that_cannot_be_read_to_its_end_is_recorded(tmp_path):
    """Its readable members are kept and the tar itself gets an error row saying where it broke,
    including a tar cut inside a header, which tarfile alone would take for the end."""
    whole = tar_bytes(SAMPLES)
    first_end = 512 + (len(sample_bytes(SAMPLES[0])) + 511) // 512 * 512  # header + padded data
    cases = {"cut_in_data": (whole[: first_end + 1000], 1, "reading member 'chelsea.jpg': ReadError"),
             "cut_in_header": (whole[: first_end + 100], 1, "reading a member header: TruncatedHeaderError"),
             "garbage_after_first": (whole[:first_end] + b"\x07" * 1024, 1, "InvalidHeaderError"),
             "empty": (b"", 0, "ReadError: empty file"),
             "not_a_tar": (b"hello" * 300, 0, "ReadError")}
    for name, (data, kept, says) in cases.items():
        (tmp_path / f"{name}.tar").write_bytes(data)
        rows = [json.loads(r["image"]) if r["image_index"] != -1 else r
                for r in decode_rows(Shard(name, "tar", (str(tmp_path / f"{name}.tar"),)), {}, 10**8)]
        images, end = rows[:-1], rows[-1]
        assert end["shard_images"] == kept + 1 == len(images), name
        assert all(r["status"] == "error" for r in images)  # until the model stage sets "ok"
        assert all(r["error_reason"] is None and r["width"] for r in images[:kept])  # decoded members
        bad = images[-1]
        assert bad["image_id"] == f"{name}/{name}.tar" and bad["error_reason"] == "unreadable", name
        assert f"{kept} image(s) read, then" in bad["error_detail"] and says in bad["error_detail"], (name, bad)
    (tmp_path / "whole.tar").write_bytes(whole + b"\0" * 512)  # zero blocks: the proper end
    files = list(iter_shard_files(Shard("whole", "tar", (str(tmp_path / "whole.tar"),))))
    assert [(n, e) for n, _, _, e, _ in files] == [(n, None) for n in SAMPLES]
    (missing,) = iter_shard_files(Shard("gone", "tar", (str(tmp_path / "gone.tar"),)))
    assert missing[:3] == ("gone.tar", str(tmp_path / "gone.tar"), None) and "FileNotFoundError" in missing[3]

    # Gzipped tars are shards too; one cut short is recorded the same way.
    gz = tmp_path / "gz"
    gz.mkdir()
    (gz / "sa_000001.tar.gz").write_bytes(gzip.compress(whole))
    (gz / "sa_000002.tgz").write_bytes(gzip.compress(whole)[:3000])
    full, cut = discover_shards(str(gz))
    assert (full.shard_id, full.kind, cut.shard_id) == ("sa_000001", "tar", "sa_000002")
    assert [n for n, *_ in iter_shard_files(full)] == list(SAMPLES)
    bad = list(iter_shard_files(cut))[-1]
    assert bad[0] == "sa_000002.tgz" and "truncated or corrupt: 0 image(s) read, then reading member" in bad[3]


def test_a_tar_read_that_fails_midway_is_retried_without_repeats(tmp_path, monkeypatch):
    import fsspec

    from pipeline import shards as shards_mod

    path = tmp_path / "sa_000000.tar"
    path.write_bytes(tar_bytes(SAMPLES))
    real_open, opens = fsspec.open, []

    class DropsAfter:  # a connection that breaks after ``limit`` bytes
        def __init__(self, f, limit):
            self.f, self.left = f, limit

        def read(self, n=-1):
            if self.left <= 0:
                raise ConnectionError("connection reset by peer")
            data = self.f.read(min(n, self.left) if n >= 0 else self.left)
            self.left -= len(data)
            return data

    class Flaky:
        def __init__(self, uri, *args, **kwargs):
            self.of = real_open(uri, *args, **kwargs)
            opens.append(uri)

        def __enter__(self):
            f = self.of.__enter__()
            return DropsAfter(f, len(sample_bytes(SAMPLES[0])) + 4096) if len(opens) < 3 else f

        def __exit__(self, *exc):
            return self.of.__exit__(*exc)

    monkeypatch.setattr(fsspec, "open", Flaky)
    monkeypatch.setattr(shards_mod, "RETRY_BASE_DELAY_S", 0.0)
    files = list(iter_shard_files(Shard("sa_000000", "tar", (str(path),))))
    assert [(n, d == sample_bytes(n), e) for n, _, d, e, _ in files] == [(n, True, None) for n in SAMPLES]
    assert len(opens) == 3  # two broken reads, then the rest of the tar; no member twice

    opens.clear()
    monkeypatch.setattr(shards_mod, "READ_ATTEMPTS", 2)  # every read breaks: the tar is recorded
    files = list(iter_shard_files(Shard("sa_000000", "tar", (str(path),))))
    assert [n for n, *_ in files] == [SAMPLES[0], "sa_000000.tar"]
    assert files[-1][3].startswith("tar unreadable after 2 attempts: 1 image(s) read, then")
    assert "ConnectionError: connection reset by peer" in files[-1][3]


def test_config_repr_hides_credentials():
    cfg = PipelineConfig("s3://in", "s3://out", storage_options={"key": "AKIA-SECRET", "secret": "shh"})
    assert "AKIA-SECRET" not in repr(cfg) and "shh" not in repr(cfg) and "2 keys hidden" in repr(cfg)


def test_config_refuses_resources_the_cluster_cannot_hold():
    cfg = PipelineConfig("in", "out")  # model actor 1 CPU, post-processing actor 0.5, decode task 0.5
    cfg.check_fits({"CPU": 2.0})
    with pytest.raises(ValueError, match="needs 2 CPUs and 0 GPUs .* has 1 CPUs"):
        cfg.check_fits({"CPU": 1.0})
    with pytest.raises(ValueError, match="needs 9.5 CPUs and 2 GPUs"):
        PipelineConfig("in", "out", workers=2, num_gpus_per_worker=1, num_cpus_per_worker=4).check_fits({"CPU": 16.0})


def test_config_rejects_empty_batches():
    for name in ("images_per_shard", "images_per_batch"):
        with pytest.raises(ValueError, match=f"{name} must be >= 1"):
            PipelineConfig("in", "out", **{name: 0})


def test_run_on_s3(ray_local, s3_server, tmp_path, checkpoint):
    import s3fs

    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_server,
                                                                      "region_name": "us-east-1"}}
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket="inbucket")
    client.create_bucket(Bucket="outbucket")
    fs = s3fs.S3FileSystem(**opts)
    for name in SAMPLES[:2]:
        fs.pipe(f"inbucket/photos/{name}", sample_bytes(name))
    fs.pipe("inbucket/photos/broken.jpg", b"")
    fs.put_file(checkpoint, "inbucket/models/sam_tiny_sharp.pth")  # the model actors read it from S3 too
    cfg = PipelineConfig(input_uri="s3://inbucket/photos/", output_uri="s3://outbucket/run1",
                         checkpoint="s3://inbucket/models/sam_tiny_sharp.pth", amg=AMG, storage_options=opts)
    summary = run_pipeline(cfg)
    assert (summary.images_ok, summary.images_error) == (2, 1)
    assert summary.errors[0]["uri"] == "s3://inbucket/photos/broken.jpg"
    assert sorted(fs.ls("outbucket/run1")) == ["outbucket/run1/_done", "outbucket/run1/_done_index.parquet",
                                               "outbucket/run1/_runs", "outbucket/run1/images", "outbucket/run1/masks"]
    (run,) = read_runs(OutputDir("s3://outbucket/run1", opts))
    assert run["status"] == "finished" and run["images"] == 3 and run["error_reasons"] == {"empty": 1}
    assert "storage_options" not in run["config"] and "testing" not in json.dumps(run)  # no credentials
    masks = OutputDir("s3://outbucket/run1", opts).read_table("masks")
    assert masks.num_rows == summary.masks > 0
    local = run_pipeline(PipelineConfig(input_uri="s3://inbucket/photos/", output_uri=str(tmp_path / "local"),
                                        checkpoint=checkpoint, amg=AMG, storage_options=opts))
    assert read_tables(tmp_path / "local")[0].equals(masks.sort_by([("image_id", "ascending"), ("mask_id", "ascending")]))
    assert local.masks == summary.masks
    assert run_pipeline(cfg).shards_processed == 0
    reader = OutputDir("s3://outbucket/run1", opts)  # the run's end left the marker index current
    reader.fs = type(reader.fs)(skip_instance_cache=True, **opts)
    reader.fs.cat = None  # no marker is read one by one
    assert reader.markers() == {p.split("/")[-1][:-5]: json.loads(fs.cat_file(p)) for p in fs.ls("outbucket/run1/_done")}

    # Exports to the same store use its endpoint (sa1b-json wrote to the default AWS one before).
    assert export_sa1b_json("s3://outbucket/run1", "s3://outbucket/sa1b", opts).images == 2
    files = sorted(fs.find("outbucket/sa1b"))
    docs = [f for f in files if "/.export/" not in f]
    assert len(docs) == 2 and all(d.endswith(".json") for d in docs)
    shard_ids = OutputDir("s3://outbucket/run1", opts).shard_ids()
    assert [f for f in files if "/.export/" in f] == [f"outbucket/sa1b/.export/{s}.json" for s in shard_ids]
    assert len(read_sa1b_json(f"s3://{docs[0]}", opts)["annotations"]) > 0
    again = export_sa1b_json("s3://outbucket/run1", "s3://outbucket/sa1b", opts)  # resumes: nothing left
    assert (again.shards_exported, again.shards_unchanged) == (0, len(shard_ids))


def test_an_input_is_listed_once_a_page_at_a_time_and_not_kept_in_the_filesystems_cache(s3_bucket, monkeypatch):
    """One paginated listing of the input (s3fs's isdir listed a flat folder once more, whole),
    each page reduced to what the run keeps as it comes in: s3fs's find, which builds every
    entry first (~1.5 KB a file, 15 GB at once for 10M files) and caches them for the instance's
    life, is not called, and nothing is left in its cache. A console's "folder/" placeholder
    keys are folders, not input files; hidden keys are left out as locally."""
    from pipeline.storage import filesystem

    opts = s3_bucket("listbucket")
    fs = filesystem("s3://listbucket", opts)[0]
    fs.pipe({f"listbucket/photos/d{i % 3}/{i:03d}.jpg": b"x" for i in range(20)})
    fs.pipe({"listbucket/photos/": b"", "listbucket/photos/d0/": b"", "listbucket/photos/.git/HEAD": b"x",
             "listbucket/photos-old/a.jpg": b"x"})  # a sibling sharing the prefix's characters
    fs.invalidate_cache()
    listings, iterdir = [], type(fs)._iterdir

    def noting(self, bucket, *args, **kwargs):
        listings.append((bucket, kwargs.get("prefix"), kwargs.get("delimiter")))
        return iterdir(self, bucket, *args, **kwargs)

    def whole(*args, **kwargs):
        raise AssertionError("a whole listing was built")

    monkeypatch.setattr(type(fs), "_iterdir", noting)
    monkeypatch.setattr(type(fs), "_find", whole)
    monkeypatch.setattr(type(fs), "_lsdir", whole)
    shards = discover_shards("s3://listbucket/photos/", 8, opts)
    assert listings == [("listbucket", "photos/", "")]
    assert shards[0].root == "s3://listbucket/photos" and shards[0].name_of(shards[0].uris[0]) == "d0/000.jpg"
    assert [len(s.uris) for s in shards] == [8, 8, 4] and all(d and d.startswith("1:") for s in shards for d in s.digests)
    assert all(u.endswith(".jpg") and "/photos/d" in u for s in shards for u in s.uris)
    assert [u for s in shards for u in s.uris] == sorted(u for s in shards for u in s.uris)
    assert not fs.dircache
    (single,) = discover_shards("s3://listbucket/photos/d1/001.jpg", 8, opts)  # a file: nothing under it, then its info
    assert single.uris == ("s3://listbucket/photos/d1/001.jpg",) and single.digests[0].startswith("1:")
    with pytest.raises(FileNotFoundError, match="No input files"):
        discover_shards("s3://listbucket/photos/d0x", 8, opts)
    fs.pipe({"listbucket/empty/": b""})
    with pytest.raises(FileNotFoundError, match="No input files"):  # a placeholder alone: an empty folder
        discover_shards("s3://listbucket/empty", 8, opts)
    out = OutputDir("s3://listbucket/out", opts)
    out.write_shard(shards[0], [], [])
    assert list(out.markers()) == [shards[0].shard_id] and not fs.dircache


def test_a_gcs_input_is_listed_a_page_at_a_time_with_finds_fingerprints(gcs_bucket, monkeypatch):
    """On GCS as on S3: one paginated objects listing, each page reduced as it comes in (gcsfs's
    find is not called, nor its cache filled), each file's fingerprint the one find gives;
    "folder/" placeholders and hidden objects are not input files."""
    from pipeline.storage import filesystem, files_under, fingerprint

    fs = filesystem("gs://gcsbucket", gcs_bucket)[0]
    for i in range(7):
        fs.pipe_file(f"gcsbucket/photos/d{i % 2}/{i:03d}.jpg", b"x" * i)
    for key in ("photos/d0/", "photos/.git/HEAD", "photos-old/a.jpg"):  # a sibling sharing the prefix's characters
        fs.pipe_file(f"gcsbucket/{key}", b"x" if "." in key else b"")
    found = fs.find("gcsbucket/photos", detail=True)
    expected = {f"gs://{p}": fingerprint(i) for p, i in found.items() if "/." not in p and not p.endswith("/")}
    fs.invalidate_cache()
    pages, call = [], type(fs)._call

    async def paging(self, method, path, *args, maxResults=None, pageToken=None, **kwargs):  # noqa: N803
        """objects.list as GCS serves it, ``maxResults`` at a time (the emulator returns all at once)."""
        page = await call(self, method, path, *args, **kwargs)
        start = int(pageToken or 0)
        pages.append((args, kwargs.get("prefix"), maxResults, start))
        items = page["items"][start : start + 3]  # 3 here where GCS serves the 1,000 asked for
        token = start + 3 if start + 3 < len(page["items"]) else None
        return dict(page, items=items, **({"nextPageToken": str(token)} if token else {}))

    def whole(*args, **kwargs):
        raise AssertionError("a whole listing was built")

    monkeypatch.setattr(type(fs), "_call", paging)
    for name in ("find", "_find", "_list_objects"):  # find's sync wrapper is bound to the instance
        monkeypatch.setattr(fs, name, whole)
    assert files_under(fs, "gcsbucket/photos/") == expected and len(expected) == 7
    assert pages == [(("gcsbucket",), "photos/", 1000, start) for start in (0, 3, 6)]
    assert all(d.startswith(f"{n}:") for n, d in zip(sorted(range(7), key=lambda i: (i % 2, i)), expected.values()))
    assert not fs.dircache
    shards = discover_shards("gs://gcsbucket/photos", 4, gcs_bucket)
    assert [s.uris for s in shards] == [tuple(sorted(expected))[:4], tuple(sorted(expected))[4:]]
    assert shards[0].name_of(shards[0].uris[0]) == "d0/000.jpg"


def test_file_names_with_url_characters_are_read_locally_and_on_s3(s3_bucket, tmp_path):
    """Names as photo libraries have them ("12::30.jpg", "#", "?", "%20", brackets, spaces,
    non-ASCII) are listed, read by the run and read back (a gallery, a tar member): fsspec takes
    a "::" for a chain of filesystems, which failed every read of such a file after 3 tries. A
    tar in a folder whose name holds a "#" ("tars #2/") is read back by its members' URIs
    (``<tar>#<member>``), which were taken for files."""
    from pipeline.export import iter_sources
    from pipeline.shards import read_source
    from pipeline.storage import chained, filesystem

    names = ["a b.jpg", "c#1.jpg", "12::30.jpg", "d%20e.jpg", "f?g.jpg", "o[1].jpg", "ü.jpg", "x::/y.jpg"]
    opts = s3_bucket("namesbucket")
    fs = filesystem("s3://namesbucket", opts)[0]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(name.encode())
            tar.addfile(info, io.BytesIO(name.encode()))
    for name in names:
        fs.pipe_file(f"namesbucket/photos/{name}", name.encode())
        (tmp_path / "photos" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "photos" / name).write_bytes(name.encode())
    fs.pipe_file("namesbucket/tars #2/t::1.tar", buf.getvalue())
    (tmp_path / "tars #2").mkdir()
    (tmp_path / "tars #2" / "t::1.tar").write_bytes(buf.getvalue())
    for root, o in [("s3://namesbucket", opts), (str(tmp_path), {})]:
        (files,) = discover_shards(f"{root}/photos", 64, o)
        (tar,) = discover_shards(f"{root}/tars #2", 64, o)
        for shard in (files, tar):
            read = {name: (data, error) for name, uri, data, error, _ in iter_shard_files(shard, o)}
            assert read == {name: (name.encode(), None) for name in names}, root
        members = {n: (u, where) for n, u, _, _, where in iter_shard_files(tar, o)}
        assert {n: read_source(u, o) for n, (u, _) in members.items()} == {n: n.encode() for n in names}
        assert {n: read_source(u, o, where) for n, (u, where) in members.items()} == {n: n.encode() for n in names}
        assert list(iter_sources([u for u, _ in members.values()], o)) == [n.encode() for n in members]
        assert {files.name_of(u): read_source(u, o) for u in files.uris} == {n: n.encode() for n in names}
    assert chained("simplecache::s3://b/k") and chained("zip://a.csv::s3://b/a.zip") and chained("blockcache::/data/x")
    assert not chained("s3://b/12::30.jpg") and not chained("/data/12::30.jpg") and not chained("s3://b/x::/y.jpg")
    assert not chained("s3://b/k") and not chained("memory://x::s3://y")


def test_an_output_whose_name_holds_glob_characters_is_read_and_cleared_as_itself(s3_bucket, gcs_bucket, tmp_path):
    """An output (or export) named "out [v2]" beside "out v", which "[v2]" read as a glob
    matches: its markers, run records and export markers are its own, and clearing it
    (--overwrite) leaves the other alone. fsspec's cat, glob and (on S3) rm took the name for a
    pattern: the markers could not be read (every run failed at its end), the other output's run
    records were read, and clearing removed the other output's files, locally and on S3 (GCS too)."""
    from pipeline.export import ExportDest
    from pipeline.shards import Shard
    from pipeline.storage import filesystem

    opts = s3_bucket("globbucket")
    for root, o in [(str(tmp_path), {}), ("s3://globbucket", opts), ("gs://gcsbucket", gcs_bucket)]:
        fs = filesystem(root, o)[0]
        for name in ("out v", "out [v2]"):
            out = OutputDir(f"{root}/{name}", o)
            for k in range(2):
                out.write_shard(Shard(f"files-0000{k}", "files", (f"/src/{name}/{k}.jpg",), "/src"), [], [])
            record = filesystem(f"{root}/{name}/_runs/r.json", o)[1]
            fs.makedirs(posixpath.dirname(record), exist_ok=True)
            fs.pipe_file(record, json.dumps({"run_id": name}).encode())
            ExportDest(f"{root}/exp {name}", o).write_marker("files-00000", {"format": "sa1b-json", "files": []})
        mine, theirs = OutputDir(f"{root}/out [v2]", o), OutputDir(f"{root}/out v", o)
        assert {s: m["members"] for s, m in mine.markers().items()} == {
            f"files-0000{k}": [f"/src/out [v2]/{k}.jpg"] for k in range(2)}, root
        assert read_runs(mine) == [{"run_id": "out [v2]"}]
        with mine.hold_lease():  # the index written, then read; the lease removed
            assert mine.markers() == OutputDir(f"{root}/out [v2]", o).markers()
        assert fs.exists(filesystem(f"{root}/out [v2]/_done_index.parquet", o)[1])
        assert not fs.exists(filesystem(f"{root}/out [v2]/_lease.json", o)[1])
        mine.clear()
        ExportDest(f"{root}/exp out [v2]", o).clear_markers()
        fs.invalidate_cache()
        assert mine.shard_ids() == [] and not mine.markers() and not ExportDest(f"{root}/exp out [v2]", o).markers()
        assert len(theirs.markers()) == 2 and read_runs(theirs) == [{"run_id": "out v"}], root
        assert sorted(theirs.shard_ids()) == ["files-00000", "files-00001"]
        assert list(ExportDest(f"{root}/exp out v", o).markers()) == ["files-00000"]


def test_a_tar_on_s3_is_read_in_ranged_gets_ahead_of_its_members(s3_bucket, tmp_path, monkeypatch):
    """A tar shard on S3 (or GCS) is read front to back in blocks of ``STREAM_RANGE_BYTES``, the
    next one fetched in a thread ahead of the member being decoded (fsspec's "background" cache),
    rather than in fsspec's default 50 MB blocks fetched when the reader reaches them: the
    members are those a local read gives, in order, with their offsets; each block is fetched
    once; the reads overlap the decoding; a tar not there is missing."""
    from fsspec.caching import BackgroundBlockCache

    from pipeline import shards as shards_mod
    from pipeline import storage as storage_mod
    from pipeline.storage import filesystem

    names = ["chelsea.jpg", "coffee.jpg", "astronaut.jpg", "d/chelsea.jpg"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in names:
            blob = sample_bytes(posixpath.basename(name))
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    data = buf.getvalue()
    (tmp_path / "sa_1.tar").write_bytes(data)
    opts = s3_bucket("tarranges")
    fs = filesystem("s3://tarranges", opts)[0]
    fs.pipe("tarranges/sa_1.tar", data)
    range_bytes = 40_000
    monkeypatch.setattr(storage_mod, "STREAM_RANGE_BYTES", range_bytes)
    calls, real = [], type(fs)._call_s3

    async def noting(self, method, *args, **kwargs):
        calls.append((method, kwargs.get("Range")))
        return await real(self, method, *args, **kwargs)

    ahead, fetch_ahead = [], BackgroundBlockCache._fetch_block

    def noting_ahead(self, block_number, log_info="sync"):
        ahead.append(log_info)
        return fetch_ahead(self, block_number, log_info)

    monkeypatch.setattr(type(fs), "_call_s3", noting)
    monkeypatch.setattr(BackgroundBlockCache, "_fetch_block", noting_ahead)
    local = list(iter_shard_files(Shard("sa_1", "tar", (str(tmp_path / "sa_1.tar"),))))
    remote = list(iter_shard_files(Shard("sa_1", "tar", ("s3://tarranges/sa_1.tar",)), opts))
    assert [(n, d, e, r) for n, _, d, e, r in remote] == [(n, d, e, r) for n, _, d, e, r in local]
    assert [n for n, *_ in remote] == names
    gets = sorted((r for m, r in calls if m == "get_object"), key=lambda r: int(r[6:].split("-")[0]))
    starts = list(range(0, len(data), range_bytes))
    assert gets == [f"bytes={s}-{s + range_bytes - 1}" for s in starts] and len(gets) > 4  # the last past the end
    assert [m for m, _ in calls if m != "get_object"] == ["head_object"]  # the size, once
    assert "async" in ahead  # blocks fetched in the background, ahead of the reader
    monkeypatch.setattr(shards_mod, "RETRY_BASE_DELAY_S", 0.0)
    (gone,) = iter_shard_files(Shard("gone", "tar", ("s3://tarranges/gone.tar",)), opts)
    assert read_error_reason(gone[3]) == "missing"


def test_tar_members_are_read_at_their_offsets(s3_server, tmp_path, monkeypatch):
    """``read_source`` of a tar member (the renderer's and the fine-tuning reader's random access)
    scans the tar's headers once and then reads each member at its offset, locally and on S3,
    instead of a pass from the tar's start per member; the first of a repeated name is the one
    the run took; a gzipped tar, without offsets, is still read; a missing member is named."""
    import boto3
    import fsspec

    from pipeline.shards import read_source

    members = [("a.jpg", b"A" * 700), ("b.jpg", b"B" * 1500), ("a.jpg", b"second a"), ("c/d.jpg", b"D" * 10)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "t.tar").write_bytes(buf.getvalue())
    (tmp_path / "t.tar.gz").write_bytes(gzip.compress(buf.getvalue()))
    client = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket="tarbucket")
    client.put_object(Bucket="tarbucket", Key="sa_1.tar", Body=buf.getvalue())
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_server,
                                                                      "region_name": "us-east-1"}}
    opened = []
    real_open = fsspec.open
    monkeypatch.setattr(fsspec, "open", lambda uri, *a, **k: opened.append(uri) or real_open(uri, *a, **k))
    expected = {"c/d.jpg": b"D" * 10, "b.jpg": b"B" * 1500, "a.jpg": b"A" * 700}  # the first a.jpg
    for tar_uri, o in [(str(tmp_path / "t.tar"), {}), ("s3://tarbucket/sa_1.tar", opts)]:
        opened.clear()
        assert {name: read_source(f"{tar_uri}#{name}", o) for name in expected} == expected
        assert opened == [tar_uri]  # the header scan; members then come from ranged reads
        with pytest.raises(FileNotFoundError, match="nope.jpg not in"):
            read_source(f"{tar_uri}#nope.jpg", o)
    gz = str(tmp_path / "t.tar.gz")
    assert {name: read_source(f"{gz}#{name}") for name in expected} == expected


def test_a_tar_members_place_is_recorded_and_read_back_in_one_ranged_read(tmp_path, checkpoint, monkeypatch):
    """A run records where each member of an uncompressed tar lies (``member_offset``,
    ``member_size``), so the renderer and the fine-tuning reader read it with one ranged read
    instead of scanning the tar's headers (on an object store, about the whole tar's bytes). The
    header read with it must still name the member: a tar rewritten since is scanned again.
    Names over 100 bytes, held in an extended header before the member's own, work too."""
    import pipeline.shards as shards_mod
    from pipeline.render import render_gallery
    from pipeline.shards import member_range, read_source

    long_name = "deep/" + "x" * 120 + ".jpg"
    members = [("a.jpg", sample_bytes("chelsea.jpg")), (long_name, sample_bytes("coffee.jpg")),
               ("b.jpg", sample_bytes("astronaut.jpg"))]

    def write(order):
        with tarfile.open(tmp_path / "in" / "sa_000001.tar", "w") as tar:
            for name, data in order:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    (tmp_path / "in").mkdir()
    write(members)
    cfg = config(tmp_path / "in", tmp_path / "out", checkpoint)
    (shard,) = discover_shards(cfg.input_uri)
    worker = ShardWorker(cfg)
    worker.output.write_shard(shard, *worker.process(shard))
    rows = OutputDir(cfg.output_uri).read_shard("images", shard.shard_id).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 3
    index = shards_mod.tar_index(shard.uris[0])
    assert [member_range(r) for r in rows] == [index[name] for name, _ in members]

    def no_scan(*args):
        raise AssertionError("the tar's headers were scanned")

    monkeypatch.setattr(shards_mod, "tar_index", no_scan)
    assert [read_source(r["uri"], None, member_range(r)) for r in rows] == [data for _, data in members]
    assert render_gallery(cfg.output_uri, str(tmp_path / "gallery"), sample=3)  # the renderer reads them so
    monkeypatch.undo()
    shards_mod._TAR_INDEXES.clear()
    write(members[::-1])  # rewritten since the run: the recorded places hold other members now
    assert [read_source(r["uri"], None, member_range(r)) for r in rows] == [data for _, data in members]
    (tmp_path / "in" / "sa_000002.tar.gz").write_bytes(gzip.compress((tmp_path / "in" / "sa_000001.tar").read_bytes()))
    gz = Shard("sa_000002", "tar", (str(tmp_path / "in" / "sa_000002.tar.gz"),))
    assert [where for *_, where in iter_shard_files(gz)] == [None] * 3  # no offsets in a gzipped tar


def test_shard_writer_streams_to_s3(s3_bucket):
    """Row groups streamed to an S3 object (written when closed), read back; abort leaves nothing."""
    opts = s3_bucket("streambucket")
    out = OutputDir("s3://streambucket/run", opts)
    rows = [mask_row("s/x.jpg", i) for i in range(5)]
    writer = ShardWriter(out, Shard("s", "files", ("x.jpg",)), row_group_rows=2)
    for i in range(0, 5, 2):
        writer.add_masks(pa.Table.from_pylist(rows[i : i + 2], schema=MASKS_SCHEMA))
    writer.finish([dict(image_id="s/x.jpg", uri="x.jpg", shard="s", status="ok")])
    assert out.read_table("masks").to_pylist() == rows and out.shard_ids() == ["s"]
    with out.fs.open("streambucket/run/masks/s.parquet", "rb") as f:
        assert pq.ParquetFile(f).metadata.num_row_groups == 3
    aborted = ShardWriter(out, Shard("t", "files", ("y.jpg",)), row_group_rows=2)
    aborted.add_masks(pa.Table.from_pylist(rows[:3], schema=MASKS_SCHEMA))
    aborted.abort()
    assert not out.fs.exists("streambucket/run/masks/t.parquet") and out.shard_ids() == ["s"]


def test_actor_killed_mid_shard_then_tables_equal_a_clean_run(ray_local, inputs, tmp_path, checkpoint):
    clean = tmp_path / "clean"
    run_pipeline(config(inputs, clean, checkpoint))
    flag = tmp_path / "crash-once"
    flag.write_text("")

    class CrashingModel(ModelStage):  # defined here so Ray ships it by value
        def process(self, rows):
            rows = super().process(rows)
            if os.path.exists(str(flag)):  # the actor dies once, after the work, before returning it
                os.remove(str(flag))
                os._exit(1)
            return rows

    out = tmp_path / "out"
    summary = run_pipeline(config(inputs, out, checkpoint), model_stage=CrashingModel)
    assert not flag.exists() and summary.shards_processed == 3
    assert read_tables(out)[0].equals(read_tables(clean)[0])


def test_driver_killed_then_rerun_equals_a_clean_run(tmp_path, inputs, checkpoint):
    """A real kill: SIGKILL the job's process once its first shard is written, then run it again."""
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "jobs.generate", "--input", str(inputs), "--checkpoint", checkpoint,
            "--images-per-shard", "1", "--images-per-batch", "1", "--max-pixels", "300000", "--points-per-side", "4",
            "--pred-iou-thresh", "0.8", "--stability-score-thresh", "0.8", "--box-nms-thresh", "1.0"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out, clean = tmp_path / "out", tmp_path / "clean"
    job = subprocess.Popen(args + ["--output", str(out)], env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("_done/*.json")):
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and the local Ray it started
    job.wait()
    done_before = len(list((out / "_done").glob("*.json")))
    assert 1 <= done_before < 7, "the kill should land mid-run"
    for target in (out, clean):
        subprocess.run(args + ["--output", str(target)], env=env, check=True, timeout=600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert read_tables(out)[0].equals(read_tables(clean)[0])
    assert read_tables(out)[1].drop_columns(TIMINGS).equals(
        read_tables(clean)[1].drop_columns(TIMINGS))


def mask_row(image_id, mask_id):
    return dict(image_id=image_id, mask_id=mask_id, counts="x", height=1, width=1, area=1, bbox=[0.0] * 4,
                predicted_iou=1.0, stability_score=1.0, point_coords=[0.0, 0.0], crop_box=[0.0] * 4,
                model="m", settings_hash="h")


class RecordingWriter:
    """A shard writer that records what it is given, when."""

    def __init__(self, shard, log):
        self.shard, self.log, self.masks = shard, log, 0

    def add_masks(self, table):
        self.masks += table.num_rows
        self.log.append(("masks", self.shard.shard_id, [(m["image_id"], m["mask_id"]) for m in table.to_pylist()]))

    def finish(self, images):
        self.log.append(("finish", self.shard.shard_id, [r["image_id"] for r in images]))

    def abort(self):
        self.log.append(("abort", self.shard.shard_id))


def test_collector_passes_masks_on_in_file_order_and_finishes_each_shard_once():
    """Rows of several shards arrive interleaved, out of order and repeated (a retried batch):
    an image's masks are passed on as soon as every earlier image of its shard is in (only
    images ahead of their turn wait), and each shard is finished once, when it is whole."""
    shards = [Shard("a", "files", ("a0", "a1", "a2")), Shard("b", "files", ("b0",)),
              Shard("empty", "tar", ("e.tar",))]
    log = []
    collector = ShardCollector(shards, lambda s: RecordingWriter(s, log))

    def row(shard, index, total=-1, masks=()):
        image = dict(image_id=f"{shard}/{index}", status="ok", decode_s=1.0, generate_s=2.0, postprocess_s=0.5)
        return dict(shard_id=shard, image_index=index, shard_images=total, image=json.dumps(image),
                    masks=masks_to_ipc([mask_row(f"{shard}/{index}", i) for i in masks]) if masks else None)

    collector.add([row("a", 1, masks=[0, 1]), row("b", -1, total=1)])
    collector.add([row("a", 1, masks=[0, 1])])  # repeated
    assert log == [] and list(collector.waiting["a"]) == [1]  # a/1 waits for a/0
    collector.add([row("b", 0, masks=[0]), row("a", -1, total=3), row("empty", -1, total=0)])
    assert log == [("masks", "b", [("b/0", 0)]), ("finish", "b", ["b/0"]), ("finish", "empty", [])]
    assert re.fullmatch(r"shard empty written \(2 of 3\): 0 images, 0 masks; run: [0-9.]+ images/s, "
                        r"about \d+ (s|min|h) left", collector.progress())
    log.clear()
    collector.add([row("a", 0, masks=[0])])
    assert log == [("masks", "a", [("a/0", 0)]), ("masks", "a", [("a/1", 0), ("a/1", 1)])]
    assert collector.waiting["a"] == {} and collector.unfinished() == ["a"]
    collector.add([row("a", 1, masks=[0, 1])])  # a repeat of an image passed on: ignored
    collector.add([row("a", 2)])
    assert log[2:] == [("finish", "a", ["a/0", "a/1", "a/2"])] and collector.unfinished() == []
    assert re.fullmatch(r"shard a written \(3 of 3\): 3 images, 3 masks; run: [0-9.]+ images/s", collector.progress())
    collector.add([row("a", 0), row("a", -1, total=3)])  # repeats after the shard is done: ignored
    assert len(log) == 3
    assert collector.written[2] == dict(shard_id="a", images_ok=3, images_error=0, errors={}, masks=3,
                                        decode_s=3.0, generate_s=6.0, postprocess_s=1.5)
    with pytest.raises(ValueError, match="unknown shard"):
        collector.add([row("zzz", 0)])


def test_collector_abort_drops_shards_being_written():
    log = []
    collector = ShardCollector([Shard("a", "files", ("a0", "a1"))], lambda s: RecordingWriter(s, log))
    collector.add([dict(shard_id="a", image_index=0, shard_images=-1, image=json.dumps({"image_id": "a/0"}),
                        masks=masks_to_ipc([mask_row("a/0", 0)]))])
    collector.abort()
    assert log[-1] == ("abort", "a") and collector.unfinished() == ["a"]


def test_shard_writer_streams_row_groups_and_readers_skip_unfinished_shards(tmp_path):
    """Masks go to the file in row groups of ``row_group_rows`` while the shard is written; a
    shard without a marker (being written, or left by a crash) is not read; abort removes its file."""
    out = OutputDir(str(tmp_path / "out"))
    shard = Shard("s", "files", ("x.jpg", "y.jpg"))
    writer = ShardWriter(out, shard, row_group_rows=4)
    rows = [mask_row("s/x.jpg", i) for i in range(7)] + [mask_row("s/y.jpg", i) for i in range(3)]
    writer.add_masks(pa.Table.from_pylist(rows[:3], schema=MASKS_SCHEMA))
    assert not (tmp_path / "out" / "masks").exists()  # under a row group: nothing written yet
    writer.add_masks(pa.Table.from_pylist(rows[3:7], schema=MASKS_SCHEMA))
    assert (tmp_path / "out" / "masks" / "s.parquet").exists()  # open, being written
    assert out.read_table("masks").num_rows == 0 and out.shard_ids() == []
    writer.add_masks(pa.Table.from_pylist(rows[7:], schema=MASKS_SCHEMA))
    images = [dict(image_id=f"s/{n}", uri=n, shard="s", status="ok") for n in ("x.jpg", "y.jpg")]
    writer.finish(images)
    assert out.read_table("masks").to_pylist() == rows
    assert pq.ParquetFile(tmp_path / "out" / "masks" / "s.parquet").metadata.num_row_groups == 3  # 4, 3, 3
    some = out.read_shard("masks", "s", ["area", "image_id"])  # only these columns, in this order
    assert some.schema == pa.schema([MASKS_SCHEMA.field("area"), MASKS_SCHEMA.field("image_id")])
    assert some.to_pylist() == [{"area": r["area"], "image_id": r["image_id"]} for r in rows]
    assert out.marker("s") == {"members": ["x.jpg", "y.jpg"], "root": None, "images": 2, "masks": 10, "errors": {},
                               "first_frame_only": 0, "compute_dtypes": {"unknown": 2}}
    with pytest.raises(ValueError, match="masks schema"):
        ShardWriter(out, shard).add_masks(pa.table({"image_id": ["s/x.jpg"]}))

    other = ShardWriter(out, Shard("t", "files", ("z.jpg",)), row_group_rows=2)
    other.add_masks(pa.Table.from_pylist([mask_row("t/z.jpg", i) for i in range(3)], schema=MASKS_SCHEMA))
    assert (tmp_path / "out" / "masks" / "t.parquet").exists()
    other.abort()
    assert not (tmp_path / "out" / "masks" / "t.parquet").exists()
    assert out.read_table("masks").to_pylist() == rows

def test_reading_tables_lets_the_interpreter_exit_cleanly(tmp_path):
    """Arrow's threads could abort the interpreter at exit (exit code 134 after the work is done;
    why: the next test): every job that reads the tables (stats, export, the generate summary)
    would fail at random. Eight fresh interpreters each read both tables and must exit with 0
    (``pq.read_table`` of an fsspec file aborted ~95% of runs; ``ParquetFile`` of one, ~1 in 100
    in CI)."""
    out = OutputDir(str(tmp_path / "out"))
    out.write_shard(Shard("s", "files", ("x.jpg",)), [mask_row("s/x.jpg", i) for i in range(100)],
                    [dict(image_id="s/x.jpg", uri="x.jpg", shard="s", status="ok")])
    code = (f"from pipeline.output import OutputDir; o = OutputDir({str(tmp_path / 'out')!r}); "
            "assert o.read_table('masks').num_rows == 100 and o.read_table('images').num_rows == 1")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True) for _ in range(8)]
    assert [(r.returncode, r.stderr[-200:]) for r in runs] == [(0, "")] * 8


def test_readers_never_call_a_python_file_from_arrow_threads(tmp_path, monkeypatch):
    """Why the interpreter aborted at exit: pyarrow reads a Python file object (an fsspec file)
    from its IO threads (Parquet pre-buffering, CSV read-ahead), and such a thread, holding the
    last reference to the file, takes the GIL to release it. After the main thread has begun
    finalizing, Python ends that thread with ``pthread_exit``, whose unwinding through Arrow's
    C++ frames is ``std::terminate`` (seen in gdb: ``PyGILState_Ensure`` <-
    ``~PyReadableFile``). The race is rare, so this checks its precondition: every call of every
    reader into a file object comes from the calling thread."""
    from fsspec.implementations.local import LocalFileOpener

    from pipeline.prompted import load_prompt_table
    from pipeline.shards import discover_shards

    callers = []
    for name in ("read", "seek", "tell"):
        def recording(self, *args, _original=getattr(LocalFileOpener, name), **kwargs):
            callers.append(threading.get_ident())
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(LocalFileOpener, name, recording)

    def threads(read):
        callers.clear()
        read()
        return set(callers)

    out = OutputDir(str(tmp_path / "out"))
    rows = [mask_row("s/x.jpg", i) for i in range(3000)]
    out.write_shard(Shard("s", "files", ("x.jpg",)), rows, [dict(image_id="s/x.jpg", uri="x.jpg", shard="s", status="ok")])
    table = pa.table({"uri": [f"im{i}.jpg" for i in range(5000)], "bbox": [[0.0, 0.0, 1.0, 1.0]] * 5000})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=1000)
    pa.csv.write_csv(table.select(["uri"]), tmp_path / "m.csv")
    readers = {
        "read_table": lambda: out.read_table("masks"),
        "read_shard columns": lambda: out.read_shard("masks", "s", ["image_id", "mask_id"]),
        "iter_masks streamed": lambda: list(out.iter_masks("s", batch_rows=500)),
        "Parquet manifest": lambda: discover_shards(str(tmp_path / "m.parquet"), 64),
        "CSV manifest": lambda: discover_shards(str(tmp_path / "m.csv"), 64),
        "prompts table": lambda: load_prompt_table(str(tmp_path / "m.parquet")),
    }
    assert {name: threads(read) for name, read in readers.items()} == {name: {threading.get_ident()} for name in readers}
    # and what they read is all there
    assert out.read_table("masks").to_pylist() == rows == list(out.iter_masks("s", out.masks_file("s")))
    assert out.read_shard("masks", "s", ["mask_id"]).column("mask_id").to_pylist() == list(range(3000))
    assert [u.rsplit("/", 1)[-1] for s in discover_shards(str(tmp_path / "m.csv"), 64) for u in s.uris] == \
        table.column("uri").to_pylist()
    assert load_prompt_table(str(tmp_path / "m.parquet")).num_rows == 5000


def test_stages_on_ray_equal_the_engine_with_crops_and_small_regions(ray_local, tmp_path, checkpoint):
    """Crop layers and small-region removal (the post-processing actors' work) through the Ray
    stages, two model actors and two post-processing actors: every image's masks equal
    SamAutomaticMaskGenerator.generate and the in-process ShardWorker's rows."""
    d = tmp_path / "in"
    d.mkdir()
    for name in SAMPLES:
        (d / name).write_bytes(sample_bytes(name))
    amg = dict(AMG, crop_n_layers=1, min_mask_region_area=400, box_nms_thresh=0.9)
    cfg = PipelineConfig(input_uri=str(d), output_uri=str(tmp_path / "out"), checkpoint=checkpoint, amg=amg,
                         images_per_shard=2, images_per_batch=2, workers=2, postprocess_workers=2,
                         num_cpus_per_worker=0.5, num_cpus_per_postprocessor=0.25, num_cpus_per_decoder=0.25)
    summary = run_pipeline(cfg)
    assert (summary.images_ok, summary.shards_processed) == (3, 2)
    assert set(summary.stage_seconds) == {"decode", "generate", "postprocess"}
    assert all(v > 0 for v in summary.stage_seconds.values())
    masks, images = read_tables(tmp_path / "out")
    worker = ShardWorker(cfg)
    local = [worker.process(s) for s in discover_shards(str(d), 2)]
    assert masks.to_pylist() == [m for shard_masks, _ in local for m in shard_masks]
    generator = worker.generator
    changed = 0
    for name in SAMPLES:
        image = decode_image(sample_bytes(name))
        expected = generator.generate(image)
        rows = masks.filter(pc.match_substring(masks.column("image_id"), "/" + name)).to_pylist()
        assert len(rows) == len(expected) > 0
        assert [r["counts"] for r in rows] == [e["segmentation"]["counts"] for e in expected]
        assert [r["bbox"] for r in rows] == [e["bbox"] for e in expected]
        # small-region removal really changed masks here (the post-processing path is exercised)
        without = SamAutomaticMaskGenerator(generator.predictor.model, **dict(
            cfg.generator_settings(), min_mask_region_area=0)).generate(image)
        changed += [e["segmentation"]["counts"] for e in expected] != [w["segmentation"]["counts"] for w in without]
    assert changed > 0
    assert images.column("postprocess_s").null_count == 0


class FailsOnChelsea(ModelStage):
    """A model stage whose generator raises (as if out of memory) on any batch with chelsea.jpg."""

    def __init__(self, config, ledger=None):
        super().__init__(config, ledger)
        real = self.generator.generate_candidates_batch
        failing_height = decode_image(sample_bytes("chelsea.jpg")).shape[0]

        def generate(images):
            if any(im.shape[0] == failing_height for im in images):
                raise RuntimeError("CUDA out of memory (simulated)")
            return real(images)
        self.generator.generate_candidates_batch = generate


class CannotStart(ModelStage):
    """A model stage whose actors fail in their constructor, as on a node without the GPU asked for."""

    def __init__(self, config, ledger=None):
        raise RuntimeError("CUDA error: no CUDA-capable device is detected (simulated)")


class DiesOnChelsea(ModelStage):
    """A model stage whose process dies (as when the kernel's OOM killer or a crash in native code
    ends it) on any batch with chelsea.jpg; Ray restarts the actor and retries the batch."""

    def _generate(self, rows):
        if any(json.loads(r["image"])["uri"].endswith("chelsea.jpg") for r in rows):
            os._exit(1)
        super()._generate(rows)


class DiesPostprocessingChelsea(PostprocessStage):
    """A post-processing stage whose process dies on chelsea.jpg's masks."""

    def mask_rows(self, image_id, records):
        if image_id.endswith("chelsea.jpg"):
            os._exit(1)
        return super().mask_rows(image_id, records)


def test_an_image_that_kills_its_postprocessing_worker_is_passed_over(ray_local, inputs, tmp_path, checkpoint):
    cfg = replace(config(inputs, tmp_path / "out", checkpoint), images_per_batch=4)
    summary = run_stages(cfg, pending_shards(cfg), cfg.output(), [(ModelStage, "model"),
                                                                   (DiesPostprocessingChelsea, "postprocess")])
    died = [e for e in summary.errors if e["reason"] == "worker_died"]
    assert [e["uri"].rsplit("/", 1)[-1] for e in died] == ["chelsea.jpg"]
    assert "while post-processing this image's masks" in died[0]["detail"]
    assert summary.images_ok == 2


def test_a_file_a_decode_task_died_on_is_passed_over(ray_local, inputs):
    """The decode side of the ledger: once a process died decoding a shard, its retry notes each
    file, and a file that was started twice without finishing is worker_died, not decoded."""
    import ray

    ledger = start_ledger()
    shard = discover_shards(str(inputs), images_per_shard=3)[0]  # astronaut, chelsea, coffee
    batch = {"shard_id": [shard.shard_id], "kind": [shard.kind], "uris": [list(shard.uris)], "root": [shard.root]}

    def decode_images():
        rows = [r for t in decode_shards(batch, {}, 10**8, ledger=ledger) for r in t.to_pylist()]
        return [json.loads(r["image"]) for r in rows if r["image"] is not None]

    assert [i["error_reason"] for i in decode_images()] == [None, None, None]  # nothing died: all decoded
    ray.get(ledger.start.remote([f"{shard.shard_id} (decode)", f"{shard.shard_id}/chelsea.jpg"]))
    assert [i["error_reason"] for i in decode_images()] == [None, None, None]  # one death on chelsea: tried again
    ray.get(ledger.start.remote([f"{shard.shard_id} (decode)", f"{shard.shard_id}/chelsea.jpg"] * 2))
    images = decode_images()
    assert [i["error_reason"] for i in images] == [None, "worker_died", None]
    assert "died 2 times while decoding this file" in images[1]["error_detail"]


def test_an_image_that_kills_its_worker_is_passed_over_not_retried_forever(ray_local, inputs, tmp_path, checkpoint):
    """Before, the run hung: Ray retries a dead actor's batch without limit. Now the image is
    recorded as worker_died after MAX_WORKER_DEATHS deaths, and its batch mates are done."""
    cfg = replace(config(inputs, tmp_path / "out", checkpoint), images_per_batch=4)
    summary = run_pipeline(cfg, model_stage=DiesOnChelsea)
    died = [e for e in summary.errors if e["reason"] == "worker_died"]
    assert [e["uri"].rsplit("/", 1)[-1] for e in died] == ["chelsea.jpg"]
    assert f"died {MAX_WORKER_DEATHS} times while generating this image's masks" in died[0]["detail"]
    assert summary.images_ok == 2  # astronaut and coffee, which shared the batch
    clean = run_pipeline(config(inputs, tmp_path / "clean", checkpoint))
    masks, _ = read_tables(tmp_path / "out")
    clean_masks, _ = read_tables(tmp_path / "clean")
    keep = pc.invert(pc.match_substring(clean_masks.column("image_id"), "chelsea"))
    assert masks.equals(clean_masks.filter(keep))
    again = run_pipeline(replace(cfg, retry_failed=True))  # worker_died may be transient: retried
    assert again.shards_processed == 1 and again.images_error == clean.images_error


def test_actors_that_cannot_start_end_the_run_with_the_cause(ray_local, inputs, tmp_path, checkpoint):
    with pytest.raises(StageStartError, match=re.escape(
            "A pipeline actor could not start: RuntimeError: CUDA error: no CUDA-capable device is detected "
            "(simulated) (its traceback is in the Ray worker logs).")):
        run_pipeline(config(inputs, tmp_path / "out", checkpoint), model_stage=CannotStart)
    assert OutputDir(str(tmp_path / "out")).shard_ids() == []
    (run,) = read_runs(OutputDir(str(tmp_path / "out")))  # the failed run is recorded, with why
    assert (run["status"], run["shards_todo"], run["shards_written"]) == ("failed", 3, [])
    assert run["error"].startswith("StageStartError: A pipeline actor could not start: RuntimeError: CUDA error")


def test_an_image_the_model_fails_on_is_recorded_and_its_batch_mates_still_done(inputs, tmp_path, checkpoint):
    """The generator raises for one image: its batch is retried image by image, that image gets
    an error row with the exception, the others the same masks as a clean run."""
    cfg = config(inputs, tmp_path / "out", checkpoint, images_per_batch=3)
    shard = discover_shards(str(inputs), 10)[0]
    masks, images = ShardWorker(cfg, model_stage=FailsOnChelsea).process(shard)
    clean_masks, _ = ShardWorker(cfg).process(shard)
    by_name = {r["image_id"].split("/", 1)[1]: r for r in images}
    assert by_name["chelsea.jpg"]["status"] == "error"
    assert by_name["chelsea.jpg"]["error_reason"] == "generate_failed"
    assert "RuntimeError: CUDA out of memory (simulated)" in by_name["chelsea.jpg"]["error_detail"]
    assert by_name["astronaut.jpg"]["status"] == by_name["coffee.jpg"]["status"] == "ok"
    assert masks == [m for m in clean_masks if "chelsea" not in m["image_id"]] and masks


def test_retry_failed_redoes_the_shards_of_images_that_failed(ray_local, inputs, tmp_path, checkpoint):
    """A run whose model raised on one image (out of memory, say) completes with that image
    recorded; a plain re-run leaves it so, a re-run with retry_failed redoes its shard only (not
    the shards whose files are broken for good), and the tables then equal a clean run's."""
    out = tmp_path / "out"
    first = run_pipeline(config(inputs, out, checkpoint), model_stage=FailsOnChelsea)
    assert sorted(e["reason"] for e in first.errors) == ["corrupt", "empty", "generate_failed", "not_an_image",
                                                         "too_large"]
    assert run_pipeline(config(inputs, out, checkpoint)).shards_processed == 0
    retried = run_pipeline(config(inputs, out, checkpoint, retry_failed=True))
    assert retried.shards_processed == 1 and "generate_failed" not in {e["reason"] for e in retried.errors}
    assert run_pipeline(config(inputs, out, checkpoint, retry_failed=True)).shards_processed == 0
    run_pipeline(config(inputs, tmp_path / "clean", checkpoint))
    assert read_tables(out)[0].equals(read_tables(tmp_path / "clean")[0])
    assert read_tables(out)[1].drop_columns(TIMINGS).equals(read_tables(tmp_path / "clean")[1].drop_columns(TIMINGS))


def test_a_shard_redone_has_no_marker_until_it_is_rewritten(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    shard = Shard("s", "files", ("a.jpg", "b.jpg"))
    out.write_shard(shard, [], [dict(image_id="s/a.jpg", uri="a.jpg", shard="s", status="error",
                                     error_reason="generate_failed"),
                                dict(image_id="s/b.jpg", uri="b.jpg", shard="s", status="ok")])
    assert out.marker("s")["errors"] == {"generate_failed": 1}
    assert out.count_reasons("s", ("generate_failed", "unreadable")) == 1 and out.count_reasons("s", ("corrupt",)) == 0
    assert out.markers(["s", "t"]) == {"s": out.marker("s")}  # one listing, one read of those found
    legacy = {k: v for k, v in out.marker("s").items() if k != "errors"}  # a marker of an earlier version
    (tmp_path / "out" / "_done" / "s.json").write_text(json.dumps(legacy))
    assert out.count_reasons("s", ("generate_failed",)) == 1  # counted from the images table
    out.reopen(shard)  # a run stopped from here on leaves the shard to be redone, not half-written and marked
    assert not out.is_complete(shard) and out.shard_ids() == []
    out.reopen(shard)  # no marker: nothing to do


def test_redo_runs_name_one_recorded_run_each(tmp_path):
    """``redo_runs`` prefixes: each must name exactly one recorded run (an ambiguous one is
    refused, listing the runs); the shards a named run wrote are redone, a tar's as well."""
    from pipeline.resuming import select_pending

    out = OutputDir(str(tmp_path / "out"))
    files, tar = Shard("files-00000", "files", ("a.jpg",)), Shard("t", "tar", ("t.tar",))
    for shard, run in ((files, "ab12" + "0" * 28), (tar, "ab34" + "0" * 28)):
        out.write_shard(shard, [], [dict(image_id=f"{shard.shard_id}/x", uri=shard.uris[0], shard=shard.shard_id,
                                         status="ok")])
        marker = tmp_path / "out" / "_done" / f"{shard.shard_id}.json"
        marker.write_text(json.dumps(dict(json.loads(marker.read_text()), run_id=run)))  # as run `run` writes it
        (tmp_path / "out" / "_runs").mkdir(exist_ok=True)
        (tmp_path / "out" / "_runs" / f"{run[:4]}.json").write_text(json.dumps({"run_id": run, "started": run[:4]}))
    assert [m["run_id"][:4] for m in out.markers().values()] == ["ab12", "ab34"]
    with pytest.raises(ValueError, match=r"--redo-run 'ab' names 2 recorded runs of .*its runs: ab120000 \(ab12\), "
                                         r"ab340000 \(ab34\)"):
        select_pending([files, tar], out, 1, redo_runs=["ab"], reopen=False)
    assert select_pending([files, tar], out, 1, reopen=False) == []
    assert [s.shard_id for s in select_pending([files, tar], out, 1, redo_runs=["AB34"], reopen=False)] == ["t"]
    assert [s.shard_id for s in select_pending([files, tar], out, 1, redo_runs=["ab12", "ab3"], reopen=False)] == [
        "t", "files-00000"]


def test_a_summary_lists_the_first_errors_and_counts_them_all():
    """A run's printed summary counts every error by reason and lists the first MAX_ERROR_LINES:
    an output of a million images with 5% bad files is not 50,000 lines of job log each run."""
    from pipeline.single_machine import MAX_ERROR_LINES, RunSummary

    errors = [{"uri": f"s3://b/{i:03d}.jpg", "reason": "corrupt" if i % 3 else "unreadable", "detail": "d"}
              for i in range(MAX_ERROR_LINES + 5)]
    text = str(RunSummary(images_ok=100, images_error=len(errors), errors=errors))
    assert "errors by reason: corrupt 16, unreadable 9" in text
    assert text.count("  error s3://b/") == MAX_ERROR_LINES and "s3://b/019.jpg" in text and "020.jpg" not in text
    assert "  ... and 5 more: every error is a row of the images table" in text
    few = str(RunSummary(images_ok=1, images_error=1, errors=errors[:1]))
    assert few.endswith("errors by reason: unreadable 1\n  error s3://b/000.jpg: unreadable (d)")


def test_the_summary_of_an_output_comes_from_its_markers(tmp_path, monkeypatch):
    """A run's closing summary counts images, masks and errors by reason from the markers and
    reads images tables only for its first error lines (it read every shard's table at the end
    of every run: an hour on an object store for 100k shards); a marker without counts (an
    earlier version's) is counted from its table."""
    from pipeline.run import summarize_tables
    from pipeline.single_machine import MAX_ERROR_LINES

    out = OutputDir(str(tmp_path / "out"))
    for i in range(30):
        shard = Shard(f"files-{i:05d}", "files", tuple(f"{i}-{k}.jpg" for k in range(3)))
        rows = [dict(image_id=f"{shard.shard_id}/{u}", uri=u, shard=shard.shard_id, status="ok", mask_count=2)
                for u in shard.uris]
        for row in rows[: i % 3]:  # 0, 1 or 2 errors
            row.update(status="error", mask_count=None, error_reason="corrupt" if i % 2 else "unreadable",
                       error_detail=f"bad {row['uri']}")
        masks = [mask_row(r["image_id"], k) for r in rows if r["status"] == "ok" for k in range(2)]
        out.write_shard(shard, masks, rows)
    legacy = {k: v for k, v in out.marker("files-00029").items() if k not in ("images", "masks", "errors")}
    (tmp_path / "out" / "_done" / "files-00029.json").write_text(json.dumps(legacy))
    images = out.read_table("images").to_pylist()
    errors = [r for r in images if r["status"] != "ok"]
    read, original = [], OutputDir.read_shard

    def counting(self, name, shard_id, columns=None):
        read.append(shard_id)
        return original(self, name, shard_id, columns)

    monkeypatch.setattr(OutputDir, "read_shard", counting)
    summary = summarize_tables(out)
    assert (summary.images_ok, summary.images_error) == (len(images) - len(errors), len(errors)) == (60, 30)
    assert summary.masks == 2 * 60
    assert summary.error_reasons == dict(Counter(r["error_reason"] for r in errors))
    assert summary.errors == [{"uri": r["uri"], "reason": r["error_reason"], "detail": r["error_detail"]}
                              for r in errors][:MAX_ERROR_LINES]
    assert read == [f"files-{i:05d}" for i in range(29) if i % 3][:14] + ["files-00029"]  # 20 lines, then legacy
    assert f"... and {30 - MAX_ERROR_LINES} more" in str(summary)


def test_a_file_of_several_frames_is_masked_on_its_first_and_said_so(tmp_path, checkpoint):
    """A multi-page TIFF or an animated GIF is masked on its first frame (a pyramid TIFF's later
    pages are smaller copies), and that is recorded, not silent: the images table's ``frames``,
    the shard's marker and the run's summary name the files. Tables of earlier versions, without
    the column, still read (frames null) and count no such file."""
    from pipeline.run import summarize_tables
    from pipeline.stats import format_stats, table_stats

    d = tmp_path / "in"
    d.mkdir()
    chelsea, coffee = (Image.open(io.BytesIO(sample_bytes(n))).convert("RGB") for n in ("chelsea.jpg", "coffee.jpg"))
    chelsea.save(d / "pages.tiff", save_all=True, append_images=[coffee])
    small = [chelsea.resize((90, 60)), coffee.resize((90, 60)), chelsea.resize((90, 60)).rotate(90)]
    small[0].save(d / "anim.gif", save_all=True, append_images=small[1:])
    (d / "still.jpg").write_bytes(sample_bytes("astronaut.jpg"))
    cfg = PipelineConfig(input_uri=str(d), output_uri=str(tmp_path / "out"), checkpoint=checkpoint, amg=AMG,
                         images_per_shard=8)
    worker = ShardWorker(cfg)
    (shard,) = discover_shards(str(d), 8)
    masks, images = worker.process(shard)
    assert {r["uri"].rsplit("/", 1)[-1]: (r["status"], r["frames"]) for r in images} == {
        "pages.tiff": ("ok", 2), "anim.gif": ("ok", 3), "still.jpg": ("ok", 1)}
    expected = worker.generator.generate(np.asarray(chelsea))  # the first page, as it is
    assert [m["counts"] for m in masks if m["image_id"].endswith("pages.tiff")] == \
        [e["segmentation"]["counts"] for e in expected] != []
    out = OutputDir(str(tmp_path / "out"))
    out.write_shard(shard, masks, images)
    assert out.marker(shard.shard_id)["first_frame_only"] == 2
    summary = summarize_tables(out)
    assert summary.images_first_frame_only == 2
    assert sorted((f["uri"].rsplit("/", 1)[-1], f["frames"]) for f in summary.first_frame_only) == \
        [("anim.gif", 3), ("pages.tiff", 2)]
    assert "2 images have several frames or pages: only the first of each was masked" in str(summary)
    assert "first frame only: " + str(d / "pages.tiff") + " (2 frames)" in str(summary)
    stats = table_stats(str(tmp_path / "out"))
    assert stats["images"]["first_frame_only"] == 2
    assert "2 files of several frames or pages, masked on the first" in format_stats(stats)
    # an earlier version's shard: no frames column, no count in its marker
    old = Shard("old", "files", ("x.jpg",))
    out.write_shard(old, [], [dict(image_id="old/x.jpg", uri="x.jpg", shard="old", status="ok", mask_count=0)])
    path = tmp_path / "out" / "images" / "old.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["frames"]), path)
    marker = tmp_path / "out" / "_done" / "old.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "first_frame_only"}))
    assert out.read_table("images").column("frames").to_pylist()[-1] is None
    assert out.read_shard("images", "old", ["uri", "frames"]).to_pylist() == [{"uri": "x.jpg", "frames": None}]
    assert summarize_tables(out).images_first_frame_only == 2 == table_stats(str(tmp_path / "out"))["images"][
        "first_frame_only"]


def test_images_record_the_dtype_their_masks_were_computed_in(tmp_path, checkpoint, monkeypatch):
    """Fast mode's "auto" dtype follows each worker's device, so one output of a mixed cluster
    holds bf16 and fp32 masks under one settings hash: each images row names its
    ``compute_dtype``, each marker counts them, and the summary and stats say when there are
    several. Tables and markers of earlier versions read as "unknown", which alone is no mix."""
    from pipeline.run import summarize_tables
    from pipeline.single_machine import RunSummary
    from pipeline.stats import format_stats, table_stats
    from sam_core import precision

    d = tmp_path / "in"
    d.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg"):
        (d / name).write_bytes(sample_bytes(name))
    (d / "truncated.jpg").write_bytes(sample_bytes("coffee.jpg")[:2000])
    cfg = PipelineConfig(input_uri=str(d), output_uri=str(tmp_path / "out"), checkpoint=checkpoint, amg=AMG,
                         mode="fast", images_per_shard=1)
    chelsea, coffee, truncated = discover_shards(str(d), 1)
    out = OutputDir(str(tmp_path / "out"))
    for native, shards in ((False, (chelsea, truncated)), (True, (coffee,))):  # a CPU worker, then a GPU one
        monkeypatch.setattr(precision, "native_bf16", lambda device: native)
        worker = ShardWorker(cfg)
        for shard in shards:
            masks, images = worker.process(shard)
            assert {m["settings_hash"] for m in masks} <= {cfg.settings_hash()}
            out.write_shard(shard, masks, images)
    rows = {r["uri"].rsplit("/", 1)[-1]: (r["status"], r["compute_dtype"]) for r in out.read_table("images").to_pylist()}
    assert rows == {"chelsea.jpg": ("ok", "float32"), "coffee.jpg": ("ok", "bfloat16"), "truncated.jpg": ("error", None)}
    assert [out.marker(s.shard_id)["compute_dtypes"] for s in (chelsea, coffee, truncated)] == [
        {"float32": 1}, {"bfloat16": 1}, {}]
    summary = summarize_tables(out)
    assert summary.compute_dtypes == {"bfloat16": 1, "float32": 1}
    assert "images computed in more than one dtype (bfloat16 1, float32 1)" in str(summary)
    stats = table_stats(str(tmp_path / "out"))
    assert stats["images"]["compute_dtypes"] == {"bfloat16": 1, "float32": 1}
    assert "computed in: bfloat16 1, float32 1" in format_stats(stats)
    # an earlier version's shard: no column in its table, no count in its marker
    (tmp_path / "out" / "_done" / f"{coffee.shard_id}.json").unlink()
    path = tmp_path / "out" / "images" / f"{chelsea.shard_id}.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["compute_dtype"]), path)
    marker = tmp_path / "out" / "_done" / f"{chelsea.shard_id}.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "compute_dtypes"}))
    assert out.read_shard("images", chelsea.shard_id, ["compute_dtype"]).to_pylist() == [{"compute_dtype": None}]
    assert summarize_tables(out).compute_dtypes == {"unknown": 1} == table_stats(str(tmp_path / "out"))["images"][
        "compute_dtypes"]
    assert "more than one dtype" not in str(RunSummary(images_ok=3, compute_dtypes={"float32": 2, "unknown": 1}))


def test_generate_job_says_when_retry_failed_may_help(tmp_path, monkeypatch, capsys):
    import jobs.generate as job
    from pipeline.single_machine import RunSummary

    summary = RunSummary(images_ok=5, images_error=3, errors=[
        {"uri": "a.jpg", "reason": "generate_failed", "detail": "RuntimeError: CUDA out of memory"},
        {"uri": "b.jpg", "reason": "corrupt", "detail": "truncated"},
        {"uri": "c.jpg", "reason": "unreadable", "detail": "ConnectionError after 3 attempts"}])
    monkeypatch.setattr(job, "run_pipeline", lambda config: summary)
    assert job.main(["--output", str(tmp_path / "out")]) == 3  # the output holds images a retry may recover
    assert ("2 image(s) failed for reasons another try may not meet (generate_failed 1, unreadable 1): "
            "--retry-failed redoes their shards") in capsys.readouterr().out
    summary.errors = summary.errors[1:2]
    assert job.main(["--output", str(tmp_path / "out")]) == 0
    assert "--retry-failed" not in capsys.readouterr().out


def test_an_image_post_processing_fails_on_is_recorded(inputs, tmp_path, checkpoint):
    """Post-processing raises on one image's candidates: that image gets a postprocess_failed
    row, the others of the batch are finished."""
    cfg = config(inputs, tmp_path / "out", checkpoint)
    rows = [dict(shard_id="s", image_index=i, shard_images=-1, candidates=blob,
                 image=json.dumps(dict(image_id=f"s/{i}", uri=f"u{i}", status="error", error_reason=None)))
            for i, blob in enumerate([b"not a pickle", None])]
    worker = ShardWorker(cfg)
    image = decode_image(sample_bytes("coffee.jpg"))
    good = worker.model.process([dict(shard_id="s", image_index=2, shard_images=-1, pixels=image.tobytes(),
                                      height=image.shape[0], width=image.shape[1],
                                      image=json.dumps(dict(image_id="s/2", uri="u2", status="error")))])
    out = worker.postprocess.process(rows + good)
    images = [json.loads(r["image"]) for r in out]
    assert images[0]["status"] == "error" and images[0]["error_reason"] == "postprocess_failed"
    assert "UnpicklingError" in images[0]["error_detail"] and out[0]["masks"] is None
    assert images[1]["status"] == "error" and images[1]["error_reason"] is None  # not decoded: untouched
    assert images[2]["status"] == "ok" and masks_from_ipc(out[2]["masks"]).num_rows == images[2]["mask_count"] > 0
