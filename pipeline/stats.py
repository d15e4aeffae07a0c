"""Counts and distributions over the masks/images tables of a run (``python -m jobs.stats``)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .output import OutputDir, first_frame_only

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
SAMPLE_ROWS = 2_000_000  # rows a sampler keeps: quantiles of more come from a uniform sample of them


def distribution(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """count, mean and quantiles (min, p5, p25, median, p75, p95, max); None values when empty."""
    v = np.asarray(values, dtype=np.float64)
    names = ("min", "p5", "p25", "median", "p75", "p95", "max")
    if v.size == 0:
        return {"count": 0, "mean": None, **{n: None for n in names}}
    q = np.quantile(v, QUANTILES)
    return {"count": int(v.size), "mean": float(v.mean()), **{n: float(x) for n, x in zip(names, q)}}


class Sampler:
    """Rows of ``k`` values added in parts; their count, sums, minima and maxima exactly, and a
    uniform sample of at most ``size`` rows for the quantiles (each row gets a random key and the
    ``size`` smallest keys are kept), so that a billion masks take bounded memory. Below ``size``
    rows nothing is left out and the quantiles are exact."""

    def __init__(self, k: int, size: Optional[int] = None, seed: int = 0) -> None:
        self.size = SAMPLE_ROWS if size is None else size
        self.rng = np.random.default_rng(seed)
        self.parts: List[np.ndarray] = []
        self.keys: List[np.ndarray] = []
        self.held = 0
        self.count = 0
        self.sum = np.zeros(k)
        self.min = np.full(k, np.inf)
        self.max = np.full(k, -np.inf)

    def add(self, values: np.ndarray) -> None:
        """Add ``values``, (k, n)."""
        n = values.shape[1]
        if n == 0:
            return
        self.count += n
        self.sum += values.sum(axis=1)
        self.min = np.minimum(self.min, values.min(axis=1))
        self.max = np.maximum(self.max, values.max(axis=1))
        self.parts.append(values)
        self.keys.append(self.rng.random(n))
        self.held += n
        if self.held > 2 * self.size:
            self._shrink()

    def _shrink(self) -> None:
        if not self.parts:
            return
        values, keys = np.concatenate(self.parts, axis=1), np.concatenate(self.keys)
        if len(keys) > self.size:
            keep = np.argpartition(keys, self.size)[: self.size]
            values, keys = values[:, keep], keys[keep]
        self.parts, self.keys, self.held = [values], [keys], len(keys)

    def distribution(self, i: int) -> Dict[str, Any]:
        """:func:`distribution` of column ``i``: count, mean, min and max of every row added, the
        other quantiles from the sample (``sampled``: its size, when it holds fewer rows)."""
        self._shrink()
        if self.count == 0:
            return distribution([])
        values = self.parts[0][i]
        d: Dict[str, Any] = dict(distribution(values), count=self.count, mean=float(self.sum[i] / self.count),
                                 min=float(self.min[i]), max=float(self.max[i]))
        if len(values) < self.count:
            d["sampled"] = len(values)
        return d


def table_stats(tables_uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Statistics of a run's output folder:

    images: ok/error counts, error reasons, files of several frames (masked on their first), ok
    images by the dtype the model computed in (a folder of mixed devices under fast mode's "auto"
    shows several; "unknown": written before this was recorded),
    width/height and masks-per-image distributions;
    masks: count, and distributions of area, area as a fraction of the image, predicted IoU and
    stability score; the model and settings identifiers found (a mixed folder shows several).
    Read shard by shard (a few read ahead in threads), only the columns used (not the masks' RLE
    strings); counts, means, minima and maxima are exact, the other quantiles come from uniform
    samples of at most ``SAMPLE_ROWS`` rows (``sampled`` in a distribution says so), so memory
    stays bounded for an output of any size.
    """
    out = OutputDir.of_run(tables_uri, storage_options)
    shard_ids = out.shard_ids()
    reasons: Counter = Counter()
    models: Counter = Counter()
    hashes: Counter = Counter()
    dtypes: Counter = Counter()
    images_sample, masks_sample, fraction_sample = Sampler(3), Sampler(3, seed=1), Sampler(1, seed=2)
    total = several = 0

    def read(shard_id: str):  # both tables of a shard, without the masks' counts strings
        return (out.read_shard("images", shard_id, ["image_id", "status", "error_reason", "width", "height",
                                                    "frames", "mask_count", "compute_dtype"]).to_pydict(),
                out.read_shard("masks", shard_id, ["image_id", "area", "predicted_iou", "stability_score", "model",
                                                   "settings_hash"]).to_pydict())

    for _, (images, masks) in out.each_shard(read, shard_ids):  # a few shards read ahead, in order
        ok = [status == "ok" for status in images["status"]]
        total += len(ok)
        reasons.update(r for r, good in zip(images["error_reason"], ok) if not good)
        several += sum(good and first_frame_only(f) for f, good in zip(images["frames"], ok))
        dtypes.update(d or "unknown" for d, good in zip(images["compute_dtype"], ok) if good)
        images_sample.add(np.array([(w, h, n) for w, h, n, good in zip(
            images["width"], images["height"], images["mask_count"], ok) if good], dtype=np.float64).reshape(-1, 3).T)
        image_area = {i: (w or 0) * (h or 0) for i, w, h in zip(images["image_id"], images["width"], images["height"])}
        masks_sample.add(np.array([masks["area"], masks["predicted_iou"], masks["stability_score"]],
                                  dtype=np.float64).reshape(3, -1))
        fraction_sample.add(np.array([[a / image_area[i] for a, i in zip(masks["area"], masks["image_id"])
                                       if image_area.get(i)]], dtype=np.float64).reshape(1, -1))
        models.update(masks["model"])
        hashes.update(masks["settings_hash"])
    return {
        "shards": len(shard_ids),
        "images": {
            "total": total,
            "ok": int(images_sample.count),
            "error": int(total - images_sample.count),
            "error_reasons": dict(reasons),
            "first_frame_only": several,
            "compute_dtypes": dict(sorted(dtypes.items())),
            "width": images_sample.distribution(0),
            "height": images_sample.distribution(1),
            "masks_per_image": images_sample.distribution(2),
        },
        "masks": {
            "total": int(masks_sample.count),
            "area": masks_sample.distribution(0),
            "area_fraction": fraction_sample.distribution(0),
            "predicted_iou": masks_sample.distribution(1),
            "stability_score": masks_sample.distribution(2),
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
    if im.get("first_frame_only"):
        n = im["first_frame_only"]
        lines.append(f"  {n} {'file' if n == 1 else 'files'} of several frames or pages, masked on the first")
    if im.get("compute_dtypes"):
        lines.append("  computed in: " + ", ".join(f"{k} {v}" for k, v in im["compute_dtypes"].items()))
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
        lines.append(f"  {name:<18}" + "".join(f"{c:>10.4g}" for c in cells) + (" *" if "sampled" in d else ""))
    sampled = sorted({d["sampled"] for _, d in rows if "sampled" in d})
    if sampled:
        lines.append(f"  * p5 to p95 from a uniform sample of {sampled[-1]:,} rows; counts, means, min and max exact")
    return "\n".join(lines)
