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
    """
    out = OutputDir(tables_uri, storage_options)
    images = out.read_table("images").to_pydict()
    masks = out.read_table("masks").to_pydict()
    ok = [s == "ok" for s in images["status"]]
    image_area = {i: (w or 0) * (h or 0) for i, w, h in zip(images["image_id"], images["width"], images["height"])}
    return {
        "shards": len(out.shard_ids()),
        "images": {
            "total": len(ok),
            "ok": int(sum(ok)),
            "error": int(len(ok) - sum(ok)),
            "error_reasons": dict(Counter(r for r, good in zip(images["error_reason"], ok) if not good)),
            "width": distribution([w for w, good in zip(images["width"], ok) if good]),
            "height": distribution([h for h, good in zip(images["height"], ok) if good]),
            "masks_per_image": distribution([n for n, good in zip(images["mask_count"], ok) if good]),
        },
        "masks": {
            "total": len(masks["mask_id"]),
            "area": distribution(masks["area"]),
            "area_fraction": distribution([a / image_area[i] for a, i in zip(masks["area"], masks["image_id"])
                                           if image_area.get(i)]),
            "predicted_iou": distribution(masks["predicted_iou"]),
            "stability_score": distribution(masks["stability_score"]),
            "models": dict(Counter(masks["model"])),
            "settings_hashes": dict(Counter(masks["settings_hash"])),
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
