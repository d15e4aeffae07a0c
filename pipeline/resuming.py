"""Which shards a run still has to do, given what its output already holds.

An output grows; it is never redone behind the user's back. A run does the input files that no
completed shard holds yet: a folder, manifest or prompts file that gained files since the last run
into the output gets the new ones in new shards (numbered after, or in the gaps between, the
completed ones), and every completed shard is kept. Resuming an interrupted run with the same
input gives the shards it would have written. A completed shard is redone (from the files of it
still in the input) when a file's digest changed (``jobs.prompt``: its boxes; ``jobs.generate``
with ``redo_changed``: the file's listing fingerprint, i.e. it was replaced under its name; without
it, such files are counted in a warning) or, with ``retry_failed``, when it holds images that
failed for a reason a retry may fix, or, with ``redo_runs``, when one of those runs wrote it
(:mod:`pipeline.run_records`). A tar is a shard
of its own, named after its path (a completed tar keeps the id it was completed as); a completed
one of that name made from another tar is refused.
Completed shards of another model or settings are refused too (an output never mixes two
configurations), and ``overwrite`` starts afresh. With ``max_shards`` a run does the first of
those shards only (tars in input order; of loose files, the shards to redo before the new ones)
and leaves the others as they are, for a later run.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from .config import RETRIED_REASONS, PipelineConfig
from .names import name_digest
from .output import OutputDir, settings_changes
from .shards import TAR_EXTENSIONS, Shard

log = logging.getLogger(__name__)

Digest = Callable[[str], str]  # uri -> what besides the file decides its masks (recorded in markers)


class Todo(List[Shard]):
    """The shards a run does, in order; ``left``: those pending beyond its ``max_shards``."""

    left: int = 0


def select_pending(shards: Sequence[Shard], output: OutputDir, images_per_shard: int, overwrite: bool = False,
                   retry_failed: bool = False, digest: Optional[Digest] = None, reopen: bool = True,
                   redo_changed: bool = True, redo_runs: Sequence[str] = (),
                   max_shards: Optional[int] = None) -> Todo:
    """The shards of the planned ``shards`` (an input's, see :func:`pipeline.shards.discover_shards`)
    that ``output`` does not hold yet: all of them after clearing it with ``overwrite``; else the
    tars without a marker and the loose files no completed shard holds, grouped
    ``images_per_shard`` to a new shard; and the completed shards to redo (their markers
    removed): those holding a file whose ``digest`` changed since (``digest`` None: the planned
    shards' own digests, their files' fingerprints; with ``redo_changed`` False such shards are
    only counted in a warning), with ``retry_failed``, those holding images that failed for a
    reason in ``RETRIED_REASONS``, and those written by the recorded runs whose ids start with one
    of ``redo_runs`` (``ValueError`` for a prefix that names no recorded run, or several). With
    ``max_shards``, the first ``max_shards`` of them (``Todo.left`` counts the others, which
    stay as they are: a completed one is reopened only when this run redoes it).
    ``reopen=False`` only says what a run would do: no marker is removed (and ``overwrite`` clears
    nothing)."""
    if digest is None:
        planned = {u: d for s in shards if s.digests for u, d in zip(s.uris, s.digests)}
        digest = planned.get if planned else None
        kind = "files replaced under their names (their size, ETag or modification time differ)"
    else:
        kind = "images with other boxes in the prompts"
    changes = Changes(kind, redo_changed)
    asked = Asked(output, retry_failed, redo_runs)
    if overwrite:
        if reopen:
            output.clear()
        return _first([_digested(s, digest) for s in shards], max_shards)
    markers = output.markers()
    for shard_id, done in markers.items():
        output.check_identity(shard_id, done)
    shards = _named_as_completed(shards, markers)
    pending: List[Shard] = []
    for shard in (s for s in shards if s.kind == "tar"):
        done = markers.get(shard.shard_id)
        if done is not None:
            output.check_members(shard, done)
        stale = done is not None and changes.note(shard.shard_id, _stale(shard.uris, done, digest))
        if done is None or stale or asked(shard.shard_id, done):
            pending.append(shard)
    files = [s for s in shards if s.kind != "tar"]
    pending += _redone_files(files, markers, asked, digest, changes)
    changes.report()
    todo = _first(pending + _new_files(files, markers, images_per_shard, digest), max_shards)
    if reopen:
        for shard in todo:
            if shard.shard_id in markers:  # a completed shard redone: its marker goes first
                output.reopen(shard)
    return todo


def _named_as_completed(shards: Sequence[Shard], markers: Mapping[str, Mapping[str, Any]]) -> List[Shard]:
    """``shards``, each tar under the id it was completed as where that differs from the one
    planned now (a tar in a subfolder, completed when shard ids were tar names alone:
    ``2026-12-01/00000.tar`` as ``00000``; a glob's common folder moved), so that a completed tar
    is neither done again nor held twice. A tar planned under an id that another tar of the
    input now keeps gets a digest of its URI after it."""
    completed = {done["members"][0]: i for i, done in markers.items() if _is_tar(done)}
    kept = {s.shard_id: completed[s.uris[0]] for s in shards if s.kind == "tar" and s.uris[0] in completed}
    taken = set(kept.values())
    named = []
    for shard in shards:
        shard_id = kept.get(shard.shard_id)
        if shard_id is None and shard.kind == "tar" and shard.shard_id in taken:
            shard_id = f"{shard.shard_id}~{name_digest(shard.uris[0])}"
        named.append(shard if shard_id in (None, shard.shard_id) else dataclasses.replace(shard, shard_id=shard_id))
    return named


def _first(pending: List[Shard], max_shards: Optional[int]) -> Todo:
    todo = Todo(pending[:max_shards])
    todo.left = len(pending) - len(todo)
    if todo.left:
        log.info("--max-shards %d: %d of %d pending shards this run; %d left for a later run.", max_shards,
                 len(todo), len(pending), todo.left)
    return todo


def spelled_as_output(config: PipelineConfig) -> PipelineConfig:
    """``config``, or, when its output's completed shards were made with the same masks' settings
    spelled otherwise (``--box-nms-thresh 0.7``, the default, given now and left out before; a
    preset's values written out), ``config`` spelled as they were (:meth:`PipelineConfig.spelled_as`),
    so that resuming goes on in the output rather than being refused, and the output keeps one
    settings hash. Settings that change the masks are still refused, by the identity check."""
    if config.overwrite:
        return config
    output = OutputDir(config.output_uri, config.storage_options)
    shard_ids = output.shard_ids()
    done = output.marker(shard_ids[0]) if shard_ids else None
    if not done or "settings" not in done or done.get("settings_hash") in (None, config.settings_hash()):
        return config
    spelled = config.spelled_as(done["settings"], done["settings_hash"])
    if spelled is not None:
        log.info("The output's masks were made with the same settings spelled otherwise (%s); going on with "
                 "its spelling.", ", ".join(settings_changes(done["settings"], config.mask_settings())))
        return spelled
    return config


class Changes:
    """Files of completed shards whose digest changed: redone (``redo``) or, if not, counted
    in a warning that says how to redo them."""

    def __init__(self, kind: str, redo: bool) -> None:
        self.kind, self.redo = kind, redo
        self.files: List[str] = []
        self.shards = 0

    def note(self, shard_id: str, stale: Sequence[str]) -> bool:
        """Note a completed shard's ``stale`` files; True if the shard is to be redone for them."""
        self.files += stale
        self.shards += bool(stale)
        return bool(stale) and self.redo

    def report(self) -> None:
        if not self.files:
            return
        if self.redo:
            log.warning("%d %s since their shards were written (e.g. %s): their %d shards are redone.",
                        len(self.files), self.kind, self.files[0], self.shards)
        else:
            log.warning("%d %s since their shards were written (e.g. %s): their masks are of the files as they "
                        "were. --redo-changed redoes their %d shards.", len(self.files), self.kind, self.files[0],
                        self.shards)


def _stale(uris: Sequence[str], done: Mapping[str, Any], digest: Optional[Digest]) -> List[str]:
    """The ``uris`` of a completed shard (its marker ``done``) whose digest differs from the one
    recorded (files without either are not compared: markers of earlier versions, manifests)."""
    if digest is None:
        return []
    recorded = done.get("digests") or {}
    return [u for u in uris if recorded.get(u) is not None and digest(u) is not None and recorded[u] != digest(u)]


def _group(shard_id: str) -> str:
    """The planned group a loose-files shard id belongs to ("files-00012" -> "files")."""
    return shard_id.rsplit("-", 1)[0]


def _is_tar(done: Mapping[str, Any]) -> bool:
    return len(done["members"]) == 1 and done["members"][0].endswith(TAR_EXTENSIONS)


def _digested(shard: Shard, digest: Optional[Digest]) -> Shard:
    return shard if digest is None else dataclasses.replace(shard, digests=tuple(digest(u) for u in shard.uris))


class Asked:
    """Whether a run was asked to redo a completed shard: with ``retry_failed``, it holds images
    that failed for a reason in ``RETRIED_REASONS``; it was written by a run of ``redo_runs``
    (prefixes of recorded run ids, each naming exactly one)."""

    def __init__(self, output: OutputDir, retry_failed: bool, redo_runs: Sequence[str]) -> None:
        self.output, self.retry_failed = output, retry_failed
        self.runs = _recorded_runs(output, redo_runs) if redo_runs else set()

    def __call__(self, shard_id: str, done: Mapping[str, Any]) -> bool:
        if done.get("run_id") in self.runs:
            return True
        return self.retry_failed and self.output.count_reasons(shard_id, RETRIED_REASONS, done) > 0


def _recorded_runs(output: OutputDir, prefixes: Sequence[str]) -> Set[str]:
    """The ids of the recorded runs of ``output`` that ``prefixes`` name, one each."""
    from .run_records import read_runs

    runs = read_runs(output)
    ids = set()
    for prefix in prefixes:
        named = [r["run_id"] for r in runs if r["run_id"].startswith(prefix.strip().lower())] if prefix.strip() else []
        if len(named) != 1:
            known = ", ".join(f"{r['run_id'][:8]} ({r['started']})" for r in runs) or "none"
            raise ValueError(f"--redo-run {prefix!r} names {'no' if not named else len(named)} recorded run"
                             f"{'s' * (len(named) > 1)} of {output.uri!r} (its runs: {known}; "
                             "python -m jobs.stats --tables <output> --runs lists them).")
        ids.add(named[0])
    return ids


def _new_files(planned: Sequence[Shard], markers: Mapping[str, Mapping[str, Any]], images_per_shard: int,
               digest: Optional[Digest]) -> List[Shard]:
    """The files of ``planned`` (loose-files shards) that no completed shard holds, in order,
    ``images_per_shard`` to a shard named after its group with the lowest numbers no completed
    shard has (so an unchanged input resumes into the shards it was planned as)."""
    done: Set[str] = {u for m in markers.values() for u in m["members"]}
    groups: Dict[str, Tuple[List[str], Optional[str]]] = {}
    for shard in planned:
        groups.setdefault(_group(shard.shard_id), ([], shard.root))[0].extend(shard.uris)
    shards: List[Shard] = []
    for group, (uris, root) in groups.items():
        new = [u for u in uris if u not in done]
        recorded = {m["root"] for i, m in markers.items() if _group(i) == group and m.get("root")}
        if len(recorded) == 1 and all(u.startswith(next(iter(recorded)) + "/") for u in new):
            root = recorded.pop()  # name new files as the completed ones were (a glob's common folder may move)
        ids = (i for i in (f"{group}-{n:05d}" for n in itertools.count()) if i not in markers)
        shards += [_digested(Shard(next(ids), "files", tuple(new[i : i + images_per_shard]), root), digest)
                   for i in range(0, len(new), images_per_shard)]
        completed = [m for i, m in markers.items() if _group(i) == group and not _is_tar(m)]
        present = set(uris)
        gone = [u for m in completed for u in m["members"] if u not in present]
        if completed and len(new) < len(uris):
            log.info("%s: %d of %d input files are in completed shards already; %d new ones in %d shards.",
                     group, len(uris) - len(new), len(uris), len(new), -(-len(new) // images_per_shard))
        if gone:
            log.warning("%s: %d files of completed shards are no longer in the input (e.g. %s); their masks stay in "
                        "the output (--overwrite rebuilds it from this input).", group, len(gone), gone[0])
    return shards


def _redone_files(planned: Sequence[Shard], markers: Mapping[str, Mapping[str, Any]], asked: "Asked",
                  digest: Optional[Digest], changes: Changes) -> List[Shard]:
    """Completed loose-files shards holding files of ``planned`` to redo (a file's digest changed,
    as ``changes`` decides, or as ``asked``), rebuilt from their markers (the members still in
    the input, the naming root)."""
    roots = {u: s.root for s in planned for u in s.uris}
    shards, dropped = [], []
    for shard_id, done in sorted(markers.items()):
        members = done["members"]
        present = [u for u in members if u in roots]
        if _is_tar(done) or not present:
            continue
        stale = changes.note(shard_id, _stale(present, done, digest))
        if not stale and not asked(shard_id, done):
            continue
        dropped += [u for u in members if u not in roots]
        shard = Shard(shard_id, "files", tuple(present), done["root"] if "root" in done else roots[present[0]])
        shards.append(_digested(shard, digest))
    if dropped:
        log.warning("%d files of shards being redone are no longer in the input (e.g. %s): their rows go.",
                    len(dropped), dropped[0])
    return shards
