"""A worker's notice on the lab board (see :mod:`.lab`): its queues and slots, the runs its
slots are busy with, its last run's result, and its quarantine (see :mod:`.health`); the
board's release notices for it (``celery-dispatch release``) put it back in service.

:class:`BenchNotices` is a thread in the worker's main process (started at ``worker_ready``):
every ``LAB_INTERVAL`` it reads the ``run_session`` tasks the worker is running (Celery's
``active_requests``) and the last result a slot left (:func:`record_last_run`, written by the
pool process as a slot ends), and publishes them; then it kills the zygotes this worker
prewarmed for runs gone from the board (:mod:`.prewarmwatch`). Worker side only: never
imports the controller.

PYTEST_DONT_REWRITE: imported by the worker app.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .health import HealthBook
from .lab import LAB_INTERVAL, RELEASE
from .labboard import Board
from .names import SLOT_TASK
from .prewarmwatch import PrewarmWatch
from .procutil import private_top, worker_pid


def _last_path(node: str) -> str | None:
    top = private_top()
    if top is None:
        return None
    return os.path.join(top, "bench-" + re.sub(r"[^A-Za-z0-9_.@-]", "_", node) + ".json")


def record_last_run(node: str, last: dict[str, Any]) -> None:
    """A slot ended (pool process): keep its result for the worker's notice."""
    path = _last_path(node)
    if path is None:
        return
    with contextlib.suppress(OSError):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "w") as fh:
            json.dump(last, fh)
        os.replace(tmp, path)


def read_last_run(node: str) -> dict[str, Any] | None:
    path = _last_path(node)
    try:
        with open(path or "") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def busy_slots(requests: Iterable[Any]) -> list[dict[str, Any]]:
    """The runs a worker's slots are busy with, from its active Celery requests."""
    busy = []
    for request in list(requests):
        if getattr(request, "task_name", None) != SLOT_TASK:
            continue
        args = getattr(request, "args", None) or []
        payload = args[0] if args and isinstance(args[0], dict) else {}
        started = getattr(request, "time_start", None)
        busy.append(
            {
                "run_id": str(payload.get("run_id") or ""),
                "queue": payload.get("queue"),
                "identity": str((payload.get("identity") or {}).get("label") or ""),
                "since": started,  # wall time (Celery converts it on accept)
            }
        )
    return busy


class BenchNotices(threading.Thread):
    """Publishes this worker's notice every ``LAB_INTERVAL`` until :meth:`stop`."""

    def __init__(
        self, board: Board, node: str, worker: str, queues: Iterable[str], slots: int
    ) -> None:
        super().__init__(name="celery-dispatch-bench", daemon=True)
        self.board = board
        self.node = node
        self.base: dict[str, Any] = {
            "kind": "worker",
            "id": node,
            "node": node,
            "worker": worker,
            "host": socket.gethostname(),
            "queues": sorted(queues),
            "slots": slots,
        }
        self.stopping = threading.Event()
        self.prewarms = PrewarmWatch(node, private_top(), worker_pid())

    def notice(self) -> dict[str, Any]:
        from celery.worker.state import active_requests

        notice = {
            **self.base,
            "busy": busy_slots(active_requests),
            "last": read_last_run(self.node),
        }
        book = HealthBook.of_worker()
        notice["quarantine"] = book.quarantine() if book is not None else None
        return notice

    def run(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(Exception):
                self.take_releases()
            with contextlib.suppress(Exception):
                self.board.publish(self.notice())
            with contextlib.suppress(Exception):
                self.prewarms.check(self.board.notices())
            self.stopping.wait(LAB_INTERVAL)

    def take_releases(self) -> None:
        """``celery-dispatch release WORKER``: a release notice naming this worker (its name
        or node) and its quarantine puts it back in service."""
        book = HealthBook.of_worker()
        if book is None or book.quarantine() is None:
            return
        for notice in self.board.notices():
            named = notice.get("worker") in (self.base["worker"], self.node)
            if notice.get("kind") == RELEASE and named:
                book.release(notice.get("since"), f"released by {notice.get('by') or '?'}")

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(Exception):
            self.board.publish({"kind": "worker", "id": self.node, "gone": True})
        with contextlib.suppress(Exception):
            self.board.close()


def start_bench_notices(worker: Any) -> BenchNotices:
    """At ``worker_ready``: this worker's notices, on its broker's board."""
    from .embedded import is_embedded
    from .labboard import open_board
    from .names import ENV_WORKER_ID
    from .workerpool import slots_of

    app = worker.app
    queues = list(app.amqp.queues.consume_from or app.amqp.queues)
    conf = app.conf
    root = conf.broker_transport_options["root"] if is_embedded(conf.broker_write_url) else None
    board = open_board(app, None if root is None else Path(root))  # it answers hellos too
    node = str(worker.hostname)
    name = os.environ.get(ENV_WORKER_ID) or node
    slots = slots_of(getattr(worker, "controller", None))
    notices = BenchNotices(board, node, name, queues, slots)
    notices.start()
    return notices
