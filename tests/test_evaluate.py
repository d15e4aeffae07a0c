"""jobs.evaluate: matching, recall / mIoU / per-size figures, missing and error images, inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from jobs.evaluate import main as evaluate_main
from pipeline.evaluate import EvaluationError, evaluate, match_image
from pipeline.output import OutputDir
from pipeline.shards import Shard
from sam_core.training.scenes import write_scene_dataset


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return rle


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_matching_is_one_to_one_and_greedy():
    gt = [_rle(_box(50, 50, 0, 10, 0, 10)), _rle(_box(50, 50, 0, 10, 0, 12))]
    # one prediction overlapping both: only one object can have it
    pred = [_rle(_box(50, 50, 0, 10, 0, 11))]
    matched, good = match_image(gt, pred)
    assert sorted(matched.round(4).tolist()) == [0.0, round(110 / 120, 4)] and good == 1
    matched, good = match_image(gt, [])
    assert matched.tolist() == [0, 0] and good == 0


def _tables_from(folder, gt_doc, transform, error_names=()):
    """Prediction tables holding ``transform(mask)`` for every ground-truth mask."""
    out = OutputDir(str(folder))
    masks_rows, image_rows = [], []
    by_image = {}
    for a in gt_doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for img in gt_doc["images"]:
        image_id = f"files-00000/{img['file_name']}"
        uri = f"/data/scenes/{img['file_name']}"
        if img["file_name"] in error_names:
            image_rows.append(dict(image_id=image_id, uri=uri, shard="files-00000", width=None, height=None,
                                   mask_count=0, status="error", error_reason="corrupt", error_detail="x",
                                   decode_s=0.0, generate_s=0.0))
            continue
        kept = 0
        for a in by_image.get(img["id"], []):
            m = mask_utils.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
            m = transform(m.astype(bool))
            if m is None:
                continue
            rle = _rle(m)
            masks_rows.append(dict(image_id=image_id, mask_id=kept, counts=rle["counts"].decode(),
                                   height=img["height"], width=img["width"], area=int(m.sum()),
                                   bbox=[0.0, 0.0, 1.0, 1.0], predicted_iou=0.9, stability_score=0.9,
                                   point_coords=[0.0, 0.0], crop_box=[0.0, 0.0, 1.0, 1.0], model="m", settings_hash="h"))
            kept += 1
        image_rows.append(dict(image_id=image_id, uri=uri, shard="files-00000", width=img["width"],
                               height=img["height"], mask_count=kept, status="ok", error_reason=None,
                               error_detail=None, decode_s=0.0, generate_s=0.0))
    out.write_shard(Shard("files-00000", "files", tuple(r["uri"] for r in image_rows)), masks_rows, image_rows)
    return str(folder)


@pytest.fixture()
def scenes(tmp_path):
    folder = tmp_path / "scenes"
    write_scene_dataset(str(folder), 3, seed=7, min_side=96, max_side=140)
    return folder, json.loads((tmp_path / "scenes.json").read_text())


def test_perfect_predictions_score_one(scenes, tmp_path):
    folder, doc = scenes
    report = evaluate(str(tmp_path / "scenes.json"), _tables_from(tmp_path / "pred", doc, lambda m: m))
    n = len(doc["annotations"])
    assert report["objects"] == n and report["predicted_masks"] == n
    assert report["miou"] == 1.0 and report["recall@0.5"] == 1.0 and report["recall@0.8"] == 1.0
    assert report["precision@0.5"] == 1.0 and report["images_without_prediction"] == []
    assert sum(s["objects"] for s in report["by_size"].values()) == n


def test_missing_masks_and_error_images_lower_recall(scenes, tmp_path):
    folder, doc = scenes
    dropped = {"n": 0}

    def drop_every_other(m):
        dropped["n"] += 1
        return m if dropped["n"] % 2 else None

    error_name = doc["images"][0]["file_name"]
    n_error = sum(1 for a in doc["annotations"] if a["image_id"] == doc["images"][0]["id"])
    pred = _tables_from(tmp_path / "pred", doc, drop_every_other, error_names=(error_name,))
    report = evaluate(str(tmp_path / "scenes.json"), pred)
    n = len(doc["annotations"])
    kept = report["predicted_masks"]
    assert report["recall@0.5"] == pytest.approx(kept / n)
    assert report["miou"] == pytest.approx(kept / n)
    assert report["images_without_prediction"] == [{"file_name": error_name, "reason": "error: corrupt"}]
    assert kept <= n - n_error


def test_eroded_masks_score_their_overlap(scenes, tmp_path):
    import cv2

    folder, doc = scenes
    ratios = []

    def shrink(m):  # a subset of the object: its IoU is the kept share of the object
        eroded = cv2.erode(m.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        eroded = eroded if eroded.any() else m
        ratios.append(eroded.sum() / m.sum())
        return eroded

    report = evaluate(str(tmp_path / "scenes.json"), _tables_from(tmp_path / "pred", doc, shrink))
    ratios = np.array(ratios)
    assert report["miou"] == pytest.approx(ratios.mean())
    assert report["recall@0.5"] == pytest.approx((ratios >= 0.5).mean())
    assert report["recall@0.8"] == pytest.approx((ratios >= 0.8).mean())
    assert report["recall@0.8"] < 1.0


def test_coco_json_predictions_and_the_cli(scenes, tmp_path, capsys):
    folder, doc = scenes
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps(doc))  # the ground truth itself, as a COCO results file
    out_json = tmp_path / "report.json"
    assert evaluate_main(["--ground-truth", str(tmp_path / "scenes.json"), "--predictions", str(pred),
                          "--json", str(out_json)]) == 0
    assert "R@0.8" in capsys.readouterr().out
    assert json.loads(out_json.read_text())["recall@0.8"] == 1.0
    assert evaluate_main(["--ground-truth", str(tmp_path / "scenes.json"),
                          "--predictions", str(tmp_path / "nothing-here")]) == 2
    assert "nothing-here' does not exist: expected the output folder" in capsys.readouterr().err


def test_size_mismatch_is_an_error(scenes, tmp_path):
    folder, doc = scenes
    pred = _tables_from(tmp_path / "pred", doc, lambda m: m)
    doc["images"][0]["width"] += 1
    bad = tmp_path / "gt.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(EvaluationError, match="ground truth is"):
        evaluate(str(bad), pred)


def test_a_ground_truth_file_missing_what_names_an_image_or_object_says_so(scenes, tmp_path, capsys):
    """A ground-truth file whose images lack their size or whose annotations lack a segmentation
    (it was a KeyError trace), or that is not a COCO object at all, is one error line, rc 2."""
    folder, doc = scenes
    pred = _tables_from(tmp_path / "pred", doc, lambda m: m)
    gt = tmp_path / "gt.json"
    no_size = dict(doc, images=[{k: v for k, v in im.items() if k != "height"} for im in doc["images"]])
    no_segmentation = dict(doc, annotations=[{k: v for k, v in a.items() if k != "segmentation"}
                                             for a in doc["annotations"]])
    for content, says in [(no_size, f"{len(doc['images'])} of its images lack one of 'id', 'file_name', 'height', "
                                    "'width' (e.g. images[0] = {"),
                          (no_segmentation, "of its annotations lack one of 'image_id', 'segmentation'"),
                          ([1, 2], "a COCO file needs 'images' and 'annotations' lists")]:
        gt.write_text(json.dumps(content))
        assert evaluate_main(["--ground-truth", str(gt), "--predictions", pred]) == 2
        assert says in capsys.readouterr().err


def test_only_the_masks_of_ground_truth_images_are_read(scenes, tmp_path, monkeypatch):
    """Scoring a few hundred ground-truth images against an output of millions reads the images
    tables and the masks tables of the shards that hold those images, not every mask."""
    folder, doc = scenes
    pred = _tables_from(tmp_path / "pred", doc, lambda m: m)
    out = OutputDir(pred)
    for k in (1, 2):  # shards of images the ground truth does not cover
        shard_id = f"files-0000{k}"
        rows = [dict(image_id=f"{shard_id}/other.png", uri=f"/data/other/{k}.png", shard=shard_id, width=9, height=9,
                     mask_count=0, status="ok")]
        out.write_shard(Shard(shard_id, "files", (rows[0]["uri"],)), [], rows)
    reads = []
    real = OutputDir.read_shard
    monkeypatch.setattr(OutputDir, "read_shard", lambda self, name, s, *a, **k: reads.append((name, s)) or real(
        self, name, s, *a, **k))
    report = evaluate(str(tmp_path / "scenes.json"), pred)
    assert report["miou"] == 1.0 and report["predicted_masks"] == len(doc["annotations"])
    assert report["predicted_images_not_in_ground_truth"] == 2
    assert sorted(s for name, s in reads if name == "masks") == ["files-00000"]
