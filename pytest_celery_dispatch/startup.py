"""The controller's lab board, opened before pytest collects.

A run waits ``HELLO_WAIT`` after its board's hello and after its own notice went out before it
decides its first turn (:func:`.lab.settled`); its notice names its queues, known only after
collection. :class:`Prestart`, made by :class:`~.session.DispatchSession` as pytest's session
starts, imports Celery, makes the app and opens the board, whose thread connects and says hello
while pytest collects; a run that remembers the queues its last run waited for joins the line
on it at once (``on_board``). After collection the session takes the app and the board
(:meth:`Prestart.take`) and joins the line: the line's wait then covers the rest of its start
(the manifest, the broker connection, the declarations, the workers' broadcast).

Traced on W1 (a quiet machine): Celery's import is CPU and the board's steps are round trips,
each followed by a wait for the GIL while pytest collects; in a thread beside collection the
import finished after collection, and only the round trips overlapped it. So the import is done
here, before collection, and the interpreter's switch interval is short until the start is
taken, so the board's thread gets its turns between collection's.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The interpreter's switch interval from the start until it is taken (the default is 5 ms).
SWITCH_INTERVAL = 0.0005


class Prestart:
    """The Celery app and the lab board, made now (see the module); :meth:`take` hands them
    over, :meth:`close` closes what was never taken."""

    def __init__(
        self,
        broker: str,
        embedded_root: Path | None,
        on_board: Callable[[Any], object] | None = None,
    ) -> None:
        from . import transport
        from .labboard import open_board

        # The dispatch engine needs no result backend (reports come on the reply queue); with
        # rpc:// every controller would leave a reply queue of its own on the broker for an hour.
        self.app = transport.make_app(broker, "disabled", embedded_root=embedded_root)
        if embedded_root is not None:
            from .embedded import sweep

            sweep(embedded_root)
        self._interval: float | None = sys.getswitchinterval()
        sys.setswitchinterval(min(self._interval, SWITCH_INTERVAL))
        self.board = open_board(self.app, embedded_root, eager=True)
        self._taken = False
        if on_board is not None:
            on_board(self.board)

    def take(self) -> tuple[Any, Any]:
        """The app and the board, the caller's from now on (to close)."""
        self._restore_interval()
        self._taken = True
        return self.app, self.board

    def close(self) -> None:
        """Close the board if it was never taken (a run that dispatched nothing)."""
        self._restore_interval()
        if not self._taken:
            self._taken = True
            with contextlib.suppress(Exception):
                self.board.close()

    def _restore_interval(self) -> None:
        if self._interval is not None:
            sys.setswitchinterval(self._interval)
            self._interval = None
