"""The flags the Ray jobs share (jobs.generate, jobs.prompt): shards and batches, model actors and
their resources, storage, and how a run treats an output it finds."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Any, Callable, Dict, Optional, Union

from pipeline.config import RETRIED_REASONS
from pipeline.decode import DEFAULT_MAX_PIXELS
from pipeline.lease import OutputBusyError
from pipeline.run import RunPlan, StageStartError
from pipeline.single_machine import RunSummary


def add_run_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--images-per-shard", type=int, default=64,
                    help="images per shard: the unit written, resumed and retried (default 64; a tar is one shard)")
    ap.add_argument("--images-per-batch", type=int, default=4,
                    help="decoded images per model call (jobs.generate: their crops share encoder batches; jobs.prompt: "
                         "one encoder batch; default 4)")
    ap.add_argument("--workers", type=int, default=1, help="model actors, one model each (default 1)")
    ap.add_argument("--num-gpus-per-worker", type=float, default=0.0, help="GPUs per model actor (default 0: CPU)")
    ap.add_argument("--num-cpus-per-worker", type=float, default=1.0,
                    help="CPUs per model actor; also its torch threads (default 1)")
    ap.add_argument("--num-cpus-per-decoder", type=float, default=0.5,
                    help="CPUs per read-and-decode task (default 0.5)")
    ap.add_argument("--device", help="torch device in the actors (default: cuda if the actor has a GPU)")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are errors")
    ap.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// URIs (e.g. a local server)")
    ap.add_argument("--overwrite", action="store_true", help="discard previous results under --output")
    ap.add_argument("--retry-failed", action="store_true",
                    help="also redo completed shards with images that failed in the model or post-processing "
                         "stage or could not be read (out of memory, a GPU in a bad state, a storage outage, "
                         "HEIC before its plugin was installed); shards are rewritten whole")
    ap.add_argument("--redo-run", action="append", default=[], metavar="RUN",
                    help="also redo the completed shards this recorded run wrote (its id or the first characters, as "
                         "jobs.stats --runs lists them: e.g. runs of a version later found faulty); repeatable")
    ap.add_argument("--dry-run", action="store_true",
                    help="say what a run would do (the shards it would write, new and redone) after the checks it "
                         "makes first, and stop: Ray is not started and nothing is written")


def run_config_args(args: argparse.Namespace) -> Dict[str, Any]:
    """``PipelineConfig`` fields from the flags of :func:`add_run_args`."""
    storage = {"client_kwargs": {"endpoint_url": args.s3_endpoint_url}} if args.s3_endpoint_url else {}
    return dict(images_per_shard=args.images_per_shard, images_per_batch=args.images_per_batch,
                workers=args.workers, num_gpus_per_worker=args.num_gpus_per_worker,
                num_cpus_per_worker=args.num_cpus_per_worker, num_cpus_per_decoder=args.num_cpus_per_decoder,
                device=args.device, max_pixels=args.max_pixels, storage_options=storage,
                overwrite=args.overwrite, retry_failed=args.retry_failed, redo_runs=tuple(args.redo_run))


def run_job(start: Callable[[], Union[RunSummary, RunPlan]], output: str) -> int:
    """Run a job's ``start()`` (the run, or its plan with ``--dry-run``) and print what it
    returns; the exit code: 0, 2 for bad input, flags, checkpoint or resources (the error says
    which), 1 when a stage's actors could not start or another run is writing into the output."""
    try:
        result = start()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (StageStartError, OutputBusyError) as e:  # a worker without its GPU; another run on the output
        print(f"error: {e}", file=sys.stderr)
        return 1
    if isinstance(result, RunPlan):
        print(result)
    else:
        print_run_end(result, output)
    return 0


def print_run_end(summary: RunSummary, output: str) -> None:
    """The run's summary, whether ``--retry-failed`` may recover some of its errors, and where the tables are."""
    print(summary)
    hint = retry_hint(summary)
    if hint:
        print(hint)
    print(f"tables: {output.rstrip('/')}/masks/*.parquet and images/*.parquet")


def retry_hint(summary: RunSummary) -> Optional[str]:
    """Whether ``--retry-failed`` may recover some of the output's errors (those of ``RETRIED_REASONS``)."""
    retriable = Counter({r: n for r, n in summary.reason_counts().items() if r in RETRIED_REASONS})
    if not retriable:
        return None
    return (f"{sum(retriable.values())} image(s) failed for reasons another try may not meet "
            f"({', '.join(f'{r} {n}' for r, n in sorted(retriable.items()))}): --retry-failed redoes their shards")
