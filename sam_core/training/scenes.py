"""Procedural scenes with exact instance masks: shapes with solid, shaded or striped fills on
textured backgrounds, partly occluding each other, at varied sizes.

Every object's mask is exactly the pixels it shows (occluded parts removed), and placement keeps
the ground truth unambiguous: an object is only added if every object it covers keeps at least
half of its area in one connected piece, and it differs in colour from what lies under it.

    image, masks = make_scene(np.random.default_rng(0), (256, 320))   # HxWx3 uint8, list of HxW bool
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import cv2
import numpy as np

SHAPES = ("ellipse", "rectangle", "triangle", "polygon", "star")


@dataclass(frozen=True)
class SceneSpec:
    """How scenes vary: object count, object size as a fraction of the shorter side, minimum area."""

    min_objects: int = 2
    max_objects: int = 7
    min_size: float = 0.08  # smallest object radius / shorter side
    max_size: float = 0.35
    min_area: int = 100  # pixels an object must show
    min_visible: float = 0.5  # fraction of an object that must stay visible under later ones
    min_colour_distance: float = 60.0  # RGB distance of a fill from what lies under it


def make_scene(rng: np.random.Generator, size: Tuple[int, int], spec: SceneSpec = SceneSpec()
               ) -> Tuple[np.ndarray, List[np.ndarray]]:
    """One scene of ``size`` (H, W): image HxWx3 uint8 and visible instance masks, each HxW bool,
    in drawing order (back to front)."""
    h, w = size
    image = _background(rng, h, w)
    full: List[np.ndarray] = []  # each object's whole shape
    visible: List[np.ndarray] = []
    n_target = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    for _ in range(n_target * 8):  # attempts
        if len(visible) == n_target:
            break
        shape = _shape_mask(rng, h, w, spec)
        area = int(shape.sum())
        if area < spec.min_area:
            continue
        fill = _fill(rng, h, w)
        under = image[shape].reshape(-1, 3).astype(np.float32).mean(0)
        if np.linalg.norm(fill[shape].reshape(-1, 3).astype(np.float32).mean(0) - under) < spec.min_colour_distance:
            continue
        after = [v & ~shape for v in visible]
        if not all(_kept(a, f, spec) for a, f in zip(after, full)):
            continue
        image[shape] = fill[shape]
        visible = after + [shape]
        full.append(shape)
    image = cv2.GaussianBlur(image, (0, 0), 0.6)  # soften edges slightly, masks unchanged
    noise = rng.normal(0, 4, image.shape)
    image = np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return image, visible


def _kept(visible: np.ndarray, full: np.ndarray, spec: SceneSpec) -> bool:
    area = int(visible.sum())
    if area < max(spec.min_area, spec.min_visible * full.sum()):
        return False
    n, _ = cv2.connectedComponents(visible.astype(np.uint8), connectivity=8)
    return n == 2  # background + one piece


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """HxWx3 uint8: a gradient, stripes, a checkerboard or smooth blotches, with fine noise."""
    kind = rng.integers(4)
    a, b = _colour(rng), _colour(rng)
    b = a + (b - a) * 0.5  # backgrounds less contrasted than objects
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:
        angle = rng.uniform(0, np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)
        t = (t - t.min()) / max(t.max() - t.min(), 1)
    elif kind == 1:
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 30)
        t = (np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period) > 0).astype(np.float32)
    elif kind == 2:
        cell = int(rng.integers(8, 40))
        t = (((yy // cell) + (xx // cell)) % 2).astype(np.float32)
    else:
        coarse = rng.random((int(rng.integers(3, 8)), int(rng.integers(3, 8)))).astype(np.float32)
        t = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    img = a + (b - a) * t[..., None]
    img += rng.normal(0, 6, (h, w, 1)) * rng.uniform(0, 1)
    return np.clip(img, 0, 255).astype(np.uint8)


def _fill(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """HxWx3 uint8 object texture: solid, shaded (linear gradient) or striped in two near colours."""
    kind = rng.integers(3)
    a = _colour(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    if kind == 0:
        img = np.broadcast_to(a, (h, w, 3)).copy()
    elif kind == 1:
        t = (np.cos(angle) * xx + np.sin(angle) * yy) / max(h, w)
        img = a + (t[..., None] - 0.5) * rng.uniform(20, 60)
    else:
        period = rng.uniform(4, 12)
        t = (np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period) > 0)
        img = a + t[..., None] * rng.uniform(-40, 40, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, h: int, w: int, spec: SceneSpec) -> np.ndarray:
    """HxW bool: one random shape, possibly extending past the image border."""
    side = min(h, w)
    r = rng.uniform(spec.min_size, spec.max_size) * side
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    angle = rng.uniform(0, 2 * np.pi)
    canvas = np.zeros((h, w), np.uint8)
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    if kind == "ellipse":
        axes = (int(r), int(r * rng.uniform(0.4, 1.0)))
        cv2.ellipse(canvas, (int(cx), int(cy)), axes, float(np.degrees(angle)), 0, 360, 1, -1)
    else:
        if kind == "rectangle":
            aspect = rng.uniform(0.35, 1.0)
            corners = np.array([[-1, -aspect], [1, -aspect], [1, aspect], [-1, aspect]]) * r / np.sqrt(1 + aspect**2)
        elif kind == "triangle":
            t = angle + np.array([0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, 3)
            corners = np.stack([np.cos(t), np.sin(t)], 1) * r
        elif kind == "polygon":
            n = int(rng.integers(5, 9))
            t = np.linspace(0, 2 * np.pi, n, endpoint=False)
            corners = np.stack([np.cos(t), np.sin(t)], 1) * r
        else:  # star
            n = int(rng.integers(4, 7))
            t = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False)
            radius = np.where(np.arange(2 * n) % 2 == 0, 1.0, rng.uniform(0.45, 0.65))
            corners = np.stack([np.cos(t), np.sin(t)], 1) * (r * radius)[:, None]
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        pts = corners @ rot.T + [cx, cy]
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1)
    return canvas.astype(bool)


def scene_sizes(rng: np.random.Generator, min_side: int, max_side: int) -> Tuple[int, int]:
    """A random (H, W) with both sides in [min_side, max_side]."""
    return int(rng.integers(min_side, max_side + 1)), int(rng.integers(min_side, max_side + 1))


def write_scene_dataset(folder: str, count: int, seed: int, min_side: int = 192, max_side: int = 320,
                        spec: SceneSpec = SceneSpec(), annotations_path: "str | None" = None) -> int:
    """``count`` scenes as ``<folder>/scene_NNNNN.png`` and their masks as a COCO file (RLE, one
    category "object") at ``annotations_path``, by default ``<folder>.json`` beside the folder (so
    the folder holds only images and can be an input as it is). File names are relative to the
    COCO file's folder. Returns the number of objects."""
    import json
    import os

    from PIL import Image
    from pycocotools import mask as mask_utils

    os.makedirs(folder, exist_ok=True)
    annotations_path = annotations_path or os.path.normpath(folder) + ".json"
    root = os.path.dirname(os.path.abspath(annotations_path))
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(count):
        image, masks = make_scene(rng, scene_sizes(rng, min_side, max_side), spec)
        path = os.path.join(folder, f"scene_{i:05d}.png")
        Image.fromarray(image).save(path)
        h, w = image.shape[:2]
        images.append({"id": i + 1, "file_name": os.path.relpath(os.path.abspath(path), root), "height": h, "width": w})
        for m in masks:
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                "area": int(m.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            })
    doc = {"info": {"description": f"procedural scenes, seed {seed}"}, "images": images,
           "annotations": annotations, "categories": [{"id": 1, "name": "object", "supercategory": "object"}]}
    with open(annotations_path, "w") as f:
        json.dump(doc, f)
    return len(annotations)
