"""The Ray Data mask-generation job: shards in, Parquet tables out, resumable."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pyarrow.compute as pc

from .config import PipelineConfig
from .driver import init_ray
from .lease import RunLease
from .output import OutputDir, first_frame_only
from .point_grids import grids_digested
from .shards import Shard, discover_shards
from .single_machine import MAX_ERROR_LINES, RunSummary
from .reading import decode_shards
from .resuming import Todo, select_pending, spelled_as_output
from .run_records import recorded
from .stages import ModelStage, PostprocessStage, ShardCollector
from .worker_deaths import start_ledger

log = logging.getLogger(__name__)


class StageStartError(RuntimeError):
    """A stage's actors could not start (their constructor raised: no GPU, out of memory, a
    checkpoint only the driver sees): the cause's last line, not Ray's page of traces."""

    def __init__(self, error: BaseException) -> None:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        cause = lines[-1] if lines else repr(error)
        super().__init__(f"A pipeline actor could not start: {cause} (its traceback is in the Ray worker logs).")


def pending_shards(config: PipelineConfig, reopen: bool = True) -> Todo:
    """Shards of the input not yet completed in the output (see :func:`pipeline.resuming.select_pending`;
    ``reopen=False``: what a run would do, changing nothing)."""
    config = spelled_as_output(config)
    shards = discover_shards(config.input_uri, config.images_per_shard, config.storage_options, config.output_uri)
    return select_pending(shards, config.output(), config.images_per_shard, config.overwrite, config.retry_failed,
                          reopen=reopen, redo_changed=config.redo_changed, redo_runs=config.redo_runs,
                          max_shards=config.max_shards)


@dataclass
class RunPlan:
    """What :func:`run_pipeline` would do with a config, found without doing it (:func:`plan_run`)."""

    output: str
    completed: Sequence[str]  # ids of the shards completed in the output now
    todo: Sequence[Shard]  # the shards a run would write, in its order
    overwrite: bool = False  # a run would delete the completed shards first
    busy: Optional[str] = None  # the run writing into the output now (a run would stop), if any
    left: int = 0  # pending shards beyond --max-shards, left for later runs

    @classmethod
    def of(cls, output: OutputDir, todo: Sequence[Shard], overwrite: bool) -> "RunPlan":
        """The plan of a run into ``output`` that would write ``todo`` (a ``Todo``, or all that is
        pending): with the shards ``output`` holds now and the run holding its lease, if any."""
        return cls(output.uri, output.shard_ids(), todo, overwrite, RunLease(output.fs, output.path).holder(),
                   getattr(todo, "left", 0))

    def __str__(self) -> str:
        return "\n".join(["dry run: nothing was started or written"] + self.lines())

    def lines(self) -> List[str]:
        done = set(self.completed)
        redone = [s for s in self.todo if s.shard_id in done]
        new = [s for s in self.todo if s.shard_id not in done]
        kept = "all deleted by --overwrite" if self.overwrite else f"{len(done) - len(redone)} kept"
        lines = [f"output {self.output}: " + (f"{_count(done, 'completed shard')}, {kept}" if done else
                                              "no completed shards"),
                 f"to do: {_count(self.todo, 'shard')}: {len(new)} new ({_inputs(new)}), {len(redone)} redone "
                 f"({_inputs(redone)})" if self.todo else "to do: nothing (the output holds every input file)"]
        lines += [f"  {s.shard_id}: {_inputs([s])}{' (redone)' * (s.shard_id in done)}"
                  for s in self.todo[:MAX_ERROR_LINES]]
        if len(self.todo) > MAX_ERROR_LINES:
            lines.append(f"  ... and {len(self.todo) - MAX_ERROR_LINES} more")
        if self.left:
            lines.append(f"left for a later run (--max-shards): {_count(range(self.left), 'pending shard')}")
        if self.busy:
            lines.append(f"another run is writing into this output now ({self.busy}): a run would stop")
        return lines


def _inputs(shards: Sequence[Shard]) -> str:
    """"130 files", "2 tars", "130 files, 2 tars" or "none": what ``shards`` are made from."""
    files = sum(len(s.uris) for s in shards if s.kind != "tar")
    tars = sum(s.kind == "tar" for s in shards)
    return ", ".join(f"{n} {word}{'s' * (n != 1)}" for n, word in ((files, "file"), (tars, "tar")) if n) or "none"


def _count(items: Sequence[Any], word: str) -> str:
    return f"{len(items)} {word}{'s' * (len(items) != 1)}"


def plan_run(config: PipelineConfig) -> RunPlan:
    """What :func:`run_pipeline` would do (``jobs.generate --dry-run``): the checks it makes before
    starting Ray (model, checkpoint, settings; an output made with others is refused, raising as
    the run would), the shards it would write, and whether another run holds the output. Starts
    nothing and writes nothing: no lease is taken, no marker removed, ``overwrite`` deletes nothing."""
    config.check_model()
    return RunPlan.of(config.output(), pending_shards(config, reopen=False), config.overwrite)


def run_pipeline(config: PipelineConfig, model_stage: type = ModelStage) -> RunSummary:
    """Process every pending shard on the Ray cluster (a local one is started if none is running)
    and return the summary of the whole output, this run's shards and earlier ones.

    Stages (see :mod:`pipeline.stages`): read and decode as CPU tasks, the model on an actor pool
    (``workers`` actors, ``num_gpus_per_worker`` each), post-processing on a CPU actor pool, and
    the driver streaming each shard's masks to its file in file order, finishing the shard once
    all its rows are in. ``model_stage`` is the model stage's class (a :class:`ModelStage` or
    subclass). Raises :class:`pipeline.lease.OutputBusyError` if another run is writing into
    the output."""
    start = time.perf_counter()
    config.check_model()  # a bad checkpoint or setting fails here, not in every actor
    config = spelled_as_output(config)  # a default given now, left out before: the same masks
    shards = discover_shards(config.input_uri, config.images_per_shard, config.storage_options, config.output_uri)
    output = config.output()
    with output.hold_lease():  # one run at a time writes here
        todo = select_pending(shards, output, config.images_per_shard, config.overwrite, config.retry_failed,
                              redo_changed=config.redo_changed, redo_runs=config.redo_runs,
                              max_shards=config.max_shards)
        summary = run_stages(config, todo, output, [(model_stage, "model"), (PostprocessStage, "postprocess")],
                             job="generate")
    summary.seconds = time.perf_counter() - start
    return summary


def run_stages(config: PipelineConfig, todo: Sequence[Shard], output: OutputDir, stages: Sequence[Tuple[type, str]],
               item_fields: Optional[Callable[[Shard], Dict[str, Any]]] = None, job: str = "generate") -> RunSummary:
    """Stream the shards ``todo`` through the decode stage and then ``stages`` (a class, built
    with ``config``, and the key of its resources in ``config.ray_stage_args()``) on Ray, each
    shard written into ``output`` once all its rows are in; the summary of the whole output.
    ``item_fields(shard)`` adds fields to a shard's item that the decode stage passes on (a
    shard's ``prompts``). A run with shards to do is recorded under ``output``
    (:mod:`pipeline.run_records`; ``job`` names it), by the id of the output's lease it holds."""
    start = time.perf_counter()
    log.info("%d shards to process", len(todo))
    collector = ShardCollector(todo, output.open_shard)
    settings = {**asdict(config), "amg": grids_digested(config.amg)}  # a grid's points: its digest
    with recorded(output, job, settings, todo, collector.written) as record:
        if todo:
            _stream(config, todo, collector, stages, item_fields)
    summary = summarize_tables(output)
    summary.run_record = record.uri if record else None
    summary.seconds = time.perf_counter() - start
    summary.stage_seconds = {stage: float(sum(s[f"{stage}_s"] for s in collector.written))
                             for stage in ("decode", "generate", "postprocess")}
    summary.shards_processed, summary.shards_left = len(collector.written), getattr(todo, "left", 0)
    summary.images_processed = int(sum(s["images_ok"] + s["images_error"] for s in collector.written))
    return summary


def _stream(config: PipelineConfig, todo: Sequence[Shard], collector: ShardCollector,
            stages: Sequence[Tuple[type, str]], item_fields: Optional[Callable[[Shard], Dict[str, Any]]]) -> None:
    """The Ray Data pipeline of :func:`run_stages`, its rows handed to ``collector``."""
    import ray

    if not ray.is_initialized():
        init_ray()
        if not os.environ.get("RAY_ADDRESS"):  # this machine's own Ray, which will not grow:
            config.check_fits(ray.cluster_resources())  # fail now rather than wait forever
    args = config.ray_stage_args()
    items = [{"shard_id": s.shard_id, "kind": s.kind, "uris": list(s.uris), "root": s.root,
              **(item_fields(s) if item_fields else {})} for s in todo]
    ledger = start_ledger()  # images a worker process died on, across task retries and actor restarts
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(decode_shards, fn_kwargs={"storage_options": dict(config.storage_options),
                                                  "max_pixels": config.max_pixels, "ledger": ledger,
                                                  "short_side": config.resize_short_side},
                        **args["decode"])
    for stage, resources in stages:
        ds = ds.map_batches(stage, fn_constructor_kwargs={"config": config, "ledger": ledger}, **args[resources])
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            collector.add(batch.to_pylist())
    except BaseException as e:
        collector.abort()  # no partial masks file is left behind (and none has a marker)
        if isinstance(e, ray.exceptions.RayActorError) and e.actor_init_failed:
            raise StageStartError(e) from None
        raise
    if collector.unfinished():
        raise RuntimeError(f"The run ended with shards not written (re-run to redo them): {collector.unfinished()}")


def summarize_tables(output: OutputDir) -> RunSummary:
    """Counts of an output folder (images ok/error, masks, errors by reason, images of several
    frames, ok images by compute dtype) from its shards' markers, and the first ``MAX_ERROR_LINES`` errors (uri, reason,
    detail) and images of several frames from the images tables of the first shards holding
    any: one listing and one concurrent read of the markers, not a
    read of every table (on an object store, ~40 ms each: an hour for 100k shards, at the end of
    every run). A marker of an earlier version without counts is counted from its table."""
    summary = RunSummary()
    reasons: Counter = Counter()
    dtypes: Counter = Counter()
    for shard_id, done in sorted(output.markers().items()):
        counted = all(k in done for k in ("images", "masks", "errors"))
        if counted:
            failed = sum(done["errors"].values())
            dtypes.update(done["compute_dtypes"] if "compute_dtypes" in done else {"unknown": done["images"] - failed})
            summary.images_ok += done["images"] - failed
            summary.images_error += failed
            summary.masks += done["masks"]
            reasons.update(done["errors"])
            summary.images_first_frame_only += done.get("first_frame_only", 0)
            if not ((failed and len(summary.errors) < MAX_ERROR_LINES) or
                    (done.get("first_frame_only") and len(summary.first_frame_only) < MAX_ERROR_LINES)):
                continue
        images = output.read_shard("images", shard_id, ["uri", "status", "frames", "mask_count", "error_reason",
                                                        "error_detail"])
        ok = pc.equal(images.column("status"), "ok")
        errors = images.filter(pc.invert(ok))
        if not counted:
            summary.images_ok += int(pc.sum(ok).as_py() or 0)
            dtypes["unknown"] += int(pc.sum(ok).as_py() or 0)
            summary.images_error += errors.num_rows
            summary.masks += int(pc.sum(images.column("mask_count")).as_py() or 0)
            reasons.update(str(r) for r in errors.column("error_reason").to_pylist())
        several = ([r for r in images.filter(ok).select(["uri", "frames"]).to_pylist() if first_frame_only(r["frames"])]
                   if "first_frame_only" in done else [])  # (earlier versions did not count frames)
        room = max(MAX_ERROR_LINES - len(summary.errors), 0)
        summary.errors += [{"uri": u, "reason": r, "detail": d} for u, r, d in zip(
            errors.column("uri").to_pylist()[:room], errors.column("error_reason").to_pylist()[:room],
            errors.column("error_detail").to_pylist()[:room])]
        summary.first_frame_only += several[:max(MAX_ERROR_LINES - len(summary.first_frame_only), 0)]
    summary.error_reasons = dict(reasons)
    summary.compute_dtypes = {k: n for k, n in sorted(dtypes.items()) if n}
    return summary
