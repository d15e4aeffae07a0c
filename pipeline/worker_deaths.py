"""Images that kill the worker process: counted across actor restarts, then passed over.

Ray Data restarts a dead actor and retries its batch without limit (right for preempted nodes).
An image whose processing kills the process itself (the kernel's OOM killer, a crash in native
code) would be retried forever and hang the run. A stage therefore notes in a :class:`DeathLedger`
(one small actor per run, on the driver's node) which images it is working on before it starts
and clears them when done, whatever the outcome (decode tasks note a shard as a whole, and its
files one by one only once a process died on it). A retried batch that holds an image another
process started and never finished is done image by image; an image that has been started
``MAX_WORKER_DEATHS`` times without finishing is recorded as ``worker_died`` instead of run again.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence

MAX_WORKER_DEATHS = 2  # unfinished starts of an image before it is passed over


class DeathLedger:
    """Ray actor: per image id, how many times a stage started it without finishing."""

    def __init__(self) -> None:
        self.started: Dict[str, int] = {}

    def start(self, image_ids: Sequence[str]) -> None:
        for i in image_ids:
            self.started[i] = self.started.get(i, 0) + 1

    def finish(self, image_ids: Sequence[str]) -> None:
        for i in image_ids:
            self.started.pop(i, None)

    def unfinished(self, image_ids: Sequence[str]) -> List[int]:
        return [self.started.get(i, 0) for i in image_ids]


def start_ledger() -> Any:
    """A :class:`DeathLedger` actor on this (the driver's) node, ending with the driver."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(DeathLedger).options(num_cpus=0, scheduling_strategy=here).remote()


class DeathGuard:
    """A stage's view of the run's ledger (``None``: no ledger, as when a stage runs in-process)."""

    def __init__(self, ledger: Optional[Any]) -> None:
        self.ledger = ledger

    def died_on(self, image_ids: Sequence[str]) -> bool:
        """True if a process started one of these images and never finished it."""
        return self.ledger is not None and any(self._unfinished(image_ids))

    def passed_over(self, image: Dict[str, Any], work: str) -> bool:
        """If processes died ``MAX_WORKER_DEATHS`` times on ``image`` (its ``images`` row), record
        ``worker_died`` on it and return True: the caller must not run it again."""
        if self.ledger is None or self._unfinished([image["image_id"]])[0] < MAX_WORKER_DEATHS:
            return False
        image.update(error_reason="worker_died", error_detail=(
            f"the worker process died {MAX_WORKER_DEATHS} times while {work} (killed for memory, a crash in "
            "native code, or its node lost); passed over"))
        return True

    @contextlib.contextmanager
    def attempt(self, image_ids: Sequence[str]) -> Iterator[None]:
        """Noted as started (before the work begins) and finished (after it, raised or not)."""
        if self.ledger is None:
            yield
            return
        import ray

        ray.get(self.ledger.start.remote(list(image_ids)))
        try:
            yield
        finally:
            self.ledger.finish.remote(list(image_ids))  # ordered after start: same caller, same actor

    def _unfinished(self, image_ids: Sequence[str]) -> List[int]:
        import ray

        return ray.get(self.ledger.unfinished.remote(list(image_ids)))


NO_GUARD = DeathGuard(None)  # in-process runs: nothing noted, nothing passed over
