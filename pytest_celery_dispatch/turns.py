"""The run's place in the line for shared benches: its notice on the lab board, its turn,
and the waiting line on its terminal.

:class:`RunTurns` is the controller's side of :mod:`.lab`: the scheduler asks :meth:`grant`
before it starts a queue (0 = wait; nothing is sent meanwhile); every turn of the event loop
calls :meth:`tick`, which renews this run's notice (waiting or holding, per queue, with its
progress) every ``LAB_INTERVAL`` and returns, at most every ``LINE_EVERY`` seconds per queue,
the waiting line to print. :meth:`close` withdraws the notice, so the next run in line goes
at once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import lab
from .identity import Identity

if TYPE_CHECKING:
    from .labboard import Board
    from .scheduling import QueueScheduler


#: pytest's cache: the queues the last run joined the line for, and its arguments.
QUEUES_KEY = "celery-dispatch/line"


def remembered(cached: Any, args: list[str]) -> list[str]:
    """The queues the last run with the same selection ``args`` (its paths, ``-k``, ``-m``...:
    :func:`.prewarmplan.selection`) joined the line for (from pytest's cache;
    [] if none, or if anything about it looks wrong): a run joins with them while it collects,
    and again only if its tests turn out to need other queues."""
    if not isinstance(cached, dict) or cached.get("args") != list(args):
        return []
    queues = cached.get("queues")
    if not isinstance(queues, list) or not all(isinstance(q, str) and q for q in queues):
        return []
    return list(queues)


class RunTurns:
    """One run on the lab board (the board and the clocks are injected)."""

    def __init__(
        self,
        run_id: str,
        identity: Identity,
        priority: int,
        board: Board,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.board = board
        self.wall = wall
        self.clock = clock
        self.me: lab.Notice = {
            "kind": "run",
            "id": run_id,
            "identity": dict(identity),
            "priority": priority,
            "arrived": wall(),
        }
        self.since: dict[str, float] = {}  # queue -> when this run got its turn (wall)
        self.unreachable: str | None = None  # why the board could not be reached at the start
        self._joined = False  # the board was waited for (at the first grant)
        self._said = False  # ... and its being out of reach was said
        self._last_notice = float("-inf")
        self._queues: dict[str, Any] = {}  # the queues of the notice published last
        self._last_line: dict[str, tuple[float, str]] = {}
        self._closed = False

    def join(self, queues: list[str]) -> None:
        """On the board at once, waiting for every queue: runs starting together see each
        other before either decides. Joined already for the same queues (the last run's,
        during collection: :func:`remembered`), the notice out since then stands."""
        if self._queues and set(self._queues) == set(queues):
            return
        self._publish({queue: {"state": lab.WAITING} for queue in queues})

    def _publish(self, queues: dict[str, Any]) -> None:
        self._queues = queues
        self.board.publish({**self.me, "queues": queues})

    def grant(self, queue: str, slots: int, wanted: int | None = None) -> int:
        """Slots of the ``slots`` of ``queue`` this run may take now, at most ``wanted``
        (0: wait for its turn).

        At the start, the board is waited for until it has settled (``HELLO_WAIT`` after its
        hello and after this run's notice went out: :func:`.lab.settled`); a board still out of
        reach after ``BOARD_WAIT`` leaves this run out of the line (said once). Later, while
        the board is cut off (a broker restart), a waiting queue keeps waiting.
        """
        if not self._joined:
            self._joined = True
            deadline = self.clock() + lab.BOARD_WAIT
            while not self.board.settled:
                if self.clock() >= deadline:
                    self.unreachable = self.board.error or "no answer"
                    break
                time.sleep(0.005)  # the first chunk and slots go once it has settled
        wanted = slots if wanted is None else wanted
        if self.unreachable:
            return wanted  # as without a line
        if not self.board.ready:
            return 0
        with contextlib.suppress(Exception):
            granted = min(wanted, lab.grant(self.me, self.board.notices(), queue, slots))
            if granted > 0:  # said at once: a run arriving now must count these slots as held
                since = self.since.setdefault(queue, self.wall())  # kept when widened
                state = {"state": lab.HOLDING, "slots": granted, "since": since}
                self._publish({**self._queues, queue: state})
            return granted
        return wanted  # the board cannot be read: as without a line

    def notice(self, sch: QueueScheduler) -> lab.Notice:
        """This run's notice: each queue it waits for or holds (slots, progress)."""
        queues: dict[str, Any] = {}
        for queue in sch.turns.waiting:
            queues[queue] = {"state": lab.WAITING, "total": len(sch.queue_nodeids[queue])}
        for queue, nodeids in sch.queue_nodeids.items():
            if queue in sch.turns.waiting or not sch.unfinished_in(queue):
                continue
            done = set().union(*(c.done for c in sch.chunks.values() if c.queue == queue))
            queues[queue] = {
                "state": lab.HOLDING,
                "slots": sum(1 for s in sch.slots.values() if s.live and s.queue == queue),
                "done": len(done),
                "total": len(nodeids),
                "since": self.since.get(queue) or self.me["arrived"],
            }
        return {**self.me, "queues": queues}

    def tick(self, sch: QueueScheduler) -> list[str]:
        """Renew the notice when due; the waiting lines due to be printed."""
        now = self.clock()
        if now - self._last_notice >= lab.LAB_INTERVAL:
            self._last_notice = now
            self._publish(self.notice(sch)["queues"])
        lines: list[str] = []
        if self.unreachable and not self._said:
            self._said = True
            lines.append(
                f"the lab board is out of reach ({self.unreachable}): this run does "
                "not wait in line for busy queues (docs/shared-benches.md)"
            )
        for queue in [q for q in self._last_line if q not in sch.turns.waiting]:
            del self._last_line[queue]
            lines.append(f"{queue}: this run's turn; sending its tests")
        if not sch.turns.waiting:
            return lines
        notices = self.board.notices()
        for queue in sorted(sch.turns.waiting):
            text = lab.waiting_line(self.me, notices, queue, self.wall())
            at, last = self._last_line.get(queue, (float("-inf"), ""))
            if now - at >= lab.LINE_EVERY or _gist(text) != _gist(last):
                self._last_line[queue] = (now, text)
                lines.append(text)
        return lines

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.board.publish({"kind": "run", "id": self.me["id"], "gone": True})
        with contextlib.suppress(Exception):
            self.board.close()


def _gist(line: str) -> str:
    """A waiting line without its clocks and counts (a change of those alone is not news)."""
    return "".join(ch for ch in line if not ch.isdigit())
