"""Host syncs of the mask generator's per-batch work, counted on CPU.

On a GPU every call that needs a tensor's values or a data-dependent shape on the host (a
boolean-mask selection, ``nonzero``, ``item``, ``tolist``...) waits for the device to drain.
The decoder batches, the filter chunks and the RLE chunks are the generator's innermost loops,
so their count of such calls is fixed here: 2 per decoder batch with survivors plus 1 per filter
chunk, 1 per batch without; 1 per image to group the kept masks by crop plus 2 per RLE chunk.
Counted with a ``TorchFunctionMode``, so it needs no GPU.
"""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sam_core import SamAutomaticMaskGenerator
from sam_core.amg import generator as generator_module

from .conftest import official_sam, ours_from, photo, sharpen

# Tensor methods and functions that block on the device (when the tensor is on one). Not
# ``numpy``: a device tensor needs ``cpu()`` first, which is counted.
SYNCING = {"nonzero", "argwhere", "tolist", "item", "__bool__", "__int__", "__float__", "__index__",
           "cpu", "unique", "unique_consecutive", "masked_select"}


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


def counted(syncs: HostSyncs, calls: List[Tuple[int, int, int]], fn, inner: List[int]):
    """``fn`` recording (host syncs, calls counted in ``inner[0]`` meanwhile, rows out) per call."""
    def wrapper(*args):
        before, inner[0] = syncs.count, 0
        out = fn(*args)
        calls.append((syncs.count - before, inner[0], len(out)))
        return out
    return wrapper


def tally(fn, inner: List[int]):
    def wrapper(*args, **kwargs):
        inner[0] += 1
        return fn(*args, **kwargs)
    return wrapper


def generate_counting_syncs(gen: SamAutomaticMaskGenerator, image, monkeypatch):
    """(host syncs, filter chunks, candidates kept) of every decoder batch and (host syncs, RLE
    chunks, masks) of every image's encoding, in ``gen.generate(image)``."""
    syncs, batches, encodings, filters, rles = HostSyncs(), [], [], [0], [0]
    gen._filter = tally(gen._filter, filters)
    gen._process_batch = counted(syncs, batches, gen._process_batch, filters)
    monkeypatch.setattr(generator_module, "mask_to_rle", tally(generator_module.mask_to_rle, rles))
    gen._encode = counted(syncs, encodings, gen._encode, rles)
    with syncs:
        gen.generate(image)
    return batches, encodings


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_host_syncs_per_decoder_batch_and_rle_chunk(mode, monkeypatch):
    model = ours_from(sharpen(official_sam("tiny", perturb=0.0)), "tiny")
    image = photo("astronaut", (301, 451))
    settings = dict(points_per_side=8, points_per_batch=16, fast_points_per_batch=16, mode=mode,
                    box_nms_thresh=1.0, stability_score_thresh=0.8)
    # Filter chunks of 3 masks (a chunk's pixels are counted at the encoder's square size).
    chunk_pixels = 3 * model.image_encoder.img_size**2
    gen = SamAutomaticMaskGenerator(model, pred_iou_thresh=0.8, max_chunk_pixels=chunk_pixels, **settings)
    batches, encodings = generate_counting_syncs(gen, image, monkeypatch)
    assert len(batches) == 4 and all(chunks > 1 for _, chunks, _ in batches)
    assert sum(kept for _, _, kept in batches) > 0
    assert [s for s, _, _ in batches] == [2 + chunks for _, chunks, _ in batches]
    [(syncs, chunks, masks)] = encodings
    assert chunks > 1 and masks > 0 and syncs == 1 + 2 * chunks
    # Nothing passes the IoU filter: one sync per batch, and no mask is decoded.
    nothing = SamAutomaticMaskGenerator(model, pred_iou_thresh=10.0, **settings)
    assert generate_counting_syncs(nothing, image, monkeypatch) == ([(1, 0, 0)] * 4, [(1, 0, 0)])
