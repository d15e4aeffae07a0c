"""Scheduled, incremental dataset builds from a spec file (``python -m jobs.build``).

A spec (TOML) names input URIs, the model and settings, and one output root. Each run processes
only the shards not yet completed, then writes the next manifest version; a run with nothing new
writes nothing. Layout under the output root::

    data/<input-key>/masks|images/<shard>.parquet   the tables of one input (see pipeline.output)
    manifests/v0001.json, v0002.json, ...           what each build version processed, and what
                                                    each input's tables then hold (images, errors by reason, masks)

With a ``[build.export]`` table (``format``: sa1b-tar, sa1b-json or coco; ``dest``, default
``<output>/export``; ``workers``; ``ray``), every run then exports each input's tables to
``<dest>/<input-key>`` (``<dest>/<input-key>.json`` for coco), incrementally
(:mod:`pipeline.export`): shards not exported yet, also those of earlier runs whose export failed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import posixpath
import re
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from sam_core.checkpoint import bundled_checkpoint

from .config import PipelineConfig
from .export import FORMATS, ExportSummary, export_coco, export_shards
from .lease import RunLease
from .output import READ_WORKERS, OutputDir, settings_changes
from .point_grids import grids_digested, with_point_grids
from .run import RunPlan, pending_shards, plan_run, run_pipeline, summarize_tables
from .storage import filesystem
from .single_machine import RunSummary

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

log = logging.getLogger(__name__)


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
    resize_short_side: Optional[int] = None  # as jobs.generate --resize-short-side
    images_per_shard: int = 64
    images_per_batch: int = 4
    workers: int = 1
    num_gpus_per_worker: float = 0.0
    num_cpus_per_worker: float = 1.0
    postprocess_workers: Optional[int] = None
    num_cpus_per_postprocessor: float = 0.5
    num_cpus_per_decoder: float = 0.5
    s3_endpoint_url: Optional[str] = None
    export: Mapping[str, Any] = field(default_factory=dict)  # [build.export]: format, dest, workers, ray

    def storage_options(self) -> Dict[str, Any]:
        return {"client_kwargs": {"endpoint_url": self.s3_endpoint_url}} if self.s3_endpoint_url else {}

    def pipeline_config(self, input_uri: str) -> PipelineConfig:
        """The pipeline run of one input: its tables under ``data/<input-key>``."""
        return PipelineConfig(
            input_uri=input_uri, output_uri=posixpath.join(self.output, "data", input_key(input_uri)),
            model_type=self.model_type, checkpoint=bundled_checkpoint(self.model_type, self.checkpoint),
            seed=self.seed, preset=self.preset,
            mode=self.mode, amg=with_point_grids(self.amg, self.storage_options()),
            resize_short_side=self.resize_short_side,
            images_per_shard=self.images_per_shard,
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
    if not isinstance(raw.get("export", {}), dict):
        raise SpecError(f"export in {path!r} must be a table ([build.export]), got {raw['export']!r}.")
    check_export(raw.get("export", {}), path)
    try:
        return BuildSpec(**raw)
    except (TypeError, ValueError) as e:
        raise SpecError(f"[build] of {path!r}: {e}") from None


EXPORT_KEYS = {"format": str, "dest": str, "workers": int, "ray": bool}


def check_export(export: Mapping[str, Any], path: str) -> None:
    """Raise ``SpecError`` saying what is wrong with a ``[build.export]`` table."""
    if not export:
        return
    unknown = sorted(set(export) - set(EXPORT_KEYS))
    if unknown:
        raise SpecError(f"Unknown keys in [build.export] of {path!r}: {unknown}; known keys: {sorted(EXPORT_KEYS)}.")
    if export.get("format") not in FORMATS:
        raise SpecError(f"[build.export] of {path!r} needs format = one of {list(FORMATS)}, got {export.get('format')!r}.")
    for key, kind in EXPORT_KEYS.items():
        if key in export and not isinstance(export[key], kind):
            raise SpecError(f"[build.export] {key} in {path!r} must be a {kind.__name__}, got {export[key]!r}.")
    if export.get("workers", 1) < 1:
        raise SpecError(f"[build.export] workers in {path!r} must be >= 1, got {export['workers']}.")
    if export.get("ray") and export["format"] == "coco":
        raise SpecError(f"[build.export] of {path!r}: ray exports shards in parallel; a coco export is one file.")


@dataclass
class BuildResult:
    version: Optional[int]  # the manifest version written, None when nothing was new
    latest: Optional[int]  # the newest manifest version after this run
    new_shards: Dict[str, List[str]]  # input URI -> shard ids processed by this run
    manifest_uri: Optional[str] = None
    exports: Dict[str, ExportSummary] = field(default_factory=dict)  # input URI -> its export ([build.export])
    tables: Dict[str, RunSummary] = field(default_factory=dict)  # input URI -> what its tables hold after the
    # run (images ok and failed, errors by reason, masks; see pipeline.run.summarize_tables)
    left: Dict[str, int] = field(default_factory=dict)  # input URI -> pending shards left for a later build
    # (beyond max_shards)


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
              retry_failed: bool = False, redo_changed: bool = False, max_shards: Optional[int] = None,
              redo_runs: Sequence[str] = ()) -> BuildResult:
    """Process the shards of every input not yet done (with ``retry_failed``, also those holding
    images that failed for a reason another try may not meet; with ``redo_changed``, those
    holding files replaced since; with ``redo_runs``, those the named recorded runs wrote (see
    :func:`redo_runs_by_input`); with ``max_shards``, at most that many of each input's: see
    ``PipelineConfig``), then write the next manifest version.

    Refuses (``SpecError``) when the model or settings differ from the latest manifest's: the
    output would otherwise mix masks of two configurations. Settings spelled otherwise for the
    same masks (a default written out in the spec) go on as the manifest spells them. One build
    at a time: it holds the lease ``<output>/_lease.json`` (:mod:`pipeline.lease`;
    :class:`~pipeline.lease.OutputBusyError` while another build holds it).
    """
    manifests = Manifests(spec.output, spec.storage_options())
    with RunLease(manifests.fs, manifests.root):  # one build at a time (its manifest versions)
        return _build(spec, manifests, run, retry_failed, redo_changed, max_shards, redo_runs)


def _build(spec: BuildSpec, manifests: "Manifests", run: Callable[[PipelineConfig], Any], retry_failed: bool,
           redo_changed: bool, max_shards: Optional[int], redo_runs: Sequence[str]) -> BuildResult:
    versions = manifests.versions()
    configs = input_configs(spec, manifests, versions, retry_failed, redo_changed, max_shards, redo_runs)
    first = next(iter(configs.values()))
    identity = {"model": first.model_id(), "settings_hash": first.settings_hash()}
    todo = {uri: pending_shards(cfg, reopen=False) for uri, cfg in configs.items()}
    pending = {uri: [s.shard_id for s in shards] for uri, shards in todo.items()}
    left = {uri: shards.left for uri, shards in todo.items()}
    if not any(pending.values()):
        return BuildResult(None, versions[-1] if versions else None, {}, exports=export_build(spec, configs, pending),
                           tables=_tables(configs), left=left)
    for uri, shard_ids in pending.items():
        if shard_ids:
            run(configs[uri])
    tables = _tables(configs)
    version = (versions[-1] if versions else 0) + 1
    manifest = {
        "name": spec.name,
        "version": version,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **identity,
        "settings": grids_digested(first.generator_settings()),
        "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()},
        "inputs": [
            {
                "uri": uri,
                "tables": cfg.output_uri,
                "shards": OutputDir(cfg.output_uri, cfg.storage_options).shard_ids(),
                "new_shards": pending[uri],
                "images_ok": tables[uri].images_ok,
                "images_error": tables[uri].images_error,
                "error_reasons": dict(sorted(tables[uri].reason_counts().items())),
                "masks": tables[uri].masks,
                "compute_dtypes": tables[uri].compute_dtypes,
            }
            for uri, cfg in configs.items()
        ],
    }
    uri = manifests.write(version, manifest)
    return BuildResult(version, version, {u: s for u, s in pending.items() if s}, uri,
                       exports=export_build(spec, configs, pending), tables=tables, left=left)


def _tables(configs: Mapping[str, PipelineConfig]) -> Dict[str, RunSummary]:
    """What each input's tables hold, from their shards' markers."""
    return {uri: summarize_tables(cfg.output()) for uri, cfg in configs.items()}


def input_configs(spec: BuildSpec, manifests: "Manifests", versions: List[int], retry_failed: bool,
                  redo_changed: bool, max_shards: Optional[int] = None,
                  redo_runs: Sequence[str] = ()) -> Dict[str, PipelineConfig]:
    """The pipeline run of each input, by URI, checked against the latest manifest (``SpecError``
    if its model or settings make other masks) and spelled as it spells the settings; each
    with its share of ``redo_runs`` (:func:`redo_runs_by_input`)."""
    configs = {uri: replace(spec.pipeline_config(uri), retry_failed=retry_failed, redo_changed=redo_changed,
                            max_shards=max_shards) for uri in spec.inputs}
    shares = redo_runs_by_input(configs, redo_runs)
    configs = {uri: replace(cfg, redo_runs=shares[uri]) for uri, cfg in configs.items()}
    if not versions:
        return configs
    first = next(iter(configs.values()))
    identity = {"model": first.model_id(), "settings_hash": first.settings_hash()}
    previous = manifests.read(versions[-1])
    before = {"model": previous["model"], "settings_hash": previous["settings_hash"]}
    if before == identity:
        return configs
    spelled = first.spelled_as(previous.get("settings") or {}, previous["settings_hash"])
    changes = settings_changes(previous.get("settings") or {}, grids_digested(first.generator_settings()))
    if spelled is None:
        raise SpecError(
            f"The spec's model/settings {identity} differ from manifest v{versions[-1]:04d} {before} "
            f"under {spec.output!r}{' (' + ', '.join(changes) + ')' if changes else ''}: build into a new "
            "output root to change them."
        )
    log.info("The spec gives the settings of manifest v%04d spelled otherwise (%s); going on with its spelling.",
             versions[-1], ", ".join(changes))
    return {uri: replace(cfg, preset=None, amg=spelled.amg) for uri, cfg in configs.items()}


def redo_runs_by_input(configs: Mapping[str, PipelineConfig], prefixes: Sequence[str]) -> Dict[str, Tuple[str, ...]]:
    """Each input's share of ``prefixes`` (``jobs.build --redo-run``, run ids or their first
    characters, as ``jobs.stats --runs`` lists them): a build runs once per input, each run
    recorded under that input's tables, so a prefix must name exactly one recorded run of all the
    inputs' tables (``ValueError`` otherwise), and the input it ran on redoes the shards it wrote."""
    from .run_records import read_runs

    shares: Dict[str, Tuple[str, ...]] = {uri: () for uri in configs}
    if not prefixes:
        return shares
    runs = {uri: [r["run_id"] for r in read_runs(cfg.output())] for uri, cfg in configs.items()}
    for prefix in prefixes:
        wanted = prefix.strip().lower()
        named = [(uri, run) for uri, ids in runs.items() for run in ids if wanted and run.startswith(wanted)]
        if len(named) != 1:
            known = "; ".join(f"{uri}: {', '.join(r[:8] for r in ids) or 'none'}" for uri, ids in runs.items())
            raise ValueError(f"--redo-run {prefix!r} names {len(named) or 'no'} recorded run"
                             f"{'s' * (len(named) != 1)} of this build's inputs (their runs: {known}; "
                             "python -m jobs.stats --tables <input tables> --runs lists them).")
        uri = named[0][0]
        shares[uri] += (prefix,)
    return shares


@dataclass
class BuildPlan:
    """What :func:`run_build` would do (:func:`plan_build`)."""

    spec: BuildSpec
    latest: Optional[int]  # the latest manifest version, None before the first
    inputs: Dict[str, RunPlan]  # by input URI
    busy: Optional[str] = None  # the build running on the output now (a build would stop), if any

    def __str__(self) -> str:
        todo = sum(len(p.todo) for p in self.inputs.values())
        latest = f"v{self.latest:04d}" if self.latest else "none"
        then = (f"; a run would process {todo} shard{'s' * (todo != 1)} and write manifest v{(self.latest or 0) + 1:04d}" if todo else
                "; up to date: a run would process nothing")
        lines = [f"{self.spec.name}: dry run, nothing was started or written (latest manifest {latest}{then})"]
        for uri, plan in self.inputs.items():
            lines += [f"input {uri}:"] + [f"  {line}" for line in plan.lines()]
        if self.spec.export:
            lines.append(f"then each input's tables are exported as {self.spec.export['format']} ([build.export])")
        if self.busy:
            lines.append(f"another build is running on this output now ({self.busy}): a build would stop")
        return "\n".join(lines)


def plan_build(spec: BuildSpec, retry_failed: bool = False, redo_changed: bool = False,
               max_shards: Optional[int] = None, redo_runs: Sequence[str] = ()) -> BuildPlan:
    """What :func:`run_build` would do (``jobs.build --dry-run``), starting and writing nothing:
    its check of the spec against the latest manifest, then each input's :func:`plan_run`."""
    manifests = Manifests(spec.output, spec.storage_options())
    versions = manifests.versions()
    configs = input_configs(spec, manifests, versions, retry_failed, redo_changed, max_shards, redo_runs)
    return BuildPlan(spec, versions[-1] if versions else None, {uri: plan_run(cfg) for uri, cfg in configs.items()},
                     RunLease(manifests.fs, manifests.root).holder())


def export_build(spec: BuildSpec, configs: Mapping[str, PipelineConfig],
                 pending: Mapping[str, List[str]]) -> Dict[str, ExportSummary]:
    """The ``[build.export]`` of every input that has tables (see the module docstring): the
    per-shard formats always (they do only what is not exported yet), coco when the input had
    new shards or its file is missing."""
    export = spec.export
    if not export:
        return {}
    dest = export.get("dest") or posixpath.join(spec.output, "export")
    summaries = {}
    for uri, cfg in configs.items():
        tables = OutputDir(cfg.output_uri, cfg.storage_options)
        if not tables.shard_ids():
            continue
        target = posixpath.join(dest, input_key(uri))
        if export["format"] != "coco":
            summaries[uri] = export_shards(cfg.output_uri, target, export["format"], cfg.storage_options,
                                           export.get("workers"), on_ray=export.get("ray", False))
            continue
        fs, path = filesystem(target + ".json", cfg.storage_options)
        if pending.get(uri) or not fs.exists(path):
            summaries[uri] = export_coco(cfg.output_uri, target + ".json", cfg.storage_options,
                                         export.get("workers") or READ_WORKERS)
    return summaries
