"""The drop-in surface: signatures and defaults as the official package, clear errors for bad input."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import segment_anything
import torch

import sam_core
from sam_core import SamPredictor

from .conftest import photo


@pytest.mark.parametrize(
    "method",
    ["set_image", "set_torch_image", "predict", "predict_torch", "get_image_embedding", "reset_image"],
)
def test_predictor_signatures_match_official(method):
    ours = inspect.signature(getattr(SamPredictor, method))
    theirs = inspect.signature(getattr(segment_anything.SamPredictor, method))
    assert [(p.name, p.default, p.kind) for p in ours.parameters.values()] == [
        (p.name, p.default, p.kind) for p in theirs.parameters.values()
    ]


def test_registry_offers_every_official_name():
    assert set(segment_anything.sam_model_registry) <= set(sam_core.sam_model_registry)
    assert {"tiny"} <= set(sam_core.sam_model_registry)


def test_unknown_model_type():
    with pytest.raises(ValueError, match="Unknown SAM model type 'vit_x'"):
        sam_core.build_sam("vit_x")


@pytest.fixture(scope="module")
def predictor(tiny_ours):
    p = SamPredictor(tiny_ours)
    p.set_image(photo("chelsea", (233, 177)))
    return p


def test_predict_before_set_image(tiny_ours):
    p = SamPredictor(tiny_ours)
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(np.array([[1, 1]]), np.array([1]))
    with pytest.raises(RuntimeError, match="set_image"):
        p.get_image_embedding()


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((20, 30), np.uint8), "HxWx3"),
        (np.zeros((20, 30, 4), np.uint8), "HxWx3"),
        (np.zeros((20, 30, 3), np.float32), "uint8"),
        (np.zeros((0, 30, 3), np.uint8), "empty"),
        ([[1, 2, 3]], "numpy array"),
    ],
    ids=["gray", "rgba", "float", "empty", "list"],
)
def test_bad_images(tiny_ours, image, match):
    with pytest.raises(ValueError, match=match):
        SamPredictor(tiny_ours).set_image(image)


def test_bad_image_format(tiny_ours):
    with pytest.raises(ValueError, match="'RGB' or 'BGR'"):
        SamPredictor(tiny_ours).set_image(np.zeros((8, 8, 3), np.uint8), "HSV")


def test_several_images_are_resized_on_torchs_threads(tiny_ours, monkeypatch):
    """``resize_images`` (the host half of ``set_images``) resizes several images at once, on as
    many threads as torch may use: two resizes must be under way together here (done one after
    the other, the barrier would time out). Same pixels as one by one, BGR flipped as before."""
    import threading

    from sam_core.transforms import ResizeLongestSide

    p = SamPredictor(tiny_ours)
    images = [photo(name, (90 + 10 * i, 120)) for i, name in enumerate(("chelsea", "coffee", "astronaut", "chelsea"))]
    expected = [ResizeLongestSide(1024).apply_image(image) for image in images]
    together = threading.Barrier(2, timeout=30)
    apply_image = p.transform.apply_image

    def resize(image):
        together.wait()
        return apply_image(image)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(p.transform, "apply_image", resize)
        got = p.resize_images(images)
        bgr = p.resize_images([image[..., ::-1] for image in images], "BGR")
    finally:
        torch.set_num_threads(threads)
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))
    assert all(np.array_equal(a, b) for a, b in zip(expected, bgr))


def test_bad_torch_image(tiny_ours):
    with pytest.raises(ValueError, match="long side 1024"):
        SamPredictor(tiny_ours).set_torch_image(torch.zeros(1, 3, 100, 200), (100, 200))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(point_coords=np.array([[1, 2]])), "given together"),
        (dict(point_coords=np.array([1, 2]), point_labels=np.array([1])), "Nx2"),
        (dict(point_coords=np.array([[1, 2]]), point_labels=np.array([1, 1])), "shape \\(1,\\)"),
        (dict(point_coords=np.array([[1, 2]]), point_labels=np.array([2])), "1 \\(foreground\\)"),
        (dict(point_coords=np.array([[np.nan, 2]]), point_labels=np.array([1])), "NaN"),
        (dict(box=np.array([1, 2, 3])), "4 finite numbers"),
        (dict(box=np.array([1, 2, 3, np.inf])), "4 finite numbers"),
        (dict(mask_input=np.zeros((256, 256))), "shape \\(1, 256, 256\\)"),
    ],
    ids=["labels-missing", "coords-1d", "labels-length", "label-value", "nan", "box-3", "box-inf",
         "mask-2d"],
)
def test_bad_prompts(predictor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        predictor.predict(**kwargs)


def test_bad_torch_prompts(predictor):
    c, l = torch.zeros(2, 1, 2), torch.ones(2, 1, dtype=torch.int)
    with pytest.raises(ValueError, match="disagree"):
        predictor.predict_torch(c, l, boxes=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="BxN"):
        predictor.predict_torch(c, torch.ones(2, 2))
    with pytest.raises(ValueError, match="Bx1x256x256"):
        predictor.predict_torch(c, l, mask_input=torch.zeros(2, 256, 256))


def test_output_types_and_shapes(predictor):
    masks, iou, low = predictor.predict(np.array([[50, 60]]), np.array([1]))
    assert masks.shape == (3, 233, 177) and masks.dtype == bool
    assert iou.shape == (3,) and iou.dtype == np.float32
    assert low.shape == (3, 256, 256) and low.dtype == np.float32
    logits, _, _ = predictor.predict(box=np.array([5, 5, 100, 120]), multimask_output=False,
                                     return_logits=True)
    assert logits.shape == (1, 233, 177) and logits.dtype == np.float32


def test_bf16_autocast_runs_and_stays_close(tiny_ours):
    image = photo("chelsea", (233, 177))
    exact, fast = SamPredictor(tiny_ours), SamPredictor(tiny_ours, amp_dtype=torch.bfloat16)
    exact.set_image(image)
    fast.set_image(image)
    assert fast.features.dtype == torch.float32
    rel = (fast.features - exact.features).norm() / exact.features.norm()
    assert rel < 0.05, f"bf16 embedding relative error {rel:.3f}"
    _, iou_exact, _ = exact.predict(np.array([[50, 60]]), np.array([1]))
    _, iou_fast, _ = fast.predict(np.array([[50, 60]]), np.array([1]))
    assert iou_fast.dtype == np.float32
    np.testing.assert_allclose(iou_fast, iou_exact, atol=0.05)


def official_public_names():
    """(module, name) for every class and function the official package defines, in the module
    that defines it, and every one a package (``__init__``) re-exports."""
    import importlib
    import pkgutil

    modules = [("segment_anything", True)] + [
        (info.name, info.ispkg) for info in pkgutil.walk_packages(segment_anything.__path__, "segment_anything.")]
    for module_name, is_package in modules:
        for name, value in vars(importlib.import_module(module_name)).items():
            if (not name.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
                    and (value.__module__ == module_name
                         or is_package and value.__module__.startswith("segment_anything"))):
                yield module_name, name


def test_every_official_module_and_name_is_importable_from_ours():
    """``from segment_anything.x.y import Z`` works as ``from sam_core.x.y import Z``."""
    import importlib

    names = list(official_public_names())
    assert len(names) > 40 and ("segment_anything.utils.onnx", "SamOnnxModel") in names
    missing = [f"{m}.{n}" for m, n in names
               if not hasattr(importlib.import_module(m.replace("segment_anything", "sam_core", 1)), n)]
    assert missing == []
    assert sam_core.build_sam is sam_core.build_sam_vit_h.func  # the function, as the official package's


def test_build_sam_with_a_checkpoint_path_builds_vit_h(tiny_checkpoint):
    """The official ``build_sam(checkpoint)`` builds vit_h: a path as the first argument is a checkpoint."""
    from sam_core.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="vit_h"):  # a tiny checkpoint into vit_h, refused naming both
        sam_core.build_sam(str(tiny_checkpoint))
    with pytest.raises(CheckpointError, match="vit_h"):
        sam_core.build_sam(tiny_checkpoint if not isinstance(tiny_checkpoint, str) else __import__("pathlib").Path(tiny_checkpoint))
    assert sam_core.build_sam("tiny", str(tiny_checkpoint)).image_encoder.img_size > 0


def test_add_decomposed_rel_pos_equals_official():
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos as official

    from sam_core.modeling.image_encoder import add_decomposed_rel_pos

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4 * 6, 8, generator=g)
    attn = torch.randn(2, 4 * 6, 5 * 3, generator=g)
    rel_h, rel_w = torch.randn(2 * 5 - 1, 8, generator=g), torch.randn(2 * 6 - 1, 8, generator=g)
    expected = official(attn, q, rel_h, rel_w, (4, 6), (5, 3))
    assert torch.equal(add_decomposed_rel_pos(attn, q, rel_h, rel_w, (4, 6), (5, 3)), expected)


@pytest.mark.parametrize("single, stability, extra", [(True, False, False), (False, False, False),
                                                      (True, True, True), (False, True, True)])
@pytest.mark.parametrize("labels, has_mask", [([1.0, 0.0, -1.0], 0.0), ([1.0, 0.0, 2.0, 3.0], 1.0), ([1.0, -1.0], 1.0)])
def test_onnx_model_equals_official(tiny_official, single, stability, extra, labels, has_mask):
    from segment_anything.utils.onnx import SamOnnxModel as Official

    from sam_core.utils.onnx import SamOnnxModel

    from .conftest import ours_from

    tiny_ours = ours_from(tiny_official, "tiny", attention_backend="reference")  # the official arithmetic

    g = torch.Generator().manual_seed(len(labels))
    encoder = tiny_official.prompt_encoder
    inputs = (torch.randn(1, encoder.embed_dim, *encoder.image_embedding_size, generator=g),
              torch.rand(1, len(labels), 2, generator=g) * tiny_official.image_encoder.img_size,
              torch.tensor([labels]),
              torch.randn(1, 1, *encoder.mask_input_size, generator=g),
              torch.tensor([has_mask]),
              torch.tensor([233.0, 177.0]))
    expected = Official(tiny_official, single, use_stability_score=stability, return_extra_metrics=extra)(*inputs)
    got = SamOnnxModel(tiny_ours, single, use_stability_score=stability, return_extra_metrics=extra)(*inputs)
    assert len(got) == len(expected) == (5 if extra else 3)
    assert got[0].shape == (1, 1 if single else 4, 233, 177)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_onnx_model_exports_and_runs_in_onnxruntime(tiny_ours, tmp_path):
    """The export the official script makes (TorchScript exporter, points dynamic) runs in ONNX
    Runtime with the torch module's outputs, for other numbers of points than it was traced with."""
    import onnxruntime

    from sam_core.utils.onnx import SamOnnxModel

    model = SamOnnxModel(tiny_ours, return_single_mask=True)
    encoder = tiny_ours.prompt_encoder
    g = torch.Generator().manual_seed(0)
    inputs = {"image_embeddings": torch.randn(1, encoder.embed_dim, *encoder.image_embedding_size, generator=g),
              "point_coords": torch.rand(1, 5, 2, generator=g) * tiny_ours.image_encoder.img_size,
              "point_labels": torch.tensor([[1.0, 0.0, 2.0, 3.0, -1.0]]),
              "mask_input": torch.randn(1, 1, *encoder.mask_input_size, generator=g),
              "has_mask_input": torch.tensor([1.0]),
              "orig_im_size": torch.tensor([300.0, 450.0])}
    path = tmp_path / "sam_decoder.onnx"
    torch.onnx.export(model, tuple(inputs.values()), str(path), input_names=list(inputs),
                      output_names=["masks", "iou_predictions", "low_res_masks"],
                      dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
                      opset_version=17, do_constant_folding=True, dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for points in (5, 3, 2):  # 3 or more: the single-mask output; 2: the best multimask one
        feed = dict(inputs, point_coords=inputs["point_coords"][:, :points],
                    point_labels=inputs["point_labels"][:, :points])
        got = session.run(None, {k: v.numpy() for k, v in feed.items()})
        expected = model(*feed.values())
        assert [o.shape for o in got] == [tuple(e.shape) for e in expected]
        assert got[0].shape == (1, 1, 300, 450)
        for o, e in zip(got, expected):  # ONNX Runtime's kernels against torch's: float rounding
            np.testing.assert_allclose(o, e.numpy(), rtol=0, atol=1e-4)
