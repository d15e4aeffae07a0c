"""Counts and distributions over the masks/images tables of a run (``python -m jobs.stats``)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from .output import OutputDir

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def distribution(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """count, mean and quantiles (min, p5, p25, median, p75, p95, max); None values when empty."""
    v = np.asarray(values, dtype=np.float64)
    names = ("min", "p5", "p25", "median", "p75", "p95", "max")
    if v.size == 0:
        return {"count": 0, "mean": None, **{n: None for n in names}}
    q = np.quantile(v, QUANTILES)
    return {"count": int(v.size), "mean": float(v.mean()), **{n: float(x) for n, x in zip(names, q)}}


def table_stats(tables_uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Statistics of a run's output folder:

    images: ok/error counts, error reasons, width/height and masks-per-image distributions;
    masks: count, and distributions of area, area as a fraction of the image, predicted IoU and
    stability score; the model and settings identifiers found (a mixed folder shows several).
    Read shard by shard (a few read ahead in threads), only the columns used (not the masks' RLE
    strings); per mask, three float64 values and the area fraction are held for the quantiles.
    """
    out = OutputDir.of_run(tables_uri, storage_options)
    shard_ids = out.shard_ids()
    reasons: Counter = Counter()
    models: Counter = Counter()
    hashes: Counter = Counter()
    ok_sizes, mask_columns, fractions = [], [], []  # numpy parts per shard
    total = 0

    def read(shard_id: str):  # both tables of a shard, without the masks' counts strings
        return (out.read_shard("images", shard_id, ["image_id", "status", "error_reason", "width", "height",
                                                    "mask_count"]).to_pydict(),
                out.read_shard("masks", shard_id, ["image_id", "area", "predicted_iou", "stability_score", "model",
                                                   "settings_hash"]).to_pydict())

    for _, (images, masks) in out.each_shard(read, shard_ids):  # a few shards read ahead, in order
        ok = [status == "ok" for status in images["status"]]
        total += len(ok)
        reasons.update(r for r, good in zip(images["error_reason"], ok) if not good)
        ok_sizes.append(np.array([(w, h, n) for w, h, n, good in zip(
            images["width"], images["height"], images["mask_count"], ok) if good], dtype=np.float64).reshape(-1, 3))
        image_area = {i: (w or 0) * (h or 0) for i, w, h in zip(images["image_id"], images["width"], images["height"])}
        mask_columns.append(np.array([masks["area"], masks["predicted_iou"], masks["stability_score"]],
                                     dtype=np.float64).reshape(3, -1))
        fractions.append(np.array([a / image_area[i] for a, i in zip(masks["area"], masks["image_id"])
                                   if image_area.get(i)], dtype=np.float64))
        models.update(masks["model"])
        hashes.update(masks["settings_hash"])
    sizes = np.concatenate(ok_sizes) if ok_sizes else np.zeros((0, 3))
    values = np.concatenate(mask_columns, axis=1) if mask_columns else np.zeros((3, 0))
    return {
        "shards": len(shard_ids),
        "images": {
            "total": total,
            "ok": int(len(sizes)),
            "error": int(total - len(sizes)),
            "error_reasons": dict(reasons),
            "width": distribution(sizes[:, 0]),
            "height": distribution(sizes[:, 1]),
            "masks_per_image": distribution(sizes[:, 2]),
        },
        "masks": {
            "total": int(values.shape[1]),
            "area": distribution(values[0]),
            "area_fraction": distribution(np.concatenate(fractions) if fractions else []),
            "predicted_iou": distribution(values[1]),
            "stability_score": distribution(values[2]),
            "models": dict(models),
            "settings_hashes": dict(hashes),
        },
    }


def format_stats(stats: Dict[str, Any]) -> str:
    """The statistics as a short text report."""
    im, m = stats["images"], stats["masks"]
    lines = [f"shards: {stats['shards']}",
             f"images: {im['total']} ({im['ok']} ok, {im['error']} error)"]
    if im["error_reasons"]:
        lines.append("  error reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(im["error_reasons"].items())))
    lines.append(f"masks: {m['total']}  models: {m['models'] or '-'}  settings: {m['settings_hashes'] or '-'}")
    header = f"  {'':<18}{'mean':>10}" + "".join(f"{n:>10}" for n in ("min", "p5", "p25", "median", "p75", "p95", "max"))
    lines.append(header)
    rows = [("image width", im["width"]), ("image height", im["height"]), ("masks per image", im["masks_per_image"]),
            ("mask area (px)", m["area"]), ("area / image", m["area_fraction"]),
            ("predicted IoU", m["predicted_iou"]), ("stability score", m["stability_score"])]
    for name, d in rows:
        if d["count"] == 0:
            lines.append(f"  {name:<18}{'(none)':>10}")
            continue
        cells = [d["mean"]] + [d[n] for n in ("min", "p5", "p25", "median", "p75", "p95", "max")]
        lines.append(f"  {name:<18}" + "".join(f"{c:>10.4g}" for c in cells))
    return "\n".join(lines)
