"""Overlay PNGs of generated masks and a static HTML gallery (``python -m jobs.render``).

The gallery is one ``index.html`` next to ``img/*.png``: no scripts or styles from elsewhere, so it
opens offline from disk. A small inline script counts the images that loaded into
``<p id="loaded">`` (what the headless-browser test reads).
"""

from __future__ import annotations

import hashlib
import heapq
import html
import io
import posixpath
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set

import numpy as np
import pyarrow.compute as pc
from PIL import Image
from pycocotools import mask as mask_utils

from .decode import decode_image
from .export import images_with_masks
from .names import name_digest, short_part
from .output import OutputDir, resized_short_side
from .shards import member_range, read_source
from .storage import filesystem
from .stats import format_stats, table_stats

ALPHA = 0.5


def overlay(image: np.ndarray, masks: Sequence[Dict[str, Any]], seed: int = 0) -> np.ndarray:
    """HxWx3 uint8 with each mask filled in its own colour (alpha 0.5), largest first so small
    masks stay visible."""
    rng = np.random.default_rng(seed)
    out = image.astype(np.float32)
    for row in sorted(masks, key=lambda r: -r["area"]):
        m = mask_utils.decode({"size": [row["height"], row["width"]], "counts": row["counts"]}).astype(bool)
        color = rng.integers(40, 256, size=3).astype(np.float32)
        out[m] = (1 - ALPHA) * out[m] + ALPHA * color
    return out.round().astype(np.uint8)


def _ok_ids(tables: OutputDir, shard_id: str) -> List[str]:
    images = tables.read_shard("images", shard_id, ["image_id", "status"])
    return images.filter(pc.equal(images.column("status"), "ok")).column("image_id").to_pylist()


def _file_name(image_id: str, taken: Set[str]) -> str:
    """A file name for ``image_id``'s overlay: its id with what a file name or URL cannot hold
    made "_", shortened where it is long (:func:`pipeline.names.short_part`), and, where another
    image of the gallery got that name ("a b.jpg", "a_b.jpg"), a digest of the id after it."""
    name = short_part(re.sub(r"[^A-Za-z0-9._-]+", "_", image_id))
    if name + ".png" in taken:
        name += "-" + name_digest(image_id)
    taken.add(name + ".png")
    return name + ".png"


def render_gallery(tables_uri: str, dest: str, image_ids: Optional[Sequence[str]] = None, sample: int = 12,
                   seed: int = 0, storage_options: Optional[Mapping[str, Any]] = None) -> List[str]:
    """Overlays for ``image_ids`` (default: a seeded sample of ``sample`` ok images) under
    ``<dest>/img/`` and ``<dest>/index.html``. Returns the image ids rendered.

    Raises ValueError naming any requested id that is not an ok image of the tables.
    """
    tables = OutputDir.of_run(tables_uri, storage_options)
    if image_ids:  # the images tables of their shards only
        shards = sorted({i.split("/", 1)[0] for i in image_ids} & set(tables.shard_ids()))
        known = {i for _, ids in tables.each_shard(lambda s: _ok_ids(tables, s), shards) for i in ids}
        missing = [i for i in image_ids if i not in known]
        if missing:
            raise ValueError(f"Not ok images of {tables_uri}: {missing}; e.g. {sorted(known)[:3]}.")
        chosen = list(image_ids)
    else:  # the ok ids with the smallest seeded hashes: a uniform sample held in O(sample) memory
        ok = (i for _, ids in tables.each_shard(lambda s: _ok_ids(tables, s)) for i in ids)
        chosen = sorted(heapq.nsmallest(sample, ok, key=lambda i: hashlib.sha1(f"{seed}:{i}".encode()).digest()))
    wanted = set(chosen)
    available = {image["image_id"]: (image, masks) for image, masks in images_with_masks(
        tables, sorted({i.split("/", 1)[0] for i in chosen})) if image["image_id"] in wanted}
    markers = tables.markers(sorted({i.split("/", 1)[0] for i in chosen}))
    fs, root = filesystem(dest, storage_options)
    fs.makedirs(posixpath.join(root, "img"), exist_ok=True)
    figures, names = [], set()
    for image_id in chosen:
        image, masks = available[image_id]
        short_side = resized_short_side(markers.get(image_id.split("/", 1)[0]))
        pixels = decode_image(read_source(image["uri"], storage_options, member_range(image)), short_side=short_side)
        buf = io.BytesIO()
        Image.fromarray(overlay(pixels, masks, seed)).save(buf, format="PNG")
        name = _file_name(image_id, names)
        fs.pipe_file(posixpath.join(root, "img", name), buf.getvalue())
        ious = [m["predicted_iou"] for m in masks]
        area = image["width"] * image["height"]
        fractions = [m["area"] / area for m in masks]
        caption = (f"{html.escape(image_id)}<br>{image['width']}×{image['height']}, {len(masks)} masks"
                   + (f"<br>median IoU {np.median(ious):.3f}, median area {np.median(fractions):.1%}" if masks else ""))
        figures.append(f'<figure><img src="img/{html.escape(name)}" alt="{html.escape(image_id)}">'
                       f"<figcaption>{caption}</figcaption></figure>")
    stats = html.escape(format_stats(table_stats(tables_uri, storage_options)))
    page = PAGE.format(title=html.escape(tables_uri), stats=stats, figures="\n".join(figures), n=len(figures))
    fs.pipe_file(posixpath.join(root, "index.html"), page.encode())
    return chosen


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>masks: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; background: #fafafa; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: 360px; }}
img {{ width: 360px; display: block; }}
figcaption {{ font-size: 12px; color: #333; }}
pre {{ font-size: 12px; }}
</style></head>
<body>
<h1>{title}</h1>
<p id="loaded">loading {n} images</p>
<pre>{stats}</pre>
<div class="grid">
{figures}
</div>
<script>
window.addEventListener("load", () => {{
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.getElementById("loaded").textContent = `loaded ${{ok}}/${{imgs.length}} images`;
}});
</script>
</body></html>
"""
