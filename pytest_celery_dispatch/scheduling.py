"""Pure scheduling: batches per queue, outstanding work, deadlines and retry decisions.

Invariants the controller relies on:

* every dispatched nodeid belongs to exactly one outstanding batch until it has a final report;
* a batch is *lost* when it has shown no sign of life for ``timeout + grace`` seconds: since its
  last event once started (a live worker hard-kills a test at ``timeout``, so it always speaks
  before that), or since it was sent or its queue last made progress while it waits there;
* a lost batch's unfinished nodeids are re-dispatched as a new batch (attempt + 1) after an
  exponential backoff, until ``retries`` re-dispatches are used up; then they fail by name.

No Celery, no pytest: plain data, unit-tested with fakes.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence

#: Seconds added to the per-test timeout before a silent, started batch counts as lost.
LOST_GRACE = 10.0
#: First re-dispatch delay; doubles with each further attempt.
BACKOFF_BASE = 1.0
BACKOFF_MAX = 30.0

_batch_counter = itertools.count(1)


@dataclasses.dataclass
class Batch:
    """A group of nodeids sent as one Celery task to one queue."""

    batch_id: str
    queue: str
    nodeids: list[str]
    attempt: int = 1
    task_id: str | None = None
    sent_at: float | None = None
    started_at: float | None = None
    last_seen: float | None = None
    worker: str | None = None
    done: set[str] = dataclasses.field(default_factory=set)
    not_before: float = 0.0  # backoff: do not send before this monotonic time

    @property
    def remaining(self) -> list[str]:
        return [n for n in self.nodeids if n not in self.done]

    @property
    def finished(self) -> bool:
        return not self.remaining


def new_batch_id(run_id: str) -> str:
    return f"{run_id}.{next(_batch_counter)}"


def chunk_count(n_tests: int, consumers: int, per_consumer: int = 2) -> int:
    """How many batches to cut a queue's tests into.

    Enough batches that every consumer (and a second pool slot on each) gets work, few enough
    that the per-batch runner start-up is amortized.
    """
    if n_tests <= 0:
        return 0
    return max(1, min(n_tests, max(1, consumers) * per_consumer))


def split(nodeids: Sequence[str], parts: int) -> list[list[str]]:
    """Split in order into ``parts`` contiguous chunks whose sizes differ by at most one.

    Contiguous chunks keep a module's tests together, so module fixtures are set up once per
    batch rather than once per test.
    """
    if parts <= 0 or not nodeids:
        return []
    parts = min(parts, len(nodeids))
    size, extra = divmod(len(nodeids), parts)
    chunks: list[list[str]] = []
    start = 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        chunks.append(list(nodeids[start:end]))
        start = end
    return chunks


def plan_batches(
    run_id: str, queue: str, nodeids: Sequence[str], consumers: int, per_consumer: int = 2
) -> list[Batch]:
    return [
        Batch(batch_id=new_batch_id(run_id), queue=queue, nodeids=chunk)
        for chunk in split(nodeids, chunk_count(len(nodeids), consumers, per_consumer))
    ]


def backoff(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_MAX) -> float:
    """Delay before sending attempt ``attempt`` (2 -> base, 3 -> 2*base, ...)."""
    if attempt <= 1:
        return 0.0
    exponent = min(attempt - 2, 64)  # 2**64 seconds is past any cap; no float overflow
    return float(min(cap, base * math.pow(2, exponent)))


def grace_for(timeout: float) -> float:
    """Slack added to the per-test timeout before silence means loss: 2 to 10 seconds."""
    return min(LOST_GRACE, max(2.0, timeout))


def is_lost(batch: Batch, now: float, timeout: float, queue_last_seen: float | None = None) -> bool:
    """Has this unfinished batch been silent for longer than ``timeout + grace``?

    A started batch is silent since its last event. A batch still waiting in its queue is
    silent since it was sent, or since the last event of this run on that queue, whichever
    is later: while the queue makes progress, waiting there is fine.
    """
    if batch.finished or batch.sent_at is None:
        return False
    if batch.started_at is not None:
        last = batch.last_seen if batch.last_seen is not None else batch.started_at
    else:
        last = max(batch.sent_at, queue_last_seen or 0.0)
    return now - last > timeout + grace_for(timeout)


def redispatch(
    batch: Batch, run_id: str, retries: int, now: float, base: float = BACKOFF_BASE
) -> Batch | None:
    """The follow-up batch for a lost one, or ``None`` when its retries are used up."""
    remaining = batch.remaining
    if not remaining or batch.attempt > retries:
        return None
    attempt = batch.attempt + 1
    return Batch(
        batch_id=new_batch_id(run_id),
        queue=batch.queue,
        nodeids=remaining,
        attempt=attempt,
        not_before=now + backoff(attempt, base),
    )


def outstanding(batches: Iterable[Batch]) -> list[Batch]:
    return [b for b in batches if not b.finished]
