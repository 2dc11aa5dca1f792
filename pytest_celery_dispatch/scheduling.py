"""Pure scheduling: batches per queue, outstanding work, deadlines and retry decisions.

Invariants the controller relies on:

* every dispatched nodeid belongs to exactly one outstanding batch until it has a final report;
* a batch is *lost* when its heartbeats stop, when a test of it outlives the worker's own hard
  kill, when its queue has no consumer any more, or when it waited in its queue for
  ``timeout + grace`` seconds while the queue made no progress (see :func:`is_lost`);
* a lost batch's unfinished nodeids are re-dispatched as a new batch (attempt + 1) after an
  exponential backoff, until ``retries`` re-dispatches are used up; then they fail by name.

No Celery, no pytest: plain data, unit-tested with fakes.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence

#: Seconds added to the per-test timeout before an overdue test counts as lost.
LOST_GRACE = 10.0
#: A started batch whose heartbeats (every 2 s) stop for this long is lost.
SILENCE_LIMIT = 10.0
#: A started batch is lost once its queue has had no consumer at all for this long.
CONSUMER_GONE_GRACE = 2.0
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
    current_since: float | None = None  # when the test running now began (monotonic)
    lost_by: list[str] = dataclasses.field(default_factory=list)  # workers of earlier attempts
    session_id: str | None = None  # the session working on it
    send_failed_since: float | None = None

    @property
    def remaining(self) -> list[str]:
        return [n for n in self.nodeids if n not in self.done]

    @property
    def finished(self) -> bool:
        return not self.remaining


@dataclasses.dataclass
class SessionState:
    """One ``run_session`` task: a worker slot pulling chunks from the run's work queue."""

    session_id: str
    queue: str
    sent_at: float
    task_id: str | None = None
    started_at: float | None = None
    last_seen: float | None = None
    worker: str | None = None
    finished: bool = False
    lost: bool = False

    @property
    def live(self) -> bool:
        return not self.finished and not self.lost


def plan_chunks(
    nodeids: Sequence[str], slots: int, divisor: int = 4, cap: int = 200
) -> list[list[str]]:
    """Cut a queue's tests into contiguous chunks that shrink as the work drains.

    Each chunk is ``remaining / (divisor * slots)`` tests (at least 1, at most ``cap``): early
    chunks are big enough to amortize a broker round trip, the last ones are single tests, so
    no slot idles while another holds a long tail (the idea of xdist's ``load`` scheduling).
    Contiguous chunks keep a module's tests together for its fixtures.
    """
    remaining = list(nodeids)
    chunks: list[list[str]] = []
    per_round = max(1, divisor * max(1, slots))
    while remaining:
        size = max(1, min(cap, len(remaining) // per_round))
        chunks.append(remaining[:size])
        remaining = remaining[size:]
    return chunks


def new_batch_id(run_id: str) -> str:
    return f"{run_id}.{next(_batch_counter)}"


def backoff(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_MAX) -> float:
    """Delay before sending attempt ``attempt`` (2 -> base, 3 -> 2*base, ...)."""
    if attempt <= 1:
        return 0.0
    exponent = min(attempt - 2, 64)  # 2**64 seconds is past any cap; no float overflow
    return float(min(cap, base * math.pow(2, exponent)))


def grace_for(timeout: float) -> float:
    """Slack added to the per-test timeout before an overdue test means loss: 2 to 10 s."""
    return min(LOST_GRACE, max(2.0, timeout))


def is_lost(
    batch: Batch,
    now: float,
    timeout: float,
    queue_last_seen: float | None = None,
    silence: float = SILENCE_LIMIT,
) -> str | None:
    """Why this unfinished batch counts as lost, or ``None`` while it is fine.

    * A started batch sends a heartbeat every couple of seconds: silent for ``silence``
      seconds, its worker is gone or cut off.
    * A test of a started batch that is still running ``timeout + grace`` after it began has
      outlived the worker's own hard kill: the worker cannot be trusted with it any more.
    * A batch still waiting in its queue is lost when neither it nor any other batch of this
      run on that queue made progress for ``timeout + grace``: while the queue moves, waiting
      there is fine.
    """
    if batch.finished or batch.sent_at is None:
        return None
    grace = grace_for(timeout)
    if batch.started_at is not None:
        last = batch.last_seen if batch.last_seen is not None else batch.started_at
        if now - last > silence:
            return f"no heartbeat for {silence:g}s"
        if batch.current_since is not None and now - batch.current_since > timeout + grace:
            return f"a test still running {timeout + grace:g}s after it started"
        return None
    last = max(batch.sent_at, queue_last_seen or 0.0)
    if now - last > timeout + grace:
        return f"not taken from the queue within {timeout + grace:g}s"
    return None


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
        lost_by=[*batch.lost_by, *([batch.worker] if batch.worker else [])],
    )


def outstanding(batches: Iterable[Batch]) -> list[Batch]:
    return [b for b in batches if not b.finished]
