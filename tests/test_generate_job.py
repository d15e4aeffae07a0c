"""Image decoding with reasons for every bad input, and the single-machine (no Ray) runner."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import decode
from pipeline.decode import ImageDecodeError, decode_image, heif_brand, heif_plugin
from pipeline.storage import list_files
from pipeline.single_machine import SAMPLE_IMAGES, run_single_machine
from sam_core import SamAutomaticMaskGenerator, build_sam
from sam_core.amg.sa1b import read_sa1b_json


def encoded(arr_or_img, fmt="PNG", **kw) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


RGB = (np.arange(12 * 20 * 3) % 251).astype(np.uint8).reshape(12, 20, 3)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1"])
def test_modes_become_rgb(mode):
    img = Image.fromarray(RGB).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_image(encoded(img, fmt))
    assert out.shape == (12, 20, 3) and out.dtype == np.uint8


def test_16_bit_is_scaled():
    arr = np.full((4, 5), 65535, np.uint16)
    arr[0, 0] = 0
    out = decode_image(encoded(Image.fromarray(arr)))
    assert out.shape == (4, 5, 3) and out[1, 1, 0] == 255 and out[0, 0, 0] == 0


def test_exif_orientation_is_applied():
    img = Image.fromarray(RGB)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(encoded(img, "JPEG", exif=exif))
    assert out.shape == (20, 12, 3)


@pytest.mark.parametrize("size, short_side, expected", [
    ((4000, 3000), 1500, (2000, 1500)), ((3000, 4000), 1500, (1500, 2000)), ((2250, 1500), 1500, (2250, 1500)),
    ((1000, 800), 1500, (1000, 800)), ((1001, 333), 100, (301, 100)), ((640, 480), None, (640, 480)),
])
def test_resized_size(size, short_side, expected):
    from pipeline.decode import resized_size

    assert resized_size(*size, short_side) == expected


def test_downsampling_follows_exif_orientation():
    """The shorter side is the upright image's: EXIF rotation first, then the downsampling."""
    img = Image.fromarray(np.zeros((40, 100, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encoded(img, "JPEG", exif=exif), short_side=20)
    assert out.shape == (50, 20, 3)
    assert decode_image(encoded(img, "PNG"), short_side=50).shape == (40, 100, 3)  # never enlarged


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"hello, not an image", "not_an_image"),
        (encoded(RGB, "PNG")[:60], "corrupt"),
    ],
    ids=["empty", "text", "truncated"],
)
def test_bad_inputs_have_reasons(data, reason):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert err.value.reason == reason


def heic(img: Image.Image, **kw) -> bytes:
    """``img`` as a HEIC file (pillow-heif's encoder; registering its opener lets PIL write it)."""
    assert heif_plugin(), "pillow-heif is a test dependency"
    return encoded(img, "HEIF", **kw)


def test_heic_photos_are_read_upright():
    """HEIF/HEIC (phone photos) through the pillow-heif plugin, EXIF orientation applied as for a JPEG."""
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :20] = 255  # a white band on the left; orientation 6: upright, it is the top
    exif = Image.Exif()
    exif[0x0112] = 6
    data = heic(Image.fromarray(arr), exif=exif.tobytes(), quality=95)
    assert heif_brand(data) == "heic"
    upright = decode_image(data)
    assert upright.shape == (80, 40, 3)
    assert upright[:15].min() > 200 and upright[25:].max() < 55
    assert decode_image(data, short_side=20).shape == (40, 20, 3)


def test_heic_without_its_plugin_says_what_to_install(monkeypatch):
    """A worker without pillow-heif records a HEIC as ``unsupported_format``, naming the fix (not
    "no image format recognised"); other ISO media files (AVIF, which PIL reads) are not HEIF."""
    data = heic(Image.fromarray(RGB))
    monkeypatch.setattr(decode, "heif_plugin", lambda: False)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert err.value.reason == "unsupported_format"
    assert "brand 'heic'" in err.value.detail and "pip install 'sam-datagen[heif]'" in err.value.detail
    # A compatible brand counts as well as the major one (an 'mif1' file of HEVC images).
    assert heif_brand(b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic") == "heic"
    assert heif_brand(b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1miaf") is None
    avif = encoded(Image.fromarray(RGB), "AVIF")
    assert heif_brand(avif) is None and decode_image(avif).shape == (12, 20, 3)


def test_pixel_limit():
    with pytest.raises(ImageDecodeError) as err:
        decode_image(encoded(RGB), max_pixels=100)
    assert err.value.reason == "too_large"


def test_float_images_are_refused():
    with pytest.raises(ImageDecodeError) as err:
        decode_image(encoded(Image.fromarray(np.zeros((3, 3), np.float32)), "TIFF"))
    assert err.value.reason == "unsupported_mode"


def test_list_files_keeps_non_images(tmp_path):
    (tmp_path / "a.png").write_bytes(encoded(RGB))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden").write_text("x")
    assert [p.rsplit("/", 1)[-1] for p in list_files(str(tmp_path))] == ["a.png", "notes.txt"]
    with pytest.raises(FileNotFoundError):
        list_files(str(tmp_path / "missing" / "*.jpg"))


def test_single_machine_runner_on_samples_and_bad_files(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg"):
        (inputs / name).write_bytes(open(f"{SAMPLE_IMAGES}/{name}", "rb").read())
    jpeg = (inputs / "coffee.jpg").read_bytes()
    (inputs / "broken.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (inputs / "empty.png").write_bytes(b"")
    (inputs / "notes.txt").write_text("not an image")
    (inputs / "more").mkdir()  # the same file name in a subfolder: its own file, not an overwrite
    (inputs / "more" / "coffee.jpg").write_bytes(open(f"{SAMPLE_IMAGES}/chelsea.jpg", "rb").read())
    frames = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    frames[0].save(inputs / "anim.gif", save_all=True, append_images=frames[1:])  # masked on its first frame
    out = tmp_path / "out"
    torch.manual_seed(0)
    generator = SamAutomaticMaskGenerator(build_sam("tiny"), points_per_side=4, pred_iou_thresh=0,
                                          stability_score_thresh=0, box_nms_thresh=1.0,
                                          output_mode="coco_rle")
    result = run_single_machine(str(inputs), str(out), generator)
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.as_dict()))
    assert summary["images_ok"] == 4 and summary["images_error"] == 3
    assert sorted(e["reason"] for e in summary["errors"]) == ["corrupt", "empty", "not_an_image"]
    doc = read_sa1b_json(str(out / "coffee.json"))
    assert doc["image"]["file_name"] == "coffee.jpg" and doc["image"]["width"] == 512
    assert len(doc["annotations"]) == summary["masks"] // 4 > 0  # no filters: every candidate stays
    other = read_sa1b_json(str(out / "more" / "coffee.json"))
    assert other["image"]["file_name"] == "more/coffee.jpg" and other["image"]["width"] == 451  # chelsea's pixels
    assert summary["images_first_frame_only"] == 1
    assert summary["first_frame_only"] == [{"uri": str(inputs / "anim.gif"), "frames": 2}]
    printed = str(result)
    assert "images ok: 4, errors: 3" in printed and "broken.jpg: corrupt" in printed
    assert "1 image has several frames or pages: only the first of each was masked" in printed
    assert "first frame only: " + str(inputs / "anim.gif") + " (2 frames)" in printed


def test_single_machine_run_reads_tars_and_keeps_every_image_apart(tmp_path):
    """An image "summary.jpg" at the input's top would be written as summary.json, then
    overwritten by the run's summary: its masks get a file of their own. "12::30.jpg" (which
    fsspec alone takes for a chain of filesystems) is written as 12::30.json. A tar's members are
    read and written under its shard's name (``sa_000000/a.json``), as an export has them; a
    loose ``sa_000000/a.jpg`` there too keeps that stem, the member gets its whole name."""
    inputs = tmp_path / "in"
    (inputs / "sa_000000").mkdir(parents=True)
    coffee, chelsea = (open(f"{SAMPLE_IMAGES}/{n}.jpg", "rb").read() for n in ("coffee", "chelsea"))
    (inputs / "summary.jpg").write_bytes(coffee)
    (inputs / "12::30.jpg").write_bytes(chelsea)
    (inputs / "sa_000000" / "a.jpg").write_bytes(chelsea)
    with tarfile.open(inputs / "sa_000000.tar", "w") as tar:
        for name, data in (("a.jpg", coffee), ("b.jpg", b"not a jpeg")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    torch.manual_seed(0)
    generator = SamAutomaticMaskGenerator(build_sam("tiny"), points_per_side=2, pred_iou_thresh=0,
                                          stability_score_thresh=0, output_mode="coco_rle")
    result = run_single_machine(str(inputs), str(out), generator)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_ok"] == 4 == result.images_ok and summary["images_error"] == 1
    assert summary["errors"][0]["uri"] == f"{inputs / 'sa_000000.tar'}#b.jpg"
    (doc_file,) = out.glob("summary-*.json")
    doc = read_sa1b_json(str(doc_file))
    other = json.loads((out / "12::30.json").read_text())
    assert doc["image"]["file_name"] == "summary.jpg" and other["image"]["file_name"] == "12::30.jpg"
    loose, member = (json.loads((out / "sa_000000" / f).read_text()) for f in ("a.json", "a.jpg.json"))
    assert loose["image"]["file_name"] == "sa_000000/a.jpg" and loose["image"]["width"] == 451  # chelsea
    assert member["image"]["file_name"] == "a.jpg" and member["image"]["width"] == 512  # coffee, from the tar
    docs = (doc, other, loose, member)
    assert sum(len(d["annotations"]) for d in docs) == result.masks and all(d["annotations"] for d in docs)


@pytest.mark.parametrize("argv, expected", [
    ([], None),  # the official generator's default: no such filter
    (["--preset", "sa1b"], 0.95),  # the SA-1B release
    (["--preset", "sa1b", "--max-mask-area-fraction", "none"], None),
    (["--max-mask-area-fraction", "0.9"], 0.9),
])
def test_max_mask_area_fraction_flag(argv, expected):
    from jobs.generate import config_from_args, parse_args

    cfg = config_from_args(parse_args(["--output", "o", *argv]))
    assert cfg.resolved_generator_settings()["max_mask_area_fraction"] == expected
    assert ("max_mask_area_fraction" in cfg.mask_settings()) == bool(argv)  # part of the output's identity


def test_model_id_names_the_folder_of_a_hugging_face_file():
    from pipeline.config import model_id

    assert model_id("vit_h", "s3://b/models/sam_vit_h_4b8939.pth", 0) == "vit_h:sam_vit_h_4b8939.pth"
    assert model_id("vit_h", "/hub/sam-vit-huge/model.safetensors", 0) == "vit_h:sam-vit-huge/model.safetensors"
    assert model_id("vit_b", "pytorch_model.bin", 0) == "vit_b:pytorch_model.bin"
    assert model_id("tiny", None, 3) == "tiny:random-seed3"
