"""Loading official-format SAM checkpoints: read safely, filter keys, load strictly with clear errors."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import posixpath
import re
import zipfile
from typing import Any, Dict, Mapping, Optional, Tuple

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn

from .config import PRESETS

log = logging.getLogger(__name__)


# Checkpoints shipped inside the package, by model type.
BUNDLED_CHECKPOINTS = {"demo": os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "sam_demo.pth")}


def bundled_checkpoint(model_type: str, checkpoint: "Optional[str]" = None) -> "Optional[str]":
    """``checkpoint`` if given, else the weights shipped for ``model_type`` (``demo``), else None."""
    return checkpoint if checkpoint is not None else BUNDLED_CHECKPOINTS.get(model_type)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the reason and what to do."""


# Wrappers that training frameworks put around a state dict.
_WRAPPER_KEYS = ("model", "state_dict")


# Hugging Face transformers' SamModel names (facebook/sam-vit-* on the Hub) -> the official
# ones, as (regex, replacement) applied in order; MLP layers are renumbered in _from_transformers.
_TRANSFORMERS_RENAMES = [
    (r"^vision_encoder\.", "image_encoder."),
    (r"^image_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^image_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"image_encoder.blocks.\1.norm\2."),
    (r"^image_encoder\.layers\.", "image_encoder.blocks."),
    (r"^image_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^image_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^image_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^image_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"^prompt_encoder\.shared_embedding\.positional_embedding$", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^shared_image_embedding\.positional_embedding$", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"^mask_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)\.", r"mask_decoder.transformer.layers.\1.norm\2."),
    (r"^mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
]
_TRANSFORMERS_MLP = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.(proj_in|layers\.(\d+)|proj_out)\.(weight|bias)$")


def is_transformers_state_dict(sd: Mapping[str, Any]) -> bool:
    """Whether ``sd`` has transformers' ``SamModel`` names (``vision_encoder.``...)."""
    return any(k.startswith("vision_encoder.") for k in sd)


def _from_transformers(sd: Mapping[str, Any]) -> Dict[str, Any]:
    """A transformers ``SamModel`` state dict under the official names (same tensors). The
    positional-encoding matrix, stored twice there (tied), must agree; every other name maps to
    one official name, and a name that maps to none is kept as it is (strict loading reports it)."""
    mlp_depth: Dict[str, int] = {}  # MLP -> its hidden layers in transformers' numbering
    for key in sd:
        m = _TRANSFORMERS_MLP.match(key)
        if m and m.group(3) is not None:
            mlp_depth[m.group(1)] = max(mlp_depth.get(m.group(1), 0), int(m.group(3)) + 1)
    out: Dict[str, Any] = {}
    for key, value in sd.items():
        m = _TRANSFORMERS_MLP.match(key)
        if m:  # proj_in, layers.i, proj_out -> layers.0, layers.(i+1), layers.(depth+1)
            prefix, part, index, kind = m.groups()
            n = 0 if part == "proj_in" else int(index) + 1 if index is not None else mlp_depth.get(prefix, 0) + 1
            new = f"{prefix}.layers.{n}.{kind}"
        else:
            new = key
            for pattern, replacement in _TRANSFORMERS_RENAMES:
                new = re.sub(pattern, replacement, new)
        if new in out:
            if not (isinstance(value, torch.Tensor) and value.shape == out[new].shape
                    and (value.is_meta or torch.equal(value, out[new]))):
                raise CheckpointError(f"The checkpoint's {key!r} differs from the tensor it should equal ({new!r}).")
            continue
        out[new] = value
    return out


def _clean_key(key: str) -> str:
    """Drop the ``module.`` prefix of DataParallel/DDP and ``_orig_mod.`` of torch.compile, which
    can stand before any submodule (``image_encoder._orig_mod.blocks.0...``)."""
    while key.startswith("module."):
        key = key[len("module.") :]
    return ".".join(part for part in key.split(".") if part != "_orig_mod")


def filter_state_dict(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Pure ``state_dict -> state_dict``: unwrap ``model``/``state_dict``, strip ``module.`` and
    ``_orig_mod.``, rename transformers' ``SamModel`` names to the official ones. Raises
    :class:`CheckpointError` if no tensors are found."""
    sd: Any = checkpoint
    while isinstance(sd, Mapping) and not _looks_like_state_dict(sd):
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, Mapping) or not _looks_like_state_dict(sd):
        raise CheckpointError(
            "The checkpoint holds no state dict of tensors (looked at the top level and under "
            f"{list(_WRAPPER_KEYS)})."
        )
    out: Dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            continue  # metadata such as epoch counters riding along in the dict
        out[_clean_key(key)] = value
    return _from_transformers(out) if is_transformers_state_dict(out) else out


def _looks_like_state_dict(d: Mapping[str, Any]) -> bool:
    return len(d) > 0 and any(isinstance(v, torch.Tensor) for v in d.values())


def read_checkpoint(path: "os.PathLike[str] | str", storage_options: Optional[Mapping[str, Any]] = None, *,
                    shapes_only: bool = False) -> Dict[str, torch.Tensor]:
    """Read a ``.pth`` file with ``weights_only=True`` (never runs pickled code) and filter it.

    ``path`` is a local path or an fsspec URI (``s3://``, ``gs://``; ``storage_options`` as for
    ``fsspec``). A remote file is copied once into a node-local cache (:func:`cached_copy`) and
    read from there. ``shapes_only`` reads just the tensor names and shapes (tensors on the meta
    device): a few kB of a multi-GB file, also remotely, for checking it before a run.
    """
    path = os.fspath(path)
    fs, fs_path = _checkpoint_file(path, storage_options)
    if not shapes_only and not isinstance(fs, LocalFileSystem):
        fs, fs_path = fsspec.filesystem("file"), cached_copy(fs, fs_path)
    with fs.open(fs_path, "rb") as f:
        head = f.read(16)
        if not head:
            raise CheckpointError(f"Checkpoint {path!r} is an empty file.")
        f.seek(0)
        if _is_safetensors(head):
            return filter_state_dict(_read_safetensors(f, path, shapes_only))
        try:
            source = fs_path if isinstance(fs, LocalFileSystem) else f  # torch reads a local file itself
            obj = torch.load(source, map_location="meta" if shapes_only else "cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" in str(e):
                raise CheckpointError(
                    f"Checkpoint {path!r} contains pickled objects other than tensors; refusing to "
                    "load it (loading runs with weights_only=True, so no code in it was executed). "
                    "Re-save it as a plain state dict: torch.save(model.state_dict(), path)."
                ) from e
            raise CheckpointError(_unreadable(path, head)) from e
        except Exception as e:  # torch.load fails in many ways on arbitrary bytes
            raise CheckpointError(_unreadable(path, head)) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"Checkpoint {path!r} holds a {type(obj).__name__}, not a state dict."
        )
    return filter_state_dict(obj)


def cache_dir() -> str:
    """Where remote checkpoints are copied: ``$SAM_DATAGEN_CACHE`` or ``~/.cache/sam_datagen``."""
    return os.environ.get("SAM_DATAGEN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sam_datagen")


def _version_key(fs: Any, fs_path: str) -> str:
    """A key of one version of a file: its path and the store's version tag (``fs.ukey``: ETag,
    or modification time and size)."""
    return hashlib.sha256(f"{fs.protocol}:{fs_path}:{fs.ukey(fs_path)}".encode()).hexdigest()[:16]


def _copy_path(fs_path: str, key: str) -> str:
    """Where :func:`cached_copy` keeps the copy of the version ``key`` of ``fs_path``."""
    return os.path.join(cache_dir(), "checkpoints", key, posixpath.basename(fs_path))


def cached_copy(fs: Any, fs_path: str) -> str:
    """Local path of a copy of remote ``fs_path``, downloaded once per node and version.

    Keyed by the path and the store's version tag (``fs.ukey``: ETag or modification time), so a
    file replaced under the same name is fetched again. Each process downloads to its own
    temporary name and renames it into place, so actors starting together on a node never read
    a half-written copy.
    """
    local = _copy_path(fs_path, _version_key(fs, fs_path))
    size = fs.size(fs_path)
    if os.path.isfile(local) and os.path.getsize(local) == size:
        return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    partial = f"{local}.{os.getpid()}.partial"
    try:
        fs.get_file(fs_path, partial)
        if os.path.getsize(partial) != size:
            raise CheckpointError(f"Copying {fs_path!r} gave {os.path.getsize(partial)} of {size} bytes.")
        os.replace(partial, local)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return local


# The weights files of a Hugging Face model folder, in the order they are used.
HF_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")


def _checkpoint_file(path: str, storage_options: Optional[Mapping[str, Any]]) -> Tuple[Any, str]:
    """(filesystem, path in it) of the checkpoint file at ``path`` (a file or a Hugging Face
    model folder, local or an fsspec URI)."""
    try:
        fs, fs_path = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    except ImportError as e:  # a scheme whose package is missing: "Please install gcsfs ..."
        raise CheckpointError(f"Cannot open checkpoint {path!r}: {e}.") from None
    if fs.isdir(fs_path):  # a Hugging Face model folder
        fs_path = _file_in_folder(fs, fs_path, path)
    if not fs.isfile(fs_path):
        raise FileNotFoundError(f"Checkpoint {path!r} does not exist or is not a file.")
    return fs, fs_path


def weights_digest(path: "os.PathLike[str] | str", storage_options: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """A digest of a checkpoint's contents, telling apart two checkpoints of one file name (a
    fine-tuned copy). A zip ``.pth`` (``torch.save``'s format, the official checkpoints'):
    from the CRC-32 it keeps for each tensor, reading only the zip directory (kB at the file's
    end, also remotely); the same for the same tensors saved again or renamed. Other files
    (safetensors, torch's legacy format) keep no sums: the SHA-256 of their bytes, read once per
    version of the file on each machine (:func:`content_digest`)."""
    fs, fs_path = _checkpoint_file(os.fspath(path), storage_options)
    with fs.open(fs_path, "rb") as f:
        if not zipfile.is_zipfile(f):
            return content_digest(fs, fs_path)
        members = zipfile.ZipFile(f).infolist()
    # member names without the archive folder (named after the file when saved); torch.save
    # writes a fresh random serialization_id each time
    entries = sorted(f"{m.filename.split('/', 1)[-1]}:{m.CRC:08x}:{m.file_size}" for m in members
                     if not m.filename.endswith(".data/serialization_id"))
    return "zip-crc32:" + hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def content_digest(fs: Any, fs_path: str) -> str:
    """``sha256:<16 hex>`` of a file's bytes. Kept under ``<cache_dir()>/digests/`` by the file's
    path and version tag (as :func:`cached_copy` keys its copies), so a file is read once per
    version on each machine (vit_h's 2.5 GB safetensors: ~2 s locally), from the node's copy of
    a remote file where :func:`cached_copy` made one; a cache that cannot be written only costs
    the next caller another read."""
    key = _version_key(fs, fs_path)
    record = os.path.join(cache_dir(), "digests", key)
    try:
        with open(record) as f:
            known = f.read().strip()
        if known.startswith("sha256:"):
            return known
    except OSError:
        pass
    copy = _copy_path(fs_path, key)
    if os.path.isfile(copy) and os.path.getsize(copy) == fs.size(fs_path):
        fs, fs_path = LocalFileSystem(), copy
    log.info("Reading %s once for its digest (the file keeps no checksums; kept in %s).", fs_path, record)
    sha = hashlib.sha256()
    with fs.open(fs_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha.update(block)
    digest = f"sha256:{sha.hexdigest()[:16]}"
    partial = f"{record}.{os.getpid()}.partial"
    try:
        os.makedirs(os.path.dirname(record), exist_ok=True)
        with open(partial, "w") as f:
            f.write(digest)
        os.replace(partial, record)
    except OSError as e:
        log.warning("Could not keep the digest of %s in %s (%s); it is read again next time.", fs_path, record, e)
    return digest


def _file_in_folder(fs: Any, folder: str, path: str) -> str:
    """The weights file of a Hugging Face model folder (``facebook/sam-vit-huge`` downloaded)."""
    for name in HF_WEIGHTS_FILES:
        if fs.isfile(posixpath.join(folder, name)):
            return posixpath.join(folder, name)
    raise FileNotFoundError(f"Checkpoint {path!r} is a folder without {' or '.join(HF_WEIGHTS_FILES)}; "
                            "give the checkpoint file.")


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _is_safetensors(head: bytes) -> bool:
    """A safetensors file: a little-endian u64 header length, then the JSON header."""
    return len(head) > 8 and head[8:9] == b"{"


def _read_safetensors(f: Any, path: str, shapes_only: bool) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file open at its start (no pickle, no extra package); with
    ``shapes_only`` only its header is read and the tensors are on the meta device."""
    try:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        if shapes_only:
            return {k: torch.empty(v["shape"], dtype=_SAFETENSORS_DTYPES[v["dtype"]], device="meta")
                    for k, v in entries.items()}
        data = bytearray(f.read())
        out = {}
        for key, v in entries.items():
            dtype = _SAFETENSORS_DTYPES[v["dtype"]]
            start, end = v["data_offsets"]
            if end > len(data) or end - start != math.prod(v["shape"]) * dtype.itemsize:
                raise ValueError(f"{key}: bytes {start}-{end} of {len(data)} for shape {v['shape']}")
            out[key] = torch.frombuffer(data, dtype=dtype, offset=start, count=(end - start) // dtype.itemsize).view(v["shape"]) \
                if end > start else torch.empty(v["shape"], dtype=dtype)
        return out
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"Checkpoint {path!r} is a damaged safetensors file ({type(e).__name__}: {e}); "
                              "download or copy it again.") from None


def _unreadable(path: str, head: bytes) -> str:
    if head.startswith(b"PK"):
        return (
            f"Checkpoint {path!r} is truncated or corrupt (a damaged zip archive); "
            "download or copy it again."
        )
    return f"{path!r} is not a PyTorch checkpoint (torch.load could not read it)."


def guess_preset(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Name of the preset whose encoder width and depth match ``state_dict``, if any."""
    width = state_dict.get("image_encoder.patch_embed.proj.weight")
    if width is None:
        return None
    blocks = {k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")}
    for name, cfg in PRESETS.items():
        if cfg.encoder_embed_dim == width.shape[0] and cfg.encoder_depth == len(blocks):
            return name
    return None


def describe(state_dict: Mapping[str, torch.Tensor]) -> str:
    width = state_dict.get("image_encoder.patch_embed.proj.weight")
    blocks = {k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")}
    w = "?" if width is None else width.shape[0]
    return f"encoder width {w}, depth {len(blocks)}"


def load_state_dict_strict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    expected: Optional[str] = None,
    assign: bool = False,
) -> None:
    """Copy ``state_dict`` into ``model`` requiring the exact key set and shapes (see
    :func:`check_state_dict` for the errors). ``assign`` adopts the tensors instead of copying
    them (for a model built on the meta device)."""
    check_state_dict(model, state_dict, expected)
    model.load_state_dict(state_dict, strict=True, assign=assign)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], expected: Optional[str] = None) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` has exactly ``model``'s keys and shapes
    (either side may be on the meta device: only shapes are compared).

    ``expected`` names the preset the caller asked for, so a checkpoint of another size is
    reported as such ("is a vit_l model") rather than as a wall of shape errors.
    """
    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if not (mismatched or missing or unexpected):
        return
    guess = guess_preset(state_dict)
    if expected is not None and guess is not None and guess != expected:
        raise CheckpointError(
            f"This checkpoint is a {guess} model ({describe(state_dict)}) but model type "
            f"{expected!r} was requested; build it with sam_model_registry[{guess!r}]."
        )
    parts = []
    for title, items in (
        ("shape mismatches", mismatched),
        ("missing keys", missing),
        ("unexpected keys", unexpected),
    ):
        if items:
            parts.append(f"{len(items)} {title}: " + ", ".join(items))
    what = f" for model type {expected!r}" if expected else ""
    raise CheckpointError(f"Checkpoint does not match the model{what}. " + "; ".join(parts))
