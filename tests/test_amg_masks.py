"""Mask utilities against brute-force references and the official ones; SA-1B JSON round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator as OfficialGenerator
from segment_anything.utils import amg as official_amg
from torchvision.ops.boxes import batched_nms

from sam_core import SamAutomaticMaskGenerator
from sam_core.amg import MaskData
from sam_core.amg import masks as M
from sam_core.amg.sa1b import decode_masks, read_sa1b_json, sa1b_document, to_coco_rle, write_sa1b_json


def blob_masks(n=12, h=47, w=61, seed=0):
    """Random masks of a few rectangles and discs, with small holes and islands."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((n, h, w), bool)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(2, 15)
            out[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        out[i, rng.integers(0, h, 3), rng.integers(0, w, 3)] ^= True  # specks
    out[0] = False  # an empty mask
    out[1] = True  # a full mask
    return out


def naive_rle(mask):
    flat = mask.T.flatten()
    counts, current, run = [], False, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def test_rle_matches_naive_official_and_round_trips():
    masks = blob_masks()
    ours = M.mask_to_rle(torch.as_tensor(masks))
    official = official_amg.mask_to_rle_pytorch(torch.as_tensor(masks))
    for m, r, o in zip(masks, ours, official):
        assert r == naive_rle(m) == o
        assert np.array_equal(M.rle_to_mask(r), m)
        assert M.area_from_rle(r) == int(m.sum())
        coco = M.coco_encode_rle(r)
        assert isinstance(coco["counts"], str)
        assert np.array_equal(mask_utils.decode(coco).astype(bool), m)
    assert M.mask_to_rle(torch.zeros(0, 5, 5, dtype=torch.bool)) == []


def test_rle_of_crop_masks_equals_rle_of_padded_masks():
    """``mask_to_rle(crop_masks, crop_box, image_size)`` against the official RLE of the masks
    padded to the image, for crops at every edge, spanning whole columns or rows, one pixel
    wide or tall, and masks empty, full, sparse, dense, set on the crop's border."""
    rng = np.random.default_rng(11)
    for trial in range(300):
        img_h, img_w = (int(v) for v in rng.integers(1, 14, 2))
        y0 = int(rng.integers(0, img_h)) if rng.random() < 0.6 else 0
        x0 = int(rng.integers(0, img_w)) if rng.random() < 0.6 else 0
        y1 = int(rng.integers(y0 + 1, img_h + 1)) if rng.random() < 0.6 else img_h
        x1 = int(rng.integers(x0 + 1, img_w + 1)) if rng.random() < 0.6 else img_w
        h, w = y1 - y0, x1 - x0
        density = rng.random((5, 1, 1)) * np.array([0.0, 1.0, 1.0, 1.0, 2.0])[:, None, None]
        crops = rng.random((5, h, w)) < density  # masks 0 (empty) and 4 (full) included
        if rng.random() < 0.5:
            crops[1, [0, -1], :] = True  # top and bottom rows set: column-boundary changes
        padded = np.zeros((5, img_h, img_w), dtype=bool)
        padded[:, y0:y1, x0:x1] = crops
        expected = official_amg.mask_to_rle_pytorch(torch.as_tensor(padded))
        got = M.mask_to_rle(torch.as_tensor(crops), [x0, y0, x1, y1], (img_h, img_w))
        assert got == expected, (trial, (x0, y0, x1, y1), (img_h, img_w))
        assert M.mask_to_rle(torch.as_tensor(padded)) == expected
    assert M.mask_to_rle(torch.zeros(0, 3, 4, dtype=torch.bool), [1, 1, 5, 4], (9, 9)) == []
    masks = torch.ones(2, 3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="together"):
        M.mask_to_rle(masks, [1, 1, 5, 4])
    for box, size in (([1, 1, 5, 5], (9, 9)), ([6, 1, 10, 4], (9, 9)), ([-1, 0, 3, 3], (9, 9))):
        with pytest.raises(ValueError, match="do not fit"):
            M.mask_to_rle(masks, box, size)


def test_stability_score_brute_force():
    logits = torch.randn(6, 23, 31) * 3
    got = M.calculate_stability_score(logits, 0.0, 1.0)
    for i, l in enumerate(logits.numpy()):
        expected = (l > 1.0).sum() / (l > -1.0).sum()
        assert got[i].item() == pytest.approx(expected, abs=1e-7)
    assert torch.equal(got, official_amg.calculate_stability_score(logits, 0.0, 1.0))


def boundary_logits(threshold, offset, n=9, h=29, w=37, seed=0):
    """Random logits with many pixels exactly at, and one float32 step either side of, the three
    thresholds (as float32), some all-below (empty) and one all-above (full) mask."""
    rng = np.random.default_rng(seed)
    at = np.float32([threshold - offset, threshold, threshold + offset])
    edges = np.concatenate([at, np.nextafter(at, np.float32(-np.inf)), np.nextafter(at, np.float32(np.inf))])
    logits = rng.normal(threshold, 2 * offset + 1, size=(n, h, w)).astype(np.float32)
    picks = rng.random((n, h, w)) < 0.3
    logits[picks] = rng.choice(edges, size=int(picks.sum()))
    logits[0] = threshold - offset - 1  # empty at every threshold
    logits[1] = threshold + offset + 1  # full
    return torch.as_tensor(logits)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("threshold,offset", [(0.0, 1.0), (0.0, 0.3), (0.1, 0.7)])
def test_mask_statistics_match_official(threshold, offset, compiled):
    # 0.3 and 0.1 are not float32 numbers: a threshold compared in float64 would differ at the
    # pixels equal to its float32 value, which every mask here has.
    for seed, (h, w) in enumerate([(29, 37), (1, 40), (64, 3)]):
        logits = boundary_logits(threshold, offset, h=h, w=w, seed=seed)
        stability, boxes = M.mask_statistics(logits, threshold, offset, compiled=compiled)
        expected = official_amg.calculate_stability_score(logits, threshold, offset)  # NaN if empty
        torch.testing.assert_close(stability, expected, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(boxes, official_amg.batched_mask_to_box(logits > threshold))
        again, boxes_again, area = M.mask_statistics(logits, threshold, offset, compiled=compiled, with_area=True)
        torch.testing.assert_close(again, expected, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(boxes_again, boxes)
        assert torch.equal(area, (logits > threshold).flatten(1).sum(1))
        assert area[0] == 0 and area[1] == h * w
    assert (M._compiled_reductions is not None) or not compiled
    stability, boxes = M.mask_statistics(torch.zeros(0, 5, 7), threshold, offset, compiled=compiled)
    assert stability.shape == (0,) and boxes.shape == (0, 4)
    *_, area = M.mask_statistics(torch.zeros(0, 5, 7), threshold, offset, compiled=compiled, with_area=True)
    assert area.shape == (0,)


def brute_force_nms(boxes, scores, thresh):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        ok = True
        for j in keep:
            x0, y0 = max(boxes[i][0], boxes[j][0]), max(boxes[i][1], boxes[j][1])
            x1, y1 = min(boxes[i][2], boxes[j][2]), min(boxes[i][3], boxes[j][3])
            inter = max(0, x1 - x0) * max(0, y1 - y0)
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])
            if inter / (area(boxes[i]) + area(boxes[j]) - inter) > thresh:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def test_box_nms_brute_force():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 100, size=(60, 2))
    wh = rng.uniform(5, 40, size=(60, 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    scores = rng.uniform(size=60)
    got = batched_nms(torch.as_tensor(boxes).float(), torch.as_tensor(scores).float(),
                      torch.zeros(60), iou_threshold=0.3).tolist()
    assert got == brute_force_nms(boxes.astype(np.float32), scores.astype(np.float32), 0.3)


def test_boxes_crops_and_grids_match_official():
    masks = torch.as_tensor(blob_masks())
    assert torch.equal(M.batched_mask_to_box(masks), official_amg.batched_mask_to_box(masks))
    for m, b in zip(masks.numpy(), M.batched_mask_to_box(masks).tolist()):
        if m.any():
            ys, xs = np.nonzero(m)
            assert b == [xs.min(), ys.min(), xs.max(), ys.max()]
        else:
            assert b == [0, 0, 0, 0]
    boxes = M.batched_mask_to_box(masks)
    crop = [10, 5, 50, 40]
    assert torch.equal(M.is_box_near_crop_edge(boxes, crop, [0, 0, 61, 47]),
                       official_amg.is_box_near_crop_edge(boxes, crop, [0, 0, 61, 47]))
    for size in [(1500, 2250), (57, 83), (1024, 1024)]:
        for layers in range(3):
            assert M.generate_crop_boxes(size, layers, 512 / 1500) == official_amg.generate_crop_boxes(
                size, layers, 512 / 1500)
    for a, b in zip(M.build_all_layer_point_grids(32, 2, 2), official_amg.build_all_layer_point_grids(32, 2, 2)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("mode", ["holes", "islands"])
def test_remove_small_regions_matches_official(mode):
    for m in blob_masks(seed=3):
        a, ca = M.remove_small_regions(m, 30, mode)
        b, cb = official_amg.remove_small_regions(m, 30, mode)
        assert ca == cb and np.array_equal(a, b)


def random_region_mask(rng):
    """A small random mask made to hit the edge cases of windowed labelling: noise, discs,
    rectangles reaching the image edges, full rows/columns that split the background, and
    equal-sized islands (whose label order decides which one is kept when all are small)."""
    h, w = rng.integers(1, 48, 2)
    yy, xx = np.mgrid[:h, :w]
    m = np.zeros((h, w), bool)
    kind = rng.integers(0, 5)
    if kind == 0:
        m = rng.random((h, w)) < rng.uniform(0.05, 0.95)
    elif kind == 1:
        for _ in range(rng.integers(1, 5)):
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(1, 12)
            m |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        m ^= rng.random((h, w)) < 0.03
    elif kind == 2:
        for _ in range(rng.integers(1, 4)):
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            m[y0 : y0 + rng.integers(1, h + 1), x0 : x0 + rng.integers(1, w + 1)] ^= True
    elif kind == 3:
        m[rng.integers(0, h, rng.integers(1, 3)), :] = True
        m[:, rng.integers(0, w, rng.integers(0, 3))] = True
        m ^= rng.random((h, w)) < 0.05
    else:
        for _ in range(rng.integers(2, 6)):
            y, x = rng.integers(0, h), rng.integers(0, w)
            m[y : y + 2, x : x + 2] = True
    return m


@pytest.mark.parametrize("mode", ["holes", "islands"])
def test_windowed_small_regions_match_official_on_edge_cases(mode):
    """Ours labels a window around the mask, the official code the whole image: same masks.
    (Without the even-aligned window start this finds island ties resolved differently.)"""
    rng = np.random.default_rng(11 if mode == "holes" else 12)
    for _ in range(8000):
        m = random_region_mask(rng)
        if rng.random() < 0.3:
            m = np.asfortranarray(m)  # as rle_to_mask returns them
        thresh = int(rng.integers(1, 60))
        a, changed = M.remove_small_regions(m, thresh, mode)
        b, official_changed = official_amg.remove_small_regions(m, thresh, mode)
        assert changed == official_changed and np.array_equal(a, b), (m.shape, thresh)
        # The boxed variant (as post-processing runs it): same mask, and the box of the result.
        box = M.rle_box(M.mask_to_rle_numpy(m))
        assert box == M._box_or_none(m)
        c, boxed_changed, c_box = M.remove_small_regions_boxed(m, thresh, mode, box)
        assert boxed_changed == changed and np.array_equal(c, b) and c_box == M._box_or_none(b)
        assert M.mask_to_rle_numpy(b, c_box) == M.mask_to_rle_numpy(b)


def test_small_regions_label_a_window_unless_a_small_hole_reaches_outside(monkeypatch):
    import cv2

    shapes = []
    label = cv2.connectedComponentsWithStats
    monkeypatch.setattr(cv2, "connectedComponentsWithStats", lambda a, c: shapes.append(a.shape) or label(a, c))
    yy, xx = np.mgrid[:900, :1300]
    disc = (yy - 401) ** 2 + (xx - 733) ** 2 < 15**2
    disc[401, 733] = False  # a one-pixel hole
    filled, changed = M.remove_small_regions(disc, 10, "holes")
    assert changed and filled[401, 733] and filled.sum() == disc.sum() + 1
    assert max(shapes[-1]) <= 33  # the disc's box and a margin, not the 900x1300 image
    # A ring of 8 pixels: its background inside the window is under the threshold, but it joins
    # the rest of the image, so only the centre is a small hole (still a window labelling).
    ring = np.zeros((900, 1300), bool)
    ring[500:503, 600:603] = True
    ring[501, 601] = False
    filled, changed = M.remove_small_regions(ring, 100, "holes")
    assert changed and filled.sum() == 9 and max(shapes[-1]) <= 6
    # A column of mask leaves 3x4 background pixels left of it: a small hole outside the window,
    # which only a whole-image labelling can fill as the official code does.
    m = np.zeros((3, 30), bool)
    m[:, 4] = True
    shapes.clear()
    a, changed = M.remove_small_regions(m, 20, "holes")
    b, _ = official_amg.remove_small_regions(m, 20, "holes")
    assert changed and np.array_equal(a, b) and a[:, :5].all() and not a[:, 5:].any()
    assert shapes[-1] == (3, 30)


def test_rle_box_is_the_box_of_the_mask():
    """Boxes from the runs alone (and decoding only their columns), on sparse and dense masks, runs crossing columns (a pixel at
    the bottom of one column and the top of the next is one run), empty and full masks."""
    rng = np.random.default_rng(9)
    h, w = 5, 4
    crossing = np.zeros((h, w), bool)
    crossing[h - 1, 1] = crossing[0, 2] = True  # one run, rows h-1 and 0
    cases = [np.zeros((h, w), bool), np.ones((h, w), bool), crossing]
    for _ in range(3000):
        h, w = rng.integers(1, 12, 2)
        cases.append(rng.random((h, w)) < rng.choice([0.02, 0.1, 0.5, 0.95]))
    for m in cases:
        rle = M.mask_to_rle_numpy(m)
        box = M.rle_box(rle)
        assert box == M._box_or_none(m), m.astype(int)
        if box is not None:  # decoding only the box's columns gives the same mask
            decoded = M.rle_to_mask(rle, box)
            assert decoded.shape == m.shape and np.array_equal(decoded, m)


def test_numpy_rle_matches_torch_rle():
    rng = np.random.default_rng(4)
    for _ in range(3000):
        h, w = rng.integers(1, 30, 2)
        m = rng.random((h, w)) < rng.choice([0.0, 0.02, 0.3, 0.9, 1.0])
        if rng.random() < 0.3:
            m[:, : rng.integers(0, w)] = False
        if rng.random() < 0.3:
            m = np.asfortranarray(m)
        assert M.mask_to_rle_numpy(m) == M.mask_to_rle(torch.as_tensor(m)[None])[0]


def test_postprocess_small_regions_matches_official():
    """Diverse masks through small-region removal and the NMS that follows it."""
    masks = blob_masks(n=40, h=64, w=80, seed=5)
    rles = M.mask_to_rle(torch.as_tensor(masks))
    boxes = M.batched_mask_to_box(torch.as_tensor(masks)).numpy()
    columns = dict(iou_preds=np.linspace(0.9, 1.0, 40, dtype=np.float32), boxes=boxes,
                   points=np.zeros((40, 2)), stability_score=np.ones(40, np.float32),
                   crop_boxes=np.tile([0, 0, 80, 64], (40, 1)))
    official = official_amg.MaskData(rles=list(rles), **{k: v.copy() for k, v in columns.items()})
    ours = MaskData(rles=list(rles), **{k: v.copy() for k, v in columns.items()})
    official = OfficialGenerator.postprocess_small_regions(official, 30, 0.5)
    ours = SamAutomaticMaskGenerator.postprocess_small_regions(ours, 30, 0.5)
    assert 0 < len(ours["rles"]) < 40  # NMS removed some
    assert ours["rles"] == official["rles"]
    for key in columns:
        assert np.array_equal(ours[key], official[key]), key


def records_for(masks):
    rles = M.mask_to_rle(torch.as_tensor(masks))
    boxes = M.box_xyxy_to_xywh(M.batched_mask_to_box(torch.as_tensor(masks)).numpy())
    return [
        {"segmentation": M.rle_to_mask(r), "area": M.area_from_rle(r), "bbox": b.tolist(),
         "predicted_iou": 1.02, "point_coords": [[3.5, 4.0]], "stability_score": 0.97,
         "crop_box": [0, 0, 61, 47]}
        for r, b in zip(rles, boxes)
    ]


def test_sa1b_json_round_trip(tmp_path):
    masks = blob_masks()
    doc = sa1b_document(7, "sa_7.jpg", 61, 47, records_for(masks), first_annotation_id=100)
    path = str(tmp_path / "sa_7.json")
    write_sa1b_json(path, doc)
    back = read_sa1b_json(path)
    assert back == json.loads(json.dumps(doc))
    assert back["image"] == {"image_id": 7, "width": 61, "height": 47, "file_name": "sa_7.jpg"}
    assert [a["id"] for a in back["annotations"]] == list(range(100, 112))
    ann = back["annotations"][3]
    assert isinstance(ann["segmentation"]["counts"], str) and ann["bbox"] == [float(v) for v in ann["bbox"]]
    for decoded, m in zip(decode_masks(back), masks):
        assert np.array_equal(decoded, m)
    for seg in (masks[3], M.mask_to_rle(torch.as_tensor(masks[3:4]))[0]):
        assert to_coco_rle(seg) == back["annotations"][3]["segmentation"]


def test_sa1b_json_rejects_malformed(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"image": {"image_id": 1}, "annotations": []}))
    with pytest.raises(ValueError, match="image lacks"):
        read_sa1b_json(str(path))
    path.write_text(json.dumps({"image": {"image_id": 1, "width": 2, "height": 2, "file_name": "x"},
                                "annotations": [{"id": 1}]}))
    with pytest.raises(ValueError, match="annotation 0 lacks"):
        read_sa1b_json(str(path))


def test_mask_data_cat_accepts_empty_placeholders_on_either_side():
    """A batch whose candidates all fell carries (0, 0, 0) placeholder logits; appending it to
    (or appending to it) real rows must keep the real rows (found with the demo model)."""
    full = MaskData(low_res=torch.ones(2, 4, 4), iou_preds=torch.ones(2))
    empty = MaskData(low_res=torch.zeros(0, 0, 0), iou_preds=torch.zeros(0))
    full.cat(empty)
    assert full["low_res"].shape == (2, 4, 4) and len(full["iou_preds"]) == 2
    empty.cat(MaskData(low_res=torch.ones(1, 4, 4), iou_preds=torch.ones(1)))
    assert empty["low_res"].shape == (1, 4, 4)


def test_utils_modules_carry_the_official_imports_over():
    """``segment_anything.utils.amg``/``.transforms`` code runs on ``sam_core.utils.amg``/``.transforms``
    unchanged: every official helper by name, with its parameters, and its results."""
    import inspect

    from segment_anything.utils.transforms import ResizeLongestSide as OfficialResize

    from sam_core.utils import amg as ours
    from sam_core.utils.transforms import ResizeLongestSide

    official_names = {n for n, v in vars(official_amg).items()
                      if callable(v) and getattr(v, "__module__", None) == official_amg.__name__}
    assert official_names == set(ours.__all__)
    for name in official_names - {"MaskData"}:
        params = lambda f: [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]
        assert params(getattr(ours, name)) == params(getattr(official_amg, name)), name

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 23, 17, generator=g) * 4
    masks = logits > 0
    masks[1] = False
    masks[2] = True
    rles = ours.mask_to_rle_pytorch(masks)
    assert rles == official_amg.mask_to_rle_pytorch(masks)
    for rle in rles:
        assert np.array_equal(ours.rle_to_mask(rle), official_amg.rle_to_mask(rle))
        assert ours.coco_encode_rle(rle) == official_amg.coco_encode_rle(rle)
        assert ours.area_from_rle(rle) == official_amg.area_from_rle(rle)
    assert torch.equal(ours.calculate_stability_score(logits, 0.0, 1.0),
                       official_amg.calculate_stability_score(logits, 0.0, 1.0))
    assert torch.equal(ours.batched_mask_to_box(masks), official_amg.batched_mask_to_box(masks))
    for crop in ([0, 0, 17, 23], [5, 7, 22, 30]):
        assert torch.equal(ours.uncrop_masks(masks, crop, 40, 30), official_amg.uncrop_masks(masks, crop, 40, 30))
        boxes = torch.tensor([[1, 2, 10, 12], [0, 0, 17, 23]])
        assert torch.equal(ours.uncrop_boxes_xyxy(boxes, crop), official_amg.uncrop_boxes_xyxy(boxes, crop))
        assert torch.equal(ours.uncrop_points(boxes[:, :2], crop), official_amg.uncrop_points(boxes[:, :2], crop))
        assert torch.equal(ours.is_box_near_crop_edge(boxes.float(), crop, [0, 0, 30, 40]),
                           official_amg.is_box_near_crop_edge(boxes.float(), crop, [0, 0, 30, 40]))
    for box in (torch.tensor([3.0, 4.0, 10.0, 20.0]), [3, 4, 10, 20], np.array([3, 4, 10, 20])):
        got, expected = ours.box_xyxy_to_xywh(box), official_amg.box_xyxy_to_xywh(box)
        assert type(got) is type(expected) and list(got) == list(expected) and list(box)[2] == 10
    assert [list(map(list, b)) for b in ours.batch_iterator(3, list(range(7)), "abcdefg")] == \
        [list(map(list, b)) for b in official_amg.batch_iterator(3, list(range(7)), "abcdefg")]
    with pytest.raises(ValueError, match="all of the same length"):  # the official asserts
        list(ours.batch_iterator(3, [1, 2], [1]))
    assert np.array_equal(ours.build_point_grid(5), official_amg.build_point_grid(5))
    assert all(np.array_equal(a, b) for a, b in zip(ours.build_all_layer_point_grids(8, 2, 2),
                                                    official_amg.build_all_layer_point_grids(8, 2, 2)))
    assert ours.generate_crop_boxes((40, 30), 2, 512 / 1500) == official_amg.generate_crop_boxes((40, 30), 2, 512 / 1500)
    island = np.zeros((20, 20), bool)
    island[2:12, 2:12], island[15, 15] = True, True
    for mode in ("holes", "islands"):
        got, expected = ours.remove_small_regions(island, 5, mode), official_amg.remove_small_regions(island, 5, mode)
        assert np.array_equal(got[0], expected[0]) and got[1] == expected[1]
    data = ours.MaskData(rles=rles, iou=torch.tensor([0.1, 0.5, 0.9]))
    data.filter(torch.tensor([True, False, True]))
    data.cat(ours.MaskData(rles=rles[:1], iou=torch.tensor([0.3])))
    data.to_numpy()
    assert data["rles"] == [rles[0], rles[2], rles[0]] and data["iou"].tolist() == pytest.approx([0.1, 0.9, 0.3])

    image = (np.random.default_rng(0).random((30, 50, 3)) * 255).astype(np.uint8)
    assert np.array_equal(ResizeLongestSide(64).apply_image(image), OfficialResize(64).apply_image(image))
