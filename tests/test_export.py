"""Parquet tables -> SA-1B JSON and COCO JSON, decoded back to the same masks."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jobs.export import main as export_main
from pipeline.export import export_stems
from pipeline.config import PipelineConfig
from pipeline.output import OutputDir
from pipeline.shards import discover_shards
from pipeline.single_machine import SAMPLE_IMAGES
from pipeline.stages import ShardWorker
from sam_core.amg.sa1b import decode_masks, read_sa1b_json

from .conftest import official_sam, sharpen

AMG = dict(points_per_side=4, box_nms_thresh=1.0, pred_iou_thresh=0.8, stability_score_thresh=0.8)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """A generate run's tables (written without Ray, by the worker itself), with one bad file."""
    root = tmp_path_factory.mktemp("export")
    inputs = root / "in"
    inputs.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg"):
        (inputs / name).write_bytes(open(f"{SAMPLE_IMAGES}/{name}", "rb").read())
    (inputs / "empty.jpg").write_bytes(b"")
    ckpt = root / "sharp.pth"
    torch.save(sharpen(official_sam("tiny", perturb=0.0)).state_dict(), ckpt)
    cfg = PipelineConfig(input_uri=str(inputs), output_uri=str(root / "out"), checkpoint=str(ckpt),
                         amg=AMG, images_per_shard=2)
    worker = ShardWorker(cfg)
    for shard in discover_shards(cfg.input_uri, cfg.images_per_shard):
        worker.output.write_shard(shard, *worker.process(shard))
    return root / "out"


def table_masks(tables):
    rows = OutputDir(str(tables)).read_table("masks").to_pylist()
    out = {}
    for r in rows:
        m = mask_utils.decode({"size": [r["height"], r["width"]], "counts": r["counts"]}).astype(bool)
        out.setdefault(r["image_id"], []).append((r["mask_id"], m))
    return {k: [m for _, m in sorted(v, key=lambda t: t[0])] for k, v in out.items()}


def test_sa1b_json_export_round_trips(tables, tmp_path, capsys):
    dest = tmp_path / "sa1b"
    assert export_main(["--tables", str(tables), "--format", "sa1b-json", "--dest", str(dest)]) == 0
    assert "wrote 2 SA-1B JSON files" in capsys.readouterr().out
    expected = table_masks(tables)
    docs = {f"{p.parent.name}/{p.stem}.jpg": read_sa1b_json(str(p)) for p in dest.glob("*/*.json")}
    assert sorted(docs) == sorted(expected)
    ann_ids = []
    for image_id, doc in docs.items():
        got = decode_masks(doc)
        assert len(got) == len(expected[image_id]) > 0
        assert all(np.array_equal(a, b) for a, b in zip(got, expected[image_id]))
        ann_ids += [a["id"] for a in doc["annotations"]]
    assert sorted(ann_ids) == list(range(len(ann_ids)))  # unique across files


def test_coco_export_loads_and_evaluates(tables, tmp_path):
    dest = tmp_path / "coco.json"
    assert export_main(["--tables", str(tables), "--format", "coco", "--dest", str(dest)]) == 0
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(dest))
    expected = table_masks(tables)
    assert len(coco.getImgIds()) == 2
    for img in coco.loadImgs(coco.getImgIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert [coco.annToMask(a).astype(bool) for a in anns] and all(
            np.array_equal(coco.annToMask(a).astype(bool), m) for a, m in zip(anns, expected[img["file_name"]]))
    results = json.loads(dest.read_text())["annotations"]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(results), iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)  # the export scored against itself


def test_stats_job_counts_and_distributions(tables, tmp_path, capsys):
    from jobs.stats import main as stats_main

    out = tmp_path / "stats.json"
    assert stats_main(["--tables", str(tables), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "images: 3 (2 ok, 1 error)" in text and "error reasons: empty 1" in text
    stats = json.loads(out.read_text())
    rows = OutputDir(str(tables)).read_table("masks").to_pylist()
    assert stats["masks"]["total"] == len(rows) > 0
    areas = sorted(r["area"] for r in rows)
    assert stats["masks"]["area"]["min"] == areas[0] and stats["masks"]["area"]["max"] == areas[-1]
    assert stats["masks"]["area"]["median"] == pytest.approx(float(np.median(areas)))
    assert 0 < stats["masks"]["area_fraction"]["max"] <= 1
    assert stats["images"]["masks_per_image"]["count"] == 2
    assert sum(stats["masks"]["models"].values()) == len(rows)


def browser() -> str:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    raise AssertionError("No Chromium: install it as the README says (apt-get install chromium).")


def test_render_gallery_loads_in_headless_chromium(tables, tmp_path, capsys):
    import subprocess

    from PIL import Image

    from jobs.render import main as render_main
    from pipeline.decode import decode_image
    from pipeline.render import read_source

    dest = tmp_path / "gallery"
    assert render_main(["--tables", str(tables), "--dest", str(dest)]) == 0
    assert "rendered 2 images" in capsys.readouterr().out
    pngs = sorted((dest / "img").glob("*.png"))
    assert len(pngs) == 2
    # The overlay changes exactly the pixels some mask covers.
    masks = table_masks(tables)
    images = {r["image_id"]: r for r in OutputDir(str(tables)).read_table("images").to_pylist()}
    for image_id, image_masks in masks.items():
        png = dest / "img" / (image_id.replace("/", "_") + ".png")
        shown = np.asarray(Image.open(png).convert("RGB"))
        original = decode_image(read_source(images[image_id]["uri"]))
        covered = np.any(np.stack(image_masks), axis=0)
        changed = np.any(shown != original, axis=-1)
        assert not np.any(changed & ~covered) and changed[covered].mean() > 0.9

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--virtual-time-budget=5000"]
    url = (dest / "index.html").as_uri()
    dom = subprocess.run([browser(), *flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    assert 'id="loaded">loaded 2/2 images<' in dom
    shot = tmp_path / "shot.png"
    subprocess.run([browser(), *flags, "--window-size=1200,900", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 2000  # photos on screen, not only text

    assert render_main(["--tables", str(tables), "--dest", str(dest), "--image", "nope/x.jpg"]) == 2
    assert "nope/x.jpg" in capsys.readouterr().err


def test_sa1b_tar_export_round_trips_and_reads_back_as_input(tables, tmp_path, capsys):
    import tarfile

    from pipeline.decode import decode_image
    from pipeline.shards import iter_shard_files

    dest = tmp_path / "tars"
    assert export_main(["--tables", str(tables), "--format", "sa1b-tar", "--dest", str(dest)]) == 0
    assert "wrote 2 images in SA-1B tar shards" in capsys.readouterr().out
    expected = table_masks(tables)
    seen = {}
    for path in sorted(dest.glob("*.tar")):
        with tarfile.open(path) as tar:
            names = tar.getnames()
            assert len(names) % 2 == 0 and all(n.endswith((".jpg", ".json")) for n in names)
            for name in (n for n in names if n.endswith(".json")):
                doc = json.loads(tar.extractfile(name).read())
                jpg = tar.extractfile(doc["image"]["file_name"]).read()
                pixels = decode_image(jpg)
                assert pixels.shape[:2] == (doc["image"]["height"], doc["image"]["width"])
                seen[f"{path.stem}/{doc['image']['file_name']}"] = decode_masks(doc)
        # An exported shard is valid input again (the .json sidecars are passed over).
        shard = discover_shards(str(path))[0]
        assert all(n.endswith(".jpg") for n, _, _, _ in iter_shard_files(shard))
    assert sorted(seen) == sorted(expected)  # sources were .jpg, so names are unchanged
    for image_id, got in seen.items():
        assert len(got) == len(expected[image_id]) and all(np.array_equal(a, b) for a, b in zip(got, expected[image_id]))


def test_tar_images_are_upright_jpegs():
    from PIL import Image

    from pipeline.decode import decode_image
    from pipeline.export import EXIF_ORIENTATION, _upright_jpeg

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(20, 40, 3), dtype=np.uint8)
    plain, rotated, png = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels).save(plain, format="JPEG")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # viewers rotate it 90 degrees
    Image.fromarray(pixels).save(rotated, format="JPEG", exif=exif)
    Image.fromarray(pixels).save(png, format="PNG")
    assert _upright_jpeg(plain.getvalue()) == plain.getvalue()  # copied byte for byte
    for source in (rotated.getvalue(), png.getvalue()):
        out = _upright_jpeg(source)
        with Image.open(io.BytesIO(out)) as im:
            assert im.format == "JPEG" and im.getexif().get(EXIF_ORIENTATION, 1) == 1
        assert decode_image(out).shape == decode_image(source).shape  # what the masks were made on


def test_one_file_name_in_two_folders_stays_two_images_through_export(tmp_path, capsys):
    """Images are named by their path under the input folder, so ``cam1/0001.jpg`` and
    ``cam2/0001.jpg`` get their own ids and export files; ``0001.jpg`` and ``0001.png`` in one
    folder keep their extensions in the export names instead of sharing ``0001``."""
    inputs = tmp_path / "in"
    for rel, sample in [("cam1/0001.jpg", "chelsea.jpg"), ("cam2/0001.jpg", "coffee.jpg"),
                        ("cam1/0001.png", "scene_00000.png")]:
        (inputs / rel).parent.mkdir(parents=True, exist_ok=True)
        (inputs / rel).write_bytes(open(f"{SAMPLE_IMAGES}/{sample}", "rb").read())
    cfg = PipelineConfig(input_uri=str(inputs), output_uri=str(tmp_path / "out"), amg=AMG)
    worker = ShardWorker(cfg)
    (shard,) = discover_shards(cfg.input_uri, cfg.images_per_shard)
    worker.output.write_shard(shard, *worker.process(shard))
    names = ["cam1/0001.jpg", "cam1/0001.png", "cam2/0001.jpg"]
    images = OutputDir(cfg.output_uri).read_table("images").to_pylist()
    assert [(r["image_id"], r["status"]) for r in images] == [(f"files-00000/{n}", "ok") for n in names]

    dest = tmp_path / "sa1b"
    assert export_main(["--tables", cfg.output_uri, "--format", "sa1b-json", "--dest", str(dest)]) == 0
    assert "wrote 3 SA-1B JSON files" in capsys.readouterr().out
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*.json"))
    assert files == ["files-00000/cam1/0001.jpg.json", "files-00000/cam1/0001.png.json", "files-00000/cam2/0001.json"]
    assert read_sa1b_json(str(dest / files[2]))["image"]["file_name"] == "cam2/0001.jpg"

    assert export_main(["--tables", cfg.output_uri, "--format", "sa1b-tar", "--dest", str(tmp_path / "tars")]) == 0
    with tarfile.open(tmp_path / "tars" / "files-00000.tar") as tar:
        assert tar.getnames() == ["cam1/0001.jpg.jpg", "cam1/0001.jpg.json", "cam1/0001.png.jpg",
                                  "cam1/0001.png.json", "cam2/0001.jpg", "cam2/0001.json"]


def test_export_stems_are_unique_within_a_shard():
    assert export_stems(["a.jpg", "b.png", "d/a.jpg"]) == {"a.jpg": "a", "b.png": "b", "d/a.jpg": "d/a"}
    assert export_stems(["a.jpg", "a.png", "b"]) == {"a.jpg": "a.jpg", "a.png": "a.png", "b": "b"}
    # "a.jpg.png" would take the stem "a.jpg", which "a.jpg" keeps as its whole name: both keep theirs
    stems = export_stems(["a.jpg", "a.png", "a.jpg.png"])
    assert stems == {"a.jpg": "a.jpg", "a.png": "a.png", "a.jpg.png": "a.jpg.png"}
