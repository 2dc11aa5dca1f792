"""The worker app: ``celery -A pytest_celery_dispatch.worker worker -Q queue_a -n worker-a@%h``.

Environment: ``CELERY_BROKER_URL`` / ``BROKER_URL`` (broker), ``WORKER_ID`` (shown in reports;
defaults to the node name), ``DISPATCH_WORKSPACE`` (root of the test code; defaults to the
current directory), ``DISPATCH_LOG_FORMAT`` (``json``, the default, or ``text``).

Tasks:

* ``run_session`` — one slot's share of a test run: a warm pytest process (see
  :mod:`.runner`) fed chunks of nodeids from the run's work queue by a :class:`.SlotDriver`,
  streaming each event to the controller's per-run reply queue;
* ``prewarm`` — a run's zygote, started from its last run's plan while the controller collects
  (see :mod:`.prewarm`);
* ``ping`` — answers with this worker's identity (health checks);
* ``task_a`` / ``task_b`` — the original demo's example tasks, routed to ``queue_a`` / ``queue_b``
  (they live in :mod:`.demo_tasks`).

This module never imports the controller side of the plugin.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from celery import Celery, Task, signals

from . import embedded
from .admission import checked_nodeids
from .artifactpaths import Limits
from .artifactship import ArtifactShipper
from .benchnotice import record_last_run, start_bench_notices
from .celeryconf import SILENT_LIMIT, backend_from_env, broker_from_env, celery_config
from .cutoffguard import run_guarded
from .demo_tasks import register_demo_tasks
from .driver import KILL, QUARANTINE, RUN, STOP, SlotDriver
from .health import session_health, worker_config
from .healthrules import QUARANTINED
from .launcher import RunnerLauncher
from .liveness import CONTROLLER_CHECK_INTERVAL, ControllerWatch
from .names import (
    ENV_ARTIFACTS,
    ENV_ARTIFACTS_TMP_PATH,
    ENV_BROKER_URL,
    ENV_FORK,
    ENV_LOG_FORMAT,
    ENV_WORKER_CONCURRENCY,
    ENV_WORKER_PID,
    ENV_WORKSPACE,
    PING_TASK,
    PREWARM_TASK,
)
from .outcome import outcome_of_reports
from .prewarm import prewarm_zygote
from .runnerspec import slot_spec
from .serialization import (
    PROTOCOL,
    SESSION_TASK,
    Event,
    RawTest,
    encode_event,
    stop_queue_name,
)
from .shipworker import BlobFetcher, Prepared, ShipState, prepare
from .slotgate import SLOT_BUSY_RETRY, SlotLease, gate_of, make_gate_folder, remove_gate_folder
from .spares import SPARE_DELAY, SparePool
from .workerinfo import context_env, queue_of, task_place, worker_id, workspace
from .workerpool import reserve_plain_task_process, slots_of, warm_connection
from .zygote import Zygotes

log = logging.getLogger("pytest_celery_dispatch.worker")

#: A passive declare's answer for a queue that does not exist.
MISSING = -1

if embedded.is_embedded(os.environ.get(ENV_BROKER_URL)):
    # Celery reads CELERY_BROKER_URL itself, as a URL: "embedded" alone would be a host name.
    os.environ[ENV_BROKER_URL] = f"{embedded.EMBEDDED}://"
app = Celery("pytest_celery_dispatch.worker")
app.conf.update(celery_config(broker_from_env(), backend_from_env()))


class WorkerProcess:
    """What one worker process keeps between its tasks: its spare runner, the zygotes it
    started, and (main process, embedded broker) its presence files.

    One per process, made once below (:data:`local`): Celery's signal handlers and tasks are
    module-level functions with no other place to find it. Each prefork pool process gets its
    own copy when it is forked from the main process, empty (spares start in the pool process).
    """

    def __init__(self) -> None:
        self.spares = SparePool()
        self.zygotes = Zygotes(self.spares)
        self.presence: list[embedded.Presence] = []
        self.ship = ShipState()
        self.notices: Any = None  # benchnotice.BenchNotices (main process)


local = WorkerProcess()


# ---------------------------------------------------------------------------- JSON logging


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    _skip = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._skip and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


@signals.worker_init.connect  # type: ignore[untyped-decorator]
def _note_concurrency(sender: Any = None, **kwargs: Any) -> None:
    """Pool processes inherit this: each session tells the controller its worker's slots.
    The pool gets one process more, for plain tasks (see workerpool); the slot locks keep
    its runs to its slots (see slotgate)."""
    try:
        worker_config()
    except ValueError as exc:  # a bad DISPATCH_HEALTH* value: the worker does not start
        print(f"celery-dispatch worker: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None  # Celery logs and swallows a signal handler's Exception
    reserve_plain_task_process(sender)
    # What names this worker on its machine (its zygotes, its prewarms): the same from a pool
    # process as from the worker's own process (solo and threads pools), see procutil.worker_pid.
    os.environ[ENV_WORKER_PID] = str(os.getpid())
    make_gate_folder(str(getattr(sender, "hostname", "") or "worker"))
    # A run's zygote (see zygote.Zygotes.fork) lives in the pool process that started it:
    # with pool processes replaced after N tasks or M bytes it would go, and the runners forked
    # from it for the other slots with it. Such workers start a runner per slot.
    if getattr(sender, "max_tasks_per_child", None) or getattr(
        sender, "max_memory_per_child", None
    ):
        os.environ.setdefault(ENV_FORK, "0")


@signals.worker_process_init.connect  # type: ignore[untyped-decorator]
def _start_spare_runner(**kwargs: Any) -> None:
    """Each pool process keeps a spare runner: the interpreter started and pytest imported
    before a run needs it (see spare_boot.py); ``DISPATCH_SPARE_RUNNER=0`` turns it off."""
    with contextlib.suppress(Exception):
        local.spares.prepare(workspace(), dict(os.environ))
    warm_connection(app)
    _ = local.ship.versions  # read once here, not on a run's way to its first test


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _announce_presence(sender: Any = None, **kwargs: Any) -> None:
    """On the embedded broker, a worker's presence file is what counts it as a consumer.
    On every broker, its notice on the lab board (see benchnotice)."""
    with contextlib.suppress(Exception):
        local.notices = start_bench_notices(sender)
    conf = sender.app.conf
    if not embedded.is_embedded(conf.broker_write_url):
        return
    queues = list(sender.app.amqp.queues.consume_from or sender.app.amqp.queues)
    presence = embedded.Presence(
        Path(conf.broker_transport_options["root"]),
        str(sender.hostname),
        queues,
        slots_of(getattr(sender, "controller", None)),
    )
    presence.write()
    presence.start()
    local.presence.append(presence)


@signals.worker_shutdown.connect  # type: ignore[untyped-decorator]
def _withdraw_presence(sender: Any = None, **kwargs: Any) -> None:
    if local.notices is not None:
        local.notices.stop()
        local.notices = None
    while local.presence:
        local.presence.pop().stop()


@signals.worker_shutdown.connect  # type: ignore[untyped-decorator]
def _remove_slot_locks(sender: Any = None, **kwargs: Any) -> None:
    remove_gate_folder()


@signals.after_setup_logger.connect  # type: ignore[untyped-decorator]
def _setup_logging(logger: logging.Logger, *args: Any, **kwargs: Any) -> None:
    if os.environ.get(ENV_LOG_FORMAT, "json").lower() != "json":
        return
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())


# ---------------------------------------------------------------------------- run_session


class _Reply:
    """This session's line to the controller: events out, work in, and the run's state.

    Cut off: when no broker call has been answered for ``SILENT_LIMIT`` seconds (each socket
    wait is bounded by the connection's read timeout), the slot can no longer be heard: the
    controller has counted it lost and sent its work elsewhere. ``control()`` then answers
    ``KILL`` (its runner stops), ``fetch()`` nothing, and ``emit()`` drops what it is given.
    A call that holds the slot's thread past that meets the :class:`.CutOffGuard` instead.
    """

    def __init__(self, task: Task, payload: dict[str, Any]) -> None:
        self.task = task
        self.reply_to = str(payload["reply_to"])
        self.work_queue = str(payload.get("work_queue") or "")
        place = task_place(task, payload)
        self.base: Event = {
            "protocol": PROTOCOL,
            "run_id": place["run_id"],
            "session_id": str(payload.get("session_id") or ""),
            "queue": place["queue"],
            "worker": place["worker"],
            "hostname": place["hostname"],
            "task_id": place["task_id"],
            "pid": os.getpid(),
        }
        self._conn = task.app.connection_for_write()
        self._producer: Any = None
        self._check_channel: Any = None
        self._work_channel: Any = None
        self.watch = ControllerWatch()
        self.identity = str((payload.get("identity") or {}).get("label") or "")
        self.clock = time.monotonic
        self.last_heard = self.clock()
        self.cut_off = False

    def _silent(self) -> bool:
        """True once the broker has said nothing for ``SILENT_LIMIT`` s (said once, in the
        log); the connection is then dropped without a word."""
        if not self.cut_off and self.clock() - self.last_heard > SILENT_LIMIT:
            self.give_up()
            with contextlib.suppress(Exception):
                self._conn.collect()
        return self.cut_off

    def silence(self) -> float | None:
        """Seconds since the broker last answered; None once cut off (calls return at once)."""
        return None if self.cut_off else self.clock() - self.last_heard

    def give_up(self) -> None:
        """Cut off for good (no broker call: the guard's thread calls it too)."""
        if not self.cut_off:
            self.cut_off = True
            log.warning(
                "no word from the broker for %.0f s: stopping this slot (it cannot be heard)",
                self.clock() - self.last_heard,
                extra={"task_id": self.base["task_id"], "session_id": self.base["session_id"]},
            )

    def emit(self, event: Event | dict[str, Any]) -> None:
        if self.cut_off:
            return  # nobody can hear it; the controller re-sends this slot's work
        body: dict[str, Any] = dict(self.base)
        body.update(event)
        body.setdefault("ts", time.time())
        if self._producer is None:
            self._producer = self.task.app.amqp.Producer(self._conn.default_channel)
        try:
            self._conn.ensure(
                self._producer,
                self._producer.publish,
                errback=self._stop_retrying_if_silent,
                max_retries=20,
                interval_start=0.2,
                interval_step=0.5,
                interval_max=2.0,
            )(
                encode_event(body),
                exchange="",
                routing_key=self.reply_to,
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
            )
        except Exception:
            if not self.cut_off:
                raise

    def _stop_retrying_if_silent(self, exc: Exception, interval: float) -> None:
        if self._silent():
            raise exc

    def fetch(self) -> dict[str, Any] | None:
        """The next chunk of work from the run's work queue, or None when there is none.

        Taken without a late ack: the controller owns completeness and re-sends lost work.
        A broker restart is waited out while heard within ``SILENT_LIMIT`` (one connection
        attempt per round: none waits long past it); a deleted work queue means the run is over.
        """
        for attempt in range(30):
            if self._silent():
                return None
            try:
                if self._work_channel is None:
                    # One attempt (one connect timeout): kombu's retries add up to ~30 s
                    # against a silent network, far past SILENT_LIMIT.
                    self._conn.ensure_connection(max_retries=0)
                    self._work_channel = self._conn.channel()
                message = self._work_channel.basic_get(queue=self.work_queue, no_ack=True)
                self.last_heard = self.clock()
                if message is None:
                    return None
                chunk = json.loads(message.body)
                return chunk if isinstance(chunk, dict) else None
            except Exception as exc:
                self._work_channel = None
                code = getattr(exc, "code", None) or getattr(exc, "reply_code", None)
                if code == 404 or "NOT_FOUND" in str(exc):
                    return None
                if self._silent():
                    return None
                log.warning("fetching work failed (%s); retrying", exc)
                time.sleep(min(2.0, 0.2 * (attempt + 1)))
                with contextlib.suppress(Exception):
                    self._conn.collect()
                    self._conn = self.task.app.connection_for_write()
                    self._producer = None
                    self._check_channel = None
        return None

    def _consumers(self, queue: str) -> int | None:
        """Passive declare: the queue's consumer count, ``MISSING`` (404), or None when the
        broker cannot tell us now."""
        try:
            if self._check_channel is None:
                self._check_channel = self._conn.channel()
            ok = self._check_channel.queue_declare(queue=queue, passive=True)
            self.last_heard = self.clock()
            return int(getattr(ok, "consumer_count", 0) or 0)
        except Exception as exc:
            self._check_channel = None
            code = getattr(exc, "code", None) or getattr(exc, "reply_code", None)
            if code == 404 or "NOT_FOUND" in str(exc):
                self.last_heard = self.clock()
                return MISSING
            return None

    def control(self) -> str:
        """What the controller wants: go on, stop after the running test, or drop the run.

        The controller deletes its reply queue when the run is over or interrupted (drop);
        before that, for -x / --maxfail, it declares the run's stop queue (stop gracefully).
        A controller that no longer consumes its reply queue is gone (see
        :class:`.ControllerWatch`): the run is dropped, and its reply and work queues are
        deleted so that every other slot of it, running or queued, drops it at once.
        """
        if self.cut_off or self.watch.gone:
            return KILL
        consumers = self._consumers(self.reply_to)
        if consumers is None and self._silent():
            return KILL  # no word from the broker for SILENT_LIMIT: this slot cannot be heard
        if consumers == MISSING:
            stop = self._consumers(stop_queue_name(self.base["run_id"]))
            return STOP if stop is not None and stop != MISSING else KILL
        if self.watch.observe(consumers):
            self._drop_run()
            return KILL
        return RUN  # the controller is there, or the broker cannot tell now: keep working

    def start_state(self) -> str:
        """:meth:`control` as a slot starts, with a controller found absent waited out (up to
        the grace): a slot of a dead run queued behind another run starts no test."""
        state = self.control()
        while state == RUN and self.watch.absent:
            time.sleep(CONTROLLER_CHECK_INTERVAL)
            state = self.control()
        return state

    def _drop_run(self) -> None:
        log.warning(
            "the controller of run %s is gone (no consumer on its reply queue for %.1fs): "
            "dropping the run",
            self.base["run_id"],
            self.watch.absent_for(),
            extra={"run_id": self.base["run_id"], "identity": self.identity},
        )
        for queue in (self.reply_to, self.work_queue):
            if not queue:
                continue
            try:
                if self._check_channel is None:
                    self._check_channel = self._conn.channel()
                self._check_channel.queue_delete(queue=queue)
            except Exception as exc:
                self._check_channel = None
                log.info("could not delete %s: %s", queue, exc)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.release()


# max_retries=None: a session waiting for a free slot is sent back to its queue for as long as
# the worker's slots are busy (``self.retry(max_retries=None)`` would mean the default, 3).
@app.task(name=SESSION_TASK, bind=True, acks_late=False, ignore_result=True, max_retries=None)  # type: ignore[untyped-decorator]
def run_session(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """One slot's share of a test run: a warm runner fed from the run's work queue.

    Acknowledged when it starts (not late): a test may run for hours, longer than RabbitMQ's
    ``consumer_timeout`` lets a delivery stay unacknowledged. The controller owns completeness
    instead: it re-sends the work of a session whose heartbeats stop.
    """
    reply = _Reply(self, payload)
    base = reply.base
    # pid: the pool process, as in the spare runner's lines (each pool process has its own).
    keys = ("task_id", "worker", "queue", "session_id", "pid")
    extra: dict[str, Any] = {k: base.get(k) for k in keys}
    extra["identity"] = reply.identity
    hold = contextlib.ExitStack()  # the run's tree, held while the slot uses it
    lease: SlotLease | None = None
    try:
        if reply.start_state() != RUN:
            log.info("session skipped: the run is over", extra=extra)
            return {"skipped": "run is over"}
        gate = gate_of(int(os.environ.get(ENV_WORKER_CONCURRENCY) or 1))
        lease = gate.acquire() if gate is not None else None
        if gate is not None and lease is None:
            # Every slot of this worker is running a session: back to the queue, for a worker
            # with a free slot (or this one, later).
            log.info("every slot busy: session sent back to its queue", extra=extra)
            raise self.retry(countdown=SLOT_BUSY_RETRY)
        shipped = hold.enter_context(_prepare_tree(self, payload, reply, extra))
        if shipped.refused:
            return {"refused": shipped.refused}
        ws = shipped.workspace
        health = session_health(payload, ws, {**os.environ, ENV_WORKSPACE: ws})
        if health is not None and (reason := health.before_work()) is not None:
            # Quarantined: back to the queue, for a healthy worker; the controller learns why.
            reply.emit({"type": QUARANTINED, "reason": reason})
            log.warning("quarantined: session sent back to its queue", extra=extra)
            raise self.retry(countdown=SLOT_BUSY_RETRY)
        nodeids = checked_nodeids(reply.emit, payload, ws, extra)
        started = time.monotonic()
        reply.emit(
            {
                "type": "session_started",
                "nodeids_total": len(nodeids),
                "concurrency": int(os.environ.get(ENV_WORKER_CONCURRENCY) or 0),
            }
        )
        log.info("session started", extra={**extra, "tests": len(nodeids)})
        limits = Limits.from_dict(payload.get("artifacts"))
        artifacts = tempfile.mkdtemp(prefix="celery-dispatch-artifacts-")  # this attempt's
        env = dict(os.environ)
        env.update(
            {
                ENV_ARTIFACTS: artifacts,
                ENV_ARTIFACTS_TMP_PATH: limits.tmp_path,
                **context_env(base, ws),
            }
        )
        spec = slot_spec({**payload, "queue": base["queue"]}, ws, nodeids, env)
        emit_logged = _ChunkLog(ArtifactShipper(reply.emit, limits, artifacts), extra)

        launcher = RunnerLauncher(spec, local.spares, local.zygotes)
        driver = SlotDriver(spec, emit_logged, reply.fetch, launcher, control=reply.control)
        if health is not None:
            driver.on_failure = lambda kind, why: health.after_failure(kind, why) is not None
            driver.control = health.control(reply.control)
        try:
            summary = run_guarded(driver, reply.silence, reply.give_up)
        finally:
            shutil.rmtree(artifacts, ignore_errors=True)
            local.spares.prepare(ws, env, SPARE_DELAY)  # the next run's first runner
        if health is not None:
            health.ended(reply.cut_off, bool(summary["chunks"]))
            if reason := health.reason(summary["state"] == QUARANTINE):
                reply.emit({"type": QUARANTINED, "reason": reason})
        summary["duration"] = round(time.monotonic() - started, 3)
        last = emit_logged.last_run(summary, base, reply.identity)
        record_last_run(str(self.request.hostname), last)
        if summary["state"] == RUN:
            reply.emit({"type": "session_finished", "summary": summary})
        log.info("session finished", extra={**extra, "summary": summary})
        return dict(summary)
    finally:
        hold.close()
        if lease is not None:
            lease.release()
        reply.close()


@contextlib.contextmanager
def _prepare_tree(
    task: Task, payload: dict[str, Any], reply: _Reply, extra: dict[str, Any]
) -> Iterator[Prepared]:
    """The run's tree on this worker (see :mod:`.shipworker`), held while the slot runs; its
    state goes home in a ``shipped`` event, a refusal as ``refused`` for every test."""
    fetcher = BlobFetcher(task.app, reply.emit, reply.base)
    found = prepare(
        payload, workspace(), local.ship, fetcher, reply.base["worker"], task.app.conf.broker_url
    )
    if "ship" in payload:  # a controller that knows the event (and --celery-ship)
        reply.emit({"type": "shipped", "ship": found.info})
    if found.refused:
        nodeids = payload.get("nodeids", [])
        reply.emit({"type": "refused", "nodeids": nodeids, "reason": found.refused})
        log.warning("refused: %s", found.refused, extra=extra)
    with found.hold:
        yield found


class _ChunkLog:
    """Forwards events and writes one log line per chunk taken, finished or crashed test,
    with task id, nodeids, worker, queue, attempt, duration and outcomes."""

    def __init__(self, emit: Any, extra: dict[str, Any]) -> None:
        self.emit = emit
        self.extra = extra
        self.chunks: dict[str, dict[str, Any]] = {}
        self.outcomes: dict[str, str] = {}
        self.totals: dict[str, int] = {}  # the session's outcomes, for the worker's notice

    def __call__(self, event: dict[str, Any]) -> None:
        self.emit(event)
        kind = event.get("type")
        batch_id = str(event.get("batch_id", ""))
        if kind == "started":
            self.chunks[batch_id] = {
                "nodeids": event.get("nodeids", []),
                "attempt": event.get("attempt"),
                "began": time.monotonic(),
            }
            log.info(
                "chunk received",
                extra={
                    **self.extra,
                    "batch_id": batch_id,
                    "nodeids": event.get("nodeids", []),
                    "attempt": event.get("attempt"),
                },
            )
        elif kind == "results":
            for test in event.get("tests", []):
                if isinstance(test, RawTest):
                    self.outcomes[test.nodeid] = test.outcome
                    continue
                reports = [r or {} for r in test.get("reports", [])]
                self.outcomes[str(test.get("nodeid", ""))] = outcome_of_reports(reports)
        elif kind == "crashed":
            self.outcomes[str(event.get("nodeid", ""))] = "crashed"
            log.warning(
                "test crashed",
                extra={
                    **self.extra,
                    "batch_id": batch_id,
                    "nodeid": event.get("nodeid"),
                    "reason": event.get("reason"),
                },
            )
        elif kind == "finished":
            chunk = self.chunks.pop(batch_id, {})
            nodeids = chunk.get("nodeids", [])
            counts: dict[str, int] = {}
            for nodeid in nodeids:
                outcome = self.outcomes.pop(nodeid, "not run")
                counts[outcome] = counts.get(outcome, 0) + 1
                self.totals[outcome] = self.totals.get(outcome, 0) + 1
            log.info(
                "chunk finished",
                extra={
                    **self.extra,
                    "batch_id": batch_id,
                    "nodeids": nodeids,
                    "attempt": chunk.get("attempt"),
                    "duration": round(time.monotonic() - chunk.get("began", time.monotonic()), 3),
                    "outcomes": counts,
                },
            )

    def last_run(self, summary: dict[str, Any], base: Event, identity: str) -> dict[str, Any]:
        """This slot's run as the worker's notice shows it afterwards."""
        return {
            "run_id": base["run_id"],
            "identity": identity,
            "queue": base["queue"],
            "state": summary.get("state"),
            "outcomes": dict(self.totals),
            "finished": time.time(),
        }


@app.task(name=PREWARM_TASK, bind=True, ignore_result=True)  # type: ignore[untyped-decorator]
def prewarm(self: Task, payload: dict[str, Any]) -> str:
    """The run's zygote, started while its controller collects (see :mod:`.prewarm`)."""
    return prewarm_zygote(self, payload, local.zygotes, local.spares)


# ---------------------------------------------------------------------------- health + demo


@app.task(name=PING_TASK, bind=True)  # type: ignore[untyped-decorator]
def ping(self: Task) -> dict[str, Any]:
    return {
        "worker": worker_id(self),
        "hostname": self.request.hostname,
        "queue": queue_of(self),
        "workspace": workspace(),
        "pid": os.getpid(),
    }


#: The original demo's example tasks (see :mod:`.demo_tasks`), on this app under their names.
task_a, task_b = register_demo_tasks(app)
