"""Celery / kombu, controller side: app factory, broker checks, publishing, the reply consumer.

Only this module (and the worker side) talks to Celery. The reply consumer runs in its own
thread with its own connection; it only puts decoded events on a ``queue.Queue`` for the
session's main-thread loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue as queue_mod
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Connection, Consumer, Exchange, Queue

from . import embedded, names
from .celeryconf import celery_config
from .liveness import CONTROLLER_HEARTBEAT, CONTROLLER_RECONNECT_MAX
from .names import PLAIN_TASK_PROCESSES, SLOT_TASK, mask_url, stop_queue_name
from .serialization import Chunk, Event, SessionPayload, dumps, loads

log = logging.getLogger(__name__)

#: An abandoned reply queue (its controller died) is deleted by RabbitMQ after this long unused.
RUN_QUEUE_EXPIRES_MS = 30 * 60 * 1000
#: The stop signal of a run (-x) outlives any test a worker may still be finishing... mostly.
STOP_QUEUE_EXPIRES_MS = 60 * 60 * 1000
#: How long the broadcast that lists the served queues waits for replies (it waits all of it).
SERVED_QUEUES_TIMEOUT = 0.5


#: What to do when the broker cannot be reached (and when it refused the credentials).
HINT_NO_BROKER = (
    "start RabbitMQ (rabbitmq-server -detached), pass --celery-broker URL, "
    "or try it on this machine: --celery-broker embedded --celery-local-workers auto"
)
HINT_ACCESS_REFUSED = "check the user name and password in the broker URL"


class _AllAnswered(Exception):
    """Raised from a broadcast's reply callback: every worker waited for has answered."""


def _served(queues: Any) -> set[str]:
    """The queue names in one worker's ``active_queues`` reply."""
    return {str(q.get("name")) for q in queues or [] if isinstance(q, dict)}


def all_answered(replies: dict[str, Any], names: set[str], consumers: dict[str, int]) -> bool:
    """Whether the ``active_queues`` ``replies`` so far name, for each queue of ``names``, as
    many workers as it has consumers (one consumer per worker and queue)."""
    found = {name: 0 for name in names}
    for queues in replies.values():
        for name in _served(queues) & names:
            found[name] += 1
    return all(found[name] >= consumers.get(name, 0) for name in names)


class BrokerUnavailable(Exception):
    """The broker cannot be reached or refused us; the message carries the masked URL."""


def unreachable_message(masked_url: str, error: str, refused: bool = False) -> str:
    """``cannot reach the broker URL: ERROR; HINT`` (pure); ``refused``: bad credentials."""
    hint = HINT_ACCESS_REFUSED if refused else HINT_NO_BROKER
    return f"cannot reach the broker {masked_url}: {error}; {hint}"


def make_app(
    broker: str,
    backend: str,
    name: str = "pytest_celery_dispatch.controller",
    embedded_root: str | os.PathLike[str] | None = None,
) -> Celery:
    config = celery_config(broker, backend, embedded_root)
    app = Celery(name, set_as_current=False)
    app.conf.update(config)
    # Celery prefers the environment's CELERY_RESULT_BACKEND to its settings; this beats both.
    app.backend_cls = config["result_backend"]
    return app


def embedded_root_of(app: Celery) -> Path | None:
    """The embedded broker's folder when ``app`` uses it, else None."""
    if not embedded.is_embedded(app.conf.broker_write_url):
        return None
    return Path((app.conf.broker_transport_options or {})["root"])


def describe_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]


def connect(app: Celery, timeout: float = 4.0) -> Connection:
    """A connected kombu Connection, or :class:`BrokerUnavailable` within about ``timeout``."""
    conn = app.connection_for_write()
    conn.connect_timeout = timeout
    try:
        conn.ensure_connection(max_retries=0, timeout=timeout)
    except Exception as exc:  # kombu raises OperationalError, amqp AccessRefused, socket errors
        conn.release()
        url = mask_url(app.conf.broker_url)
        refused = "ACCESS_REFUSED" in str(exc) or "403" in str(exc)
        raise BrokerUnavailable(unreachable_message(url, describe_error(exc), refused)) from None
    return conn


def warm_sending(app: Celery) -> None:
    """Build what ``app``'s first ``send_task`` builds on first use: the result backend (its
    module's import), the task sender, and a connected producer in the producer pool (about
    20-80 ms of the first slot's send, measured): done within the line's wait, before the
    scheduler begins (see :mod:`.startup`). Best effort: the send does whatever is left."""
    with contextlib.suppress(Exception):
        app.backend  # noqa: B018 (a property that imports and builds the backend)
        app.amqp.send_task_message  # noqa: B018 (likewise, the sender)
        with app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=0)


def load_sending(app: Celery) -> None:
    """Import what ``app``'s first ``send_task`` imports, without a connection: a thread that
    sends while pytest collects must import nothing (an import registers loggers, and pytest's
    logging plugin iterates them: "dictionary changed size during iteration")."""
    with contextlib.suppress(Exception):
        app.backend  # noqa: B018 (properties that import and build)
        app.AsyncResult  # noqa: B018
        app.amqp.send_task_message  # noqa: B018
        app.amqp.Producer  # noqa: B018
        conn = app.connection_for_write()
        conn.transport  # noqa: B018 (imports the transport: kombu's pyamqp, amqp)
        conn.release()
        "localhost".encode("idna")  # a host name's codec, imported on the first connect


def task_queue(app: Celery, name: str) -> Queue:
    """The queue exactly as a ``celery worker -Q name`` declares it (durable, direct)."""
    return app.amqp.queues[name]


def run_queue(name: str) -> Queue:
    """A queue of this run (reply or work): durable, on the default exchange, deleted by the
    controller at the end, and by RabbitMQ if the controller died and left it unused."""
    return names.run_queue(name, RUN_QUEUE_EXPIRES_MS)


class Broker:
    """Main-thread broker operations: declare, count consumers, send, clean up."""

    def __init__(self, app: Celery, conn: Connection) -> None:
        self.app = app
        self.conn = conn
        self._channel: Any = None

    @property
    def channel(self) -> Any:
        if self._channel is None:
            self._channel = self.conn.channel()
        return self._channel

    def _reset_channel(self) -> None:
        try:
            if self._channel is not None:
                self._channel.close()
        except Exception:
            pass
        self._channel = None

    def declare_task_queue(self, name: str) -> None:
        task_queue(self.app, name)(self.channel).declare()

    def declare_reply_queue(self, name: str) -> None:
        run_queue(name)(self.channel).declare()

    def consumer_count(self, name: str) -> int | None:
        """Consumers on a queue (a passive declare: about 0.2 ms on RabbitMQ).

        0 when the queue is gone; ``None`` when the broker cannot be asked right now
        (a restart in progress): callers must not take that for "no worker".
        """
        counts = self._passive_declare(name)
        return None if counts is None else counts[1]

    def message_count(self, name: str) -> int | None:
        """Messages ready in a queue (0 when it is gone, ``None`` when the broker cannot tell)."""
        counts = self._passive_declare(name)
        return None if counts is None else counts[0]

    def _passive_declare(self, name: str) -> tuple[int, int] | None:
        """(messages, consumers) of a queue; (0, 0) when it is gone; None when unknown."""
        try:
            if not self.conn.connected:
                self._reset_channel()
                self.conn.ensure_connection(max_retries=1, timeout=2.0)
            ok = self.channel.queue_declare(queue=name, passive=True)
            messages = getattr(ok, "message_count", ok[1])
            return int(messages), int(getattr(ok, "consumer_count", ok[2]))
        except Exception as exc:
            self._reset_channel()
            code = getattr(exc, "code", None) or getattr(exc, "reply_code", None)
            if code == 404 or "NOT_FOUND" in str(exc):
                return 0, 0
            log.debug("passive declare of %s failed: %s", name, exc)
            with contextlib.suppress(Exception):
                self.conn.collect()
            return None

    def declare_stop_queue(self, run_id: str) -> None:
        """Ask this run's workers to stop after their running test (see worker.control)."""
        Queue(
            stop_queue_name(run_id),
            exchange=Exchange("", type="direct"),
            routing_key=stop_queue_name(run_id),
            durable=False,
            auto_delete=False,
            queue_arguments={"x-expires": STOP_QUEUE_EXPIRES_MS},
        )(self.channel).declare()

    def inspect_workers(
        self, names: set[str], consumers: dict[str, int] | None = None, timeout: float = 1.0
    ) -> dict[str, list[tuple[str, int]]]:
        """``(node name, slots)`` of each worker consuming each queue.

        Two broadcasts (``active_queues``, then ``stats`` of the workers found). The first
        ends once as many workers serve each queue as it has ``consumers`` (every other worker
        of the lab answers too, and does not count), else after ``timeout`` without a reply;
        a worker it misses tells its slots when its first session starts.
        """
        result: dict[str, list[tuple[str, int]]] = {name: [] for name in names}
        root = embedded_root_of(self.app)
        if root is not None:  # the workers' presence files say it all, without a broadcast
            for worker in embedded.read_presence(root):
                for qname in worker.get("queues") or []:
                    if qname in result:
                        node = str(worker.get("node"))
                        result[qname].append((node, int(worker.get("concurrency") or 1)))
            return result
        try:
            queues_by_node = self._active_queues(names, consumers, timeout)
            ours = [node for node, queues in queues_by_node.items() if _served(queues) & names]
            stats: dict[str, Any] = {}
            if ours:
                stats = (
                    self.app.control.inspect(
                        destination=ours, timeout=timeout, limit=len(ours)
                    ).stats()
                    or {}
                )
        except Exception as exc:
            log.debug("inspect failed: %s", exc)
            return result
        for node, queues in sorted(queues_by_node.items()):
            pool = (stats.get(node) or {}).get("pool") or {}
            # The pool keeps a process beside the slots for plain tasks (workerpool); a worker
            # without it is undercounted by one until its first slot tells its own count.
            concurrency = max(1, int(pool.get("max-concurrency") or 1) - PLAIN_TASK_PROCESSES)
            for qname in sorted(_served(queues) & names):
                result[qname].append((node, concurrency))
        return result

    def _active_queues(
        self, names: set[str], consumers: dict[str, int] | None, timeout: float
    ) -> dict[str, Any]:
        """Node -> its queues, from one ``active_queues`` broadcast that stops waiting once
        the workers of ``consumers`` have all answered (a lab's other workers answer too:
        Celery's own ``limit`` would count them)."""
        replies: dict[str, Any] = {}

        def on_reply(body: Any) -> None:
            if isinstance(body, dict):
                replies.update(body)
            if consumers and all_answered(replies, names, consumers):
                raise _AllAnswered

        with contextlib.suppress(_AllAnswered):
            self.app.control.inspect(timeout=timeout, callback=on_reply).active_queues()
        return replies

    def served_queues(self, timeout: float = SERVED_QUEUES_TIMEOUT) -> set[str]:
        """Every queue some worker consumes now: the embedded workers' presence files, else one
        ``active_queues`` broadcast, which waits its whole ``timeout`` (0.5 s measured for 0.5).
        Only asked when a queue of the run has no consumer."""
        root = embedded_root_of(self.app)
        if root is not None:
            return {str(q) for w in embedded.read_presence(root) for q in w.get("queues") or []}
        try:
            replies = self.app.control.inspect(timeout=timeout).active_queues() or {}
        except Exception as exc:
            log.debug("inspect failed: %s", exc)
            return set()
        return {
            str(q["name"])
            for queues in replies.values()
            for q in queues or []
            if isinstance(q, dict) and q.get("name")
        }

    def declare_work_queue(self, name: str) -> None:
        """A run's work for one queue: chunks of nodeids that its sessions pull."""
        run_queue(name)(self.channel).declare()

    def publish_work(self, name: str, chunk: Chunk) -> None:
        producer = self.app.amqp.Producer(self.channel)
        self.conn.ensure(producer, producer.publish, max_retries=2, interval_start=0.2)(
            dumps(chunk),
            exchange="",
            routing_key=name,
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
        )

    def send_session(self, payload: SessionPayload, task_id: str) -> str:
        result = self.app.send_task(
            SLOT_TASK,
            args=[payload],
            queue=payload["queue"],
            routing_key=payload["queue"],
            task_id=task_id,
            ignore_result=True,
            serializer="json",
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        )
        return str(result.id)

    def delete_queue(self, name: str) -> None:
        try:
            self.channel.queue_delete(queue=name)
        except Exception as exc:
            log.debug("could not delete %s: %s", name, exc)
            self._reset_channel()

    def close(self) -> None:
        self._reset_channel()
        with contextlib.suppress(Exception):
            self.conn.release()

    def abandon(self) -> None:
        """Drop the connection without a word to the broker (it is silent: a polite close
        would wait for its answer)."""
        self._channel = None
        with contextlib.suppress(Exception):
            self.conn.collect()


class ReplyConsumer(threading.Thread):
    """Consumes the run's reply queue on its own connection; puts events on ``events``.

    Reconnects and re-subscribes after a connection loss, so reports published while the
    broker restarted are still delivered (the queue is durable, the messages persistent).
    Its consumer is how workers know the controller is alive (see :mod:`.liveness`); on the
    embedded broker a presence file stands for it.
    Its connection beats every ``CONTROLLER_HEARTBEAT`` seconds: a broker silent for two beats
    (a partition: no reset, no error, nothing) counts as lost, and ``connected`` is cleared;
    ``last_heard`` is when the broker last said anything (monotonic).
    """

    def __init__(self, app: Celery, queue_name: str, events: queue_mod.Queue[Event]) -> None:
        super().__init__(name="celery-dispatch-replies", daemon=True)
        self.app = app
        self.queue_name = queue_name
        self.events = events
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.connected = threading.Event()
        self.error: str | None = None
        self.last_heard = time.monotonic()
        self._heard_bytes: int | None = None

    def _on_message(self, message: Any) -> None:
        """One event, its body decoded here with the plain JSON decoder: kombu's own decode
        calls its object hook on every JSON object (each report's parts: a Python call each),
        and events carry none of the types it restores. A body that is not a JSON object is
        dropped."""
        try:
            if message.content_type in ("application/json", None, ""):
                event = loads(message.body)
                if isinstance(event, dict):
                    self.events.put(event)  # type: ignore[arg-type]
        except ValueError as exc:
            log.warning("reply consumer: dropped an event that is not JSON (%s)", exc)
        finally:
            message.ack()

    def _heard(self, conn: Connection) -> None:
        """Note when the broker last said anything (a frame of any kind, heartbeats too)."""
        received = getattr(conn.connection, "bytes_recv", None)
        if received is None or received != self._heard_bytes:
            self._heard_bytes = received
            self.last_heard = time.monotonic()

    def run(self) -> None:
        presence = None
        root = embedded_root_of(self.app)
        if root is not None:
            name = self.queue_name
            presence = embedded.Presence(root, name, [name], 0, folder=embedded.CONTROLLERS)
            presence.write()
            presence.start()
        try:
            self._consume()
        finally:
            if presence is not None:
                presence.stop()

    def _consume(self) -> None:
        delay = 0.2
        while not self.stop_event.is_set():
            # With heartbeats, RabbitMQ drops the consumer of a controller whose machine
            # vanished (that is how the workers see it gone), and a silent broker is noticed
            # here: heartbeat_check below raises after two missed beats.
            heartbeat = 0.0 if embedded_root_of(self.app) else CONTROLLER_HEARTBEAT
            conn = self.app.connection_for_read(heartbeat=heartbeat)
            failed = False
            try:
                conn.ensure_connection(max_retries=0)
                channel = conn.channel()
                channel.basic_qos(0, 200, False)
                with Consumer(
                    channel,
                    queues=[run_queue(self.queue_name)],
                    on_message=self._on_message,
                    accept=["json"],
                ):
                    self.ready.set()
                    self._heard_bytes = None
                    self._heard(conn)
                    self.connected.set()
                    delay = 0.2
                    while not self.stop_event.is_set():
                        try:
                            conn.drain_events(timeout=0.05)  # stop() waits at most this long
                        except TimeoutError:
                            conn.heartbeat_check()  # raises after two silent beats
                        self._heard(conn)
            except Exception as exc:  # connection lost: wait and re-subscribe
                failed = True
                self.connected.clear()
                if self.stop_event.is_set():
                    break  # e.g. the queue was deleted on purpose: never declare it again
                self.error = describe_error(exc)
                log.debug("reply consumer: %s; reconnecting", self.error)
                self.stop_event.wait(delay)
                delay = min(delay * 2, CONTROLLER_RECONNECT_MAX)
            finally:
                with contextlib.suppress(Exception):
                    # After a failure, no polite close: a silent broker would never answer it.
                    conn.collect() if failed else conn.release()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop consuming; with ``timeout=0`` do not wait for the thread to end.

        Once ``stop_event`` is set the thread never subscribes again, so the reply queue can
        be deleted right away without the consumer declaring it anew.
        """
        self.stop_event.set()
        if timeout:
            self.join(timeout)


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
