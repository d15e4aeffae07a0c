"""Mask generation on one machine: every image under an input URI -> SA-1B JSON files.

The Ray pipeline distributes the same steps; this runner is the reference and the fallback.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from sam_core import SamAutomaticMaskGenerator
from sam_core.amg.sa1b import sa1b_document
from sam_core.precision import compute_dtype_name

from .decode import DEFAULT_MAX_PIXELS
from .export import export_stems, write_document
from .names import name_digest, relative_path
from .output import first_frame_only
from .reading import decoded_images
from .shards import discover_shards
from .storage import filesystem

log = logging.getLogger(__name__)

SAMPLE_IMAGES = os.path.join(os.path.dirname(__file__), "sample_images")
MAX_ERROR_LINES = 20  # errors a summary lists one by one (a large run's log is not flooded; the tables hold all)


@dataclass
class RunSummary:
    images_ok: int = 0
    images_error: int = 0
    masks: int = 0
    seconds: float = 0.0
    errors: List[Dict[str, str]] = field(default_factory=list)  # {"uri", "reason", "detail"} (see error_reasons)
    error_reasons: Dict[str, int] = field(default_factory=dict)  # every error counted by reason, where
    # errors lists only the first MAX_ERROR_LINES (a pipeline output's summary); empty: count errors
    stage_seconds: Dict[str, float] = field(default_factory=dict)  # summed worker time per stage
    shards_processed: int = 0  # shards done by this run (the rest were already complete)
    shards_left: int = 0  # pending shards this run left for a later one (--max-shards)
    run_record: Optional[str] = None  # the run's record (pipeline.run_records), if it wrote one
    images_processed: Optional[int] = None  # images done by this run, if not all of them
    images_first_frame_only: int = 0  # images whose files have more frames or pages than the one masked
    first_frame_only: List[Dict[str, Any]] = field(default_factory=list)  # the first MAX_ERROR_LINES
    # of them: {"uri", "frames"}
    compute_dtypes: Dict[str, int] = field(default_factory=dict)  # ok images by what the model computed
    # in ("float32", "bfloat16", "float16"; "unknown": shards written before this was recorded)

    @property
    def images_per_second(self) -> float:
        done = self.images_ok + self.images_error if self.images_processed is None else self.images_processed
        return done / self.seconds if self.seconds else 0.0

    def reason_counts(self) -> Counter:
        """Errors by reason: ``error_reasons`` if given, else counted from ``errors``."""
        return Counter(self.error_reasons) if self.error_reasons else Counter(e["reason"] for e in self.errors)

    def as_dict(self) -> Dict[str, Any]:
        return dict(asdict(self), images_per_second=self.images_per_second)

    def counts(self) -> str:
        """"images ok: 5, errors: 1, masks: 53": what the output holds."""
        return f"images ok: {self.images_ok}, errors: {self.images_error}, masks: {self.masks}"

    def __str__(self) -> str:
        lines = [f"{self.counts()}, {self.seconds:.1f} s ({self.images_per_second:.3f} images/s)"]
        if self.stage_seconds:
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_seconds.items())
            lines.append(f"shards processed this run: {self.shards_processed}; worker time: {stages}")
        if self.shards_left:
            lines.append(f"shards left for a later run (--max-shards): {self.shards_left}")
        return "\n".join(lines + self.detail_lines())

    def detail_lines(self) -> List[str]:
        """The errors by reason, the first ``MAX_ERROR_LINES`` of them one by one, the images
        masked on their first frame only, and the dtypes computed in where there are several."""
        lines = []
        reasons = self.reason_counts()
        if reasons:
            lines.append("errors by reason: " + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items(), key=str)))
        shown = self.errors[:MAX_ERROR_LINES]
        lines += [f"  error {e['uri']}: {e['reason']} ({e['detail']})" for e in shown]
        more = max(sum(reasons.values()), len(self.errors)) - len(shown)
        if more > 0:
            lines.append(f"  ... and {more} more: every error is a row of the images table (status 'error', "
                         "with its uri, error_reason and error_detail)")
        if self.images_first_frame_only:
            n = self.images_first_frame_only
            lines.append(f"{n} {'image has' if n == 1 else 'images have'} several frames or pages: only the first "
                         "of each was masked (the images table's frames column counts them)")
            lines += [f"  first frame only: {f['uri']} ({f['frames']} frames)"
                      for f in self.first_frame_only[:MAX_ERROR_LINES]]
        if len(set(self.compute_dtypes) - {"unknown"}) > 1:
            counts = ", ".join(f"{d} {n}" for d, n in sorted(self.compute_dtypes.items()))
            lines.append(f"images computed in more than one dtype ({counts}): fast mode's fast_dtype 'auto' follows "
                         "each worker's device, and the masks of one dtype differ from the other's by rounding "
                         "(the images table's compute_dtype column says which; pin --fast-dtype for one)")
        return lines


class Stems:
    """The stems of a run's SA-1B files (``<stem>.json``): the loose files' from their names
    (:func:`pipeline.export.export_stems`), and a tar member's under its shard's name, given as
    it comes (``sa_000000/sa_1``); one that another file has (or "summary", the run's summary)
    gets a digest of its name after it."""

    def __init__(self, names: List[str]) -> None:
        self.loose = export_stems(names)  # cam1/0001.jpg -> cam1/0001
        for name, stem in self.loose.items():
            if stem == "summary":
                self.loose[name] = f"summary-{name_digest(name)}"
        self.taken = set(self.loose.values()) | {"summary"}

    def of_member(self, shard_id: str, name: str) -> str:
        whole = relative_path(f"{shard_id}/{name}")
        for stem in (posixpath.splitext(whole)[0], whole, f"{whole}-{name_digest(f'{shard_id}/{name}')}"):
            if stem not in self.taken:
                break
        self.taken.add(stem)
        return stem


def run_single_machine(
    input_uri: str,
    output_uri: str,
    generator: SamAutomaticMaskGenerator,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    short_side: Optional[int] = None,
) -> RunSummary:
    """Generate masks for every image of the input (a folder, glob, manifest or tar shards, as
    :func:`pipeline.shards.discover_shards` reads them); write ``<stem>.json`` (SA-1B) per image,
    named by its path under the input folder as exports are (:func:`pipeline.export.export_stems`),
    a tar's members under its shard's name (``sa_000000/sa_1.json``, as a ``sa1b-json`` export
    has them), and ``summary.json`` under ``output_uri``; a name met again (an image whose stem is
    "summary", a loose ``sa_000000/sa_1.jpg``) gets a digest after it. Bad inputs (unreadable
    after retries, or not a usable image) are recorded, never skipped silently. ``short_side``:
    images downsampled so their shorter side is at most that (as ``jobs.generate --resize-short-side``)."""
    if generator.output_mode != "coco_rle":
        raise ValueError("run_single_machine needs a generator with output_mode='coco_rle'.")
    summary = RunSummary()
    start = time.perf_counter()
    out_fs, out_path = filesystem(output_uri)
    out_fs.makedirs(out_path, exist_ok=True)
    shards = discover_shards(input_uri, sys.maxsize, output_uri=output_uri)  # loose files: one shard
    stems = Stems([s.name_of(u) for s in shards if s.kind == "files" for u in s.uris])
    rows = ((s, r, i) for s in shards for r, i in decoded_images(s, None, max_pixels, short_side=short_side))
    for image_id, (shard, row, image) in enumerate(rows):
        if image is None:
            summary.images_error += 1
            summary.errors.append({"uri": row["uri"], "reason": row["error_reason"], "detail": row["error_detail"]})
            continue
        uri, name = row["uri"], row["image_id"].split("/", 1)[1]
        stem = stems.of_member(shard.shard_id, name) if shard.kind == "tar" else stems.loose[name]
        records = generator.generate(image)
        h, w = image.shape[:2]
        doc = sa1b_document(image_id, name, w, h, records)
        write_document(out_fs, posixpath.join(out_path, stem + ".json"), doc)
        summary.images_ok += 1
        summary.masks += len(records)
        if first_frame_only(row["frames"]):
            summary.images_first_frame_only += 1
            summary.first_frame_only.append({"uri": uri, "frames": row["frames"]})
        log.info("%s: %d masks", uri, len(records))
    if summary.images_ok:
        summary.compute_dtypes = {compute_dtype_name(generator.amp_dtype): summary.images_ok}
    summary.seconds = time.perf_counter() - start
    out_fs.pipe_file(posixpath.join(out_path, "summary.json"), json.dumps(summary.as_dict(), indent=2).encode())
    return summary
