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

from .lab import HELLO_WAIT, LAB_INTERVAL, LAB_LISTEN, LAB_STALE, Notice

log = logging.getLogger("pytest_celery_dispatch.labboard")

LAB_EXCHANGE = "celery-dispatch.lab"
#: The embedded broker's folder for notices.
LAB_FOLDER = "lab"


class FileBoard:
    """The embedded broker's board: a folder of notices, one file per sender."""

    def __init__(self, root: Path) -> None:
        self.folder = Path(root) / LAB_FOLDER
        self.started = time.monotonic() - LAB_LISTEN  # nothing to listen for

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

    def close(self) -> None:
        pass


class AmqpBoard:
    """RabbitMQ's board: notices go out on a fanout exchange; with ``listen`` a thread keeps
    the latest one of each sender (its own connection; publishing uses another, from the thread
    that calls :meth:`publish`)."""

    def __init__(self, app: Any, listen: bool = True) -> None:
        self.app = app
        self._latest: dict[str, tuple[float, Notice]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._conn: Any = None
        self._producer: Any = None
        self.id = uuid.uuid4().hex[:12]
        self.last: Notice | None = None  # the latest notice published here: a hello's answer
        self.started = time.monotonic()
        self._hello_at: float | None = None
        self._thread: threading.Thread | None = None
        if listen:
            self._thread = threading.Thread(
                target=self._listen, name="celery-dispatch-lab", daemon=True
            )
            self._thread.start()

    def _exchange(self) -> Any:
        from kombu import Exchange

        return Exchange(LAB_EXCHANGE, type="fanout", durable=False, auto_delete=False)

    def publish(self, notice: Notice) -> None:
        """Best effort: the board is for people and for the line; a failed publish is tried
        again with the next notice."""
        self.last = None if notice.get("gone") else notice
        try:
            if self._conn is None:
                self._conn = self.app.connection_for_write()
                self._conn.ensure_connection(max_retries=1)
                self._producer = self._conn.Producer(serializer="json")
                self._exchange()(self._conn.default_channel).declare()
            self._producer.publish(
                notice,
                exchange=LAB_EXCHANGE,
                routing_key="",
                expiration=LAB_STALE,
                delivery_mode=1,
                retry=False,
            )
        except Exception as exc:
            log.debug("lab notice not published: %s", exc)
            self._drop_publisher()

    def _drop_publisher(self) -> None:
        conn, self._conn, self._producer = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.release()

    def _on_message(self, body: Any, message: Any, answer: Any = None) -> None:
        if isinstance(body, dict) and body.get("kind") == "hello":
            if body.get("id") != self.id and self.last is not None and answer is not None:
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

    def _listen(self) -> None:
        while not self._stopping.is_set():
            try:
                with self.app.connection_for_read() as conn:
                    conn.ensure_connection(max_retries=1)
                    self._consume(conn)
            except Exception as exc:
                log.debug("lab board listener: %s; listening again", exc)
                self._stopping.wait(LAB_INTERVAL)

    def _consume(self, conn: Any) -> None:
        """Say hello, then keep the notices that come until :meth:`close`."""
        from kombu import Consumer, Queue

        queue = Queue(
            f"celery-dispatch.lab.{self.id}",
            exchange=self._exchange(),
            exclusive=True,
            auto_delete=True,
            durable=False,
            queue_arguments={"x-message-ttl": int(LAB_STALE * 1000)},
        )
        producer = conn.Producer(serializer="json")

        def answer(notice: Notice) -> None:
            producer.publish(notice, exchange=LAB_EXCHANGE, routing_key="", expiration=LAB_STALE)

        def on_message(body: Any, message: Any) -> None:
            self._on_message(body, message, answer)

        with Consumer(conn, [queue], callbacks=[on_message], accept=["json"]):
            answer({"kind": "hello", "id": self.id})
            self._hello_at = self._hello_at or time.monotonic()
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):  # nothing came: look at the flag
                    conn.drain_events(timeout=LAB_INTERVAL)

    @property
    def ready(self) -> bool:
        """Listened long enough to have heard every live sender: the answers to its hello,
        else one round of notices."""
        now, hello = time.monotonic(), self._hello_at
        heard = hello is not None and now - hello >= HELLO_WAIT
        return heard or now - self.started >= LAB_LISTEN

    def notices(self) -> list[Notice]:
        now = time.monotonic()
        with self._lock:
            for key in [k for k, (at, _) in self._latest.items() if now - at > LAB_STALE]:
                del self._latest[key]
            return [notice for _, notice in self._latest.values()]

    def close(self) -> None:
        self._stopping.set()  # the listener ends within LAB_INTERVAL (a daemon: not awaited)
        self._drop_publisher()


Board = FileBoard | AmqpBoard


def open_board(app: Any, embedded_root: Path | None, listen: bool = True) -> Board:
    """The board of ``app``'s broker: a folder beside the embedded broker, else the exchange."""
    if embedded_root is not None:
        return FileBoard(embedded_root)
    return AmqpBoard(app, listen=listen)
