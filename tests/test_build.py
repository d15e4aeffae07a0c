"""Incremental builds from a spec: idempotent, new shards picked up, versioned manifests, clear errors."""

from __future__ import annotations

import functools
import json
import shutil
import tarfile

import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from jobs.build import main as build_main
from pipeline import decode
from pipeline.build import SpecError, input_key, load_spec, run_build
from pipeline.decode import heif_plugin
from pipeline.lease import RunLease
from pipeline.output import OutputDir
from pipeline.run import pending_shards
from pipeline.shards import Shard, discover_shards
from pipeline.single_machine import SAMPLE_IMAGES
from pipeline.stages import ShardWorker


def write_tar(path, names):
    with tarfile.open(path, "w") as tar:
        for i, name in enumerate(names):
            tar.add(f"{SAMPLE_IMAGES}/{name}", arcname=f"sa_{i}.jpg")


def spec_file(tmp_path, inputs, extra="", amg="points_per_side = 4"):
    path = tmp_path / "spec.toml"
    path.write_text(f'[build]\nname = "t"\noutput = "{tmp_path / "built"}"\n'
                    f"inputs = {json.dumps([str(i) for i in inputs])}\n{extra}\n"
                    f"[build.amg]\n{amg}\n")
    return str(path)


def local_run(config):
    """The pipeline's work without Ray: the same worker over the pending shards."""
    worker = ShardWorker(config)
    for shard in pending_shards(config):
        worker.output.write_shard(shard, *worker.process(shard))


def test_build_is_incremental_and_versioned(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "sa_000001.tar", ["chelsea.jpg"])
    write_tar(shards / "sa_000002.tar", ["coffee.jpg", "astronaut.jpg"])
    spec = load_spec(spec_file(tmp_path, [shards]))

    first = run_build(spec, run=local_run)
    assert first.version == 1 and first.new_shards == {str(shards): ["sa_000001", "sa_000002"]}
    manifest = json.loads((tmp_path / "built/manifests/v0001.json").read_text())
    assert manifest["name"] == "t" and manifest["settings"]["points_per_side"] == 4
    assert manifest["inputs"][0]["shards"] == ["sa_000001", "sa_000002"]
    tables = OutputDir(manifest["inputs"][0]["tables"])
    assert tables.read_table("images").num_rows == 3
    assert set(tables.read_table("masks").column("settings_hash").to_pylist()) <= {manifest["settings_hash"]}

    again = run_build(spec, run=local_run)  # nothing new: no work, no manifest
    assert again.version is None and again.latest == 1
    assert sorted(p.name for p in (tmp_path / "built/manifests").iterdir()) == ["v0001.json"]

    write_tar(shards / "sa_000003.tar", ["chelsea.jpg"])
    third = run_build(spec, run=local_run)
    assert third.version == 2 and third.new_shards == {str(shards): ["sa_000003"]}
    v2 = json.loads((tmp_path / "built/manifests/v0002.json").read_text())
    assert v2["inputs"][0]["shards"] == ["sa_000001", "sa_000002", "sa_000003"]
    assert v2["inputs"][0]["new_shards"] == ["sa_000003"]
    assert tables.read_table("images").num_rows == 4

    # An image of sa_000002 failed in the model stage (out of memory, say): only --retry-failed redoes its shard.
    images = tables.read_shard("images", "sa_000002").to_pylist()
    images[0].update(status="error", error_reason="generate_failed", mask_count=None)
    masks = [m for m in tables.read_shard("masks", "sa_000002").to_pylist() if m["image_id"] != images[0]["image_id"]]
    tables.write_shard(next(s for s in discover_shards(str(shards)) if s.shard_id == "sa_000002"), masks, images)
    assert run_build(spec, run=local_run).version is None
    fourth = run_build(spec, run=local_run, retry_failed=True)
    assert fourth.version == 3 and fourth.new_shards == {str(shards): ["sa_000002"]}
    assert tables.read_table("images").column("status").to_pylist() == ["ok"] * 4


def test_a_folder_that_grows_is_built_incrementally(tmp_path):
    """Loose images added to an input folder go into new shards of the next version (the build
    refused before: "the input changed"); a --retry-failed build reports the shards it redoes
    and the new ones, and its preview changes nothing before the run."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg", "scene_00000.png"):
        shutil.copy(f"{SAMPLE_IMAGES}/{name}", photos / name)
    spec = load_spec(spec_file(tmp_path, [photos], extra="images_per_shard = 2"))
    assert run_build(spec, run=local_run).new_shards == {str(photos): ["files-00000", "files-00001"]}
    shutil.copy(f"{SAMPLE_IMAGES}/astronaut.jpg", photos / "astronaut.jpg")  # sorts first
    second = run_build(spec, run=local_run)
    assert second.version == 2 and second.new_shards == {str(photos): ["files-00002"]}
    tables = OutputDir(json.loads((tmp_path / "built/manifests/v0002.json").read_text())["inputs"][0]["tables"])
    assert tables.read_table("images").num_rows == 4

    images = tables.read_shard("images", "files-00000").to_pylist()  # chelsea, coffee
    images[0].update(status="error", error_reason="generate_failed", mask_count=None)
    masks = [m for m in tables.read_shard("masks", "files-00000").to_pylist() if m["image_id"] != images[0]["image_id"]]
    marker = tables.marker("files-00000")
    tables.write_shard(Shard("files-00000", "files", tuple(marker["members"]), marker["root"]), masks, images)
    shutil.copy(f"{SAMPLE_IMAGES}/scene_00001.png", photos / "scene_00001.png")
    seen = []
    third = run_build(spec, run=lambda config: seen.append(sorted(tables.shard_ids())) or local_run(config),
                      retry_failed=True)
    assert seen == [["files-00000", "files-00001", "files-00002"]]  # the preview removed no marker
    assert third.new_shards == {str(photos): ["files-00000", "files-00003"]}
    assert tables.shard_ids() == ["files-00000", "files-00001", "files-00002", "files-00003"]
    assert tables.read_table("images").column("status").to_pylist() == ["ok"] * 5


def test_build_refuses_changed_settings(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "sa_000001.tar", ["chelsea.jpg"])
    run_build(load_spec(spec_file(tmp_path, [shards])), run=local_run)
    changed = load_spec(spec_file(tmp_path, [shards], extra='mode = "fast"'))
    with pytest.raises(SpecError, match="differ from manifest v0001"):
        run_build(changed, run=local_run)


def test_build_goes_on_with_the_same_settings_spelled_otherwise(tmp_path):
    """A spec that now writes out defaults (the same masks) builds on: the new shard's masks and
    the next manifest keep the output's settings hash. One whose settings change the masks is
    refused, naming the setting."""
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "sa_000001.tar", ["scene_00000.png"])
    path = spec_file(tmp_path, [shards])
    run_build(load_spec(path), run=local_run)
    v1 = json.loads((tmp_path / "built/manifests/v0001.json").read_text())
    with open(path, "a") as f:
        f.write(f"box_nms_thresh = 0.7\ncrop_overlap_ratio = {512 / 1500!r}\nstability_score_offset = 1.0\n")
    write_tar(shards / "sa_000002.tar", ["scene_00001.png"])
    second = run_build(load_spec(path), run=local_run)
    assert second.version == 2 and second.new_shards == {str(shards): ["sa_000002"]}
    v2 = json.loads((tmp_path / "built/manifests/v0002.json").read_text())
    assert v2["settings_hash"] == v1["settings_hash"] and "box_nms_thresh" not in v2["settings"]
    masks = OutputDir(v2["inputs"][0]["tables"]).read_shard("masks", "sa_000002")
    assert masks.num_rows > 0 and set(masks.column("settings_hash").to_pylist()) == {v1["settings_hash"]}
    with open(path, "a") as f:
        f.write("crop_nms_thresh = 0.5\n")
    with pytest.raises(SpecError, match=r"differ from manifest v0002 .*crop_nms_thresh \(unset\) -> 0.5"):
        run_build(load_spec(path), run=local_run)


def test_a_build_reads_its_point_grids_from_a_file_and_records_their_digest(tmp_path):
    """``point_grids = "FILE"`` under [build.amg]: the grids are read from the file, the
    manifests record their digest, a spec spelled otherwise builds on, and other grids in the
    file are refused, naming the setting."""
    import numpy as np

    from sam_core.amg.masks import build_point_grid

    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "sa_000001.tar", ["scene_00000.png"])
    np.save(tmp_path / "grid.npy", build_point_grid(4))
    path = spec_file(tmp_path, [shards], amg=f'point_grids = "{tmp_path / "grid.npy"}"')
    run_build(load_spec(path), run=local_run)
    v1 = json.loads((tmp_path / "built/manifests/v0001.json").read_text())
    assert v1["settings"]["point_grids"].startswith("1 grid (16 points), sha256 ")
    with open(path, "a") as f:
        f.write("stability_score_offset = 1.0\n")
    write_tar(shards / "sa_000002.tar", ["scene_00001.png"])
    second = run_build(load_spec(path), run=local_run)
    assert second.new_shards == {str(shards): ["sa_000002"]}
    v2 = json.loads((tmp_path / "built/manifests/v0002.json").read_text())
    assert v2["settings_hash"] == v1["settings_hash"]
    np.save(tmp_path / "grid.npy", build_point_grid(3))
    with pytest.raises(SpecError, match=r"point_grids 1 grid \(16 points\), sha256 \w+ -> 1 grid \(9 points\)"):
        run_build(load_spec(path), run=local_run)


def test_a_build_says_what_each_input_holds_and_what_failed(tmp_path, capsys):
    """Each build, also one with nothing new, prints what each input's tables hold: images ok and
    failed, the errors by reason and one by one, and whether --retry-failed may recover some; the
    manifest records the counts (a nightly build's log and its manifests show failures, which
    were in the tables only)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg"):
        shutil.copy(f"{SAMPLE_IMAGES}/{name}", photos / name)
    (photos / "broken.jpg").write_bytes(b"not an image")
    path = spec_file(tmp_path, [photos], extra="images_per_shard = 2",
                     amg="points_per_side = 8\npred_iou_thresh = 0.3\nstability_score_thresh = 0.7")
    first = run_build(load_spec(path), run=local_run)
    tables = OutputDir(json.loads((tmp_path / "built/manifests/v0001.json").read_text())["inputs"][0]["tables"])
    masks = tables.read_table("masks").num_rows
    assert masks > 0
    held = first.tables[str(photos)]
    assert (held.images_ok, held.images_error, held.masks, dict(held.reason_counts())) == (2, 1, masks, {"not_an_image": 1})
    v1 = json.loads((tmp_path / "built/manifests/v0001.json").read_text())["inputs"][0]
    assert {k: v1[k] for k in ("images_ok", "images_error", "error_reasons", "masks", "compute_dtypes")} == {
        "images_ok": 2, "images_error": 1, "error_reasons": {"not_an_image": 1}, "masks": masks,
        "compute_dtypes": {"float32": 2}}

    # coffee.jpg failed in the model stage (out of memory, say): a build with nothing new says so.
    images = tables.read_shard("images", "files-00001").to_pylist()
    assert [i["uri"] for i in images] == [str(photos / "coffee.jpg")]
    images[0].update(status="error", error_reason="generate_failed", error_detail="CUDA out of memory", mask_count=None)
    marker = tables.marker("files-00001")
    tables.write_shard(Shard("files-00001", "files", tuple(marker["members"]), marker["root"]), [], images)
    assert build_main(["--spec", path]) == 3  # the output holds an image another try may recover
    captured = capsys.readouterr()
    assert captured.err == "exit status 3 (--fail-on retriable): the output holds 1 failed image(s) (generate_failed 1)\n"
    lines = captured.out.splitlines()
    assert lines[0] == "t: up to date (latest manifest v0001); nothing processed"
    assert lines[1:] == [
        f"input {photos}: images ok: 1, errors: 2, masks: {tables.read_table('masks').num_rows}",
        "  errors by reason: generate_failed 1, not_an_image 1",
        f"    error {photos / 'broken.jpg'}: not_an_image (no image format recognised)",
        f"    error {photos / 'coffee.jpg'}: generate_failed (CUDA out of memory)",
        "  1 image(s) failed for reasons another try may not meet (generate_failed 1): --retry-failed redoes their shards"]
    assert build_main(["--spec", path, "--fail-on", "none"]) == 0
    assert build_main(["--spec", path, "--fail-on", "any"]) == 3
    assert "the output holds 2 failed image(s) (generate_failed 1, not_an_image 1)" in capsys.readouterr().err


def test_a_build_with_max_shards_does_that_many_of_each_input_and_the_next_goes_on(tmp_path, capsys, monkeypatch):
    import jobs.build

    monkeypatch.setattr(jobs.build, "run_build", functools.partial(run_build, run=local_run))  # no Ray
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in (1, 2, 3, 4):
        write_tar(shards / f"sa_00000{i}.tar", ["chelsea.jpg"])
    path = spec_file(tmp_path, [shards])
    assert build_main(["--spec", path, "--max-shards", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"t: processed 2 shards; wrote manifest {tmp_path / 'built/manifests/v0001.json'}",
        "left for a later build (--max-shards): 2 pending shards"]
    manifest = json.loads((tmp_path / "built/manifests/v0001.json").read_text())
    assert manifest["inputs"][0]["shards"] == manifest["inputs"][0]["new_shards"] == ["sa_000001", "sa_000002"]
    assert build_main(["--spec", path, "--dry-run", "--max-shards", "1"]) == 0
    plan = capsys.readouterr().out
    assert "to do: 1 shard: 1 new (1 tar), 0 redone (none)\n    sa_000003: 1 tar\n" in plan
    assert "  left for a later run (--max-shards): 1 pending shard\n" in plan
    rest = run_build(load_spec(path), run=local_run)
    assert rest.version == 2 and rest.new_shards == {str(shards): ["sa_000003", "sa_000004"]}
    assert rest.left == {str(shards): 0}


def recorded_local_run(config):
    """:func:`local_run`, recorded as a run of the pipeline is (under the output's lease)."""
    from pipeline.run_records import recorded, written_shard

    worker = ShardWorker(config)
    with worker.output.hold_lease():
        todo, written = pending_shards(config), []
        with recorded(worker.output, "generate", {}, todo, written):
            for shard in todo:
                masks, images = worker.process(shard)
                worker.output.write_shard(shard, masks, images)
                written.append(written_shard(shard.shard_id, images, len(masks)))


def test_redo_run_redoes_the_shards_one_recorded_run_of_an_input_wrote(tmp_path, capsys, monkeypatch):
    """``jobs.build --redo-run``: a build records one run per input (under that input's tables);
    a prefix names one of them among all the inputs, and only that input's shards it wrote are
    redone. A prefix naming none, or runs of two inputs, is refused before anything runs."""
    import jobs.build
    from pipeline.run_records import read_runs

    monkeypatch.setattr(jobs.build, "run_build", functools.partial(run_build, run=recorded_local_run))  # no Ray
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, tars in ((a, (1, 2)), (b, (3,))):
        folder.mkdir()
        for i in tars:
            write_tar(folder / f"sa_00000{i}.tar", ["chelsea.jpg"])
    spec = load_spec(spec_file(tmp_path, [a, b]))
    first = run_build(spec, run=recorded_local_run)
    assert first.new_shards == {str(a): ["sa_000001", "sa_000002"], str(b): ["sa_000003"]}
    manifest = json.loads((tmp_path / "built/manifests/v0001.json").read_text())
    (run_a,), (run_b,) = (read_runs(OutputDir(i["tables"])) for i in manifest["inputs"])
    assert run_a["run_id"] != run_b["run_id"]
    path = spec_file(tmp_path, [a, b])
    assert build_main(["--spec", path, "--redo-run", run_a["run_id"][:8], "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "a run would process 2 shards" in plan and "2 redone" in plan
    redone = run_build(spec, run=recorded_local_run, redo_runs=[run_a["run_id"][:8].upper()])
    assert redone.version == 2 and redone.new_shards == {str(a): ["sa_000001", "sa_000002"]}
    # a run of input b whose id begins as run_a's does: that beginning names two runs
    tables_b = manifest["inputs"][1]["tables"]
    twin = {"run_id": run_a["run_id"][:6] + "f" * 26, "started": "2026-01-01T00:00:00"}
    with open(f"{tables_b}/_runs/twin.json", "w") as f:
        json.dump(twin, f)
    for prefix, says in (("zzzz", "names no recorded runs"), (run_a["run_id"][:6], "names 2 recorded runs")):
        assert build_main(["--spec", path, "--redo-run", prefix]) == 2
        err = capsys.readouterr().err
        assert f"--redo-run {prefix!r} " in err and says in err and run_b["run_id"][:8] in err
    assert sorted(p.name for p in (tmp_path / "built/manifests").iterdir()) == ["v0001.json", "v0002.json"]


def test_heic_read_without_its_plugin_is_redone_once_it_is_installed(tmp_path, monkeypatch, capsys):
    """A HEIC photo on workers without pillow-heif is an error row naming the plugin; after it is
    installed, --retry-failed redoes its shard (a plain build does not)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(f"{SAMPLE_IMAGES}/coffee.jpg", photos / "coffee.jpg")
    assert heif_plugin()  # a test dependency; lets PIL write HEIC
    Image.open(f"{SAMPLE_IMAGES}/chelsea.jpg").save(photos / "phone.heic", format="HEIF")
    path = spec_file(tmp_path, [photos])
    spec = load_spec(path)
    monkeypatch.setattr(decode, "heif_plugin", lambda: False)  # a worker without the plugin
    first = run_build(spec, run=local_run)
    assert dict(first.tables[str(photos)].reason_counts()) == {"unsupported_format": 1}
    monkeypatch.undo()  # installed
    assert build_main(["--spec", path]) == 3  # up to date: nothing is redone without --retry-failed
    out = capsys.readouterr().out
    assert f"error {photos / 'phone.heic'}: unsupported_format (a HEIF/HEIC image (brand 'heic'): reading it " in out
    assert "1 image(s) failed for reasons another try may not meet (unsupported_format 1)" in out
    again = run_build(spec, run=local_run, retry_failed=True)
    assert again.version == 2 and again.tables[str(photos)].images_error == 0
    tables = OutputDir(json.loads((tmp_path / "built/manifests/v0002.json").read_text())["inputs"][0]["tables"])
    assert sorted(zip(*tables.read_table("images").select(["uri", "status"]).to_pydict().values())) == [
        (str(photos / "coffee.jpg"), "ok"), (str(photos / "phone.heic"), "ok")]


def test_a_dry_run_of_a_build_says_what_it_would_do_and_changes_nothing(tmp_path, capsys):
    """``jobs.build --dry-run``: the spec's check against the latest manifest, then each input's
    shards to write (as ``jobs.generate --dry-run``); no manifest, marker or table is written."""
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "sa_000001.tar", ["chelsea.jpg"])
    path = spec_file(tmp_path, [shards])
    assert build_main(["--spec", path, "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "t: dry run, nothing was started or written (latest manifest none; a run would process 1 shard and "
        "write manifest v0001)", f"input {shards}:", f"  output {tmp_path / 'built/data' / input_key(str(shards))}: "
        "no completed shards", "  to do: 1 shard: 1 new (1 tar), 0 redone (none)", "    sa_000001: 1 tar"]
    assert not (tmp_path / "built").exists()
    run_build(load_spec(path), run=local_run)
    write_tar(shards / "sa_000002.tar", ["coffee.jpg"])
    before = sorted(str(p) for p in (tmp_path / "built").rglob("*"))
    assert build_main(["--spec", path, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "(latest manifest v0001; a run would process 1 shard and write manifest v0002)" in printed
    assert "  to do: 1 shard: 1 new (1 tar), 0 redone (none)\n    sa_000002: 1 tar" in printed
    assert sorted(str(p) for p in (tmp_path / "built").rglob("*")) == before
    # One build at a time: a second one (run by hand while the nightly one runs) stops, naming it.
    with RunLease(LocalFileSystem(), str(tmp_path / "built")):
        assert build_main(["--spec", path, "--dry-run"]) == 0
        assert "another build is running on this output now (run " in capsys.readouterr().out
        assert build_main(["--spec", path]) == 1
        assert "Another run is writing into this output" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "built/manifests").iterdir()) == ["v0001.json"]
    with open(path, "a") as f:
        f.write("pred_iou_thresh = 0.5\n")
    assert build_main(["--spec", path, "--dry-run"]) == 2
    assert "pred_iou_thresh (unset) -> 0.5" in capsys.readouterr().err


def test_spec_errors_say_what_to_fix(tmp_path, capsys):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    for text, message in [
        ("[build\n", "not valid TOML"),
        ("[other]\nx = 1\n", "no \\[build\\] table"),
        ('[build]\nname = "a"\noutput = "o"\n', "lacks \\['inputs'\\]"),
        ('[build]\nname = "a"\noutput = "o"\ninputs = "x"\n', "non-empty list"),
        ('[build]\nname = "a"\noutput = "o"\ninputs = ["x"]\nworkerz = 2\n', "Unknown keys.*workerz"),
        ('[build]\nname = "a"\noutput = "o"\ninputs = ["a/b", "a_b"]\n', "same folder"),
        ('[build]\nname = "a"\noutput = "o"\ninputs = ["x"]\npreset = "nope"\n', "preset 'nope'.*sa1b"),
        ('[build]\nname = "a"\noutput = "o"\ninputs = ["x"]\nmode = "quick"\n', "mode 'quick'"),
    ]:
        bad.write_text(text)
        with pytest.raises(SpecError, match=message):
            load_spec(str(bad))
    assert build_main(["--spec", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_spec_defaults_to_the_bundled_demo_model(tmp_path):
    from sam_core.checkpoint import BUNDLED_CHECKPOINTS

    config = load_spec(spec_file(tmp_path, ["photos/"])).pipeline_config("photos/")
    assert (config.model_type, config.checkpoint) == ("demo", BUNDLED_CHECKPOINTS["demo"])
    named = load_spec(spec_file(tmp_path, ["photos/"], extra='model_type = "tiny"')).pipeline_config("photos/")
    assert (named.model_type, named.checkpoint) == ("tiny", None)  # seeded random weights


def test_input_keys():
    assert input_key("s3://bucket/sa1b/") == "bucket_sa1b"
    assert input_key("/data/photos/*.jpg") == "data_photos_.jpg"


def test_batch_sizes_do_not_change_the_settings_hash():
    from pipeline.config import PipelineConfig

    base = PipelineConfig("in", "out", amg={"points_per_side": 8})
    faster = PipelineConfig("in", "out", amg={"points_per_side": 8, "encoder_batch_size": 16,
                                              "points_per_batch": 256, "compile": True})
    other = PipelineConfig("in", "out", amg={"points_per_side": 16})
    assert base.settings_hash() == faster.settings_hash() != other.settings_hash()


def test_settings_spelled_otherwise_are_the_same_masks():
    """``PipelineConfig.spelled_as``: a run whose settings differ from an output's only in how
    they are spelled (defaults written out, a preset's values given one by one) takes the
    output's spelling and hash, keeping its own throughput settings; any setting that changes
    the masks (a value, the mode, the downsampling, the model) does not."""
    from pipeline.config import PipelineConfig
    from sam_core.amg import PRESETS

    def recorded(config):
        return config.mask_settings(), config.settings_hash()

    base = PipelineConfig("in", "out", amg={"points_per_side": 8})
    spelled = PipelineConfig("in", "out", amg={"points_per_side": 8, "box_nms_thresh": 0.7, "crop_n_layers": 0,
                                               "crop_overlap_ratio": 512 / 1500, "points_per_batch": 7})
    assert spelled.settings_hash() != base.settings_hash()
    adopted = spelled.spelled_as(*recorded(base))
    assert adopted.settings_hash() == base.settings_hash()
    assert adopted.generator_settings()["points_per_batch"] == 7  # the run's own throughput setting
    assert adopted.effective_mask_settings() == spelled.effective_mask_settings()
    assert base.spelled_as(*recorded(spelled)).settings_hash() == spelled.settings_hash()  # and back

    preset = PipelineConfig("in", "out", preset="sa1b")
    written_out = PipelineConfig("in", "out", amg=dict(PRESETS["sa1b"]))
    assert written_out.spelled_as(*recorded(preset)).settings_hash() == preset.settings_hash()

    for other in (PipelineConfig("in", "out", amg={"points_per_side": 8, "box_nms_thresh": 0.5}),
                  PipelineConfig("in", "out", amg={"points_per_side": 8}, mode="fast"),
                  PipelineConfig("in", "out", amg={"points_per_side": 8}, resize_short_side=1500),
                  PipelineConfig("in", "out", amg={"points_per_side": 8}, seed=1),
                  PipelineConfig("in", "out", amg={"points_per_side": 8, "no_such_setting": 1})):
        assert other.spelled_as(*recorded(base)) is None
    assert base.spelled_as({"points_per_side": 8, "no_such_setting": 1}, base.settings_hash()) is None


def test_build_exports_each_input_incrementally(tmp_path, capsys):
    """[build.export]: every build run exports each input's tables, only what is not exported yet
    (an up-to-date build exports nothing; a new tar's shard alone), to <dest>/<input-key>."""
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "sa_000001.tar", ["chelsea.jpg"])
    dest = tmp_path / "sa1b"
    spec = load_spec(spec_file(tmp_path, [shards], f'[build.export]\nformat = "sa1b-tar"\ndest = "{dest}"\nworkers = 2'))
    first = run_build(spec, run=local_run)
    assert first.exports[str(shards)].shards_exported == 1
    exported = dest / input_key(str(shards))
    assert sorted(p.name for p in exported.glob("*.tar")) == ["sa_000001.tar"]
    stamp = (exported / "sa_000001.tar").stat().st_mtime_ns
    again = run_build(spec, run=local_run)
    assert again.version is None and (again.exports[str(shards)].shards_exported,
                                      again.exports[str(shards)].shards_unchanged) == (0, 1)
    write_tar(shards / "sa_000002.tar", ["coffee.jpg"])
    third = run_build(spec, run=local_run)
    assert third.version == 2 and third.exports[str(shards)].shards_exported == 1
    assert sorted(p.name for p in exported.glob("*.tar")) == ["sa_000001.tar", "sa_000002.tar"]
    assert (exported / "sa_000001.tar").stat().st_mtime_ns == stamp
    with tarfile.open(exported / "sa_000002.tar") as tar:
        assert tar.getnames() == ["sa_0.jpg", "sa_0.json"]

    for extra, message in [('[build.export]\nformat = "png"', "needs format = one of"),
                           ('[build.export]\nformat = "coco"\nray = true', "a coco export is one file"),
                           ('[build.export]\nformat = "coco"\nbucket = "x"', r"Unknown keys in \[build\.export\]")]:
        with pytest.raises(SpecError, match=message):
            load_spec(spec_file(tmp_path, [shards], extra))
