"""The units of the run's work as the controller tracks them, and the actions the scheduler
returns for the session to carry out (no Celery, no pytest).

A *chunk* is a list of nodeids published to the run's work queue of one Celery queue
(``batch_id`` on the wire); a *slot* is one ``run_session`` task, a worker process pulling
chunks (``session_id`` on the wire).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass
class ChunkState:
    """A group of nodeids published as one message to one queue's work queue."""

    batch_id: str
    queue: str
    nodeids: list[str]
    attempt: int = 1
    sent_at: float | None = None
    started_at: float | None = None
    last_seen: float | None = None
    worker: str | None = None
    done: set[str] = dataclasses.field(default_factory=set)
    not_before: float = 0.0  # the one delay field: nothing happens to it before this time
    current_since: float | None = None  # when the test running now began (monotonic)
    lost_by: list[str] = dataclasses.field(default_factory=list)  # workers of earlier attempts
    session_id: str | None = None  # the slot working on it
    send_failed_since: float | None = None
    sent_order: int = 0  # its place in its work queue (first in, first out)
    gone_since: float | None = None  # not started, yet no longer in its work queue
    distinct: int = dataclasses.field(init=False, repr=False, default=0)

    def __post_init__(self) -> None:
        self.distinct = len(set(self.nodeids))

    @property
    def remaining(self) -> list[str]:
        return [n for n in self.nodeids if n not in self.done]

    @property
    def finished(self) -> bool:
        """Every test of it has its outcome. ``done`` only ever holds the chunk's own nodeids
        (``Scheduler.done``), so counting is enough: the event loop asks this of every live
        chunk per event (a list of the remaining tests cost W6's controller 1.9 s)."""
        return len(self.done) >= self.distinct


@dataclasses.dataclass
class SlotState:
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
    #: The chunks it announced and has not finished: its heartbeats speak for them all (it
    #: takes the next one while a test runs, and that one is silent until its turn).
    held: list[ChunkState] = dataclasses.field(default_factory=list)

    @property
    def live(self) -> bool:
        return not self.finished and not self.lost


# ----------------------------------------------------------------------------- actions


@dataclasses.dataclass(frozen=True)
class Publish:
    """Put this chunk on its queue's work queue."""

    chunk: ChunkState


@dataclasses.dataclass(frozen=True)
class StartSlot:
    """Send one more ``run_session`` task to this slot's Celery queue."""

    slot: SlotState


@dataclasses.dataclass(frozen=True)
class Fail:
    """End this test with a named infrastructure failure."""

    nodeid: str
    message: str


@dataclasses.dataclass(frozen=True)
class Notice:
    """A line for the terminal (``yellow``: a retry, ``cyan``: news)."""

    text: str
    color: str = "yellow"


@dataclasses.dataclass(frozen=True)
class Attempt:
    """These tests are now on this attempt (for the reports)."""

    nodeids: tuple[str, ...]
    attempt: int


Action = Publish | StartSlot | Fail | Notice | Attempt


class TurnGate:
    """A run's queues on shared benches: ``grant(queue, slots, wanted)`` (see
    :func:`.lab.grant`) says how many of a queue's ``slots`` the run may take now, at most the
    ``wanted`` it has work for; 0 = the queue waits for its turn, and nothing of it is sent
    meanwhile. Without a ``grant`` every queue goes at once."""

    def __init__(self, grant: Callable[[str, int, int], int] | None = None) -> None:
        self.grant = grant
        self.waiting: dict[str, tuple[int, int]] = {}  # queue -> (slots, wanted), waiting
        self.granted: dict[str, int] = {}  # queue -> slots this run may hold

    def take(self, queue: str, slots: int, wanted: int | None = None) -> bool:
        if self.grant is None:
            return True
        wanted = slots if wanted is None else wanted
        granted = self.grant(queue, slots, wanted)
        if granted <= 0:
            self.waiting[queue] = (slots, wanted)
            return False
        self.waiting.pop(queue, None)
        self.granted[queue] = granted
        return True

    def widen(self, queue: str, slots: int, wanted: int) -> int:
        """A queue already going learned it has ``slots`` slots (its first count missed a
        worker) and has work for ``wanted``: how many it may hold now. Above its grant, the
        line's rule decides again (:func:`.lab.grant`); never fewer than it holds."""
        held = self.granted.get(queue)
        if self.grant is None or held is None or wanted <= held:
            return wanted
        self.granted[queue] = max(held, self.grant(queue, slots, wanted))
        return self.granted[queue]

    def due(self, stopping: bool = False) -> list[str]:
        """The waiting queues whose turn has come (now granted); none once the run stops."""
        if stopping:
            return []
        return [q for q, (n, w) in sorted(self.waiting.items()) if self.take(q, n, w)]
