"""jobs.prompt: boxes from a COCO file or a table -> masks equal to SamPredictor's for those boxes."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pycocotools import mask as mask_utils

from jobs.prompt import main as prompt_main
from jobs.stats import main as stats_main
from pipeline.decode import decode_image
from pipeline.config import PipelineConfig
from pipeline.output import OutputDir, masks_from_ipc
from pipeline.run_records import read_runs
from pipeline.prompted import (BoxPrompter, BoxStage, ImagePrompts, plan_prompted, read_prompts, run_prompted,
                               run_prompted_on_ray)
from pipeline.single_machine import SAMPLE_IMAGES
from sam_core import SamPredictor, build_sam

LOGIT_TIE = 1e-4  # pixels this close to the threshold may fall either way (see test_model_parity)
BOXES = {"chelsea.jpg": [[30.0, 40.0, 200.0, 150.0], [0.0, 0.0, 451.0, 300.0]],
         "coffee.jpg": [[100.5, 60.0, 250.0, 180.0]],
         "astronaut.jpg": []}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    for name in BOXES:
        shutil.copy(f"{SAMPLE_IMAGES}/{name}", d / name)
    return d


def coco_file(path, photos):
    images = [{"id": i + 1, "file_name": n} for i, n in enumerate(BOXES)]
    images += [{"id": 10, "file_name": "missing.jpg"}, {"id": 11, "file_name": "coffee_bad.jpg"}]
    shutil.copy(photos / "coffee.jpg", photos / "coffee_bad.jpg")
    anns = [{"id": 100 + k, "image_id": im["id"], "bbox": b, "category_id": 1}
            for im in images[:3] for k, b in enumerate(BOXES[im["file_name"]])]
    anns += [{"id": 900, "image_id": 10, "bbox": [1, 1, 5, 5], "category_id": 1},
             {"id": 901, "image_id": 11, "bbox": [10, 10, 0, 5], "category_id": 1}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    return path


def rows_by_image(out):
    masks = OutputDir(str(out)).read_table("masks").to_pylist()
    images = {r["image_id"].split("/", 1)[1]: r for r in OutputDir(str(out)).read_table("images").to_pylist()}
    by = {}
    for r in masks:
        by.setdefault(r["image_id"].split("/", 1)[1], []).append(r)
    return by, images


def test_prompted_masks_equal_the_predictor(ray_local, photos, tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    args = ["--prompts", str(coco_file(tmp_path / "dets.json", photos)), "--images", str(photos),
            "--output", str(out), "--checkpoint", str(tiny_checkpoint)]
    assert prompt_main(args) == 3  # missing.jpg is missing: another try may find it
    captured = capsys.readouterr()
    assert "images ok: 3, errors: 2, masks: 3" in captured.out
    assert captured.err.endswith("exit status 3 (--fail-on retriable): the output holds 1 failed image(s) (missing 1)\n")
    masks, images = rows_by_image(out)
    assert images["missing.jpg"]["error_reason"] == "missing"
    assert images["coffee_bad.jpg"]["error_reason"] == "bad_prompt"
    assert "box 0 [10.0, 10.0, 0.0, 5.0]" in images["coffee_bad.jpg"]["error_detail"]
    assert images["astronaut.jpg"]["status"] == "ok" and images["astronaut.jpg"]["mask_count"] == 0
    assert {n: r["compute_dtype"] for n, r in images.items()} == {
        "chelsea.jpg": "float32", "coffee.jpg": "float32", "astronaut.jpg": "float32", "missing.jpg": None,
        "coffee_bad.jpg": None}

    predictor = SamPredictor(build_sam("tiny", tiny_checkpoint))
    for name, boxes in BOXES.items():
        if not boxes:
            continue
        image = decode_image((photos / name).read_bytes())
        predictor.set_image(image)
        rows = sorted(masks[name], key=lambda r: r["mask_id"])
        assert len(rows) == len(boxes) == images[name]["mask_count"]
        for row, (x, y, w, h) in zip(rows, boxes):
            box = np.array([x, y, x + w, y + h])
            logits, iou, _ = predictor.predict(box=box, multimask_output=False, return_logits=True)
            expected = logits[0] > predictor.model.mask_threshold
            got = mask_utils.decode({"size": [row["height"], row["width"]], "counts": row["counts"]}).astype(bool)
            decided = np.abs(logits[0]) > LOGIT_TIE
            assert not np.any((got != expected) & decided)
            assert row["predicted_iou"] == pytest.approx(float(iou[0]), abs=LOGIT_TIE)
            assert row["area"] == int(got.sum()) and row["point_coords"] is None
            assert row["crop_box"] == [0.0, 0.0, float(image.shape[1]), float(image.shape[0])]

    # The tables export like generated ones; a box-prompted annotation has no prompt point.
    from jobs.export import main as export_main

    assert export_main(["--tables", str(out), "--format", "sa1b-json", "--dest", str(tmp_path / "sa1b")]) == 0
    docs = [json.loads(p.read_text()) for p in sorted((tmp_path / "sa1b").rglob("*.json")) if ".export" not in p.parts]
    anns = [a for d in docs for a in d["annotations"]]
    assert len(anns) == 3 and all(a["point_coords"] == [] for a in anns)
    assert export_main(["--tables", str(out), "--format", "coco", "--dest", str(tmp_path / "c.json")]) == 0

    # Again: complete shards are skipped; with another model they are refused, not mixed.
    assert prompt_main(args + ["--fail-on", "none"]) == 0
    assert "images ok: 3, errors: 2, masks: 3" in capsys.readouterr().out
    assert prompt_main(args[:-2] + ["--model-type", "tiny"]) == 2
    assert "model tiny:sam_tiny.pth -> tiny:random-seed0" in capsys.readouterr().err


def test_box_table_gives_the_same_masks(ray_local, photos, tmp_path, tiny_checkpoint):
    rows = [{"uri": name, "bbox": b} for name, boxes in BOXES.items() for b in boxes]
    table = tmp_path / "boxes.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table)
    coco_out, table_out = tmp_path / "a", tmp_path / "b"
    common = ["--images", str(photos), "--checkpoint", str(tiny_checkpoint)]
    assert prompt_main(["--prompts", str(table), "--output", str(table_out)] + common) == 0
    assert prompt_main(["--prompts", str(coco_file(tmp_path / "d.json", photos)), "--output", str(coco_out)]
                       + common) == 3  # its missing.jpg is missing
    a, _ = rows_by_image(coco_out)
    b, _ = rows_by_image(table_out)
    for name in ("chelsea.jpg", "coffee.jpg"):
        assert [r["counts"] for r in a[name]] == [r["counts"] for r in b[name]]


def test_prompt_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                               "annotations": [{"image_id": 2, "bbox": [0, 0, 1, 1]}]}))
    assert prompt_main(["--prompts", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "image ids not in 'images': [2]" in capsys.readouterr().err
    table = tmp_path / "t.csv"
    table.write_text("path,bbox\nx.jpg,1\n")
    assert prompt_main(["--prompts", str(table), "--output", str(tmp_path / "o")]) == 2
    assert "needs a 'uri' column" in capsys.readouterr().err
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "a.jpg"}],
                                 "annotations": []}))
    assert prompt_main(["--prompts", str(twice), "--output", str(tmp_path / "o")]) == 2
    assert "1 file_name(s) belong to more than one image: ['a.jpg']" in capsys.readouterr().err

    # What names an image or a box missing: refused, naming the entries (it was a KeyError trace).
    for doc, says in [({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2}], "annotations": []},
                       "1 of its images lack one of 'id', 'file_name' (e.g. images[1] = {\"id\": 2})"),
                      ({"images": [{"id": 1, "file_name": "a.jpg"}],
                        "annotations": [{"id": 5, "image_id": 1, "segmentation": [[1, 2, 3, 4, 5, 6]]}]},
                       "1 of its annotations lack one of 'image_id', 'bbox' (e.g. annotations[0] = {\"id\": 5"),
                      ({"images": {}, "annotations": []}, "a COCO file needs 'images' and 'annotations' lists")]:
        bad.write_text(json.dumps(doc))
        assert prompt_main(["--prompts", str(bad), "--output", str(tmp_path / "o")]) == 2
        assert says in capsys.readouterr().err
    table.write_text('uri,bbox\n,"[1,2,3,4]"\n')
    assert prompt_main(["--prompts", str(table), "--output", str(tmp_path / "o")]) == 2
    assert "1 row(s) have no 'uri' (e.g. row 0)" in capsys.readouterr().err
    table.write_text("uri,bbox\nx.jpg,[1,2,3,4]\n")  # a list not quoted: more fields than columns
    assert prompt_main(["--prompts", str(table), "--output", str(tmp_path / "o")]) == 2
    assert f"{table}: CSV parse error: Expected 2 columns, got 5" in capsys.readouterr().err


def test_box_values_that_are_not_numbers_make_their_image_a_bad_prompt(tmp_path):
    """A box value that is not a number (text, an empty CSV cell, null) is kept as NaN, so its image
    gets a bad_prompt row naming the box (it was a ValueError or TypeError ending the job); a CSV
    bbox written as JSON text is read as its list."""
    from pipeline.prompted import bad_boxes

    (tmp_path / "a.csv").write_text('uri,bbox\nx.jpg,"[1, 2, 30, 40]"\nx.jpg,"[1, 2, ""a"", 4]"\ny.jpg,oops\n')
    (tmp_path / "b.csv").write_text("uri,x,y,w,h\nz.jpg,1,2,,4\n")
    (tmp_path / "c.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "w.jpg"}],
                                                 "annotations": [{"image_id": 1, "bbox": ["a", 1, 2, None]}]}))
    prompts = {p.uri: p.boxes for name in ("a.csv", "b.csv", "c.json") for p in read_prompts(str(tmp_path / name))}
    assert prompts["x.jpg"][0] == (1.0, 2.0, 30.0, 40.0)
    assert bad_boxes(prompts["x.jpg"], 100, 100) == ["box 1 [1.0, 2.0, nan, 4.0] has a value that is not a number (nan)"]
    assert bad_boxes(prompts["y.jpg"], 100, 100) == ["box 0 [nan] does not have 4 values (x, y, w, h)"]
    assert bad_boxes(prompts["z.jpg"], 100, 100) == ["box 0 [1.0, 2.0, nan, 4.0] has a value that is not a number (nan)"]
    assert bad_boxes(prompts["w.jpg"], 100, 100) == ["box 0 [nan, 1.0, 2.0, nan] has a value that is not a number (nan)"]


def test_prompts_on_ray_equal_the_in_process_run_and_failures_are_recorded(ray_local, photos, tmp_path,
                                                                          tiny_checkpoint):
    """Two model actors over shards of 2 images, encoding the images of a batch together, give
    the tables of the in-process run (one image at a time); an image the model raises on gets
    generate_failed and --retry-failed redoes its shard."""
    prompts = read_prompts(str(coco_file(tmp_path / "dets.json", photos)), str(photos))
    cfg = PipelineConfig(input_uri="dets.json", output_uri=str(tmp_path / "ray"), model_type="tiny",
                         checkpoint=str(tiny_checkpoint), images_per_shard=2, images_per_batch=2, workers=2,
                         num_cpus_per_worker=0.5, num_cpus_per_postprocessor=0.0)
    summary = run_prompted_on_ray(prompts, cfg)
    assert (summary.images_ok, summary.images_error, summary.shards_processed) == (3, 2, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actors (Ray gives a 0.5-CPU actor one thread): same sums, same bits
    try:
        run_prompted(prompts, str(tmp_path / "local"), BoxPrompter("tiny", str(tiny_checkpoint)), images_per_shard=2)
    finally:
        torch.set_num_threads(threads)
    timings = ["decode_s", "generate_s", "postprocess_s"]
    for name in ("masks", "images"):
        on_ray = OutputDir(cfg.output_uri).read_table(name)
        local = OutputDir(str(tmp_path / "local")).read_table(name)
        if name == "images":
            on_ray, local = on_ray.drop_columns(timings), local.drop_columns(timings)
        assert on_ray.equals(local), name

    class Failing(BoxStage):
        def __init__(self, config, ledger=None):
            super().__init__(config, ledger)

            def out_of_memory(image, boxes, embedding=None):
                raise RuntimeError("CUDA out of memory (simulated)")
            self.prompter.masks = out_of_memory

    failing_cfg = replace(cfg, output_uri=str(tmp_path / "failing"))
    first = run_prompted_on_ray(prompts, failing_cfg, stage=Failing)
    assert sorted(e["reason"] for e in first.errors) == ["bad_prompt"] + ["generate_failed"] * 3 + ["missing"]
    assert "RuntimeError: CUDA out of memory (simulated)" in first.errors[0]["detail"] + first.errors[1]["detail"]
    retried = run_prompted_on_ray(prompts, replace(failing_cfg, retry_failed=True))
    assert retried.shards_processed == 2 and sorted(e["reason"] for e in retried.errors) == ["bad_prompt",
                                                                                              "missing"]
    assert OutputDir(failing_cfg.output_uri).read_table("masks").equals(OutputDir(cfg.output_uri).read_table("masks"))


def test_changed_boxes_redo_their_shard_and_new_images_get_new_shards(photos, tmp_path, tiny_checkpoint, caplog):
    """A prompts file edited since the last run into the output: the shards of images whose boxes
    changed are redone (their masks were of the old boxes: kept, they were stale without a word),
    new images go into new shards, and the rest is left as it was."""
    prompter = BoxPrompter("tiny", str(tiny_checkpoint))
    photos = shutil.copytree(photos, tmp_path / "photos")

    def prompts_of(boxes):
        return [ImagePrompts(str(photos / name), tuple(tuple(b) for b in bs)) for name, bs in boxes.items()]

    def run(boxes, output):
        return run_prompted(prompts_of(boxes), str(output), prompter, images_per_shard=2)

    def masks_of(output):
        by, _ = rows_by_image(output)
        return {name: [(r["mask_id"], r["counts"]) for r in rows] for name, rows in by.items()}

    out = tmp_path / "out"
    assert run(BOXES, out).shards_processed == 2  # (chelsea, coffee), (astronaut)
    before = {p.name: p.read_bytes() for p in (out / "masks").iterdir()}
    assert run(BOXES, out).shards_processed == 0
    edited = dict(BOXES, **{"coffee.jpg": [[10.0, 20.0, 120.0, 90.0]]})
    # jobs.prompt --dry-run says so first, and changes nothing.
    cfg = PipelineConfig(input_uri="-", output_uri=str(out), model_type="tiny", checkpoint=str(tiny_checkpoint),
                         images_per_shard=2)
    plan = plan_prompted(prompts_of(edited), cfg)
    assert [s.shard_id for s in plan.todo] == ["prompts-00000"] and plan.completed == ["prompts-00000", "prompts-00001"]
    assert "to do: 1 shard: 0 new (none), 1 redone (2 files)" in str(plan)
    assert OutputDir(str(out)).shard_ids() == ["prompts-00000", "prompts-00001"]
    with pytest.raises(ValueError, match="mode exact -> fast"):  # refused as the run would be
        plan_prompted(prompts_of(edited), replace(cfg, mode="fast"))
    caplog.clear()
    assert run(edited, out).shards_processed == 1
    assert "1 images with other boxes in the prompts since their shards were written" in caplog.text
    assert (out / "masks" / "prompts-00001.parquet").read_bytes() == before["prompts-00001.parquet"]
    edited = dict(edited, **{"astronaut.jpg": [[50.0, 50.0, 100.0, 100.0]], "coffee_copy.jpg": BOXES["coffee.jpg"]})
    shutil.copy(photos / "coffee.jpg", photos / "coffee_copy.jpg")
    second = run(edited, out)
    assert second.shards_processed == 2 and OutputDir(str(out)).shard_ids() == [
        "prompts-00000", "prompts-00001", "prompts-00002"]  # astronaut's redone, coffee_copy's new
    assert run(edited, out).shards_processed == 0
    run(edited, tmp_path / "clean")
    assert masks_of(out) == masks_of(tmp_path / "clean")
    run(BOXES, tmp_path / "old")
    assert masks_of(out)["coffee_copy.jpg"] == masks_of(tmp_path / "old")["coffee.jpg"]
    # Each run that wrote something is recorded (runs with nothing to do are not), and each
    # shard's marker names the run that wrote it last.
    runs = read_runs(OutputDir(str(out)))
    assert [(r["job"], r["status"], r["shards_written"]) for r in runs] == [
        ("prompt", "finished", ["prompts-00000", "prompts-00001"]), ("prompt", "finished", ["prompts-00000"]),
        ("prompt", "finished", ["prompts-00001", "prompts-00002"])]
    markers = OutputDir(str(out)).markers()
    assert [markers[s]["run_id"] for s in sorted(markers)] == [runs[1]["run_id"]] + [runs[2]["run_id"]] * 2


def test_redo_run_redoes_the_shards_a_recorded_run_wrote(photos, tmp_path, tiny_checkpoint):
    """``--redo-run`` (``redo_runs``): the completed shards a recorded run wrote (e.g. with a
    version later found faulty) are redone, those of other runs kept; a prefix that names no
    recorded run is refused, naming the runs; a dry run lists them as redone."""
    out = tmp_path / "out"
    prompter = BoxPrompter("tiny", str(tiny_checkpoint))
    prompts = [ImagePrompts(str(photos / n), tuple(tuple(b) for b in bs)) for n, bs in BOXES.items()]
    limited = run_prompted(prompts, str(out), prompter, images_per_shard=2, max_shards=1)
    assert (limited.shards_processed, limited.shards_left) == (1, 1)  # prompts-00000: chelsea, coffee
    assert "shards left for a later run (--max-shards): 1" in str(limited)
    run_prompted(prompts, str(out), prompter, images_per_shard=2)  # prompts-00001: astronaut
    first, second = read_runs(OutputDir(str(out)))
    assert json.loads(open(limited.run_record).read())["run_id"] == first["run_id"]
    kept = (out / "masks" / "prompts-00001.parquet").read_bytes()
    for bad, says in [("zzzz", "names no recorded run"), ("", "names no recorded run")]:
        with pytest.raises(ValueError, match=says) as err:
            run_prompted(prompts, str(out), prompter, images_per_shard=2, redo_runs=[bad])
        assert f"{first['run_id'][:8]} ({first['started']})" in str(err.value)
    cfg = PipelineConfig(input_uri="-", output_uri=str(out), model_type="tiny", checkpoint=str(tiny_checkpoint),
                         images_per_shard=2, redo_runs=(first["run_id"][:6].upper(),))
    plan = plan_prompted(prompts, cfg)
    assert [s.shard_id for s in plan.todo] == ["prompts-00000"] and "1 redone (2 files)" in str(plan)
    redone = run_prompted(prompts, str(out), prompter, images_per_shard=2, redo_runs=[first["run_id"][:6]])
    assert redone.shards_processed == 1 and redone.images_processed == 2
    assert (out / "masks" / "prompts-00001.parquet").read_bytes() == kept
    third = read_runs(OutputDir(str(out)))[2]
    markers = OutputDir(str(out)).markers()
    assert (markers["prompts-00000"]["run_id"], markers["prompts-00001"]["run_id"]) == (third["run_id"],
                                                                                        second["run_id"])
    # The first run's record stays; it has no shards left, so naming it again redoes nothing.
    assert run_prompted(prompts, str(out), prompter, images_per_shard=2,
                        redo_runs=[first["run_id"][:8]]).shards_processed == 0


def test_stats_lists_the_runs_that_wrote_an_output(photos, tmp_path, tiny_checkpoint, capsys):
    """``jobs.stats --runs``: each recorded run, how it ended and what the output still holds of
    it; a run killed mid-way (its record still "running", the lease not held) and shards of
    earlier versions (markers without a run) are named as such."""
    out = tmp_path / "out"
    prompts = [ImagePrompts(str(photos / n), tuple(tuple(b) for b in bs)) for n, bs in BOXES.items()]
    prompter = BoxPrompter("tiny", str(tiny_checkpoint))
    run_prompted(prompts, str(out), prompter, images_per_shard=2)
    run_prompted(prompts[:1], str(out / "x"), prompter)  # another output: not listed
    output = OutputDir(str(out))
    (first,) = read_runs(output)
    # A later run, killed (its record named after its start, so listed after the first run's).
    killed = dict(first, run_id="dead0000" + "0" * 24, started="2999-01-01T00:00:00+00:00", status="running")
    for key in ("shards_written", "images", "images_error", "error_reasons", "masks", "seconds"):
        killed.pop(key)
    (out / "_runs" / "2999-01-01T000000-dead0000.json").write_text(json.dumps(killed))
    marker = json.loads((out / "_done" / "prompts-00001.json").read_text())
    marker.pop("run_id")  # as a marker of an earlier version
    (out / "_done" / "prompts-00001.json").write_text(json.dumps(marker))
    assert stats_main(["--tables", str(out), "--runs", "--json", str(tmp_path / "stats.json")]) == 0
    printed = capsys.readouterr().out
    runs = printed[printed.index("runs:\n"):].splitlines()[1:]
    assert len(runs) == 4 and runs[3] == f"wrote {tmp_path / 'stats.json'}"
    masks = first["masks"]
    assert runs[0].startswith(f"  {first['started']} prompt run {first['run_id'][:8]} on {first['host']}, finished: "
                              f"2 of 2 shards written, 3 images (0 errors), {masks} masks, ")
    assert runs[0].endswith(f"; the output holds 1 shard as it wrote them; sam-datagen "
                            f"{first['versions']['sam-datagen']}, torch {torch.__version__}, ray "
                            f"{first['versions']['ray']}")
    assert runs[1] == ("  2999-01-01T00:00:00+00:00 prompt run dead0000 on " + first["host"] + ", stopped without "
                       "ending (killed, or its node lost); the output holds 0 shards as it wrote them; sam-datagen "
                       f"{first['versions']['sam-datagen']}, torch {torch.__version__}, ray {first['versions']['ray']}")
    assert runs[2] == "  1 completed shard written before runs were recorded"
    assert [r["run_id"] for r in json.loads((tmp_path / "stats.json").read_text())["runs"]] == [
        first["run_id"], killed["run_id"]]


def test_bad_boxes_say_what_is_wrong_with_each():
    from pipeline.prompted import bad_boxes

    assert bad_boxes([(0, 0, 10, 10), (5.5, 1, 2, 3)], 100, 50) == []
    assert bad_boxes([(1, 2, 3), (0, 0, float("nan"), 1), (0, 0, 0, 5), (100, 0, 5, 5), (-9, -9, 9, 9)], 100, 50) == [
        "box 0 [1, 2, 3] does not have 4 values (x, y, w, h)",
        "box 1 [0, 0, nan, 1] has a value that is not a number (nan)",
        "box 2 [0, 0, 0, 5] is not a finite box of positive size",
        "box 3 [100, 0, 5, 5] lies outside the 100x50 image",
        "box 4 [-9, -9, 9, 9] lies outside the 100x50 image"]


def test_boxes_are_decoded_in_chunks_under_a_pixel_budget(photos, tiny_checkpoint):
    """An image's boxes are decoded a chunk at a time (at most ``max_chunk_pixels`` mask pixels):
    one box per chunk gives the same masks, ids and scores as all boxes at once, up to the float
    rounding of another decoder batch size in the predicted IoU."""
    image = decode_image((photos / "chelsea.jpg").read_bytes())
    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    boxes = [[float(rng.integers(0, w - 60)), float(rng.integers(0, h - 60)), float(rng.integers(8, 60)),
              float(rng.integers(8, 60))] for _ in range(12)]
    whole = BoxPrompter("tiny", str(tiny_checkpoint)).masks(image, boxes)
    one_by_one = BoxPrompter("tiny", str(tiny_checkpoint), max_chunk_pixels=1).masks(image, boxes)
    assert [r["mask_id"] for r in one_by_one] == list(range(12))
    for a, b in zip(whole, one_by_one):
        assert {k: v for k, v in a.items() if k != "predicted_iou"} == {k: v for k, v in b.items() if k != "predicted_iou"}
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-6)
    with pytest.raises(ValueError, match="max_chunk_pixels must be >= 1"):
        BoxPrompter("tiny", str(tiny_checkpoint), max_chunk_pixels=0)


def test_fast_mode_masks_are_close_to_exact_and_kept_apart(tmp_path):
    """``--mode fast`` (bf16 autocast) gives masks within IoU 0.98 of exact mode's for the demo
    model's boxes on held-out scenes, and an output keeps one mode: a fast run into an exact
    output is refused, naming the change."""
    from pycocotools import mask as mask_utils

    from sam_core.training.scenes import write_scene_dataset

    write_scene_dataset(str(tmp_path / "scenes"), 4, seed=3)
    doc = json.loads((tmp_path / "scenes.json").read_text())
    prompts = [ImagePrompts(str(tmp_path / img["file_name"]),  # file names are under tmp_path
                            tuple(tuple(a["bbox"]) for a in doc["annotations"] if a["image_id"] == img["id"]))
               for img in doc["images"]]
    exact, fast = BoxPrompter("demo", None), BoxPrompter("demo", None, mode="fast")
    assert run_prompted(prompts, str(tmp_path / "exact"), exact).masks == len(doc["annotations"])
    assert run_prompted(prompts, str(tmp_path / "fast"), fast).masks == len(doc["annotations"])
    a, _ = rows_by_image(tmp_path / "exact")
    b, _ = rows_by_image(tmp_path / "fast")
    assert sorted(a) == sorted(b)
    ious = [mask_utils.iou([{"size": [x["height"], x["width"]], "counts": x["counts"]}],
                           [{"size": [y["height"], y["width"]], "counts": y["counts"]}], [0])[0][0]
            for name in a for x, y in zip(sorted(a[name], key=lambda r: r["mask_id"]),
                                          sorted(b[name], key=lambda r: r["mask_id"]))]
    assert len(ious) == len(doc["annotations"]) and min(ious) >= 0.98
    assert {r["settings_hash"] for rows in b.values() for r in rows} == {"prompted-boxes-fast"}
    with pytest.raises(ValueError, match="mode exact -> fast"):
        run_prompted(prompts, str(tmp_path / "exact"), fast)
    with pytest.raises(ValueError, match="mode must be one of"):
        BoxPrompter("demo", None, mode="bf16")


def test_a_pinned_fast_dtype_is_part_of_a_prompted_outputs_identity(photos, tmp_path, tiny_checkpoint, capsys):
    """``jobs.prompt --fast-dtype``: a pin decides the masks, so it names the output (outputs
    of "auto" keep "prompted-boxes-fast"), each image records the dtype it was computed in, and
    a pin with exact mode is refused before the run."""
    prompts = [ImagePrompts(str(photos / "chelsea.jpg"), tuple(map(tuple, BOXES["chelsea.jpg"])))]
    pinned = BoxPrompter("tiny", str(tiny_checkpoint), mode="fast", fast_dtype="bfloat16")
    assert pinned.predictor.amp_dtype == torch.bfloat16 and pinned.settings_hash == "prompted-boxes-fast-bfloat16"
    assert run_prompted(prompts, str(tmp_path / "bf16"), pinned).masks == 2
    masks, images = rows_by_image(tmp_path / "bf16")
    assert {r["settings_hash"] for r in masks["chelsea.jpg"]} == {"prompted-boxes-fast-bfloat16"}
    assert images["chelsea.jpg"]["compute_dtype"] == "bfloat16"
    assert OutputDir(str(tmp_path / "bf16")).marker("prompts-00000")["settings"] == {"mode": "fast",
                                                                                      "fast_dtype": "bfloat16"}
    with pytest.raises(ValueError, match="fast_dtype"):  # "auto" would pick by device: not resumed into
        run_prompted(prompts, str(tmp_path / "bf16"), BoxPrompter("tiny", str(tiny_checkpoint), mode="fast"))
    assert BoxPrompter("tiny", str(tiny_checkpoint), mode="fast", fast_dtype="auto").settings_hash == \
        "prompted-boxes-fast"
    with pytest.raises(ValueError, match="applies to mode='fast' only"):
        BoxPrompter("tiny", str(tiny_checkpoint), fast_dtype="float32")
    args = ["--prompts", str(coco_file(tmp_path / "dets.json", photos)), "--images", str(photos),
            "--output", str(tmp_path / "o"), "--checkpoint", str(tiny_checkpoint), "--dry-run"]
    assert prompt_main(args + ["--fast-dtype", "float32"]) == 2
    assert "fast_dtype='float32' applies to mode='fast' only" in capsys.readouterr().err
    assert prompt_main(args + ["--fast-dtype", "float32", "--mode", "fast"]) == 0
    with pytest.raises(SystemExit):  # argparse: not a choice
        prompt_main(args + ["--fast-dtype", "half", "--mode", "fast"])
    cfg = PipelineConfig("p.json", "o", mode="fast", amg={"fast_dtype": "float32"})
    assert BoxStage(replace(cfg, checkpoint=str(tiny_checkpoint))).prompter.settings_hash == \
        "prompted-boxes-fast-float32"


def test_a_model_batch_encodes_its_images_together(photos, tmp_path, tiny_checkpoint):
    """The model stage encodes the images of a batch whose boxes can prompt in one encoder call
    (an image with a bad box is not encoded) and gives each image the masks it gets alone."""
    from pipeline.reading import decode_rows
    from pipeline.shards import Shard

    names = ["chelsea.jpg", "coffee.jpg", "astronaut.jpg"]
    boxes = [BOXES["chelsea.jpg"], [[10.0, 10.0, 0.0, 5.0]], [[20.0, 30.0, 100.0, 80.0]]]
    shard = Shard("prompts-00000", "files", tuple(str(photos / n) for n in names), str(photos))
    rows = [r for r in decode_rows(shard, None, 10**9, prompts=boxes) if r.get("image")]
    cfg = PipelineConfig(input_uri="x.json", output_uri=str(tmp_path / "o"), model_type="tiny",
                         checkpoint=str(tiny_checkpoint))
    stage = BoxStage(cfg)
    batches = []
    encode = stage.prompter.encode
    stage.prompter.encode = lambda images: batches.append(len(images)) or encode(images)
    out = stage.process(rows)
    assert batches == [2]
    alone = BoxPrompter("tiny", str(tiny_checkpoint))
    for name, b, r in zip(names, boxes, out):
        image_row = json.loads(r["image"])
        expected = alone.prompt(dict(image_row), decode_image((photos / name).read_bytes()), b)
        got = [] if r["masks"] is None else masks_from_ipc(r["masks"]).to_pylist()
        assert [m["counts"] for m in got] == [m["counts"] for m in expected]
        assert image_row["status"] == ("error" if name == "coffee.jpg" else "ok")


def test_coco_prompts_come_back_with_their_masks(photos, tmp_path, tiny_checkpoint, capsys):
    """``jobs.export --format coco --prompts``: the detections file of a prompt run with each
    annotation's mask (ids, categories and boxes kept); an annotation without one (its image
    failed, or the file gives the image another size) is listed with its reason, not dropped."""
    from pycocotools.coco import COCO

    from jobs.export import main as export_main

    dets = coco_file(tmp_path / "dets.json", photos)
    doc = json.loads(dets.read_text())
    for a in doc["annotations"]:
        a["category_id"] = 7 if a["id"] % 2 else 3
    doc["images"][1]["width"] = 999  # coffee.jpg is not 999 wide: its mask would not fit the file's image
    dets.write_text(json.dumps(doc))
    prompts = read_prompts(str(dets), str(photos))
    run_prompted(prompts, str(tmp_path / "out"), BoxPrompter("tiny", str(tiny_checkpoint)), images_per_shard=2)
    dest = tmp_path / "with-masks.json"
    assert export_main(["--tables", str(tmp_path / "out"), "--format", "coco", "--prompts", str(dets),
                        "--images", str(photos), "--dest", str(dest)]) == 0
    assert "5 boxes of" in capsys.readouterr().out
    out = json.loads(dest.read_text())
    by_image = {im["id"]: im["file_name"] for im in doc["images"]}
    masks, _ = rows_by_image(tmp_path / "out")
    assert [(a["id"], a["category_id"], a["bbox"]) for a in out["annotations"]] == [
        (a["id"], a["category_id"], a["bbox"]) for a in doc["annotations"] if by_image[a["image_id"]] == "chelsea.jpg"]
    for k, a in enumerate(out["annotations"]):
        row = next(r for r in masks["chelsea.jpg"] if r["mask_id"] == k)
        assert a["segmentation"]["counts"] == row["counts"] and a["area"] == row["area"]
    assert sorted((by_image[u["image_id"]], u["reason"].split(":")[0]) for u in out["unmasked_annotations"]) == [
        ("coffee.jpg", "size mismatch"), ("coffee_bad.jpg", "image error"), ("missing.jpg", "image error")]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(dest))
    assert all(coco.annToMask(a).sum() == a["area"] for a in coco.loadAnns(coco.getAnnIds()))
    with pytest.raises(SystemExit):  # argparse: --prompts goes with coco
        export_main(["--tables", str(tmp_path / "out"), "--format", "sa1b-json", "--prompts", str(dets),
                     "--dest", str(tmp_path / "x")])
    assert "is written back as --format coco, not sa1b-json" in capsys.readouterr().err


def test_a_box_table_comes_back_with_its_masks(photos, tmp_path, tiny_checkpoint, capsys):
    """``jobs.export --format parquet --prompts boxes.parquet``: every row of the table, its own
    columns and order kept (rows of one image need not be together), with its box's mask, or a
    mask_status saying why it has none."""
    from jobs.export import main as export_main

    rows = [{"uri": "chelsea.jpg", "bbox": BOXES["chelsea.jpg"][0], "label": "cat", "score": 0.9},
            {"uri": "coffee.jpg", "bbox": BOXES["coffee.jpg"][0], "label": "cup", "score": 0.8},
            {"uri": "missing.jpg", "bbox": [1.0, 1.0, 5.0, 5.0], "label": "x", "score": 0.1},
            {"uri": "chelsea.jpg", "bbox": BOXES["chelsea.jpg"][1], "label": "sofa", "score": 0.7}]
    boxes = tmp_path / "boxes.parquet"
    pq.write_table(pa.Table.from_pylist(rows), boxes)
    prompts = read_prompts(str(boxes), str(photos))
    run_prompted(prompts, str(tmp_path / "out"), BoxPrompter("tiny", str(tiny_checkpoint)))
    dest = tmp_path / "with-masks.parquet"
    assert export_main(["--tables", str(tmp_path / "out"), "--format", "parquet", "--prompts", str(boxes),
                        "--images", str(photos), "--dest", str(dest)]) == 0
    printed = capsys.readouterr().out
    assert "4 boxes of" in printed and "3 with their mask, 1 without (image error 1; in their mask_status)" in printed
    got = pq.read_table(dest).to_pylist()
    assert [{k: r[k] for k in ("uri", "bbox", "label", "score")} for r in got] == rows
    masks, _ = rows_by_image(tmp_path / "out")
    expected = [masks["chelsea.jpg"][0]["counts"], masks["coffee.jpg"][0]["counts"], None,
                masks["chelsea.jpg"][1]["counts"]]
    assert [r["mask_counts"] for r in got] == expected
    assert [r["mask_status"] for r in got] == ["ok", "ok", "image error: missing", "ok"]
    with pytest.raises(SystemExit):
        export_main(["--tables", str(tmp_path / "out"), "--format", "parquet", "--dest", str(dest)])
