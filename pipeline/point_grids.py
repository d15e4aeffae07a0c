"""Prompt grids of one's own (the generator's ``point_grids``) read from a file, and how an
output records them.

A file holds one grid per crop layer, each ``N x 2`` points ``(x, y)`` in ``[0, 1]`` of the crop:

- ``.npy``: one ``N x 2`` array (layer 0 only), or ``L x N x 2`` (L layers of N points each);
- ``.npz``: one array per layer, in the order they were saved (``np.savez(f, g0, g1)``);
- ``.json``: a list of grids (``[[[x, y], ...], ...]``), or one grid.

The grids travel to the workers in the run's settings as lists of floats; markers and manifests
record :func:`point_grids_digest` instead of the points (kB per marker, thousands of markers).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import zipfile
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .storage import open_uri

Grids = List[List[List[float]]]  # per layer, N x [x, y]
EXTENSIONS = (".npy", ".npz", ".json")


def read_point_grids(uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> Grids:
    """The grids in the file at ``uri`` (local path or fsspec URI) as lists of float64 values.
    A file that is not there, of another kind or not grids of ``N x 2`` points in ``[0, 1]``
    raises ``ValueError`` naming it (the run's own checks then need one grid per crop layer)."""
    ext = posixpath.splitext(uri.lower())[1]
    if ext not in EXTENSIONS:
        raise ValueError(f"point grids file {uri!r}: expected one of {list(EXTENSIONS)}, got {ext or 'no extension'!r}.")
    try:
        with open_uri(uri, "rb", storage_options) as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"point grids file {uri!r} does not exist.") from None
    except OSError as e:
        raise ValueError(f"point grids file {uri!r} could not be read: {type(e).__name__}: {e}") from None
    try:
        if ext == ".json":
            loaded = json.loads(data)
            grids = [loaded] if _is_one_grid(loaded) else loaded
        elif ext == ".npz":
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                grids = [npz[name] for name in npz.files]
        else:
            array = np.load(io.BytesIO(data), allow_pickle=False)
            grids = [array] if array.ndim == 2 else list(array)
        grids = [np.asarray(g, dtype=np.float64) for g in grids]
    except (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"point grids file {uri!r} could not be read as grids: {type(e).__name__}: {e}") from None
    if not grids:
        raise ValueError(f"point grids file {uri!r} holds no grid.")
    for i, g in enumerate(grids):
        if g.ndim != 2 or g.shape[1] != 2 or len(g) == 0:
            raise ValueError(f"point grids file {uri!r}: grid {i} must be N x 2 points (x, y), N >= 1; got shape "
                             f"{g.shape}.")
        if not np.all((g >= 0) & (g <= 1)):
            raise ValueError(f"point grids file {uri!r}: grid {i} has points outside [0, 1] (values from {g.min():g} "
                             f"to {g.max():g}); points are fractions of the crop's width and height.")
    return [g.tolist() for g in grids]


def _is_one_grid(loaded: Any) -> bool:
    """Whether JSON ``loaded`` is one grid (``[[x, y], ...]``) rather than a list of grids."""
    return (isinstance(loaded, list) and bool(loaded) and isinstance(loaded[0], list) and bool(loaded[0])
            and isinstance(loaded[0][0], (int, float)))


def with_point_grids(amg: Mapping[str, Any], storage_options: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Generator settings ``amg`` whose ``point_grids`` names a file (``--point-grids``, a build
    spec's ``[build.amg]``), with the grids read from it; ``points_per_side`` is then None
    unless given (a preset's grid size gives way to the file, a given one is refused by the
    generator's checks). Other settings are returned as they are."""
    settings = dict(amg)
    if isinstance(settings.get("point_grids"), str):
        settings["point_grids"] = read_point_grids(settings["point_grids"], storage_options)
        settings.setdefault("points_per_side", None)
    return settings


def point_grids_digest(grids: Sequence[Sequence[Sequence[float]]]) -> str:
    """What an output records of its grids: their number, points per grid and a digest of the
    points (``"2 grids (1024, 256 points), sha256 9f0c5a1e27b3d4c8"``)."""
    arrays = [np.asarray(g, dtype=np.float64) for g in grids]
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.asarray(a.shape, dtype=np.int64).tobytes() + np.ascontiguousarray(a).tobytes())
    counts = ", ".join(str(len(a)) for a in arrays)
    return f"{len(arrays)} grid{'s' if len(arrays) != 1 else ''} ({counts} points), sha256 {digest.hexdigest()[:16]}"


def grids_digested(settings: Mapping[str, Any]) -> Dict[str, Any]:
    """Generator settings as an output records them: ``point_grids`` as :func:`point_grids_digest`."""
    if settings.get("point_grids") is None or isinstance(settings["point_grids"], str):
        return dict(settings)
    return {**settings, "point_grids": point_grids_digest(settings["point_grids"])}
