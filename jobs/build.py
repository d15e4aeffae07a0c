"""Incremental dataset build from a spec file: only shards not yet done; a new manifest version
when something was processed, nothing when all is up to date; then what each input's tables hold
(images ok and failed, errors by reason, masks). Run it on a schedule.

    python -m jobs.build --spec infra/build-spec.example.toml
    ray job submit --working-dir . -- python -m jobs.build --spec specs/sa1b.toml

Spec (TOML), table [build]: name, output, inputs (list of URIs), and optionally model_type (default
demo, the bundled model; name the type of any other checkpoint), checkpoint, seed, preset, mode,
amg (a table of generator settings), images_per_shard,
images_per_batch, workers, num_gpus_per_worker, num_cpus_per_worker, postprocess_workers,
num_cpus_per_postprocessor, num_cpus_per_decoder, s3_endpoint_url; and a table [build.export]
(format = "sa1b-tar" | "sa1b-json" | "coco", dest (default <output>/export), workers, ray) to
export each input's tables after every run, incrementally, to <dest>/<input-key>.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.run_args import (EXIT_STATUS_HELP, add_fail_on_arg, add_max_shards_arg, failed_images_exit, retry_hint,
                           stopped_exit)
from pipeline.build import load_spec, plan_build, run_build
from pipeline.driver import Terminated, stopped_cleanly
from pipeline.lease import OutputBusyError
from pipeline.run import StageStartError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.build", description=__doc__, epilog=EXIT_STATUS_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", required=True, help="build spec file (TOML, see above)")
    ap.add_argument("--retry-failed", action="store_true",
                    help="also redo shards with images that failed in the model or post-processing stage or "
                         "could not be read or were not there, or HEIC before its plugin was installed (as "
                         "jobs.generate --retry-failed)")
    ap.add_argument("--redo-changed", action="store_true",
                    help="also redo shards holding input files replaced under their names since (as jobs.generate "
                         "--redo-changed)")
    ap.add_argument("--redo-run", action="append", default=[], metavar="RUN",
                    help="also redo the completed shards this recorded run wrote (its id or the first characters, "
                         "as jobs.stats --tables <an input's tables> --runs lists them; a build records one run per "
                         "input); repeatable")
    ap.add_argument("--dry-run", action="store_true",
                    help="say what a build would do (each input's shards to write, new and redone) after its checks, "
                         "and stop: nothing is started or written")
    add_max_shards_arg(ap, each=" of each input")
    add_fail_on_arg(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = load_spec(args.spec)
        if args.dry_run:
            print(plan_build(spec, retry_failed=args.retry_failed, redo_changed=args.redo_changed,
                             max_shards=args.max_shards, redo_runs=args.redo_run))
            return 0
        with stopped_cleanly():
            result = run_build(spec, retry_failed=args.retry_failed, redo_changed=args.redo_changed,
                               max_shards=args.max_shards, redo_runs=args.redo_run)
    except (KeyboardInterrupt, Terminated) as e:
        return stopped_exit(e)
    except (ValueError, FileNotFoundError) as e:  # the spec (SpecError), a checkpoint, an input: say which
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (StageStartError, OutputBusyError) as e:  # a worker without its GPU; another run on the output
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.version is None:
        latest = f"v{result.latest:04d}" if result.latest else "none"
        print(f"{spec.name}: up to date (latest manifest {latest}); nothing processed")
    else:
        shards = sum(len(s) for s in result.new_shards.values())
        print(f"{spec.name}: processed {shards} shards; wrote manifest {result.manifest_uri}")
    left = sum(result.left.values())
    if left:
        print(f"left for a later build (--max-shards): {left} pending shard{'s' * (left != 1)}")
    for uri, summary in result.tables.items():
        lines = [f"input {uri}: {summary.counts()}"] + summary.detail_lines() + [retry_hint(summary) or ""]
        print("\n  ".join(line for line in lines if line))
    for uri, summary in result.exports.items():
        print(f"export of {uri}: {summary}")
    if any(summary.failed for summary in result.exports.values()):
        return 1
    return failed_images_exit(result.tables.values(), args.fail_on)


if __name__ == "__main__":
    sys.exit(main())
