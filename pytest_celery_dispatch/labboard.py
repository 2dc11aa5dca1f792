"""The lab board: where runs and workers publish their notices (see :mod:`.lab`).

* RabbitMQ: a fanout exchange, ``celery-dispatch.lab``. Publishers send each notice with a
  ``LAB_STALE`` expiration; a listener binds an exclusive, auto-deleted queue of its own and
  keeps the latest notice of each sender. A new listener says ``hello``; every listening
  sender answers at once with its latest notice, so the newcomer has heard everyone after
  ``HELLO_WAIT`` instead of a whole ``LAB_INTERVAL``. Nothing here changes a queue that an
  earlier version declared: the exchange and the listeners' queues are new, so existing
  deployments keep working (a worker or controller of an earlier version publishes nothing and
  is not shown; its runs are seen through this version's workers).
* The embedded broker: one file per sender in ``<broker folder>/lab/``, rewritten atomically;
  a file older than ``LAB_STALE`` is gone.

Used by the controller (:mod:`.turns`), the worker (:mod:`.benchnotice`) and the
``celery-dispatch status`` command (:mod:`.cli`). Kombu is imported where it is used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .lab import FIRST_SEND_EVERY, HELLO_WAIT, LAB_INTERVAL, LAB_STALE, Notice, settled

log = logging.getLogger("pytest_celery_dispatch.labboard")

LAB_EXCHANGE = "celery-dispatch.lab"
#: The board's thread sends a notice given to it within this long.
SEND_EVERY = 0.05
#: Closing waits this long at most for the last notice (a run's ``gone``) to go out.
CLOSE_WAIT = 1.0
#: The embedded broker's folder for notices.
LAB_FOLDER = "lab"


class FileBoard:
    """The embedded broker's board: a folder of notices, one file per sender."""

    error: str | None = None

    def __init__(self, root: Path) -> None:
        self.folder = Path(root) / LAB_FOLDER

    def _path(self, sender: str) -> Path:
        return self.folder / (re.sub(r"[^A-Za-z0-9_.@-]", "_", sender) + ".json")

    def publish(self, notice: Notice) -> None:
        path = self._path(str(notice["id"]))
        with contextlib.suppress(OSError):
            if notice.get("gone"):
                path.unlink(missing_ok=True)
                return
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps(notice))
            os.replace(tmp, path)

    def notices(self) -> list[Notice]:
        now = time.time()
        found: list[Notice] = []
        with contextlib.suppress(OSError):
            for path in self.folder.glob("*.json"):
                try:
                    age = now - path.stat().st_mtime
                    data = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                if age > LAB_STALE * 10:
                    path.unlink(missing_ok=True)  # a dead sender's: nobody else removes it
                elif age <= LAB_STALE and isinstance(data, dict) and "id" in data:
                    found.append(data)
        return found

    @property
    def ready(self) -> bool:
        return True

    settled = ready  # a notice is in its file once published

    def close(self) -> None:
        pass


class AmqpBoard:
    """RabbitMQ's board: one thread with its own connection sends this sender's notices and
    keeps the latest notice of every sender. :meth:`publish` never waits for the broker (a
    silent network must not stall the controller's event loop): the thread sends the latest
    notice given to it within ``SEND_EVERY`` (``FIRST_SEND_EVERY`` until its first, when
    ``eager``: a run's board opened before it joins the line)."""

    def __init__(self, app: Any, eager: bool = False) -> None:
        self.app = app
        self.eager = eager
        self._sent_at: float | None = None  # when a notice of this board last went out
        self._latest: dict[str, tuple[float, Notice]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sent = threading.Event()
        self._pending: Notice | None = None
        self.id = uuid.uuid4().hex[:12]
        self.last: Notice | None = None  # the latest notice published here: a hello's answer
        self.error: str | None = None  # why the last connection failed
        self._hello_at: float | None = None  # said hello on the current connection
        self._thread = threading.Thread(target=self._run, name="celery-dispatch-lab", daemon=True)
        self._thread.start()

    def publish(self, notice: Notice) -> None:
        """Best effort, at once: the thread sends it (a failed send: the next notice)."""
        with self._lock:
            self._pending = notice
            self.last = None if notice.get("gone") else notice
            self._sent.clear()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                with self.app.connection_for_read() as conn:
                    conn.ensure_connection(max_retries=1)
                    self._serve(conn)
            except Exception as exc:
                log.debug("lab board: %s; connecting again", exc)
                self.error = str(exc) or type(exc).__name__
            self._hello_at = None  # cut off: what it holds ages, nothing is decided on it
            self._stopping.wait(LAB_INTERVAL)

    def _serve(self, conn: Any) -> None:
        """Say hello, then send what :meth:`publish` gives and keep what comes, until
        :meth:`close`."""
        from kombu import Consumer, Exchange, Queue

        queue = Queue(
            f"celery-dispatch.lab.{self.id}",
            exchange=Exchange(LAB_EXCHANGE, type="fanout", durable=False, auto_delete=False),
            exclusive=True,
            auto_delete=True,
            durable=False,
            queue_arguments={"x-message-ttl": int(LAB_STALE * 1000)},
        )
        producer = conn.Producer(serializer="json")

        def send(notice: Notice) -> None:
            producer.publish(notice, exchange=LAB_EXCHANGE, routing_key="", expiration=LAB_STALE)

        def on_message(body: Any, message: Any) -> None:
            self._on_message(body, message, send)

        with Consumer(conn, [queue], callbacks=[on_message], accept=["json"]):
            send({"kind": "hello", "id": self.id})
            self._hello_at = time.monotonic()
            while True:
                with self._lock:
                    pending = self._pending
                if pending is not None:
                    send(pending)
                    with self._lock:  # pending until it went out (see settled)
                        if self._pending is pending:
                            self._pending = None
                        self._sent_at = time.monotonic()
                self._sent.set()
                if self._stopping.is_set():
                    return
                first = self.eager and self._sent_at is None
                with contextlib.suppress(TimeoutError):  # nothing came: send, look at the flag
                    conn.drain_events(timeout=FIRST_SEND_EVERY if first else SEND_EVERY)
                conn.heartbeat_check()  # ours out; a silent broker raises: connect again

    def _on_message(self, body: Any, message: Any, answer: Any) -> None:
        if isinstance(body, dict) and body.get("kind") == "hello":
            if body.get("id") != self.id and self.last is not None:
                with contextlib.suppress(Exception):
                    answer(self.last)
        elif isinstance(body, dict) and "id" in body:
            with self._lock:
                if body.get("gone"):
                    self._latest.pop(str(body["id"]), None)
                else:
                    self._latest[str(body["id"])] = (time.monotonic(), body)
        with contextlib.suppress(Exception):
            message.ack()

    @property
    def ready(self) -> bool:
        """Connected, and listened long enough to have heard every live sender (the answers to
        its hello). Not while cut off from the broker."""
        hello = self._hello_at
        return hello is not None and time.monotonic() - hello >= HELLO_WAIT

    @property
    def settled(self) -> bool:
        """:attr:`ready`, and the notice given last went out ``HELLO_WAIT`` ago (see
        :func:`.lab.settled`): a run decides its first turn on a settled board."""
        with self._lock:
            pending, sent_at = self._pending is not None, self._sent_at
        return settled(time.monotonic(), self._hello_at, sent_at, pending)

    def notices(self) -> list[Notice]:
        now = time.monotonic()
        with self._lock:
            for key in [k for k, (at, _) in self._latest.items() if now - at > LAB_STALE]:
                del self._latest[key]
            return [notice for _, notice in self._latest.values()]

    def close(self) -> None:
        """Stop; a last notice given (a run's ``gone``) is sent first, if the broker answers
        within ``CLOSE_WAIT``."""
        with self._lock:
            pending = self._pending is not None
        if pending and self._thread.is_alive():
            self._sent.wait(CLOSE_WAIT)
        self._stopping.set()


Board = FileBoard | AmqpBoard


def open_board(app: Any, embedded_root: Path | None, eager: bool = False) -> Board:
    """The board of ``app``'s broker: a folder beside the embedded broker, else the exchange
    (``eager``: see :class:`AmqpBoard`)."""
    if embedded_root is not None:
        return FileBoard(embedded_root)
    return AmqpBoard(app, eager)
