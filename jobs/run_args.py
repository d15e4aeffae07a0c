"""The flags the Ray jobs share (jobs.generate, jobs.prompt): shards and batches, model actors and
their resources, storage, and how a run treats an output it finds."""

from __future__ import annotations

import argparse
import signal
import sys
from collections import Counter
from typing import Any, Callable, Dict, Iterable, Optional, Union

from pipeline.config import RETRIED_REASONS
from pipeline.decode import DEFAULT_MAX_PIXELS
from pipeline.driver import Terminated, stopped_cleanly
from pipeline.lease import OutputBusyError
from pipeline.run import RunPlan, StageStartError
from pipeline.single_machine import RunSummary


FAIL_ON = ("retriable", "any", "none")
EXIT_FAILED_IMAGES = 3  # the run finished, and the output holds images that failed (as --fail-on says)
EXIT_STATUS_HELP = """exit status:
  0        the run ended; every image has its masks or failed for a reason of its own (corrupt...)
  3        the run ended; the output holds images that failed for a reason a retry may fix (--fail-on)
  2        refused before starting: a flag, the checkpoint, the input, an output made with other settings
  1        a stage's actors could not start, another run holds the output (or an export failed)
  130/143  stopped by Ctrl-C / SIGTERM (ray job stop): completed shards kept; run again to go on"""


def stopped_exit(error: BaseException, what: str = "run") -> int:
    """What a run (or an export) stopped by Ctrl-C or SIGTERM prints, and its exit status (130,
    143: 128 + the signal)."""
    interrupted = isinstance(error, KeyboardInterrupt)
    print(f"error: the {what} was stopped by {'Ctrl-C' if interrupted else 'SIGTERM'}; the shards it completed are "
          "kept, and running it again goes on", file=sys.stderr)
    return 128 + (signal.SIGINT if interrupted else signal.SIGTERM)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_max_shards_arg(ap: argparse.ArgumentParser, each: str = "") -> None:
    ap.add_argument("--max-shards", type=positive_int, metavar="N",
                    help=f"do at most N of the shards to do{each} (the first, as --dry-run lists them) and "
                         "leave the others, as they are, to a later run: a trial on a few shards of a large input, "
                         "or a run of bounded length")


def add_fail_on_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--fail-on", choices=FAIL_ON, default="retriable",
                    help=f"exit status {EXIT_FAILED_IMAGES} once the run has ended when the output holds images that "
                         "failed: retriable (default): for reasons another try may not meet, those --retry-failed "
                         "redoes (a storage outage, out of memory, a lost node); any: also files that are no usable "
                         "image (corrupt, empty, too large...); none: never")


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
                         "stage or could not be read (out of memory, a GPU in a bad state, a storage outage, a "
                         "listed file not there yet, "
                         "HEIC before its plugin was installed); shards are rewritten whole")
    ap.add_argument("--redo-run", action="append", default=[], metavar="RUN",
                    help="also redo the completed shards this recorded run wrote (its id or the first characters, as "
                         "jobs.stats --runs lists them: e.g. runs of a version later found faulty); repeatable")
    ap.add_argument("--dry-run", action="store_true",
                    help="say what a run would do (the shards it would write, new and redone) after the checks it "
                         "makes first, and stop: Ray is not started and nothing is written")
    add_max_shards_arg(ap)
    add_fail_on_arg(ap)


def run_config_args(args: argparse.Namespace) -> Dict[str, Any]:
    """``PipelineConfig`` fields from the flags of :func:`add_run_args`."""
    storage = {"client_kwargs": {"endpoint_url": args.s3_endpoint_url}} if args.s3_endpoint_url else {}
    return dict(images_per_shard=args.images_per_shard, images_per_batch=args.images_per_batch,
                workers=args.workers, num_gpus_per_worker=args.num_gpus_per_worker,
                num_cpus_per_worker=args.num_cpus_per_worker, num_cpus_per_decoder=args.num_cpus_per_decoder,
                device=args.device, max_pixels=args.max_pixels, storage_options=storage,
                overwrite=args.overwrite, retry_failed=args.retry_failed, redo_runs=tuple(args.redo_run),
                max_shards=args.max_shards)


def run_job(start: Callable[[], Union[RunSummary, RunPlan]], output: str, fail_on: str = "retriable") -> int:
    """Run a job's ``start()`` (the run, or its plan with ``--dry-run``) and print what it
    returns; the exit code: 0, 2 for bad input, flags, checkpoint or resources (the error says
    which), 1 when a stage's actors could not start or another run is writing into the output,
    ``EXIT_FAILED_IMAGES`` when the run ended with images failed as ``fail_on`` says (see
    :func:`failed_images_exit`), 130 or 143 when stopped by Ctrl-C or SIGTERM (:func:`stopped_cleanly`)."""
    try:
        with stopped_cleanly():
            result = start()
    except (KeyboardInterrupt, Terminated) as e:
        return stopped_exit(e)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (StageStartError, OutputBusyError) as e:  # a worker without its GPU; another run on the output
        print(f"error: {e}", file=sys.stderr)
        return 1
    if isinstance(result, RunPlan):
        print(result)
        return 0
    print_run_end(result, output)
    return failed_images_exit([result], fail_on)


def print_run_end(summary: RunSummary, output: str) -> None:
    """The run's summary, whether ``--retry-failed`` may recover some of its errors, where the
    tables are, and the run's record."""
    print(summary)
    hint = retry_hint(summary)
    if hint:
        print(hint)
    print(f"tables: {output.rstrip('/')}/masks/*.parquet and images/*.parquet")
    if summary.run_record:
        print(f"run record: {summary.run_record}")


def failed_by_reason(summary: RunSummary, fail_on: str) -> Counter:
    """The summary's errors by reason that ``fail_on`` counts: "retriable", those of
    ``RETRIED_REASONS``; "any", all; "none", none."""
    return Counter({r: n for r, n in summary.reason_counts().items()
                    if fail_on == "any" or (fail_on == "retriable" and r in RETRIED_REASONS)})


def failed_images_exit(summaries: Iterable[RunSummary], fail_on: str) -> int:
    """``EXIT_FAILED_IMAGES`` when the outputs of ``summaries`` hold images failed as ``fail_on``
    says (and why, on stderr), else 0: an orchestrator sees a run that left holes a retry may
    fill (or, with "any", any failed image) without reading its log."""
    failed = sum((failed_by_reason(s, fail_on) for s in summaries), Counter())
    if not failed:
        return 0
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(failed.items()))
    print(f"exit status {EXIT_FAILED_IMAGES} (--fail-on {fail_on}): the output holds {sum(failed.values())} failed "
          f"image(s) ({reasons})", file=sys.stderr)
    return EXIT_FAILED_IMAGES


def retry_hint(summary: RunSummary) -> Optional[str]:
    """Whether ``--retry-failed`` may recover some of the output's errors (those of ``RETRIED_REASONS``)."""
    retriable = failed_by_reason(summary, "retriable")
    if not retriable:
        return None
    return (f"{sum(retriable.values())} image(s) failed for reasons another try may not meet "
            f"({', '.join(f'{r} {n}' for r, n in sorted(retriable.items()))}): --retry-failed redoes their shards")
