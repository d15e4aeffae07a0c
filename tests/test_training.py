"""Fine-tuning (sam_core.training), procedural scenes and the COCO / table readers."""

from __future__ import annotations

import dataclasses
import importlib
import json

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from sam_core import build_sam
from sam_core.training import Sample, SceneSpec, TrainConfig, finetune, make_scene, save_checkpoint
from sam_core.training.data import coco_samples, decode_segmentation, load_coco
from sam_core.training.finetune import best_iou, noisy_boxes, sample_points
from sam_core.training.losses import dice_loss, focal_loss, sam_loss
from sam_core.training.scenes import write_scene_dataset

finetune_module = importlib.import_module("sam_core.training.finetune")  # the package exports a function of that name


@pytest.mark.parametrize("seed", range(6))
def test_scene_masks_are_exact_disjoint_single_pieces(seed):
    spec = SceneSpec()
    image, masks = make_scene(np.random.default_rng(seed), (200, 260), spec)
    assert image.shape == (200, 260, 3) and image.dtype == np.uint8
    assert len(masks) >= 1
    covered = np.zeros((200, 260), int)
    for m in masks:
        assert m.shape == (200, 260) and m.dtype == bool
        assert m.sum() >= spec.min_area
        assert cv2.connectedComponents(m.astype(np.uint8), connectivity=8)[0] == 2
        covered += m
    assert covered.max() == 1  # visible parts never overlap
    again, masks_again = make_scene(np.random.default_rng(seed), (200, 260), spec)
    assert np.array_equal(image, again) and all(np.array_equal(a, b) for a, b in zip(masks, masks_again))


def test_scene_dataset_is_valid_coco(tmp_path):
    n = write_scene_dataset(str(tmp_path / "scenes"), 3, seed=5, min_side=96, max_side=128)
    entries = load_coco(str(tmp_path / "scenes.json"))
    assert sum(len(a) for _, _, a in entries) == n and len(entries) == 3
    sample = next(coco_samples(str(tmp_path / "scenes.json")))
    for m in sample.masks:
        assert m.shape == sample.image.shape[:2]
    doc = json.loads((tmp_path / "scenes.json").read_text())
    for a in doc["annotations"]:
        img = doc["images"][a["image_id"] - 1]
        assert decode_segmentation(a["segmentation"], img["height"], img["width"]).sum() == a["area"]


def test_polygon_and_uncompressed_segmentations_decode():
    square = [[2, 2, 8, 2, 8, 8, 2, 8]]
    poly = decode_segmentation(square, 12, 12)
    assert poly[3:8, 3:8].all() and not poly[0].any()
    rle = mask_utils.encode(np.asfortranarray(poly.astype(np.uint8)))
    assert np.array_equal(decode_segmentation({"size": [12, 12], "counts": rle["counts"].decode()}, 12, 12), poly)
    flat = poly.flatten(order="F").astype(int)
    runs, last, count = [], 0, 0
    for v in flat:
        if v != last:
            runs.append(count)
            last, count = v, 0
        count += 1
    runs.append(count)
    assert np.array_equal(decode_segmentation({"size": [12, 12], "counts": runs}, 12, 12), poly)


def test_prompt_simulation_draws_from_the_region_and_jitters_boxes():
    rng = np.random.default_rng(0)
    gt = torch.zeros(3, 64, 64)
    gt[0, 10:20, 30:50] = 1
    gt[1, 40:60, 5:15] = 1
    gt[2, 0:64, 0:64] = 1
    region = torch.zeros(3, 64, 64, dtype=torch.bool)
    region[0, 12, 33] = True  # a single error pixel: must be chosen
    region[1] = gt[1] > 0.5
    # region[2] empty: falls back to the ground truth
    for _ in range(5):
        pts = sample_points(gt, region, rng)
        assert pts.shape == (3, 1, 2)
        assert tuple(pts[0, 0].tolist()) == (33.0, 12.0)
        x, y = pts[1, 0].long().tolist()
        assert gt[1, y, x] == 1
    boxes = noisy_boxes(gt, rng)
    tight = torch.tensor([[30, 10, 49, 19], [5, 40, 14, 59], [0, 0, 63, 63]], dtype=torch.float)
    assert (boxes - tight).abs().max() <= 20 and boxes.min() >= 0 and boxes.max() <= 63


def test_losses_prefer_the_right_mask_and_ignore_padding():
    target = torch.zeros(1, 16, 16)
    target[0, 4:12, 4:12] = 1
    valid = torch.ones(1, 16, 16)
    good = (target * 2 - 1) * 20  # confident and right
    bad = -good
    logits = torch.stack([bad[0], good[0], torch.zeros(16, 16)])[None]  # (1, 3, 16, 16)
    total, mask_loss, iou_loss, best, ious = sam_loss(logits, torch.tensor([[0.0, 1.0, 0.5]]), target, valid)
    assert best.item() == 1 and mask_loss < 1e-3
    assert torch.allclose(ious, torch.tensor([[0.0, 1.0, 0.0]]))
    assert focal_loss(good, target, valid) < 1e-6 and dice_loss(good, target, valid) < 1e-3
    # padding: whatever the logits are outside ``valid``, losses do not change
    valid_part = valid.clone()
    valid_part[0, :, 14:] = 0
    noisy = good.clone()
    noisy[0, :, 14:] = 30
    assert torch.allclose(focal_loss(noisy, target, valid_part), focal_loss(good, target, valid_part))
    assert torch.allclose(dice_loss(noisy, target, valid_part), dice_loss(good, target, valid_part))


def _scene_stream(seed=0):
    rng = np.random.default_rng(seed)
    while True:
        image, masks = make_scene(rng, (96, 128), SceneSpec(max_objects=3))
        yield Sample(image, masks)


def test_finetune_trains_only_the_chosen_parts_and_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    model = build_sam("demo")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fixed = next(_scene_stream())
    config = TrainConfig(steps=40, lr=2e-3, warmup_steps=2, images_per_step=1, masks_per_image=3, rounds=2,
                         box_fraction=0.5, log_every=10)
    history = finetune(model, iter(lambda: fixed, None), config)
    assert [h["step"] for h in history] == [10, 20, 30, 40]
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith(("image_encoder.", "prompt_encoder.")))
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("mask_decoder."))
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_finetune_can_train_encoder_and_prompt_encoder():
    torch.manual_seed(0)
    model = build_sam("demo")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(steps=2, lr=1e-3, images_per_step=2, masks_per_image=2, rounds=3,
                         train_encoder=True, train_prompt_encoder=True, log_every=1)
    finetune(model, _scene_stream(1), config)
    after = model.state_dict()
    for part in ("image_encoder.patch_embed", "prompt_encoder.point_embeddings", "mask_decoder.iou_token"):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(part)), part


def test_best_iou_matches_pycocotools():
    rng = np.random.default_rng(0)
    pred, masks = rng.random((2, 3, 20, 24)) < 0.3, rng.random((4, 20, 24)) < 0.5
    masks[3] = False  # an empty mask matches nothing

    def rle(m):
        return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))

    want = np.asarray(mask_utils.iou([rle(p) for p in pred.reshape(6, 20, 24)], [rle(m) for m in masks], [0] * 4))
    got = best_iou(torch.as_tensor(pred), torch.as_tensor(masks))
    assert got.shape == (2, 3)
    assert np.allclose(got.reshape(-1).numpy(), want.max(1), atol=1e-6)


def test_background_prompts_fall_outside_every_mask_and_train_only_the_iou_head(monkeypatch):
    torch.manual_seed(0)
    model = build_sam("demo")
    fixed = next(_scene_stream(3))
    transform = finetune_module.ResizeLongestSide(model.image_encoder.img_size)
    batch = [finetune_module._prepare(fixed, transform, np.random.default_rng(0), 1, model.device, all_masks=True)]
    _, gt, valid, every = batch[0]
    assert gt.shape[0] == 1 and every.shape[0] == len(fixed.masks)  # every mask, not just the k drawn
    drawn = []

    def recording(gt, region, rng):
        drawn.append(sample_points(gt, region, rng))
        return drawn[-1]

    monkeypatch.setattr(finetune_module, "sample_points", recording)
    with torch.no_grad():
        embeddings = model.image_encoder(model.preprocess(batch[0][0])[None])
    loss = finetune_module._background_loss(model, embeddings, batch, 16, np.random.default_rng(1))
    xy = drawn[0][:, 0].long()
    assert len(xy) == 16 and float(loss) > 0
    assert not every[:, xy[:, 1], xy[:, 0]].any() and bool(valid[0, xy[:, 1], xy[:, 0]].all())
    # The masks of background prompts get no loss: only the IoU head (and the tokens and
    # transformer it reads) learns from them.
    loss.backward()
    decoder = model.mask_decoder
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.iou_prediction_head.parameters())
    for part in (decoder.output_hypernetworks_mlps, decoder.output_upscaling):
        assert all(p.grad is None or not p.grad.any() for p in part.parameters())
    monkeypatch.undo()

    config = TrainConfig(steps=2, images_per_step=1, masks_per_image=2, rounds=1, background_points=4, log_every=1)
    assert "background_iou_loss" in finetune(model, iter(lambda: fixed, None), config)[0]
    plain = finetune(model, iter(lambda: fixed, None), dataclasses.replace(config, background_points=0))[0]
    assert "background_iou_loss" not in plain


def test_saved_checkpoint_loads_in_the_official_package_and_ours(tmp_path, tiny_official):
    from segment_anything import sam_model_registry as official_registry  # noqa: F401
    from sam_core.testing import official_sam

    torch.manual_seed(0)
    model = build_sam("tiny")
    model.load_state_dict(tiny_official.state_dict())
    finetune(model, _scene_stream(2), TrainConfig(steps=1, images_per_step=1, masks_per_image=1, rounds=1))
    path = tmp_path / "tuned.pth"
    save_checkpoint(model, path)
    official = official_sam("tiny", perturb=0)
    official.load_state_dict(torch.load(path, weights_only=True), strict=True)
    ours = build_sam("tiny", path)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), model.state_dict().values()))
    save_checkpoint(model, tmp_path / "half.pth", half=True)
    half = build_sam("tiny", tmp_path / "half.pth")
    assert next(half.parameters()).dtype == torch.float32


def test_config_validation():
    with pytest.raises(ValueError, match="rounds"):
        TrainConfig(rounds=0)
    with pytest.raises(ValueError, match="box_fraction"):
        TrainConfig(box_fraction=1.5)
    with pytest.raises(ValueError, match="background_points"):
        TrainConfig(background_points=-1)
    bad = Sample(np.zeros((8, 8), np.uint8), [np.ones((8, 8), bool)])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        finetune(build_sam("demo"), iter([bad]), dataclasses.replace(TrainConfig(), steps=1, images_per_step=1))


def test_train_job_on_coco_and_on_our_tables(tmp_path):
    from jobs.train import main as train_main
    from pipeline.output import OutputDir
    from pipeline.shards import Shard
    from pipeline.training_data import table_samples

    scenes = tmp_path / "scenes"
    write_scene_dataset(str(scenes), 2, seed=3, min_side=96, max_side=128)
    out = tmp_path / "tuned.pth"
    common = ["--model-type", "demo", "--steps", "2", "--images-per-step", "1", "--masks-per-image", "2",
              "--history", str(tmp_path / "h.json")]
    assert train_main(["--coco", str(tmp_path / "scenes.json"), "--output", str(out), "--background-points", "2"]
                      + common) == 0
    tuned = build_sam("demo", out)  # strict load of the written file
    history = json.loads((tmp_path / "h.json").read_text())
    assert len(history) == 1 and "background_iou_loss" in history[0]
    assert not all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), build_sam("demo").state_dict().values()))

    # the same masks as our tables (what jobs.generate / jobs.prompt write) train the same way
    doc = json.loads((tmp_path / "scenes.json").read_text())
    masks, images = [], []
    for img in doc["images"]:
        anns = [a for a in doc["annotations"] if a["image_id"] == img["id"]]
        image_id = f"files-00000/{img['file_name']}"
        for i, a in enumerate(anns):
            masks.append(dict(image_id=image_id, mask_id=i, counts=a["segmentation"]["counts"], height=img["height"],
                              width=img["width"], area=a["area"], bbox=a["bbox"], predicted_iou=1.0,
                              stability_score=1.0, point_coords=None, crop_box=[0, 0, img["width"], img["height"]],
                              model="gt", settings_hash="gt"))
        images.append(dict(image_id=image_id, uri=str(tmp_path / img["file_name"]), shard="files-00000",
                           width=img["width"], height=img["height"], mask_count=len(anns), status="ok",
                           error_reason=None, error_detail=None, decode_s=0.0, generate_s=0.0))
    tables = tmp_path / "tables"
    OutputDir(str(tables)).write_shard(Shard("files-00000", "files", tuple(r["uri"] for r in images)), masks, images)
    stream_t, stream_c = table_samples(str(tables)), coco_samples(str(tmp_path / "scenes.json"))
    from_tables = {s.image.tobytes(): s for s in (next(stream_t) for _ in range(2))}  # one pass each
    from_coco = {s.image.tobytes(): s for s in (next(stream_c) for _ in range(2))}
    assert len(from_tables) == 2 and set(from_tables) == set(from_coco)
    for key, sample in from_tables.items():
        assert len(sample.masks) == len(from_coco[key].masks)
        assert all(np.array_equal(a, b) for a, b in zip(sample.masks, from_coco[key].masks))
    assert train_main(["--tables", str(tables), "--output", str(tmp_path / "t.pth")] + common) == 0
    assert train_main(["--coco", str(tmp_path / "missing.json"), "--output", str(tmp_path / "m.pth")]) == 2


def test_demo_recipe_resumed_at_a_stage_ends_with_the_same_weights(tmp_path):
    from sam_core.training.demo import scaled_stages, train_demo

    stages = tuple(dataclasses.replace(c, images_per_step=1, masks_per_image=2) for c in scaled_stages(4))
    whole, resumed = tmp_path / "whole.pth", tmp_path / "resumed.pth"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # multi-threaded CPU sums may reorder (last bits); one thread is exact
    try:
        train_demo(str(whole), stages, log=lambda e: None)
        train_demo(str(resumed), stages[:1], log=lambda e: None)  # "interrupted" after stage 0
        train_demo(str(resumed), stages, log=lambda e: None, start_stage=1)
    finally:
        torch.set_num_threads(threads)
    a, b = torch.load(whole, weights_only=True), torch.load(resumed, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_coco_file_missing_segmentations_is_refused_naming_them(tmp_path):
    from sam_core.training.data import load_coco

    path = tmp_path / "train.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                "annotations": [{"id": 7, "image_id": 1, "bbox": [0, 0, 4, 4]}]}))
    with pytest.raises(ValueError, match=r"1 of its annotations lack one of 'image_id', 'segmentation' "
                                         r"\(e.g. annotations\[0\] = \{\"id\": 7"):
        load_coco(str(path))


def test_table_samples_hold_a_few_shards_at_a_time(tmp_path, monkeypatch):
    """A pass over our tables yields every ok image with masks once, with its masks in mask_id
    order, reading the masks of ``SHUFFLE_SHARDS`` shards at a time rather than of the whole
    output; images without masks and error rows are not samples."""
    from PIL import Image

    import pipeline.training_data as training_data
    from pipeline.output import OutputDir

    from .test_export import synthetic_shard

    monkeypatch.setattr(training_data, "SHUFFLE_SHARDS", 3)
    out = OutputDir(str(tmp_path / "out"), identity={"model": "tiny:x", "settings_hash": "h"})
    expected = {}
    for k in range(7):
        names = [f"{k}a.png", f"{k}b.png", f"{k}c.png"]
        for i, name in enumerate(names):
            Image.fromarray(np.full((30, 40, 3), 30 * i + k, np.uint8)).save(tmp_path / name)
        rows = synthetic_shard(out, f"files-{k:05d}", names, masks_per_image=2, uris=[str(tmp_path / n) for n in names],
                               errors={f"{k}b.png"})
        for r in rows:
            expected.setdefault(r["image_id"].split("/")[1], []).append(r["counts"])
    reads = []
    real = OutputDir.read_shard
    monkeypatch.setattr(OutputDir, "read_shard", lambda self, name, s, *a, **k: reads.append((name, s)) or real(
        self, name, s, *a, **k))
    stream = training_data.table_samples(str(tmp_path / "out"), seed=1)
    first = next(stream)
    assert len({s for name, s in reads if name == "masks"}) == 3  # one group of shards, not all 7
    samples = [first] + [next(stream) for _ in range(len(expected) - 1)]
    seen = sorted(int(s.image[0, 0, 0]) for s in samples)  # pixel value 30 * i + k names the image
    assert seen == sorted(30 * i + k for k in range(7) for i in (0, 2))
    for s in samples:
        k, i = int(s.image[0, 0, 0]) % 30, int(s.image[0, 0, 0]) // 30
        counts = expected[f"{k}{'abc'[i]}.png"]
        want = [mask_utils.decode({"size": [30, 40], "counts": c.encode()}).astype(bool) for c in counts]
        assert len(s.masks) == 2 and all(np.array_equal(a, b) for a, b in zip(s.masks, want))
