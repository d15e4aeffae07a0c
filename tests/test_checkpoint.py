"""Official-format checkpoints load strictly; every way a file can be wrong gets a clear error."""

from __future__ import annotations

import copy
import gc
import io
import os
import pickle
import threading

import pytest
import torch

from segment_anything import SamPredictor as OfficialPredictor

from sam_core import CheckpointError, SamPredictor, build_sam, sam_model_registry
from sam_core.build import check_checkpoint
from sam_core.checkpoint import filter_state_dict, guess_preset, read_checkpoint
from sam_core.config import get_config

from .conftest import official_sam, photo


def assert_same_weights(model, state_dict):
    ours = model.state_dict()
    assert set(ours) == set(state_dict)
    for k, v in state_dict.items():
        assert torch.equal(ours[k], v), k


def test_official_tiny_checkpoint_loads_and_runs(tiny_official, tiny_checkpoint):
    model = sam_model_registry["tiny"](checkpoint=tiny_checkpoint)
    assert not model.training
    assert_same_weights(model, tiny_official.state_dict())
    assert all(t.device.type == "cpu" and t.dtype == torch.float32
               for t in list(model.parameters()) + list(model.buffers()))
    assert torch.equal(model.pixel_mean, tiny_official.pixel_mean)
    assert torch.equal(model.pixel_std, tiny_official.pixel_std)
    image = photo("chelsea", (233, 177))
    ours, official = SamPredictor(model), OfficialPredictor(tiny_official)
    ours.set_image(image)
    official.set_image(image)
    torch.testing.assert_close(ours.features, official.features, atol=1e-4, rtol=0)


def test_half_precision_checkpoint_loads_as_float32(tiny_official, tmp_path):
    path = tmp_path / "half.pth"
    torch.save({k: v.half() for k, v in tiny_official.state_dict().items()}, path)
    model = build_sam("tiny", checkpoint=path)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_official_full_size_state_dicts_load(model_type, tmp_path):
    """A state dict written by the official package for each released size loads strictly."""
    official = official_sam(model_type, perturb=0.0)
    expected = official.state_dict()
    path = tmp_path / f"sam_{model_type}.pth"
    torch.save(expected, path)
    del official
    gc.collect()
    model = sam_model_registry[model_type](checkpoint=path)
    assert_same_weights(model, expected)
    if model_type == "vit_l":
        with pytest.raises(CheckpointError, match="is a vit_l model.*'vit_b' was requested"):
            sam_model_registry["vit_b"](checkpoint=path)
    del model, expected
    gc.collect()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
        lambda sd: {k.replace("image_encoder.", "image_encoder._orig_mod."): v for k, v in sd.items()},
        lambda sd: {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
    ],
    ids=["model", "state_dict+module", "orig_mod", "orig_mod_inside", "nested"],
)
def test_wrapped_checkpoints_load(wrap, tiny_official, tmp_path):
    sd = tiny_official.state_dict()
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(sd), path)
    assert_same_weights(build_sam("tiny", checkpoint=path), sd)


def test_filter_state_dict_is_pure(tiny_official):
    wrapped = {"model": {f"module.{k}": v for k, v in tiny_official.state_dict().items()}}
    before = list(wrapped["model"])
    out = filter_state_dict(wrapped)
    assert list(wrapped["model"]) == before
    assert set(out) == set(tiny_official.state_dict())


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        build_sam("tiny", checkpoint=path)


@pytest.fixture(scope="module")
def transformers_sam(tmp_path_factory):
    """A tiny transformers ``SamModel`` with random weights, saved as the Hub's files are
    (``save_pretrained``: model.safetensors + config.json)."""
    from transformers import SamConfig as TransformersConfig
    from transformers import SamModel
    from transformers.models.sam.configuration_sam import SamVisionConfig
    from transformers.utils import logging as transformers_logging

    tiny = get_config("tiny")
    vision = SamVisionConfig(hidden_size=tiny.encoder_embed_dim, num_hidden_layers=tiny.encoder_depth,
                             num_attention_heads=tiny.encoder_num_heads,
                             global_attn_indexes=list(tiny.encoder_global_attn_indexes))
    torch.manual_seed(0)
    model = SamModel(TransformersConfig(vision_config=vision.to_dict())).eval()
    with torch.no_grad():  # its own initialisation is near zero (initializer_range 1e-10)
        for param in model.parameters():
            param.normal_(0, 0.05 if param.dim() > 1 else 0.1)
    folder = tmp_path_factory.mktemp("hf") / "sam-tiny"
    # Its progress bar would start tqdm's monitor, a daemon thread that lives to the end of the
    # test process; one waking during interpreter shutdown crashed a CI run (segfault after the
    # last test had passed).
    transformers_logging.disable_progress_bar()
    threads = {t.name for t in threading.enumerate()}
    model.save_pretrained(folder)
    assert {t.name for t in threading.enumerate()} <= threads  # no thread left behind
    return model, folder


def test_transformers_checkpoint_loads_as_the_official_model(transformers_sam, tmp_path):
    """Hugging Face's SAM files (safetensors or a torch.save of the state dict, transformers'
    names) load strictly and compute what transformers' model computes. In float64, so that any
    wrongly mapped tensor shows; transformers' decoder LayerNorms use eps 1e-6 where the official
    model (and so ours) uses 1e-5, so the comparison sets theirs to 1e-5."""
    hf, folder = transformers_sam
    ours = build_sam("tiny", folder / "model.safetensors")
    assert guess_preset(read_checkpoint(folder / "model.safetensors", shapes_only=True)) == "tiny"
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # both copies of the tied matrix
    again = build_sam("tiny", tmp_path / "pytorch_model.bin")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))

    points, labels = torch.tensor([[[100.0, 200.0], [500.0, 600.0]]]), torch.tensor([[1, 0]])
    with torch.no_grad():
        sparse, _ = ours.prompt_encoder(points=(points, labels), boxes=None, masks=None)
        theirs, _ = hf.prompt_encoder(input_points=points[None], input_labels=labels[None], input_boxes=None,
                                      input_masks=None)
        assert torch.equal(sparse, theirs[0])  # float32: the official code casts point encodings to float
        assert torch.equal(ours.prompt_encoder.get_dense_pe(), hf.get_image_wide_positional_embeddings())
        hf64, ours64 = copy.deepcopy(hf).double(), copy.deepcopy(ours).double()
        for module in hf64.mask_decoder.transformer.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = 1e-5
        g = torch.Generator().manual_seed(0)
        image = torch.randn(1, 3, 1024, 1024, generator=g, dtype=torch.float64)
        embedding = ours64.image_encoder(image)
        torch.testing.assert_close(embedding, hf64.get_image_embeddings(image), rtol=0, atol=1e-12)
        mask = torch.randn(1, 1, 256, 256, generator=g, dtype=torch.float64)
        _, dense = ours64.prompt_encoder(points=None, boxes=None, masks=mask)
        torch.testing.assert_close(dense, hf64.prompt_encoder(None, None, None, mask)[1], rtol=0, atol=1e-12)
        pe = ours.prompt_encoder.get_dense_pe().double()  # float32 in the official code, as the points
        expected = hf64.mask_decoder(embedding, pe, sparse[None].double(), dense, multimask_output=True)
        got = ours64.mask_decoder(image_embeddings=embedding, image_pe=pe, sparse_prompt_embeddings=sparse.double(),
                                  dense_prompt_embeddings=dense, multimask_output=True)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b[0], rtol=0, atol=1e-12)


def test_hugging_face_model_folder_is_a_checkpoint(transformers_sam, tmp_path):
    """The folder the Hub gives (config.json + model.safetensors) names its weights file."""
    folder = transformers_sam[1]
    from_folder, from_file = build_sam("tiny", folder), build_sam("tiny", folder / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(from_folder.state_dict().values(), from_file.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="folder without model.safetensors or pytorch_model.bin"):
        build_sam("tiny", tmp_path)


def test_transformers_checkpoint_of_another_size_is_refused(transformers_sam):
    with pytest.raises(CheckpointError, match="vit_b"):
        build_sam("vit_b", transformers_sam[1] / "model.safetensors")


def test_damaged_safetensors_file(transformers_sam, tmp_path):
    data = (transformers_sam[1] / "model.safetensors").read_bytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged safetensors file"):
        build_sam("tiny", path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        read_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_sam("tiny", checkpoint=tmp_path / "nope.pth")


def test_truncated_checkpoint(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        build_sam("tiny", checkpoint=path)


class _Payload:
    """Pickles to a call that would create a marker file if it were ever executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_payload_is_refused_and_not_executed(tmp_path, tiny_official, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = dict(tiny_official.state_dict(), extra=_Payload(marker))
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match="refusing to load"):
        build_sam("tiny", checkpoint=path)
    assert not marker.exists()


def test_plain_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_of_another_size(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="is a tiny model.*'vit_b' was requested"):
        sam_model_registry["vit_b"](checkpoint=tiny_checkpoint)


def test_missing_and_unexpected_keys_are_named(tiny_official, tmp_path):
    sd = dict(tiny_official.state_dict())
    del sd["mask_decoder.iou_token.weight"]
    sd["mask_decoder.extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "edited.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        build_sam("tiny", checkpoint=path)
    msg = str(err.value)
    assert "1 missing keys: mask_decoder.iou_token.weight" in msg
    assert "1 unexpected keys: mask_decoder.extra_head.weight" in msg


def test_shape_mismatch_is_named(tiny_official, tmp_path):
    sd = dict(tiny_official.state_dict())
    sd["mask_decoder.iou_token.weight"] = torch.zeros(1, 128)
    path = tmp_path / "bad_shape.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"mask_decoder.iou_token.weight: checkpoint \(1, 128\)"):
        build_sam("tiny", checkpoint=path)


def test_tensor_instead_of_state_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_checkpoint(path)


# ---------------------------------------------------------------- checking a checkpoint before a run
def _bad_checkpoints(tiny_official, tiny_checkpoint, tmp_path):
    """(name, path) of files that build_sam("tiny", path) refuses, one per kind of fault."""
    data = tiny_checkpoint.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    for zip_format in (True, False):
        torch.save(dict(tiny_official.state_dict(), extra=_Payload(tmp_path / "pwned")),
                   tmp_path / f"evil-{zip_format}.pth", _use_new_zipfile_serialization=zip_format)
    edited = dict(tiny_official.state_dict())
    del edited["mask_decoder.iou_token.weight"]
    torch.save(edited, tmp_path / "edited.pth")
    reshaped = dict(tiny_official.state_dict())
    reshaped["mask_decoder.iou_token.weight"] = torch.zeros(2, 3)
    torch.save(reshaped, tmp_path / "reshaped.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    names = ["missing", "truncated", "empty", "text", "evil-True", "evil-False", "edited", "reshaped", "tensor"]
    return [(n, tmp_path / f"{n}.pth") for n in names]


def test_check_checkpoint_raises_what_loading_would(tiny_official, tiny_checkpoint, tmp_path):
    """check_checkpoint reads only names and shapes, yet refuses every file build_sam refuses,
    with the same error, and runs no pickled code."""
    for name, path in _bad_checkpoints(tiny_official, tiny_checkpoint, tmp_path):
        with pytest.raises(Exception) as built:
            build_sam("tiny", checkpoint=path)
        with pytest.raises(type(built.value)) as checked:
            check_checkpoint("tiny", path)
        assert str(checked.value) == str(built.value), name
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(CheckpointError, match="is a tiny model.*'vit_b' was requested"):
        check_checkpoint("vit_b", tiny_checkpoint)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_check_checkpoint_passes_a_good_file_from_its_shapes(tiny_official, tmp_path, zip_format):
    path = tmp_path / "good.pth"
    torch.save(tiny_official.state_dict(), path, _use_new_zipfile_serialization=zip_format)
    check_checkpoint("tiny", path)
    shapes = read_checkpoint(path, shapes_only=True)
    assert {k: v.shape for k, v in shapes.items()} == {k: v.shape for k, v in tiny_official.state_dict().items()}
    assert {v.device.type for v in shapes.values()} == {"meta"}


def test_checkpoint_from_object_storage_is_cached_per_version(tiny_official, tiny_checkpoint, tmp_path, monkeypatch):
    """A checkpoint URI (fsspec's memory filesystem stands in for S3) loads like the local file;
    it is copied once into the cache, and again only when the stored file changes."""
    import fsspec

    monkeypatch.setenv("SAM_DATAGEN_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.pipe("/models/sam_tiny.pth", tiny_checkpoint.read_bytes())
    uri = "memory://models/sam_tiny.pth"
    check_checkpoint("tiny", uri)
    assert_same_weights(build_sam("tiny", uri), tiny_official.state_dict())
    copies = list((tmp_path / "cache" / "checkpoints").glob("*/sam_tiny.pth"))
    assert len(copies) == 1 and copies[0].read_bytes() == tiny_checkpoint.read_bytes()

    fetched = []
    monkeypatch.setattr(type(fs), "get_file", lambda self, *a, **k: fetched.append(a) or fsspec.AbstractFileSystem.get_file(self, *a, **k))
    build_sam("tiny", uri)
    assert fetched == []  # read from the cached copy
    other = official_sam("tiny", seed=5).state_dict()
    fs.rm("/models/sam_tiny.pth")
    buf = io.BytesIO()
    torch.save(other, buf)
    fs.pipe("/models/sam_tiny.pth", buf.getvalue())
    assert_same_weights(build_sam("tiny", uri), other)
    assert len(fetched) == 1
    with pytest.raises(FileNotFoundError, match="memory://models/nope.pth' does not exist"):
        check_checkpoint("tiny", "memory://models/nope.pth")


def test_weights_digest_tells_other_tensors_apart_from_the_zip_directory(tiny_official, tmp_path, transformers_sam,
                                                                         monkeypatch, caplog):
    """A run's output records its checkpoint's digest, so that a checkpoint replaced under the same
    name (a fine-tuned copy) is not resumed into. It comes from the CRC-32s of a zip .pth, read
    from the zip directory alone (also remotely), and is the same for the same tensors saved
    again (torch.save writes a random serialization id) or moved. Files without sums
    (safetensors, torch's legacy format) get the SHA-256 of their bytes, read once per version."""
    import hashlib
    import shutil

    import fsspec

    from sam_core.checkpoint import cache_dir, cached_copy, weights_digest

    state = tiny_official.state_dict()
    torch.save(state, tmp_path / "a.pth")
    torch.save(state, tmp_path / "b.pth")  # saved again, another name
    tuned = dict(state)
    key = "mask_decoder.iou_prediction_head.layers.2.bias"
    tuned[key] = tuned[key] + 1e-3
    torch.save(tuned, tmp_path / "tuned.pth")
    digest = weights_digest(tmp_path / "a.pth")
    assert digest.startswith("zip-crc32:") and weights_digest(tmp_path / "b.pth") == digest
    assert weights_digest(tmp_path / "tuned.pth") != digest
    fs = fsspec.filesystem("memory")
    fs.pipe("/models/a.pth", (tmp_path / "a.pth").read_bytes())
    assert weights_digest("memory://models/a.pth") == digest
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    legacy = "sha256:" + hashlib.sha256((tmp_path / "legacy.pth").read_bytes()).hexdigest()[:16]
    assert weights_digest(tmp_path / "legacy.pth") == legacy  # no sums in the file: its bytes

    # A Hugging Face folder's model.safetensors: its bytes, read once per version of the file.
    monkeypatch.setenv("SAM_DATAGEN_CACHE", str(tmp_path / "cache"))
    hub = tmp_path / "hub"
    shutil.copytree(transformers_sam[1], hub)
    weights = hub / "model.safetensors"
    first = weights_digest(hub)
    assert first == "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    assert [p.read_text() for p in (tmp_path / "cache" / "digests").iterdir()] == [first]
    opened = []
    monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "_open",
                        lambda self, path, *a, **k: opened.append(path) or open(path, "rb"))
    assert weights_digest(hub) == first and opened == [str(weights)]  # the format check, not a second read
    monkeypatch.undo()
    monkeypatch.setenv("SAM_DATAGEN_CACHE", str(tmp_path / "cache"))
    tuned = bytearray(weights.read_bytes())
    tuned[-1] ^= 1  # a fine-tuned copy saved under the same name: other bytes, another mtime
    weights.write_bytes(bytes(tuned))
    os.utime(weights, ns=(1, 1))
    assert weights_digest(hub) not in (first, None) and len(os.listdir(cache_dir() + "/digests")) == 2
    # A remote file this node has copied (cached_copy, as build_sam does): its copy is read.
    fs.pipe("/hub/sam/model.safetensors", bytes(tuned))
    cached_copy(fs, "/hub/sam/model.safetensors")
    memory = type(fs)
    opened.clear()
    monkeypatch.setattr(memory, "_open", lambda self, path, *a, **k: opened.append(path) or io.BytesIO(fs.cat(path)))
    assert weights_digest("memory://hub/sam") == weights_digest(hub) and opened == ["/hub/sam/model.safetensors"]
    monkeypatch.setenv("SAM_DATAGEN_CACHE", str(tmp_path / "a.pth"))  # a cache that cannot be made: read each time
    assert weights_digest(hub) == weights_digest(hub) == "sha256:" + hashlib.sha256(tuned).hexdigest()[:16]
    assert "Could not keep the digest of " in caplog.text
    with pytest.raises(FileNotFoundError):
        weights_digest(tmp_path / "nope.pth")


def test_checkpoint_scheme_without_its_package(scheme_without_package):
    with pytest.raises(CheckpointError, match=f"Cannot open checkpoint '{scheme_without_package}://b/sam.pth': "
                                              "Please install no_such_package_xyz"):
        check_checkpoint("tiny", f"{scheme_without_package}://b/sam.pth")
