"""The decoder's transformer with factored image tokens (fast mode) computes what the dense one
computes, without a copy of the image tokens per prompt."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LargestTensor(TorchDispatchMode):
    """The largest tensor (elements) any operator returns inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def prompts(model, batch: int, boxes: bool):
    """Sparse and dense embeddings of ``batch`` random point (or box) prompts."""
    gen = torch.Generator().manual_seed(batch)
    if boxes:
        corners = torch.rand(batch, 2, 2, generator=gen) * 1024
        return model.prompt_encoder(points=None, boxes=corners.sort(dim=1).values.flatten(1), masks=None)
    points = torch.rand(batch, 1, 2, generator=gen) * 1024
    return model.prompt_encoder(points=(points, torch.ones(batch, 1, dtype=torch.int)), boxes=None, masks=None)


@pytest.mark.parametrize("boxes", [False, True])
def test_factored_transformer_matches_the_dense_one(tiny_ours, boxes):
    """Tokens, image tokens and the masks made from them agree to fp32 rounding; ``tiny`` has the
    official decoder (256 wide, 8 heads, 64x64 tokens)."""
    decoder = tiny_ours.mask_decoder
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(1))
    pe = tiny_ours.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        sparse, dense = prompts(tiny_ours, 6, boxes)
        hs, src = decoder.run_transformer(embedding, pe, sparse, dense)
        factored_hs, rows = decoder.run_transformer_factored(embedding, pe, sparse, dense)
        torch.testing.assert_close(factored_hs, hs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decoder.image_tokens(rows, (64, 64)), src, rtol=1e-5, atol=1e-5)
        some = torch.tensor([4, 1])
        expected = decoder.masks_from_tokens(hs[some], src[some])
        torch.testing.assert_close(decoder.masks_from_tokens(factored_hs[some], decoder.image_tokens(rows, (64, 64), some)),
                                   expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(decoder.masks_from_rows(factored_hs[some], rows.select(some), (64, 64)),
                                   expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("per_row_offset", [False, True])
def test_factored_rows_dense_is_the_formula(scaled, per_row_offset):
    """``dense`` makes ``scale * shared + coeffs^T @ basis + offset`` for each kind of factors,
    for every prompt or a subset, and in the dtype asked for."""
    from sam_core.modeling.factored import FactoredRows

    g = torch.Generator().manual_seed(3)
    b, r, n, c = 3, 4, 10, 6
    scale = torch.rand(b, n, generator=g) + 0.5 if scaled else None
    rows = FactoredRows(scale, torch.randn(n, c, generator=g), torch.randn(b, r, n, generator=g),
                        torch.randn(b, r, c, generator=g), torch.randn(*((n, c) if per_row_offset else (c,)), generator=g))
    expected = rows.coeffs.transpose(1, 2) @ rows.basis + rows.offset
    expected = expected + (rows.shared if scale is None else scale[..., None] * rows.shared)
    torch.testing.assert_close(rows.dense(), expected)
    some = torch.tensor([2, 0])
    torch.testing.assert_close(rows.dense(some), expected[some])
    low = rows.dense(dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, rtol=0.02, atol=0.05)


def test_masks_from_rows_matches_the_upscaling_convolutions(tiny_ours):
    """The mask head on the factors (per-pixel products, each token's 4x4 block of pixels in
    rows) puts every logit where the convolutions do: a non-square embedding, so that rows and
    columns cannot be swapped unseen. Under bf16 autocast it computes in bf16, close to fp32."""
    decoder = tiny_ours.mask_decoder
    gen = torch.Generator().manual_seed(2)
    embedding, pe = torch.randn(1, 256, 12, 20, generator=gen), torch.randn(1, 256, 12, 20, generator=gen)
    with torch.no_grad():
        sparse, dense = prompts(tiny_ours, 5, False)
        dense = dense[..., :12, :20]  # the no-mask embedding, one vector everywhere
        hs, rows = decoder.run_transformer_factored(embedding, pe, sparse, dense)
        expected = decoder.masks_from_tokens(hs, decoder.image_tokens(rows, (12, 20)))  # (5, 4, 48, 80)
        got = decoder.masks_from_rows(hs, rows, (12, 20))
        assert got.shape == expected.shape == (5, 4, 48, 80)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", torch.bfloat16):
            low = decoder.masks_from_rows(hs, rows, (12, 20))
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), expected, rtol=0.05, atol=0.05 * expected.abs().max().item())
    with pytest.raises(ValueError, match="2x2 stride-2 transposed convolution"):
        from sam_core.modeling.mask_decoder import _pixel_blocks

        _pixel_blocks(torch.nn.ConvTranspose2d(4, 4, kernel_size=3, stride=2))


def test_factored_transformer_makes_no_image_tokens_per_prompt(tiny_ours):
    """No operator returns a tensor as large as B copies of the (N, C) image tokens; the dense
    path does (the check sees it)."""
    decoder = tiny_ours.mask_decoder
    batch, tokens = 16, 64 * 64 * 256
    embedding = torch.randn(1, 256, 64, 64)
    pe = tiny_ours.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        sparse, dense = prompts(tiny_ours, batch, False)
        with LargestTensor() as factored:
            decoder.run_transformer_factored(embedding, pe, sparse, dense)
        with LargestTensor() as dense_path:
            decoder.run_transformer(embedding, pe, sparse, dense)
    assert factored.numel < batch * tokens <= dense_path.numel


def test_factored_transformer_needs_tokens_shared_by_every_prompt(tiny_ours):
    decoder = tiny_ours.mask_decoder
    pe = tiny_ours.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        sparse, dense = prompts(tiny_ours, 2, False)
        with pytest.raises(ValueError, match="one image embedding and no mask prompt"):
            decoder.run_transformer_factored(torch.randn(2, 256, 64, 64), pe, sparse, dense)
        masks = torch.randn(2, 1, 256, 256)
        sparse, dense = tiny_ours.prompt_encoder(points=None, boxes=None, masks=masks)
        with pytest.raises(ValueError, match="one image embedding and no mask prompt"):
            decoder.run_transformer_factored(torch.randn(1, 256, 64, 64), pe, sparse, dense)


def test_factored_transformer_matches_on_a_trained_model():
    """The bundled demo model (trained weights, so activations of a real scale) on a bundled
    scene's embedding: the same agreement."""
    from pipeline.single_machine import SAMPLE_IMAGES
    from sam_core import SamPredictor, build_sam
    from sam_core.checkpoint import BUNDLED_CHECKPOINTS
    from sam_core.training.data import load_coco, read_rgb

    model = build_sam("demo", BUNDLED_CHECKPOINTS["demo"])
    path, _, _ = load_coco(SAMPLE_IMAGES + ".json")[0]
    predictor = SamPredictor(model)
    predictor.set_image(read_rgb(path))
    decoder = model.mask_decoder
    pe = model.prompt_encoder.get_dense_pe()
    grid = torch.stack(torch.meshgrid(torch.linspace(8, 248, 6), torch.linspace(8, 248, 6), indexing="xy"), -1)
    points = grid.reshape(-1, 1, 2)
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=(points, torch.ones(len(points), 1, dtype=torch.int)),
                                             boxes=None, masks=None)
        hs, src = decoder.run_transformer(predictor.features, pe, sparse, dense)
        factored_hs, rows = decoder.run_transformer_factored(predictor.features, pe, sparse, dense)
    torch.testing.assert_close(factored_hs, hs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decoder.image_tokens(rows, src.shape[-2:]), src, rtol=1e-5, atol=1e-5)


def test_predictor_with_factored_decoder_gives_the_same_masks(tiny_ours, monkeypatch):
    """``SamPredictor(factored_decoder=True)`` (what ``jobs.prompt --mode fast`` uses) on a batch
    of boxes: the same logits and IoU up to fp32 rounding; with a mask input it takes the dense
    path (the prompts do not share the image tokens)."""
    from pipeline.prompted import BoxPrompter
    from sam_core import SamPredictor

    from .conftest import photo

    decoder = tiny_ours.mask_decoder
    factored_calls = []
    run_factored = decoder.run_transformer_factored
    monkeypatch.setattr(decoder, "run_transformer_factored",
                        lambda *args: factored_calls.append(len(args[2])) or run_factored(*args))
    image = photo("coffee", (200, 300))
    dense_path, factored = SamPredictor(tiny_ours), SamPredictor(tiny_ours, factored_decoder=True)
    boxes = torch.tensor([[10.0, 20.0, 400.0, 300.0], [500.0, 100.0, 900.0, 600.0], [0.0, 0.0, 1000.0, 680.0]])
    results = []
    for predictor in (dense_path, factored):
        predictor.set_image(image)
        with torch.no_grad():
            results.append(predictor.predict_torch(None, None, boxes, multimask_output=True, return_logits=True))
            results.append(predictor.predict_torch(None, None, boxes[:2], mask_input=results[0][2][:2, :1]))
    for expected, got in zip(results[:2], results[2:]):
        for a, b in zip(expected, got):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert factored_calls == [3]  # the boxes; not the call with two mask inputs, nor the dense predictor's
    assert BoxPrompter("tiny", None, mode="fast").predictor.factored_decoder
    assert not BoxPrompter("tiny", None).predictor.factored_decoder
