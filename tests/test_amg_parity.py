"""Our automatic mask generator against the official one: identical records on identical weights.

The model under test uses the reference attention backend, which repeats the official arithmetic
op for op, so "identical" means bit-identical masks and scores, in the same order.
"""

from __future__ import annotations

import numpy as np
import pytest
from segment_anything import SamAutomaticMaskGenerator as OfficialGenerator

from sam_core import SamAutomaticMaskGenerator

from .conftest import assert_records_identical, official_sam, ours_from, photo, sharpen

RELAXED = dict(box_nms_thresh=1.0, pred_iou_thresh=0.8, stability_score_thresh=0.8)


@pytest.fixture(scope="module")
def as_is():
    official = official_sam("tiny", perturb=0.0)
    return official, ours_from(official, "tiny", attention_backend="reference")


@pytest.fixture(scope="module")
def sharpened():
    official = sharpen(official_sam("tiny", perturb=0.0))
    return official, ours_from(official, "tiny", attention_backend="reference")


def run_both(models, image, **kwargs):
    official, ours = models
    expected = OfficialGenerator(official, **kwargs).generate(image)
    got = SamAutomaticMaskGenerator(ours, **kwargs).generate(image)
    assert_records_identical(expected, got)
    return got


def test_random_weights_as_is_nothing_survives(as_is):
    assert run_both(as_is, photo("coffee"), points_per_side=8) == []


def test_random_weights_with_crops_do_not_crash(as_is):
    """The official generator raises IndexError when no mask survives with crop layers."""
    official, ours = as_is
    image = photo("astronaut", (301, 451))
    with pytest.raises(IndexError):
        OfficialGenerator(official, points_per_side=4, crop_n_layers=1).generate(image)
    assert SamAutomaticMaskGenerator(ours, points_per_side=4, crop_n_layers=1).generate(image) == []


@pytest.mark.parametrize(
    "name, size, kwargs",
    [
        ("coffee", None, dict(points_per_side=8)),
        ("astronaut", (301, 451), dict(points_per_side=6, points_per_batch=7, **RELAXED)),
        ("chelsea", (57, 83), dict(points_per_side=5, **RELAXED)),
        ("astronaut", (301, 451), dict(points_per_side=4, crop_n_layers=1, **RELAXED)),
        ("chelsea", (233, 177), dict(points_per_side=4, crop_n_layers=2, crop_n_points_downscale_factor=2,
                                     **RELAXED)),
        ("coffee", None, dict(points_per_side=4, crop_n_layers=1, min_mask_region_area=100, **RELAXED)),
        ("coffee", None, dict(points_per_side=6, min_mask_region_area=500, box_nms_thresh=0.7)),
    ],
    ids=["default", "odd-batches", "small-odd", "crops1", "crops2-downscale",
         "small-regions-crops", "small-regions"],
)
def test_sharpened_records_identical(sharpened, name, size, kwargs):
    got = run_both(sharpened, photo(name, size), **kwargs)
    assert len(got) >= 1


def test_compiled_reductions_records_identical(sharpened):
    """``compile=True`` (stability and boxes as one compiled reduction) over crops of several
    sizes and chunks of 3 masks or fewer: still the official records, bit for bit."""
    official, ours = sharpened
    image = photo("astronaut", (301, 451))
    kwargs = dict(points_per_side=5, crop_n_layers=1, **dict(RELAXED, crop_nms_thresh=1.0))
    expected = OfficialGenerator(official, **kwargs).generate(image)
    got = SamAutomaticMaskGenerator(ours, compile=True, max_chunk_pixels=3 * 301 * 451, **kwargs).generate(image)
    assert_records_identical(expected, got)
    assert len(got) >= 20


def test_many_masks_survive_sharpened(sharpened):
    got = run_both(sharpened, photo("coffee"), points_per_side=8, **RELAXED)
    assert len(got) > 50


def test_custom_point_grids(sharpened):
    rng = np.random.default_rng(0)
    grids = [rng.uniform(0, 1, size=(20, 2)), rng.uniform(0, 1, size=(5, 2))]
    got = run_both(sharpened, photo("astronaut", (301, 451)), points_per_side=None, point_grids=grids,
                   crop_n_layers=1, **RELAXED)
    assert len(got) >= 1


@pytest.mark.parametrize("output_mode", ["uncompressed_rle", "coco_rle"])
def test_output_modes(sharpened, output_mode):
    got = run_both(sharpened, photo("chelsea", (233, 177)), points_per_side=4, output_mode=output_mode,
                   **RELAXED)
    assert got and isinstance(got[0]["segmentation"], dict)


def test_record_types(sharpened):
    rec = SamAutomaticMaskGenerator(sharpened[1], points_per_side=4, **RELAXED).generate(
        photo("chelsea", (233, 177)))[0]
    assert rec["segmentation"].dtype == bool and rec["segmentation"].shape == (233, 177)
    assert isinstance(rec["area"], int)
    assert isinstance(rec["predicted_iou"], float) and isinstance(rec["stability_score"], float)
    assert len(rec["bbox"]) == 4 and len(rec["crop_box"]) == 4
    assert len(rec["point_coords"]) == 1 and len(rec["point_coords"][0]) == 2


@pytest.mark.slow
def test_vit_b_sharpened_records_identical():
    official = sharpen(official_sam("vit_b", perturb=0.0))
    ours = ours_from(official, "vit_b", attention_backend="reference")
    got = run_both((official, ours), photo("astronaut", (301, 451)), points_per_side=4, **RELAXED)
    assert len(got) >= 1


def test_sa1b_preset(sharpened):
    gen = SamAutomaticMaskGenerator.from_preset("sa1b", sharpened[1], points_per_side=4)
    assert gen.crop_n_layers == 2 and gen.crop_n_points_downscale_factor == 2
    assert gen.min_mask_region_area == 100 and gen.pred_iou_thresh == 0.88
    assert [len(g) for g in gen.point_grids] == [16, 4, 1]
    assert gen.max_mask_area_fraction == 0.95
    default = SamAutomaticMaskGenerator.from_preset("sa1b", sharpened[1])
    assert [len(g) for g in default.point_grids] == [1024, 256, 64]
    with pytest.raises(ValueError, match="Unknown preset"):
        SamAutomaticMaskGenerator.from_preset("sa2", sharpened[1])


@pytest.mark.parametrize("crop_n_layers", [0, 1])
def test_masks_covering_most_of_the_image_are_dropped(sharpened, crop_n_layers):
    """max_mask_area_fraction drops candidates covering that fraction of the image or more, and
    only those; with NMS off (IoU 1.0) every other record stays as it was."""
    image = photo("chelsea", (233, 177))
    settings = dict(points_per_side=6, crop_n_layers=crop_n_layers, crop_nms_thresh=1.0, **RELAXED)
    everything = SamAutomaticMaskGenerator(sharpened[1], **settings).generate(image)
    fraction = 0.86
    large = [r for r in everything if r["area"] >= fraction * image.shape[0] * image.shape[1]]
    assert 0 < len(large) < len(everything)  # the test separates something
    got = SamAutomaticMaskGenerator(sharpened[1], max_mask_area_fraction=fraction, **settings).generate(image)
    assert_records_identical([r for r in everything if not any(r is big for big in large)], got)


def test_a_dropped_large_mask_suppresses_nothing(sharpened):
    """With NMS on, a mask dropped for its size is dropped before NMS: a mask it would have
    suppressed is kept."""
    image = photo("chelsea", (233, 177))
    pixels = image.shape[0] * image.shape[1]
    settings = dict(points_per_side=6, pred_iou_thresh=0.8, stability_score_thresh=0.8)  # box NMS 0.7
    everything = SamAutomaticMaskGenerator(sharpened[1], **settings).generate(image)
    assert len(everything) == 1 and everything[0]["area"] > 0.5 * pixels  # it suppressed the rest
    got = SamAutomaticMaskGenerator(sharpened[1], max_mask_area_fraction=0.5, **settings).generate(image)
    assert got and all(r["area"] < 0.5 * pixels for r in got)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(points_per_side=None), "exactly one"),
        (dict(point_grids=[np.zeros((4, 2))]), "exactly one"),
        (dict(output_mode="png"), "output_mode"),
        (dict(mode="turbo"), "mode must be"),
        (dict(points_per_batch=0), "points_per_batch"),
        (dict(points_per_side=None, point_grids=[np.zeros((4, 2))], crop_n_layers=1), "one per layer"),
        (dict(points_per_side=None, point_grids=[np.full((4, 2), 2.0)]), "in \\[0, 1\\]"),
        (dict(max_mask_area_fraction=0.0), "max_mask_area_fraction"),
        (dict(max_mask_area_fraction=1.5), "max_mask_area_fraction"),
    ],
)
def test_bad_settings(as_is, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamAutomaticMaskGenerator(as_is[1], **kwargs)


def test_bad_image(as_is):
    with pytest.raises(ValueError, match="HxWx3"):
        SamAutomaticMaskGenerator(as_is[1]).generate(np.zeros((10, 10), np.uint8))


def test_generate_batch_equals_one_by_one(sharpened):
    """Crops of several images share encoder batches; each image's records stay its own."""
    _, ours = sharpened
    images = [photo("astronaut", (120, 180)), photo("chelsea", (150, 100)), photo("coffee", (90, 135))]
    settings = dict(points_per_side=4, crop_n_layers=1, output_mode="coco_rle", **RELAXED)
    batched = SamAutomaticMaskGenerator(ours, encoder_batch_size=3, **settings).generate_batch(images)
    single = SamAutomaticMaskGenerator(ours, encoder_batch_size=1, **settings)
    assert len(batched) == len(images)
    assert sum(len(r) for r in batched) > 0
    for image, got in zip(images, batched):
        assert_records_identical(single.generate(image), got)


def test_the_next_batch_of_crops_is_resized_while_this_one_is_encoded(sharpened, monkeypatch):
    """The host's crop resizing (PIL) overlaps the model's work: while the first batch of crops is
    encoded, the second is being resized on the worker thread. ``encode`` of the first batch waits
    for that resize to begin; done one after the other, it would wait in vain. The records are
    the official ones (the same resizes)."""
    import threading

    official, ours = sharpened
    settings = dict(points_per_side=4, crop_n_layers=1, encoder_batch_size=2, **RELAXED)  # 5 crops: 3 batches
    gen = SamAutomaticMaskGenerator(ours, **settings)
    resizes, threads, second_batch = [], set(), threading.Event()
    apply_image, encode = gen.predictor.transform.apply_image, gen.predictor.encode

    def resize(image):
        threads.add(threading.current_thread().name)
        resizes.append(image.shape)
        if len(resizes) == 3:  # the first crop of the second batch
            second_batch.set()
        return apply_image(image)

    overlapped = []

    def encode_waiting(images, sizes):
        if not overlapped:
            overlapped.append(second_batch.wait(timeout=30))
        return encode(images, sizes)

    monkeypatch.setattr(gen.predictor.transform, "apply_image", resize)
    monkeypatch.setattr(gen.predictor, "encode", encode_waiting)
    image = photo("astronaut", (301, 451))
    got = gen.generate(image)
    assert overlapped == [True] and len(resizes) == 5
    assert threads and "MainThread" not in threads
    assert_records_identical(OfficialGenerator(official, **{k: v for k, v in settings.items()
                                                           if k != "encoder_batch_size"}).generate(image), got)
    assert len(got) > 0
