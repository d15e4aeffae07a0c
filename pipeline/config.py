"""One typed configuration for a mask-generation run, and the Ray arguments derived from it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

from .decode import DEFAULT_MAX_PIXELS
from .point_grids import grids_digested

if TYPE_CHECKING:
    from .output import OutputDir

log = logging.getLogger(__name__)


# Error reasons that another try may not repeat (out of memory, a GPU in a bad state, an
# object-store outage, a file not yet uploaded, a lost node, a decoder plugin missing on the
# workers until installed): with ``retry_failed`` the shards holding such images are done again.
RETRIED_REASONS = ("generate_failed", "postprocess_failed", "unreadable", "missing", "worker_died",
                   "unsupported_format")

# Generator settings that change speed and memory, not which masks come out (in fast mode, batch
# sizes and a compiled encoder and decoder change bf16 rounding only).
THROUGHPUT_SETTINGS = frozenset({"points_per_batch", "encoder_batch_size", "fast_points_per_batch", "max_chunk_pixels",
                                 "compile"})




def model_id(model_type: str, checkpoint: Optional[str], seed: int) -> str:
    """``<type>:<checkpoint file name>`` (``<folder>/<file name>`` for Hugging Face's file names,
    the same for every model), or ``<type>:random-seed<N>`` without a checkpoint."""
    from sam_core.checkpoint import HF_WEIGHTS_FILES

    if not checkpoint:
        return f"{model_type}:random-seed{seed}"
    parts = checkpoint.replace(os.sep, "/").rstrip("/").split("/")
    name = "/".join(parts[-2:]) if parts[-1] in HF_WEIGHTS_FILES else parts[-1]
    return f"{model_type}:{name}"


def weights_of(checkpoint: Optional[str], storage_options: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """:func:`sam_core.checkpoint.weights_digest` of a run's checkpoint: part of its output's
    identity, so that a checkpoint replaced under the same name is not resumed into. None
    without a checkpoint, or where this machine does not see it (a cluster's workers may mount
    it where the driver does not)."""
    from sam_core.checkpoint import weights_digest

    if not checkpoint:
        return None
    try:
        return weights_digest(checkpoint, storage_options)
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class PipelineConfig:
    input_uri: str  # folder, glob, tar shard(s) or manifest of images (local path or fsspec URI)
    output_uri: str  # folder for the masks/ and images/ Parquet tables (local path or fsspec URI)
    model_type: str = "tiny"  # tiny, vit_b, vit_l or vit_h
    checkpoint: Optional[str] = None  # official-format .pth; None: seeded random weights
    seed: int = 0  # seed of the random weights when there is no checkpoint
    amg: Mapping[str, Any] = field(default_factory=dict)  # SamAutomaticMaskGenerator settings
    preset: Optional[str] = None  # named AMG settings ("sa1b"), under ``amg``
    mode: str = "exact"  # generator mode: "exact" or "fast"
    images_per_shard: int = 64  # loose images per shard (tars and manifests: see pipeline.shards)
    images_per_batch: int = 4  # decoded images per generator call (their crops share encoder batches)
    max_pixels: int = DEFAULT_MAX_PIXELS  # images larger than this are recorded as errors
    resize_short_side: Optional[int] = None  # downsample images to this shorter side (SA-1B: 1500); None: as they are
    overwrite: bool = False  # delete previous results under output_uri instead of resuming
    retry_failed: bool = False  # also redo completed shards with images of RETRIED_REASONS
    redo_changed: bool = False  # also redo completed shards with files replaced since (see pipeline.resuming)
    redo_runs: Tuple[str, ...] = ()  # also redo completed shards written by these recorded runs (id prefixes)
    max_shards: Optional[int] = None  # do at most this many of the pending shards; a later run does the rest
    storage_options: Mapping[str, Any] = field(default_factory=dict)  # fsspec options (S3 endpoint...)
    device: Optional[str] = None  # torch device in the workers; None: cuda if the worker has a GPU
    num_gpus_per_worker: float = 0.0  # GPUs reserved by each model actor
    num_cpus_per_worker: float = 1.0  # CPUs reserved by each model actor (Ray sets its torch threads)
    workers: int = 1  # model actors (one model each)
    postprocess_workers: Optional[int] = None  # CPU actors for small regions + records; None: = workers
    num_cpus_per_postprocessor: float = 0.5  # CPUs reserved by each post-processing actor
    num_cpus_per_decoder: float = 0.5  # CPUs reserved by each read-and-decode task

    def __post_init__(self) -> None:
        for name in ("images_per_shard", "images_per_batch", "workers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("resize_short_side", "postprocess_workers", "max_shards"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("num_gpus_per_worker", "num_cpus_per_worker", "num_cpus_per_postprocessor", "num_cpus_per_decoder"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")

    def __repr__(self) -> str:
        # storage_options may hold credentials: never print them.
        fields = {k: v for k, v in self.__dict__.items() if k != "storage_options"}
        hidden = sorted(self.storage_options)
        return f"PipelineConfig({fields}, storage_options=<{len(hidden)} keys hidden: {hidden}>)"

    def generator_settings(self) -> Dict[str, Any]:
        """Effective AMG settings: preset, then ``amg`` overrides, then the fixed output mode."""
        from sam_core.amg import PRESETS

        settings: Dict[str, Any] = dict(PRESETS[self.preset]) if self.preset else {}
        settings.update(self.amg)
        settings.update(output_mode="coco_rle", mode=self.mode)
        return settings

    def resolved_generator_settings(self) -> Dict[str, Any]:
        """:meth:`generator_settings` with the generator's defaults for the rest (every argument
        of ``SamAutomaticMaskGenerator`` but the model); an unknown setting name raises here."""
        import inspect

        from sam_core import SamAutomaticMaskGenerator

        try:
            bound = inspect.signature(SamAutomaticMaskGenerator).bind(None, **self.generator_settings())
        except TypeError as e:
            raise ValueError(f"Bad mask-generator settings {dict(self.amg)}: {e}") from None
        bound.apply_defaults()
        return {k: v for k, v in bound.arguments.items() if k != "model"}

    def model_id(self) -> str:
        return model_id(self.model_type, self.checkpoint, self.seed)

    def check_model(self) -> None:
        """Raise now, in the driver, what every model actor would raise on starting: generator
        settings it cannot run with (and point grids it would leave unused), an unknown model
        type, a checkpoint that is missing, unreadable or of another model (only its tensor names
        and shapes are read: kB, also from object storage). Attached to a cluster
        (``RAY_ADDRESS``), a local checkpoint path the driver does not see is left to the actors:
        the workers may mount it where the driver does not."""
        from sam_core.amg import check_generator_settings
        from sam_core.build import check_checkpoint
        from sam_core.config import get_config

        settings = self.resolved_generator_settings()
        check_generator_settings(**settings)
        grids, layers = settings["point_grids"], settings["crop_n_layers"] + 1
        if grids is not None and len(grids) > layers:  # the generator would leave the rest unused
            raise ValueError(f"point_grids has {len(grids)} grids; crop_n_layers={layers - 1} uses {layers} (one "
                             f"per layer): set crop_n_layers={len(grids) - 1}, or leave the extra grids out.")
        get_config(self.model_type)
        if self.checkpoint is None:
            return
        remote = "://" in self.checkpoint and not self.checkpoint.startswith("file://")
        if not remote and not os.path.exists(self.checkpoint) and os.environ.get("RAY_ADDRESS"):
            log.warning("Checkpoint %s is not on this machine; the model actors will read it on theirs.",
                        self.checkpoint)
            return
        check_checkpoint(self.model_type, self.checkpoint, self.storage_options)

    def mask_settings(self) -> Dict[str, Any]:
        """The settings that decide the masks: the generator's (batch sizes, memory caps, compile
        left out, ``point_grids`` as their digest) and ``resize_short_side`` when set (the masks are
        of the downsampled images)."""
        settings = grids_digested(self.generator_settings())
        settings = {k: v for k, v in settings.items() if k not in THROUGHPUT_SETTINGS}
        if self.resize_short_side is not None:
            settings["resize_short_side"] = self.resize_short_side
        return settings

    def effective_mask_settings(self) -> Dict[str, Any]:
        """:meth:`mask_settings` with the generator's defaults filled in: equal for two runs
        that make the same masks however their settings are spelled (a default given or left
        out, a preset's values written out)."""
        settings = {k: v for k, v in self.resolved_generator_settings().items() if k not in THROUGHPUT_SETTINGS}
        return {**settings, "resize_short_side": self.resize_short_side}

    def spelled_as(self, settings: Mapping[str, Any], settings_hash: str) -> Optional["PipelineConfig"]:
        """This run with its mask settings spelled as ``settings`` (those an output recorded:
        a marker's ``settings`` or a build manifest's), if that spelling gives the recorded
        ``settings_hash`` (model and mode included) and the same masks as this run's
        (:meth:`effective_mask_settings`); None if not. Throughput settings stay this run's.
        A run that resumes this way writes the output's hash on its masks, so an output
        keeps one settings hash."""
        recorded = {k: v for k, v in settings.items()
                    if k not in THROUGHPUT_SETTINGS and k not in ("output_mode", "mode", "resize_short_side")}
        if recorded.get("point_grids") is not None:  # a digest: this run's grids, if they are the ones recorded
            if recorded["point_grids"] != self.mask_settings().get("point_grids"):
                return None
            recorded["point_grids"] = self.generator_settings()["point_grids"]
        throughput = {k: v for k, v in self.generator_settings().items() if k in THROUGHPUT_SETTINGS}
        spelled = replace(self, preset=None, amg={**recorded, **throughput})
        try:
            same = (spelled.settings_hash() == settings_hash
                    and spelled.effective_mask_settings() == self.effective_mask_settings())
        except ValueError:  # a recorded setting this version's generator does not know
            return None
        return spelled if same else None

    def settings_hash(self) -> str:
        """Short stable hash of the model and :meth:`mask_settings` (recorded on every mask)."""
        blob = json.dumps({"model": self.model_id(), **self.mask_settings()}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def identity(self) -> Dict[str, Any]:
        """What decides this run's masks, as written into every shard's completion marker: a
        later run into the same output must have the same ``model``, ``settings_hash`` and, where
        both record them, ``weights`` (:func:`weights_of`)."""
        weights = weights_of(self.checkpoint, self.storage_options)
        return {"model": self.model_id(), **({"weights": weights} if weights else {}),
                "settings_hash": self.settings_hash(), "settings": self.mask_settings()}

    def output(self) -> "OutputDir":
        """The output folder as this run writes it: markers carry :meth:`identity`, which resuming checks."""
        from .output import OutputDir

        return OutputDir(self.output_uri, self.storage_options, self.identity())

    def check_fits(self, resources: Mapping[str, float]) -> None:
        """Raise if a cluster with ``resources`` (``ray.cluster_resources()``) cannot hold every
        actor plus one decode task at once: the pipeline would wait forever instead."""
        cpus = (self.workers * self.num_cpus_per_worker + (self.postprocess_workers or self.workers)
                * self.num_cpus_per_postprocessor + self.num_cpus_per_decoder)
        gpus = self.workers * self.num_gpus_per_worker
        have_cpus, have_gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        if cpus > have_cpus + 1e-9 or gpus > have_gpus + 1e-9:
            raise ValueError(
                f"The pipeline needs {cpus:g} CPUs and {gpus:g} GPUs at once (model actors "
                f"{self.workers} x {self.num_cpus_per_worker:g} CPU + {self.num_gpus_per_worker:g} GPU, "
                f"post-processing actors {self.postprocess_workers or self.workers} x "
                f"{self.num_cpus_per_postprocessor:g} CPU, a decode task {self.num_cpus_per_decoder:g} CPU); "
                f"this Ray has {have_cpus:g} CPUs and {have_gpus:g} GPUs. Lower --workers or the "
                "--num-cpus-per-*/--num-gpus-per-worker values.")

    def ray_stage_args(self) -> Dict[str, Dict[str, Any]]:
        """Every Ray resource argument of the three stages, for ``Dataset.map_batches``."""
        from ray.data import ActorPoolStrategy

        # Ray Data restarts a dead actor and retries its batch; the collector ignores repeats and
        # writes a shard (data, then marker) only once all its rows are in.
        return dict(
            decode=dict(batch_size=1, num_cpus=self.num_cpus_per_decoder),  # one shard per task
            model=dict(batch_size=self.images_per_batch, batch_format="pyarrow",
                       compute=ActorPoolStrategy(size=self.workers),
                       num_gpus=self.num_gpus_per_worker, num_cpus=self.num_cpus_per_worker),
            postprocess=dict(batch_size=self.images_per_batch, batch_format="pyarrow",
                             compute=ActorPoolStrategy(size=self.postprocess_workers or self.workers),
                             num_cpus=self.num_cpus_per_postprocessor),
        )
