"""Host syncs of the mask generator's per-batch work, counted on CPU.

On a GPU every call that needs a tensor's values or a data-dependent shape on the host (a
boolean-mask selection, ``nonzero``, ``item``, ``tolist``...) waits for the device to drain.
The decoder batches and the filter chunks are the generator's innermost loops, so their count
of such calls is fixed here: 2 per decoder batch with survivors plus 1 per filter chunk, and 1
per batch without. Counted with a ``TorchFunctionMode``, so it needs no GPU.
"""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sam_core import SamAutomaticMaskGenerator

from .conftest import official_sam, ours_from, photo, sharpen

# Tensor methods and functions that block on the device (when the tensor is on one).
SYNCING = {"nonzero", "argwhere", "tolist", "item", "__bool__", "__int__", "__float__", "__index__",
           "cpu", "numpy", "unique", "unique_consecutive", "masked_select"}


def _is_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostSyncs(TorchFunctionMode):
    """Counts the torch calls made while active that would wait for a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING or (name in ("__getitem__", "__setitem__") and _is_bool_index(args[1])):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_counter_sees_syncs():
    x = torch.randn(6, 3)
    with HostSyncs() as syncs:
        x[x > 0], (x > 0).nonzero(), x.sum().item(), bool(x.any()), x[:, 0].tolist()
        x.index_select(0, torch.tensor([0, 2])), x[torch.tensor([1])], x + 1
    assert syncs.count == 5


def batch_syncs(gen: SamAutomaticMaskGenerator, image) -> List[Tuple[int, int, int]]:
    """(host syncs, filter chunks, candidates kept) of every decoder batch of ``gen.generate(image)``."""
    syncs, batches, chunks = HostSyncs(), [], [0]
    process_batch, filter_chunk = gen._process_batch, gen._filter

    def counted_filter(*args):
        chunks[0] += 1
        return filter_chunk(*args)

    def counted_batch(*args):
        before, chunks[0] = syncs.count, 0
        out = process_batch(*args)
        batches.append((syncs.count - before, chunks[0], len(out)))
        return out

    gen._process_batch, gen._filter = counted_batch, counted_filter
    with syncs:
        gen.generate(image)
    return batches


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_host_syncs_per_decoder_batch(mode):
    model = ours_from(sharpen(official_sam("tiny", perturb=0.0)), "tiny")
    image = photo("astronaut", (301, 451))
    settings = dict(points_per_side=8, points_per_batch=16, fast_points_per_batch=16, mode=mode,
                    box_nms_thresh=1.0, stability_score_thresh=0.8)
    # Filter chunks of 3 masks (a chunk's pixels are counted at the encoder's square size).
    chunk_pixels = 3 * model.image_encoder.img_size**2
    gen = SamAutomaticMaskGenerator(model, pred_iou_thresh=0.8, max_chunk_pixels=chunk_pixels, **settings)
    batches = batch_syncs(gen, image)
    assert len(batches) == 4 and all(chunks > 1 for _, chunks, _ in batches)
    assert sum(kept for _, _, kept in batches) > 0
    assert [s for s, _, _ in batches] == [2 + chunks for _, chunks, _ in batches]
    # Nothing passes the IoU filter: one sync, and no mask is decoded.
    nothing = SamAutomaticMaskGenerator(model, pred_iou_thresh=10.0, **settings)
    assert batch_syncs(nothing, image) == [(1, 0, 0)] * 4
