"""Scheduled, incremental dataset builds from a spec file (``python -m jobs.build``).

A spec (TOML) names input URIs, the model and settings, and one output root. Each run processes
only the shards not yet completed, then writes the next manifest version; a run with nothing new
writes nothing. Layout under the output root::

    data/<input-key>/masks|images/<shard>.parquet   the tables of one input (see pipeline.output)
    manifests/v0001.json, v0002.json, ...           what each build version processed
"""

from __future__ import annotations

import datetime as dt
import json
import posixpath
import re
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from sam_core.checkpoint import bundled_checkpoint

from .config import PipelineConfig
from .output import OutputDir
from .run import pending_shards, run_pipeline
from .shards import filesystem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


class SpecError(ValueError):
    """The spec file is missing, unreadable or inconsistent; the message says what to fix."""


@dataclass(frozen=True)
class BuildSpec:
    name: str  # dataset name, recorded in every manifest
    output: str  # output root (local path or fsspec URI)
    inputs: Tuple[str, ...]  # folders, globs, tar prefixes or manifests of images
    model_type: str = "demo"  # as the jobs: the bundled demo model unless a type/checkpoint is named
    checkpoint: Optional[str] = None  # None: the bundled weights of model_type (demo), else random
    seed: int = 0
    preset: Optional[str] = None  # "sa1b"
    mode: str = "exact"
    amg: Mapping[str, Any] = field(default_factory=dict)  # SamAutomaticMaskGenerator settings
    images_per_shard: int = 64
    images_per_batch: int = 4
    workers: int = 1
    num_gpus_per_worker: float = 0.0
    num_cpus_per_worker: float = 1.0
    postprocess_workers: Optional[int] = None
    num_cpus_per_postprocessor: float = 0.5
    num_cpus_per_decoder: float = 0.5
    s3_endpoint_url: Optional[str] = None

    def storage_options(self) -> Dict[str, Any]:
        return {"client_kwargs": {"endpoint_url": self.s3_endpoint_url}} if self.s3_endpoint_url else {}

    def pipeline_config(self, input_uri: str) -> PipelineConfig:
        """The pipeline run of one input: its tables under ``data/<input-key>``."""
        return PipelineConfig(
            input_uri=input_uri, output_uri=posixpath.join(self.output, "data", input_key(input_uri)),
            model_type=self.model_type, checkpoint=bundled_checkpoint(self.model_type, self.checkpoint),
            seed=self.seed, preset=self.preset,
            mode=self.mode, amg=dict(self.amg), images_per_shard=self.images_per_shard,
            images_per_batch=self.images_per_batch, workers=self.workers,
            num_gpus_per_worker=self.num_gpus_per_worker, num_cpus_per_worker=self.num_cpus_per_worker,
            postprocess_workers=self.postprocess_workers, num_cpus_per_postprocessor=self.num_cpus_per_postprocessor,
            num_cpus_per_decoder=self.num_cpus_per_decoder, storage_options=self.storage_options(),
        )


def input_key(uri: str) -> str:
    """A folder name for an input URI: its scheme-less path with separators and specials as '_'."""
    path = uri.split("://", 1)[-1].strip("/")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path).strip("_") or "input"


def load_spec(path: str) -> BuildSpec:
    """Read and check a TOML spec whose table ``[build]`` holds :class:`BuildSpec`'s fields."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(f"Spec file {path!r} does not exist.") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"Spec file {path!r} is not valid TOML: {e}") from None
    raw = dict(doc.get("build", {}))
    if not raw:
        raise SpecError(f"Spec file {path!r} has no [build] table.")
    known = {f.name for f in fields(BuildSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SpecError(f"Unknown keys in [build] of {path!r}: {unknown}; known keys: {sorted(known)}.")
    missing = [k for k in ("name", "output", "inputs") if k not in raw]
    if missing:
        raise SpecError(f"[build] of {path!r} lacks {missing}.")
    inputs = raw["inputs"]
    if isinstance(inputs, str) or not inputs or not all(isinstance(i, str) for i in inputs):
        raise SpecError(f"inputs in {path!r} must be a non-empty list of URIs, got {inputs!r}.")
    keys = [input_key(i) for i in inputs]
    if len(set(keys)) != len(keys):
        raise SpecError(f"Two inputs in {path!r} map to the same folder: {inputs}.")
    raw["inputs"] = tuple(inputs)
    from sam_core.amg import PRESETS
    from sam_core.amg.generator import MODES

    if raw.get("preset") is not None and raw["preset"] not in PRESETS:
        raise SpecError(f"preset {raw['preset']!r} in {path!r} is not one of {sorted(PRESETS)}.")
    if raw.get("mode", "exact") not in MODES:
        raise SpecError(f"mode {raw['mode']!r} in {path!r} is not one of {list(MODES)}.")
    try:
        return BuildSpec(**raw)
    except (TypeError, ValueError) as e:
        raise SpecError(f"[build] of {path!r}: {e}") from None


@dataclass
class BuildResult:
    version: Optional[int]  # the manifest version written, None when nothing was new
    latest: Optional[int]  # the newest manifest version after this run
    new_shards: Dict[str, List[str]]  # input URI -> shard ids processed by this run
    manifest_uri: Optional[str] = None


class Manifests:
    """The versioned manifests of a build: ``manifests/vNNNN.json`` under the output root."""

    def __init__(self, output: str, storage_options: Mapping[str, Any]) -> None:
        self.fs, self.root = filesystem(output, storage_options)
        self.dir = posixpath.join(self.root, "manifests")
        self.output = output

    def versions(self) -> List[int]:
        if not self.fs.exists(self.dir):
            return []
        names = [posixpath.basename(p) for p in self.fs.ls(self.dir, detail=False)]
        return sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"v(\d{4,})\.json", n)))

    def read(self, version: int) -> Dict[str, Any]:
        with self.fs.open(posixpath.join(self.dir, f"v{version:04d}.json"), "r") as f:
            return json.load(f)

    def write(self, version: int, manifest: Dict[str, Any]) -> str:
        path = posixpath.join(self.dir, f"v{version:04d}.json")
        self.fs.makedirs(self.dir, exist_ok=True)
        self.fs.pipe_file(path, json.dumps(manifest, indent=2).encode())
        return posixpath.join(self.output, "manifests", f"v{version:04d}.json")


def run_build(spec: BuildSpec, run: Callable[[PipelineConfig], Any] = run_pipeline,
              retry_failed: bool = False) -> BuildResult:
    """Process the shards of every input not yet done (with ``retry_failed``, also those holding
    images that failed for a reason another try may not meet: see ``PipelineConfig``), then
    write the next manifest version.

    Refuses (``SpecError``) when the model or settings differ from the latest manifest's: the
    output would otherwise mix masks of two configurations.
    """
    manifests = Manifests(spec.output, spec.storage_options())
    versions = manifests.versions()
    configs = {uri: replace(spec.pipeline_config(uri), retry_failed=retry_failed) for uri in spec.inputs}
    first = next(iter(configs.values()))
    identity = {"model": first.model_id(), "settings_hash": first.settings_hash()}
    if versions:
        previous = manifests.read(versions[-1])
        before = {"model": previous["model"], "settings_hash": previous["settings_hash"]}
        if before != identity:
            raise SpecError(
                f"The spec's model/settings {identity} differ from manifest v{versions[-1]:04d} {before} "
                f"under {spec.output!r}: build into a new output root to change them."
            )
    pending = {uri: [s.shard_id for s in pending_shards(cfg, reopen=False)] for uri, cfg in configs.items()}
    if not any(pending.values()):
        return BuildResult(None, versions[-1] if versions else None, {})
    for uri, shard_ids in pending.items():
        if shard_ids:
            run(configs[uri])
    version = (versions[-1] if versions else 0) + 1
    manifest = {
        "name": spec.name,
        "version": version,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **identity,
        "settings": first.generator_settings(),
        "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()},
        "inputs": [
            {
                "uri": uri,
                "tables": cfg.output_uri,
                "shards": OutputDir(cfg.output_uri, cfg.storage_options).shard_ids(),
                "new_shards": pending[uri],
            }
            for uri, cfg in configs.items()
        ],
    }
    uri = manifests.write(version, manifest)
    return BuildResult(version, version, {u: s for u, s in pending.items() if s}, uri)
