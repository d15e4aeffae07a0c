"""Fast mode (bf16 autocast where native, or a pinned dtype; fused attention, factored decoder)
stays within the documented fidelity of exact mode."""

from __future__ import annotations

import pytest
import torch

from sam_core import SamAutomaticMaskGenerator
from sam_core.amg.fidelity import compare_records

from .conftest import official_sam, ours_from, photo, sharpen

RELAXED = dict(box_nms_thresh=1.0, pred_iou_thresh=0.8, stability_score_thresh=0.8)


@pytest.fixture(scope="module")
def models():
    official = sharpen(official_sam("tiny", perturb=0.0))
    return (ours_from(official, "tiny", attention_backend="reference"),
            ours_from(official, "tiny", attention_backend="sdpa"))


@pytest.mark.parametrize("name, size, fast_dtype", [
    ("coffee", None, "auto"), ("astronaut", (301, 451), "auto"),
    # bf16 on every machine: "auto" is fp32 on CPUs without bf16 instructions, where this one
    # is emulated and slow (so one image, not both).
    ("astronaut", (301, 451), "bfloat16"),
    # fp16, the pin for GPUs without bf16 (V100, T4): also emulated here, so a smaller image.
    ("astronaut", (201, 301), "float16"),
])
def test_fast_mode_fidelity(models, name, size, fast_dtype):
    exact_model, fast_model = models
    image = photo(name, size)
    exact = SamAutomaticMaskGenerator(exact_model, points_per_side=8, **RELAXED).generate(image)
    gen = SamAutomaticMaskGenerator(fast_model, points_per_side=8, mode="fast", fast_dtype=fast_dtype, **RELAXED)
    if fast_dtype != "auto":
        assert gen.amp_dtype == getattr(torch, fast_dtype)
    f = compare_records(exact, gen.generate(image))
    print(f"fast ({gen.amp_dtype}) vs exact on {name}: {f.as_dict()}")
    assert f.reference_masks > 20
    assert f.median_matched_iou >= 0.99
    assert f.matched_at_0_9 >= 0.95


def test_fast_mode_compiled_fidelity(models):
    """``compile=True`` in fast mode compiles the encoder (batches of 2 and the last one of 1
    here), the decoder (prompt batches of 36 and 9, a varying number with survivors) and the
    candidate reductions; the masks stay within fast mode's fidelity bound."""
    exact_model, fast_model = models
    image = photo("astronaut", (301, 451))
    settings = dict(points_per_side=6, crop_n_layers=1, **dict(RELAXED, crop_nms_thresh=1.0))
    exact = SamAutomaticMaskGenerator(exact_model, **settings).generate(image)
    gen = SamAutomaticMaskGenerator(fast_model, mode="fast", compile=True, encoder_batch_size=2, **settings)
    assert isinstance(gen.predictor._encoder, torch._dynamo.eval_frame.OptimizedModule)
    assert gen.factored_decoder  # fast mode: the image tokens factored (tests/test_factored_decoder.py)
    for compiled in (gen._run_transformer, gen._masks):
        assert hasattr(compiled, "_torchdynamo_orig_callable")
    assert gen._masks._torchdynamo_orig_callable == fast_model.mask_decoder.masks_from_rows
    f = compare_records(exact, gen.generate(image))
    print(f"fast compiled vs exact: {f.as_dict()}")
    assert f.reference_masks > 20
    assert f.median_matched_iou >= 0.99
    assert f.matched_at_0_9 >= 0.95
    exact_gen = SamAutomaticMaskGenerator(exact_model, compile=True, **settings)
    assert exact_gen.predictor._encoder is exact_model.image_encoder  # exact mode: official arithmetic
    assert exact_gen._run_transformer == exact_model.mask_decoder.run_transformer
    assert not exact_gen.factored_decoder
    assert exact_gen._masks == exact_model.mask_decoder.masks_from_tokens


def test_compare_records_is_discriminating(models):
    """The metric sees a real difference: different images give unmatched masks."""
    exact_model, _ = models
    gen = SamAutomaticMaskGenerator(exact_model, points_per_side=6, **RELAXED)
    a = gen.generate(photo("astronaut", (301, 451)))
    b = gen.generate(photo("coffee", (301, 451)))
    assert compare_records(a, a).median_matched_iou == 1.0
    assert compare_records(a, b).matched_at_0_9 < 0.5
