"""The units of the run's work as the controller tracks them, and the actions the scheduler
returns for the session to carry out (no Celery, no pytest).

A *chunk* is a list of nodeids published to the run's work queue of one Celery queue
(``batch_id`` on the wire); a *slot* is one ``run_session`` task, a worker process pulling
chunks (``session_id`` on the wire).
"""

from __future__ import annotations

import dataclasses


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

    @property
    def remaining(self) -> list[str]:
        return [n for n in self.nodeids if n not in self.done]

    @property
    def finished(self) -> bool:
        return not self.remaining


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
