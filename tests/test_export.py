"""Parquet tables -> SA-1B JSON and COCO JSON, decoded back to the same masks."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
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


def exported_json(dest):
    """The SA-1B JSON files of an export (not its .export/ markers)."""
    return [p for p in dest.rglob("*.json") if ".export" not in p.parts]


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
    docs = {f"{p.parent.name}/{p.stem}.jpg": read_sa1b_json(str(p)) for p in exported_json(dest)}
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


def test_a_gallery_gives_each_image_its_own_overlay_and_shows_names_as_text(tmp_path):
    """Names that come to the same file name ("a b.jpg", "a_b.jpg") get an overlay each, not
    one over the other; a name holding HTML ("<b>x & y.jpg") is shown as the text it is; a name
    too long for a file name (an S3 key may be 1,024 bytes) gets a shortened one."""
    from PIL import Image

    from pipeline.render import render_gallery

    names = ["a b.jpg", "a_b.jpg", "<b>x & y.jpg", "x" * 300 + ".jpg"]
    src = tmp_path / "src"
    src.mkdir()
    for k in range(len(names)):
        Image.fromarray(np.full((30, 40, 3), 60 * k, np.uint8)).save(src / f"{k}.jpg", format="JPEG", quality=100)
    out = OutputDir(str(tmp_path / "out"), identity={"model": "tiny:x", "settings_hash": "h"})
    synthetic_shard(out, "files-00000", names, uris=[str(src / f"{k}.jpg") for k in range(len(names))])
    dest = tmp_path / "gallery"
    assert sorted(render_gallery(str(tmp_path / "out"), str(dest), sample=4)) == sorted(f"files-00000/{n}" for n in names)
    pngs = sorted((dest / "img").glob("*.png"))
    assert len(pngs) == 4 and max(len(p.name.encode()) for p in pngs) <= 255
    shades = sorted(int(np.median(np.asarray(Image.open(p).convert("L")))) for p in pngs)
    assert [round(v / 60) for v in shades] == [0, 1, 2, 3]  # each image's own pixels
    page = (dest / "index.html").read_text()
    assert "<b>x" not in page and page.count("&lt;b&gt;x &amp; y.jpg") == 2  # alt and caption
    for p in pngs:
        assert f'src="img/{p.name}"' in page


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
        assert all(n.endswith(".jpg") for n, *_ in iter_shard_files(shard))
    assert sorted(seen) == sorted(expected)  # sources were .jpg, so names are unchanged
    for image_id, got in seen.items():
        assert len(got) == len(expected[image_id]) and all(np.array_equal(a, b) for a, b in zip(got, expected[image_id]))


def test_downsampled_run_is_read_back_at_its_size(tmp_path, capsys):
    """--resize-short-side: the tables hold the downsampled sizes and masks, and everything that
    reads the sources again (tar export, gallery, training samples) downsamples them the same way;
    resuming without the setting is refused, naming it."""
    from PIL import Image

    from jobs.render import main as render_main
    from pipeline.decode import decode_image
    from pipeline.run import pending_shards
    from pipeline.training_data import table_samples

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg"):
        (inputs / name).write_bytes(open(f"{SAMPLE_IMAGES}/{name}", "rb").read())
    ckpt = tmp_path / "sharp.pth"
    torch.save(sharpen(official_sam("tiny", perturb=0.0)).state_dict(), ckpt)
    cfg = PipelineConfig(input_uri=str(inputs), output_uri=str(tmp_path / "out"), checkpoint=str(ckpt),
                         amg=AMG, images_per_shard=1, resize_short_side=120)
    worker = ShardWorker(cfg)
    for shard in discover_shards(cfg.input_uri, cfg.images_per_shard):
        worker.output.write_shard(shard, *worker.process(shard))
    images = {r["image_id"]: r for r in OutputDir(cfg.output_uri).read_table("images").to_pylist()}
    assert len(images) == 2 and all(r["status"] == "ok" and min(r["width"], r["height"]) == 120
                                    for r in images.values())
    masks = table_masks(tmp_path / "out")
    assert sum(len(m) for m in masks.values()) > 0
    for image_id, image_masks in masks.items():
        assert all(m.shape == (images[image_id]["height"], images[image_id]["width"]) for m in image_masks)
    with pytest.raises(ValueError, match=r"resize_short_side 120 -> \(unset\)"):
        pending_shards(PipelineConfig(**{**cfg.__dict__, "resize_short_side": None}))

    dest = tmp_path / "tars"
    assert export_main(["--tables", cfg.output_uri, "--format", "sa1b-tar", "--dest", str(dest)]) == 0
    for path in sorted(dest.glob("*.tar")):
        with tarfile.open(path) as tar:
            for name in (n for n in tar.getnames() if n.endswith(".json")):
                doc = json.loads(tar.extractfile(name).read())
                pixels = decode_image(tar.extractfile(doc["image"]["file_name"]).read())
                assert pixels.shape[:2] == (doc["image"]["height"], doc["image"]["width"])
                assert min(pixels.shape[:2]) == 120
                image_id = f"{path.stem}/{doc['image']['file_name']}"
                assert all(np.array_equal(a, b) for a, b in zip(decode_masks(doc), masks[image_id]))

    assert render_main(["--tables", cfg.output_uri, "--dest", str(tmp_path / "gallery")]) == 0
    pngs = sorted((tmp_path / "gallery" / "img").glob("*.png"))
    assert len(pngs) == 2
    for png in pngs:
        image_id = png.stem.replace("_", "/", 1)
        assert np.asarray(Image.open(png)).shape[:2] == (images[image_id]["height"], images[image_id]["width"])

    sample = next(table_samples(cfg.output_uri))
    assert min(sample.image.shape[:2]) == 120 and sample.masks[0].shape == sample.image.shape[:2]


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
    assert _upright_jpeg(plain.getvalue()) == (plain.getvalue(), (40, 20))  # copied byte for byte
    for source, size in ((rotated.getvalue(), (20, 40)), (png.getvalue(), (40, 20))):
        out, upright = _upright_jpeg(source)
        assert upright == size
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
    files = sorted(str(p.relative_to(dest)) for p in exported_json(dest))
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
    # S3 keys and tar members may hold "//", "./" and "..": stems stay under the shard's folder, one each
    stems = export_stems(["../../evil.jpg", "/abs.jpg", "./c.jpg", "a//b.jpg", "a/b.jpg", "..", "x/./y/../z.png"])
    assert stems == {"../../evil.jpg": "__/__/evil", "/abs.jpg": "abs", "./c.jpg": "c", "a/b.jpg": "a/b.jpg",
                     "a//b.jpg": "a/b.jpg-" + hashlib.sha1(b"a//b.jpg").hexdigest()[:10], "..": "__",
                     "x/./y/../z.png": "x/y/__/z"}
    # a name too long for a file name (S3 keys may be 1,024 bytes): its start, a digest, its extension
    long = ["d/" + "é" * 150 + "a.jpg", "d/" + "é" * 150 + "b.jpg"]
    stems = export_stems(long)
    assert len(set(stems.values())) == 2 and all(s.startswith("d/éé") for s in stems.values())
    assert all(len((s + ".json").split("/")[-1].encode()) <= 255 for s in stems.values())
    digest = hashlib.sha1(b"x" * 300 + b".jpg").hexdigest()[:10]
    assert export_stems(["x" * 300 + ".jpg", "x" * 200]) == {"x" * 300 + ".jpg": "x" * 185 + "~" + digest, "x" * 200: "x" * 200}


def test_an_export_writes_every_image_inside_its_destination(tmp_path, caplog):
    """Image names from S3 keys or tar members ("../../x.jpg", "a//b.jpg" beside "a/b.jpg", 300
    characters) are exported each to a file of its own under the destination (one was written two
    folders above it, two images to one file, the second over the first, and a name too long for
    a file name failed its shard); files an earlier export's marker names outside the destination
    are never removed."""
    from PIL import Image

    from pipeline.export import ExportDest, export_shards

    names = ["../../evil.jpg", "a//b.jpg", "a/b.jpg", "./c.jpg", "/d.jpg", "x" * 300 + ".png"]
    out = OutputDir(str(tmp_path / "run" / "out"), identity={"model": "tiny:x", "settings_hash": "h"})
    synthetic_shard(out, "sa_1", names)
    dest = tmp_path / "run" / "dest"
    assert export_shards(str(tmp_path / "run" / "out"), str(dest), "sa1b-json").images == 6
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.json") if not {"_done", ".export"} & set(p.parts))
    assert len(written) == 6 and all(w.startswith("run/dest/sa_1/") for w in written), written
    assert sorted(d["image"]["file_name"] for d in map(read_sa1b_json, (str(tmp_path / w) for w in written))) == sorted(names)
    src = tmp_path / "src"
    src.mkdir()
    for k in range(len(names)):
        Image.fromarray(np.full((30, 40, 3), 40 * k, np.uint8)).save(src / f"{k}.jpg")
    out = OutputDir(str(tmp_path / "tars" / "out"), identity={"model": "tiny:x", "settings_hash": "h"})
    synthetic_shard(out, "sa_1", names, uris=[str(src / f"{k}.jpg") for k in range(len(names))])
    assert export_shards(str(tmp_path / "tars" / "out"), str(tmp_path / "tars" / "dest"), "sa1b-tar").images == 6
    with tarfile.open(tmp_path / "tars" / "dest" / "sa_1.tar") as tar:
        members = tar.getnames()
    assert len(set(members)) == 12 and not any(m.startswith("/") or ".." in m.split("/") or "//" in m for m in members)
    (tmp_path / "keep.json").write_text("{}")
    export = ExportDest(str(dest))
    with caplog.at_level(logging.WARNING, logger="pipeline.export"):
        paths = export.files_to_remove("sa1b-json", "sa_1", ["a/b.jpg.json", "../../../keep.json", "/keep.json"])
    assert paths == [export.file_path("sa1b-json", "sa_1", "a/b.jpg.json")] and "Not removing 2 file(s)" in caplog.text


# -- exports at scale: one pass per source tar, resumable, incremental, failures recorded -----

def synthetic_shard(out, shard_id, names, masks_per_image=2, uris=None, errors=()):
    """A completed shard of ``names`` (ok, ``masks_per_image`` box masks each, except ``errors``)
    written straight into ``out``; returns its mask rows."""
    from pipeline.shards import Shard

    uris = list(uris or [f"/src/{shard_id}/{n}" for n in names])
    images, rows = [], []
    for k, (name, uri) in enumerate(zip(names, uris)):
        image_id = f"{shard_id}/{name}"
        if name in errors:
            images.append(dict(image_id=image_id, uri=uri, shard=shard_id, status="error", error_reason="corrupt",
                               error_detail="bad bytes", mask_count=0))
            continue
        for j in range(masks_per_image):
            m = np.zeros((30, 40), np.uint8, order="F")
            m[j : j + 5 + k, 3 : 9 + j] = 1
            rle = mask_utils.encode(m)
            rows.append(dict(image_id=image_id, mask_id=j, counts=rle["counts"].decode(), height=30, width=40,
                             area=int(m.sum()), bbox=[3.0, float(j), 6.0 + j, 5.0 + k], predicted_iou=0.9,
                             stability_score=0.95, point_coords=[4.0, 5.0], crop_box=[0.0, 0.0, 40.0, 30.0],
                             model="tiny:x", settings_hash="h"))
        images.append(dict(image_id=image_id, uri=uri, shard=shard_id, width=40, height=30,
                           mask_count=masks_per_image, status="ok"))
    out.write_shard(Shard(shard_id, "files", tuple(uris), "/src"), rows, images)
    return rows


def export_ids(dest):
    """{file: (image id, [annotation ids])} of an SA-1B JSON export."""
    return {str(p.relative_to(dest)): (d["image"]["image_id"], [a["id"] for a in d["annotations"]])
            for p in exported_json(dest) for d in [read_sa1b_json(str(p))]}


def test_sa1b_json_export_resumes_and_grows_without_changing_ids(tmp_path, capsys, monkeypatch):
    """A second export does nothing; shards added to the tables since are exported alone with
    ids after every id given before; a shard redone by the run (its marker changed) is exported
    again with its ids, and the file of an image that is no longer ok is removed."""
    out = OutputDir(str(tmp_path / "out"), identity={"model": "tiny:x", "settings_hash": "h"})
    synthetic_shard(out, "files-00000", ["a.jpg", "b.jpg"])
    synthetic_shard(out, "files-00002", ["e.jpg"], masks_per_image=3)
    dest = tmp_path / "sa1b"
    args = ["--tables", str(tmp_path / "out"), "--format", "sa1b-json", "--dest", str(dest)]
    assert export_main(args) == 0
    first = export_ids(dest)
    assert first == {"files-00000/a.json": (0, [0, 1]), "files-00000/b.json": (1, [2, 3]),
                     "files-00002/e.json": (2, [4, 5, 6])}
    stamps = {p: p.stat().st_mtime_ns for p in exported_json(dest)}
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # the same tables spelled another way are the same tables
    assert export_main(["--tables", "./out/", "--format", "sa1b-json", "--dest", str(dest)]) == 0
    assert "0 shards exported, 2 unchanged" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in exported_json(dest)} == stamps  # nothing rewritten

    synthetic_shard(out, "files-00001", ["c.jpg", "d.jpg"])  # grew in the gap (sorted before files-00002)
    assert export_main(args) == 0
    assert "1 shards exported, 2 unchanged" in capsys.readouterr().out
    grown = export_ids(dest)
    assert {k: v for k, v in grown.items() if k in first} == first
    assert grown["files-00001/c.json"] == (3, [7, 8]) and grown["files-00001/d.json"] == (4, [9, 10])

    synthetic_shard(out, "files-00000", ["a.jpg", "b.jpg"], errors={"b.jpg"})  # redone: b failed this time
    assert export_main(args) == 0
    assert "1 shards exported, 2 unchanged" in capsys.readouterr().out
    redone = export_ids(dest)
    assert "files-00000/b.json" not in redone and redone["files-00000/a.json"] == first["files-00000/a.json"]
    assert {k: v for k, v in redone.items() if k != "files-00000/a.json"} == {
        k: v for k, v in grown.items() if not k.startswith("files-00000/")}

    # Another format into the same folder is refused; --overwrite numbers afresh in shard order.
    assert export_main(["--tables", str(tmp_path / "out"), "--format", "sa1b-tar", "--dest", str(dest)]) == 2
    assert "holds a sa1b-json export" in capsys.readouterr().err
    assert export_main(args + ["--overwrite"]) == 0
    assert export_ids(dest) == {"files-00000/a.json": (0, [0, 1]), "files-00001/c.json": (1, [2, 3]),
                                "files-00001/d.json": (2, [4, 5]), "files-00002/e.json": (3, [6, 7, 8])}


def test_prune_removes_the_exports_of_shards_the_tables_no_longer_hold(tmp_path, capsys, caplog):
    """Tables redone into other shards (a run with --overwrite) leave exported shards they no
    longer hold: an export keeps their files with a warning, and --prune removes them (also the
    folders a JSON export made) while their ids stay reserved; a shard of that name that comes
    back is exported again with its ids."""
    from PIL import Image

    for name in ("a.jpg", "b.jpg", "cam1/c.jpg", "cam1/d.jpg", "e.jpg", "x.jpg"):
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "src" / name)
    out = OutputDir(str(tmp_path / "out"), identity={"model": "tiny:x", "settings_hash": "h"})
    shard = lambda shard_id, names: synthetic_shard(out, shard_id, names,  # noqa: E731
                                                   uris=[str(tmp_path / "src" / n) for n in names])
    shard("files-00000", ["a.jpg", "b.jpg"])
    shard("files-00001", ["cam1/c.jpg", "cam1/d.jpg"])
    shard("files-00003", ["x.jpg"])
    dest, tars = tmp_path / "sa1b", tmp_path / "tars"
    args = ["--tables", str(tmp_path / "out"), "--format", "sa1b-json", "--dest", str(dest)]
    assert export_main(args) == 0
    assert export_main(["--tables", str(tmp_path / "out"), "--format", "sa1b-tar", "--dest", str(tars)]) == 0
    assert sorted(export_ids(dest)) == ["files-00000/a.json", "files-00000/b.json", "files-00001/cam1/c.json",
                                        "files-00001/cam1/d.json", "files-00003/x.json"]
    (dest / "files-00003" / "notes.txt").write_text("the user's")  # not the export's: kept

    out.clear()  # redone from an input that changed: files-00001 and -00003 are no more, files-00002 is new
    shard("files-00000", ["a.jpg"])
    shard("files-00002", ["e.jpg"])
    capsys.readouterr()
    assert export_main(args) == 0
    assert "2 shards exported into" in caplog.text and "--prune removes them" in caplog.text
    assert "2 shards exported, 0 unchanged" in capsys.readouterr().out
    assert "files-00001/cam1/c.json" in export_ids(dest)  # kept, with a warning
    caplog.clear()
    assert export_main(args + ["--prune"]) == 0
    text = capsys.readouterr().out
    assert "0 shards exported, 2 unchanged" in text and "removed the files of 2 shards" in text
    assert export_ids(dest) == {"files-00000/a.json": (0, [0, 1]), "files-00002/e.json": (5, [10, 11])}
    assert not (dest / "files-00001").exists() and (dest / "files-00003" / "notes.txt").exists()
    assert "no longer in the tables" not in caplog.text
    tombstone = json.loads((dest / ".export" / "files-00001.json").read_text())
    assert tombstone["pruned"] and tombstone["files"] == [] and tombstone["first_image"] == 2
    assert export_main(args + ["--prune"]) == 0  # nothing more to remove
    assert "removed" not in capsys.readouterr().out

    shard("files-00001", ["cam1/c.jpg"])  # the shard comes back: its ids again
    assert export_main(args) == 0
    assert export_ids(dest)["files-00001/cam1/c.json"] == (2, [4, 5])

    tar_args = ["--tables", str(tmp_path / "out"), "--format", "sa1b-tar", "--dest", str(tars)]
    out.clear()
    shard("files-00000", ["a.jpg"])
    assert export_main(tar_args + ["--prune", "--overwrite"]) == 0  # pruned before the markers are cleared
    assert sorted(p.name for p in tars.iterdir()) == [".export", "files-00000.tar"]
    assert sorted(p.name for p in (tars / ".export").glob("*.json")) == ["files-00000.json"]
    with pytest.raises(SystemExit) as exit_:
        export_main(["--tables", str(tmp_path / "out"), "--format", "coco", "--dest", str(tmp_path / "c.json"),
                     "--prune"])
    assert exit_.value.code == 2
    assert "--prune applies to sa1b-json and sa1b-tar" in capsys.readouterr().err


def test_sa1b_tar_export_reads_each_source_tar_once(tmp_path, monkeypatch):
    """The images of a tar input are copied from one pass over their tar, not one pass from its
    start per image (quadratic: an SA-1B tar of ~11k images would be read ~5k times over)."""
    import fsspec

    src = tmp_path / "sa_000001.tar"
    names = [f"sa_{i}.jpg" for i in range(6)]
    blobs = {}
    with tarfile.open(src, "w") as tar:
        for i, name in enumerate(names):
            buf = io.BytesIO()
            from PIL import Image

            Image.fromarray(np.full((30, 40, 3), 40 * i, np.uint8)).save(buf, format="JPEG")
            blobs[name] = buf.getvalue()
            info = tarfile.TarInfo(name)
            info.size = len(blobs[name])
            tar.addfile(info, io.BytesIO(blobs[name]))
    out = OutputDir(str(tmp_path / "out"), identity={"model": "tiny:x", "settings_hash": "h"})
    synthetic_shard(out, "sa_000001", names, uris=[f"{src}#{n}" for n in names], errors={"sa_2.jpg"})
    opened = []
    real_open = fsspec.open
    monkeypatch.setattr(fsspec, "open", lambda uri, *a, **k: opened.append(uri) or real_open(uri, *a, **k))
    dest = tmp_path / "tars"
    assert export_main(["--tables", str(tmp_path / "out"), "--format", "sa1b-tar", "--dest", str(dest)]) == 0
    assert opened == [str(src)]
    with tarfile.open(dest / "sa_000001.tar") as tar:
        got = {n: tar.extractfile(n).read() for n in tar.getnames() if n.endswith(".jpg")}
    assert got == {n: blobs[n] for n in names if n != "sa_2.jpg"}  # byte for byte, the error row left out


def test_export_records_a_failed_shard_and_goes_on(tmp_path, capsys):
    """A source image gone since the run fails its shard's tar (no partial tar, no marker) with
    the reason in the summary and rc 1; the other shards are exported; once the image is back,
    the next export does that shard alone."""
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg"]):
        Image.fromarray(np.full((30, 40, 3), 50 * i, np.uint8)).save(src / name)
    out = OutputDir(str(tmp_path / "out"), identity={"model": "tiny:x", "settings_hash": "h"})
    synthetic_shard(out, "files-00000", ["a.jpg", "b.jpg"], uris=[str(src / "a.jpg"), str(src / "b.jpg")])
    synthetic_shard(out, "files-00001", ["c.jpg"], uris=[str(src / "c.jpg")])
    (src / "b.jpg").rename(tmp_path / "b.jpg")
    dest = tmp_path / "tars"
    args = ["--tables", str(tmp_path / "out"), "--format", "sa1b-tar", "--dest", str(dest)]
    assert export_main(args) == 1
    text = capsys.readouterr().out
    assert "1 shards exported, 0 unchanged since an earlier export, 1 failed" in text
    assert f"failed: files-00000: OSError: source image {src / 'b.jpg'} could not be read: FileNotFoundError" in text
    assert sorted(p.name for p in dest.iterdir()) == [".export", "files-00001.tar"]
    assert sorted(p.name for p in (dest / ".export").glob("*.json")) == ["files-00001.json"]
    Image.fromarray(np.zeros((30, 41, 3), np.uint8)).save(src / "b.jpg")  # another image under its name
    assert export_main(args) == 1
    assert f"source image {src / 'b.jpg'} is 41x30 now, 40x30 when its masks were made" in capsys.readouterr().out
    assert not (dest / "files-00000.tar").exists()
    (tmp_path / "b.jpg").rename(src / "b.jpg")
    assert export_main(args) == 0
    assert "1 shards exported, 1 unchanged" in capsys.readouterr().out
    with tarfile.open(dest / "files-00000.tar") as tar:
        assert tar.getnames() == ["a.jpg", "a.json", "b.jpg", "b.json"]


def test_export_refuses_tables_that_disagree_with_themselves(tmp_path, capsys):
    """Mask rows of an image the images table does not list as ok would be dropped by an export
    that walks the images: the shard fails, naming the image, instead."""
    out = OutputDir(str(tmp_path / "out"), identity={"model": "tiny:x", "settings_hash": "h"})
    rows = synthetic_shard(out, "files-00000", ["a.jpg", "b.jpg"])
    images = out.read_shard("images", "files-00000").to_pylist()
    from pipeline.shards import Shard

    out.write_shard(Shard("files-00000", "files", ("/src/a.jpg", "/src/b.jpg"), "/src"), rows + [
        dict(rows[0], image_id="files-00000/ghost.jpg")], images)
    assert export_main(["--tables", str(tmp_path / "out"), "--format", "sa1b-json", "--dest", str(tmp_path / "j")]) == 1
    assert "'files-00000/ghost.jpg', which is not an ok image of the shard" in capsys.readouterr().out


def test_coco_export_streams_every_shard(tmp_path):
    """COCO ids count from 1 across shards in shard and file order, every mask once."""
    out = OutputDir(str(tmp_path / "out"), identity={"model": "tiny:x", "settings_hash": "h"})
    expected = []
    for i in range(5):
        expected += synthetic_shard(out, f"files-{i:05d}", [f"{i}a.jpg", f"{i}b.jpg", f"{i}c.jpg"],
                                    masks_per_image=i, errors={f"{i}b.jpg"})
    dest = tmp_path / "coco.json"
    assert export_main(["--tables", str(tmp_path / "out"), "--format", "coco", "--dest", str(dest),
                        "--workers", "2"]) == 0
    doc = json.loads(dest.read_text())
    assert [img["file_name"] for img in doc["images"]] == [f"files-{i:05d}/{i}{c}.jpg" for i in range(5) for c in "ac"]
    assert [img["id"] for img in doc["images"]] == list(range(1, 11))
    assert [a["id"] for a in doc["annotations"]] == list(range(1, len(expected) + 1))
    by_id = {img["id"]: img["file_name"] for img in doc["images"]}
    assert [(by_id[a["image_id"]], a["segmentation"]["counts"]) for a in doc["annotations"]] == [
        (r["image_id"], r["counts"]) for r in expected]
    # A masks file over the read-ahead bound is not read ahead, then streamed: the same rows.
    assert out.masks_file("files-00004", max_bytes=1) is None
    assert list(out.iter_masks("files-00004")) == list(out.iter_masks("files-00004", out.masks_file("files-00004")))


def test_hidden_folders_are_not_inputs(tmp_path, monkeypatch):
    """An export's .export/ markers (or a .git folder) inside an input folder are not images:
    locally (walked a directory entry at a time, hidden folders not entered: fsspec's whole
    find/ls not called) and on a filesystem listed with its find (memory://), in sorted order. A
    folder whose name a glob would read as a pattern is listed as the folder it is."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.storage import list_files, list_input

    files = ("a.jpg", ".b.jpg", "sub/c.jpg", ".export/files-00000.json", "sub/.git/x", "a/z.jpg", "a.b/y.jpg")
    expected = ["a.b/y.jpg", "a.jpg", "a/z.jpg", "sub/c.jpg"]  # as strings sort: "." < "/"
    memory = fsspec.filesystem("memory")
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
        memory.pipe_file(f"/in/{rel}", b"x")

    def whole(*args, **kwargs):
        raise AssertionError("a whole listing was built")

    with monkeypatch.context() as m:
        m.setattr(LocalFileSystem, "find", whole)
        m.setattr(LocalFileSystem, "ls", whole)
        listing = list_input(str(tmp_path))
    assert list(listing.fingerprints) == [str(tmp_path / rel) for rel in expected] and listing.folder == str(tmp_path)
    stat = (tmp_path / "a.jpg").stat()
    assert listing.fingerprints[str(tmp_path / "a.jpg")] == f"{stat.st_size}:{stat.st_mtime}"  # as fsspec's listing
    assert list_files("memory://in") == [f"memory:///in/{rel}" for rel in expected]
    (tmp_path / "photos [2024]" / "x").mkdir(parents=True)  # a name a glob would read as a pattern, matching nothing
    (tmp_path / "photos [2024]" / "x" / "a.jpg").write_bytes(b"x")
    assert list_input(str(tmp_path / "photos [2024]")).folder == str(tmp_path / "photos [2024]")
    assert list_files(str(tmp_path / "photos [2024]" / "x" / "a.jpg")) == [str(tmp_path / "photos [2024]" / "x" / "a.jpg")]
    assert list_files(str(tmp_path / "photos [[]2024]" / "*" / "*.jpg")) == [str(tmp_path / "photos [2024]" / "x" / "a.jpg")]


def test_linked_folders_of_a_local_input_are_followed_once(tmp_path, caplog):
    """A symlink to a folder (a dataset assembled from links to camera folders) is listed as a
    folder, its images named by their path through the link, not taken for one unreadable file;
    a link back into a folder it lies in is not followed (logged); a broken link is a file that
    is missing (an images row says so)."""
    from pipeline.shards import discover_shards, iter_shard_files, read_error_reason

    (tmp_path / "cameras" / "cam1").mkdir(parents=True)
    (tmp_path / "cameras" / "cam1" / "a.jpg").write_bytes(b"a")
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "own.jpg").write_bytes(b"o")
    (inputs / "cam1").symlink_to(tmp_path / "cameras" / "cam1")
    (inputs / "back").symlink_to(inputs)
    (inputs / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with caplog.at_level(logging.WARNING, logger="pipeline.storage"):
        (shard,) = discover_shards(str(inputs), 8)
    assert "Not following" in caplog.text and str(inputs / "back") in caplog.text
    read = {name: (data, error and read_error_reason(error)) for name, _, data, error, _ in iter_shard_files(shard)}
    assert read == {"cam1/a.jpg": (b"a", None), "gone.jpg": (None, "missing"), "own.jpg": (b"o", None)}


def test_export_on_ray_equals_the_threaded_export(ray_local, tmp_path):
    """``--ray`` runs each shard's export as a Ray task: the same tars and markers as threads of
    one process, and a shard that fails is recorded with its exception while the rest are done."""
    from PIL import Image

    from pipeline.export import export_shards

    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(["a.jpg", "b.png", "c.jpg", "d.jpg"]):
        Image.fromarray(np.full((30, 40, 3), 50 * i, np.uint8)).save(src / name)
    out = OutputDir(str(tmp_path / "out"), identity={"model": "tiny:x", "settings_hash": "h"})
    for k, names in enumerate([["a.jpg", "b.png"], ["c.jpg"], ["d.jpg", "gone.jpg"]]):
        synthetic_shard(out, f"files-{k:05d}", names, uris=[str(src / n) for n in names])
    threads = export_shards(str(tmp_path / "out"), str(tmp_path / "threads"), "sa1b-tar")
    ray_run = export_shards(str(tmp_path / "out"), str(tmp_path / "ray"), "sa1b-tar", on_ray=True, workers=2)
    for summary in (threads, ray_run):
        assert (summary.shards_exported, summary.images, sorted(summary.failed)) == (2, 3, ["files-00002"])
        assert "could not be read: FileNotFoundError" in summary.failed["files-00002"]
    for name in ["files-00000.tar", "files-00001.tar", ".export/files-00000.json", ".export/files-00001.json"]:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "threads" / name).read_bytes()
    assert not (tmp_path / "ray" / "files-00002.tar").exists()


def test_a_second_export_into_one_destination_is_refused(tmp_path, capsys):
    """Two exports into one --dest would write the same files at once: while one holds the
    destination's lease, another stops with rc 1 and names it; the lease is gone afterwards."""
    from pipeline.export import EXPORT_MARKERS, ExportDest
    from pipeline.lease import RunLease

    out = OutputDir(str(tmp_path / "out"), identity={"model": "tiny:x", "settings_hash": "h"})
    synthetic_shard(out, "files-00000", ["a.jpg"])
    dest = ExportDest(str(tmp_path / "sa1b"))
    args = ["--tables", str(tmp_path / "out"), "--format", "sa1b-json", "--dest", str(tmp_path / "sa1b")]
    with RunLease(dest.fs, f"{dest.path}/{EXPORT_MARKERS}/lease", settle_s=0.0):
        assert export_main(args) == 1
        assert "Another run is writing into this output" in capsys.readouterr().err
    assert export_main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "sa1b" / ".export").iterdir()) == ["files-00000.json", "lease"]
    assert list((tmp_path / "sa1b" / ".export" / "lease").iterdir()) == []


def test_an_export_stopped_by_sigterm_finishes_the_shard_it_is_on_and_starts_no_other(tmp_path, capsys, monkeypatch):
    """SIGTERM (or Ctrl-C) during an export: the shard being exported is finished, the queued
    ones are not started, the destination's lease is released, exit status 143; the next export
    goes on with the shards not marked."""
    import os
    import signal
    import time

    import pipeline.export

    out = OutputDir(str(tmp_path / "out"), identity={"model": "tiny:x", "settings_hash": "h"})
    for i in range(3):
        synthetic_shard(out, f"files-0000{i}", [f"{i}.jpg"])
    exported = []
    export_one = pipeline.export._export_one

    def stopped_midway(tables, dest, fmt, plan, *rest):
        exported.append(plan.shard_id)
        if len(exported) == 1:  # the main thread, waiting for the queued shards, is stopped
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
        return export_one(tables, dest, fmt, plan, *rest)

    monkeypatch.setattr(pipeline.export, "_export_one", stopped_midway)
    args = ["--tables", str(tmp_path / "out"), "--format", "sa1b-json", "--dest", str(tmp_path / "sa1b"),
            "--workers", "1"]
    assert export_main(args) == 143
    assert "error: the export was stopped by SIGTERM; the shards it completed are kept" in capsys.readouterr().err
    assert exported == ["files-00000"]
    assert list((tmp_path / "sa1b" / ".export" / "lease").iterdir()) == []
    monkeypatch.undo()
    assert export_main(args) == 0
    assert sorted(p.name for p in (tmp_path / "sa1b" / ".export").iterdir()) == [
        "_index.parquet", "files-00000.json", "files-00001.json", "files-00002.json", "lease"]


def test_stats_of_more_masks_than_a_sample_holds(tmp_path, monkeypatch, capsys):
    """Beyond ``SAMPLE_ROWS`` rows, quantiles come from a uniform sample (said in the report)
    while counts, means, minima and maxima stay exact, so memory is bounded for any output."""
    import pipeline.stats
    from jobs.stats import main as stats_main

    out = OutputDir(str(tmp_path / "out"), identity={"model": "tiny:x", "settings_hash": "h"})
    rows = []
    for k in range(6):
        rows += synthetic_shard(out, f"files-{k:05d}", [f"{k}{c}.jpg" for c in "abcd"], masks_per_image=5)
    monkeypatch.setattr(pipeline.stats, "SAMPLE_ROWS", 40)
    assert stats_main(["--tables", str(tmp_path / "out"), "--json", str(tmp_path / "s.json")]) == 0
    assert "from a uniform sample of 40 rows" in capsys.readouterr().out
    area = json.loads((tmp_path / "s.json").read_text())["masks"]["area"]
    exact = np.array([r["area"] for r in rows], dtype=np.float64)
    assert (area["count"], area["sampled"]) == (120, 40)
    assert area["mean"] == pytest.approx(exact.mean()) and (area["min"], area["max"]) == (exact.min(), exact.max())
    assert exact.min() <= area["p5"] <= area["median"] <= area["p95"] <= exact.max()
    assert np.quantile(exact, 0.05) <= area["median"] <= np.quantile(exact, 0.95)
