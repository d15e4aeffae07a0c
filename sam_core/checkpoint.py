"""Loading official-format SAM checkpoints: read safely, filter keys, load strictly with clear errors."""

from __future__ import annotations

import hashlib
import os
import pickle
import posixpath
from typing import Any, Dict, Mapping, Optional

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn

from .config import PRESETS


# Checkpoints shipped inside the package, by model type.
BUNDLED_CHECKPOINTS = {"demo": os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "sam_demo.pth")}


def bundled_checkpoint(model_type: str, checkpoint: "Optional[str]" = None) -> "Optional[str]":
    """``checkpoint`` if given, else the weights shipped for ``model_type`` (``demo``), else None."""
    return checkpoint if checkpoint is not None else BUNDLED_CHECKPOINTS.get(model_type)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the reason and what to do."""


# Wrappers that training frameworks put around a state dict.
_WRAPPER_KEYS = ("model", "state_dict")


def _clean_key(key: str) -> str:
    """Drop the ``module.`` prefix of DataParallel/DDP and ``_orig_mod.`` of torch.compile, which
    can stand before any submodule (``image_encoder._orig_mod.blocks.0...``)."""
    while key.startswith("module."):
        key = key[len("module.") :]
    return ".".join(part for part in key.split(".") if part != "_orig_mod")


def filter_state_dict(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Pure ``state_dict -> state_dict``: unwrap ``model``/``state_dict``, strip ``module.`` and
    ``_orig_mod.``. Raises :class:`CheckpointError` if no tensors are found."""
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
    return out


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
    try:
        fs, fs_path = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    except ImportError as e:  # a scheme whose package is missing: "Please install gcsfs ..."
        raise CheckpointError(f"Cannot open checkpoint {path!r}: {e}.") from None
    if not fs.isfile(fs_path):
        raise FileNotFoundError(f"Checkpoint {path!r} does not exist or is not a file.")
    if not shapes_only and not isinstance(fs, LocalFileSystem):
        fs, fs_path = fsspec.filesystem("file"), cached_copy(fs, fs_path)
    with fs.open(fs_path, "rb") as f:
        head = f.read(16)
        if not head:
            raise CheckpointError(f"Checkpoint {path!r} is an empty file.")
        f.seek(0)
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


def cached_copy(fs: Any, fs_path: str) -> str:
    """Local path of a copy of remote ``fs_path``, downloaded once per node and version.

    Keyed by the path and the store's version tag (``fs.ukey``: ETag or modification time), so a
    file replaced under the same name is fetched again. Each process downloads to its own
    temporary name and renames it into place, so actors starting together on a node never read
    a half-written copy.
    """
    key = hashlib.sha256(f"{fs.protocol}:{fs_path}:{fs.ukey(fs_path)}".encode()).hexdigest()[:16]
    local = os.path.join(cache_dir(), "checkpoints", key, posixpath.basename(fs_path))
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


def _unreadable(path: str, head: bytes) -> str:
    if head.startswith(b"PK"):
        return (
            f"Checkpoint {path!r} is truncated or corrupt (a damaged zip archive); "
            "download or copy it again."
        )
    if len(head) > 8 and head[8:9] == b"{":  # safetensors: u64 header length, then a JSON header
        return (
            f"{path!r} is a safetensors file, not an official SAM checkpoint (.pth, a torch.save of the "
            "state dict). Hugging Face's facebook/sam-vit-* files hold the same weights under "
            "transformers' names, which this package does not map; use the official files "
            "(sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth)."
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
