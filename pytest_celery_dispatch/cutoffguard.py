"""The cut-off guard: stops a slot's runner when the slot has not heard the broker for too long,
even while the slot's own thread waits inside a broker call.

The slot driver asks the broker every ``CONTROLLER_CHECK_INTERVAL`` and stops its runner itself
once nothing has been heard for ``SILENT_LIMIT`` (see ``worker._Reply``). That needs each broker
call to return: a socket read or write is bounded by ``BROKER_IO_TIMEOUT`` and a connection
attempt by the connect timeout, but a silent network can still hold a call longer (py-amqp goes
on reading a frame it has begun, a library's retries add up). Meanwhile the runner, told
nothing, would go on running what it was given, and start the test it holds back once the call
returns. The guard, a thread of its own, reads only the time of the last answer: past
``GUARD_LIMIT`` it marks the slot cut off for good (every later broker call of the slot returns
at once), interrupts the runner as Ctrl-C would, and kills it ``TEARDOWN_GRACE`` later.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from .celeryconf import BROKER_IO_TIMEOUT, SILENT_LIMIT
from .liveness import TEARDOWN_GRACE

#: The driver stops its runner by itself within ``SILENT_LIMIT`` plus one check that waits on
#: its socket (a channel open, then a declare: two bounded waits at most). Past that, its
#: thread is stuck in a broker call, and the guard stops the runner instead.
GUARD_LIMIT = SILENT_LIMIT + 2 * BROKER_IO_TIMEOUT
#: How often the guard looks.
GUARD_INTERVAL = 0.5


class Stoppable(Protocol):
    def interrupt(self) -> None: ...

    def kill(self) -> None: ...


class Slot(Protocol):
    """What the guard needs of a :class:`.SlotDriver`."""

    @property
    def runner(self) -> Stoppable | None: ...

    def run(self) -> dict[str, Any]: ...


def run_guarded(
    driver: Slot, silence: Callable[[], float | None], give_up: Callable[[], None]
) -> dict[str, Any]:
    """``driver.run()`` with a :class:`CutOffGuard` beside it, on the slot's broker line."""
    with CutOffGuard(silence, lambda: driver.runner, give_up).watching():
        return driver.run()


class CutOffGuard:
    """``silence()``: seconds since the broker last answered the slot, None once the slot knows
    it is cut off (its driver then stops the runner itself: its calls return at once);
    ``runner()``: the slot's runner now (None between runners); ``give_up()``: mark the slot cut
    off for good (no broker call). :meth:`check` is one look; :meth:`watching` runs it in a
    thread every ``interval`` seconds."""

    def __init__(
        self,
        silence: Callable[[], float | None],
        runner: Callable[[], Stoppable | None],
        give_up: Callable[[], None],
        *,
        limit: float = GUARD_LIMIT,
        grace: float = TEARDOWN_GRACE,
        interval: float = GUARD_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.silence = silence
        self.runner = runner
        self.give_up = give_up
        self.limit = limit
        self.grace = grace
        self.interval = interval
        self.clock = clock
        self.stopped: Stoppable | None = None  # the runner the guard interrupted
        self.stopped_at: float | None = None
        self.killed = False

    def check(self) -> None:
        if self.stopped_at is None:
            quiet = self.silence()
            if quiet is None or quiet <= self.limit:
                return
            self.give_up()
            self.stopped_at = self.clock()
            self.stopped = self.runner()
            if self.stopped is not None:
                self.stopped.interrupt()
        elif not self.killed and self.clock() - self.stopped_at >= self.grace:
            self.killed = True
            # Only while the driver still holds it: once closed, its pid may be another's.
            if self.stopped is not None and self.runner() is self.stopped:
                self.stopped.kill()

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        done = threading.Event()

        def loop() -> None:
            while not done.wait(self.interval) and not self.killed:
                self.check()

        thread = threading.Thread(target=loop, name="cut-off-guard", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
