"""The controller's broker side, started while pytest collects.

Nothing of it needs the collected tests: :class:`Prestart` (a thread, started by
:class:`~.session.DispatchSession` as collection begins) imports Celery, makes the app, opens
the lab board (whose hello is answered meanwhile; a run that remembers the queues its last run
waited for joins the line on it at once), connects to the broker, and builds what
Celery's first ``send_task`` builds on first use (the result backend's class, the producer
pool's connection). After collection the session takes them (:meth:`Prestart.take`): its
network round trips and waits overlapped pytest's collection instead of following it. A
failure is the session's to report, as if it had happened there; a run that never takes them
(nothing to dispatch, a collection error) has them closed by :meth:`Prestart.close`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Started:
    """What the start made: the Celery app, the lab board, and the broker connection, or
    why it could not be had (``error``: a :class:`~.transport.BrokerUnavailable`)."""

    app: Any
    board: Any
    conn: Any = None
    error: BaseException | None = None


class Prestart:
    """One thread that starts the broker side (see the module); :meth:`take` waits for it."""

    def __init__(
        self,
        broker: str,
        embedded_root: Path | None,
        on_board: Callable[[Any], object] | None = None,
    ) -> None:
        self.broker = broker
        self.embedded_root = embedded_root
        self.on_board = on_board  # called in the thread with the board as soon as it is open
        self._started: Started | None = None
        self._failure: BaseException | None = None  # a bug: raised again in the main thread
        self._taken = False
        self._board_open = threading.Event()  # the app and the board are there (or never)
        self._thread = threading.Thread(target=self._run, name="celery-dispatch-start", daemon=True)

    def start(self) -> Prestart:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._started = self._start()
        except BaseException as exc:
            self._failure = exc
        finally:
            self._board_open.set()

    def _start(self) -> Started:
        from . import transport
        from .labboard import open_board

        # The dispatch engine needs no result backend (reports come on the reply queue); with
        # rpc:// every controller would leave a reply queue of its own on the broker for an hour.
        app = transport.make_app(self.broker, "disabled", embedded_root=self.embedded_root)
        if self.embedded_root is not None:
            from .embedded import sweep

            sweep(self.embedded_root)
        started = self._started = Started(app, open_board(app, self.embedded_root, eager=True))
        if self.on_board is not None:
            self.on_board(started.board)
        self._board_open.set()  # the run can join the line while the rest goes on
        try:
            started.conn = transport.connect(app)
        except transport.BrokerUnavailable as exc:
            started.error = exc
            return started
        transport.warm_sending(app)
        return started

    def app_and_board(self) -> tuple[Any, Any]:
        """The app and the lab board, as soon as they are there (the rest may still be under
        way: :meth:`take` waits for it)."""
        self._board_open.wait()
        started = self._started or self.take()  # (none: take raises what went wrong)
        return started.app, started.board

    def take(self) -> Started:
        """Wait for the start; what it made is the caller's from now on (to close)."""
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        assert self._started is not None
        self._taken = True
        return self._started

    def close(self) -> None:
        """Close what was started and not taken (no wait for a start still under way)."""
        if self._taken or self._thread.is_alive() or self._started is None:
            return
        self._taken = True
        with contextlib.suppress(Exception):
            self._started.board.close()
        if self._started.conn is not None:
            with contextlib.suppress(Exception):
                self._started.conn.release()
