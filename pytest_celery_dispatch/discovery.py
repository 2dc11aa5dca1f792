"""Who serves the run's queues as it starts: consumers, workers and their slots, the workers
``--celery-local-workers`` starts for the run, and a guess for a queue nobody serves.

Asked once by :class:`~.session.DispatchSession` before the scheduler begins; everything here
goes through the :class:`~.transport.Broker` it is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import routing
from .settings import Settings


@dataclasses.dataclass
class Workers:
    """The run's queues as found: consumers, worker slots, and worker names per queue."""

    consumers: dict[str, int]
    capacity: dict[str, int]
    by_queue: dict[str, list[str]]


def find_workers(broker: Any, queues: Iterable[str], wait_workers: float) -> Workers:
    """Consumers per queue (a passive declare each), then who they are and how many slots
    they have (one inspect broadcast, only for queues with a consumer)."""
    consumers = {q: broker.consumer_count(q) or 0 for q in queues}
    if not (present := {q for q, c in consumers.items() if c > 0}):
        return Workers(consumers, {}, {})
    # The wait ends once each queue's consumers answered; a worker that answers too late
    # tells its slots when its first session starts (QueueScheduler.slot_started).
    found = broker.inspect_workers(
        present,
        {q: consumers[q] for q in present},
        timeout=min(1.0, max(0.2, wait_workers)),
    )
    by_queue = {q: [name for name, _ in found[q]] for q in found}
    capacity = {q: sum(c for _, c in found[q]) or consumers[q] for q in found}
    return Workers(consumers, capacity, by_queue)


def guess_queue_names(
    broker: Any,
    waiting: Iterable[str],
    consumers: dict[str, int],
    allowed: frozenset[str] | set[str] | None,
) -> dict[str, str]:
    """A queue without consumer may be a typo: the served or declared queue one edit away
    (their names cost a broadcast: only asked on this unhappy path)."""
    known = {q for q, count in consumers.items() if count > 0}
    known |= allowed or set()
    known |= broker.served_queues()
    guesses = {}
    for queue in waiting:
        if guess := routing.did_you_mean(queue, known):
            guesses[queue] = guess
    return guesses


def start_local_workers(
    settings: Settings,
    rootpath: Path,
    embedded_root: Path | None,
    queues: list[str],
    consumer_count: Callable[[str], int | None],
    write_line: Callable[..., None],
) -> Any:
    """``--celery-local-workers``: one worker per queue, started and awaited now (None when
    the option is not given)."""
    if not (settings.local_workers or settings.local_workers_auto):
        return None
    from .localworkers import start_for_run

    return start_for_run(
        settings.broker,
        rootpath,
        embedded_root,
        queues if settings.local_workers_auto else list(settings.local_workers),
        consumer_count,
        write_line,
    )
