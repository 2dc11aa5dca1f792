"""The controller: health checks, sending batches, and the main-thread event loop.

Only the main thread calls pytest hooks. The reply consumer thread puts events on a queue;
:meth:`DispatchSession.loop_once` drains it, buffers each test's phase reports per execution
stream, and replays a test into ``pytest_runtest_logstart`` / ``logreport`` / ``logfinish``
only when that stream has finished it, and only the first time: a test run twice (broker
redelivery, re-dispatch) is reported once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import itertools
import os
import queue as queue_mod
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import pytest

from . import routing, scheduling
from .outcome import outcome_of_reports
from .serialization import (
    PROTOCOL,
    Chunk,
    DispatchError,
    Event,
    SessionPayload,
    dumps,
    file_digest,
    nodeid_path,
    reply_queue_name,
    work_queue_name,
)
from .settings import EMBEDDED, Settings

#: How often queues are polled for consumers while waiting, and batches checked for deadlines.
POLL_INTERVAL = 0.5
#: With nothing reported for this long, a status line says what each queue is doing.
STATUS_EVERY = 5.0


@dataclasses.dataclass
class TestRecord:
    """Where and when one dispatched test ran; the ``dispatch`` section of the JSON report."""

    __test__ = False  # not a test class, whatever pytest's collection rules say

    nodeid: str
    queue: str | None
    worker: str | None = None
    hostname: str | None = None
    task_id: str | None = None
    attempts: int = 0
    sent: float | None = None
    started: float | None = None
    finished: float | None = None
    duration: float = 0.0
    outcome: str | None = None
    infrastructure_error: str | None = None
    session: str | None = None  # the worker slot (run_session) that produced the result

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "worker": self.worker,
            "hostname": self.hostname,
            "task_id": self.task_id,
            "attempts": self.attempts,
            "sent": self.sent,
            "started": self.started,
            "finished": self.finished,
            "infrastructure_error": self.infrastructure_error,
            "session": self.session,
        }


def make_error_longrepr(message: str) -> Any:
    """A longrepr whose crash line is ``message`` (shown in -r summaries), no traceback."""
    try:
        raise DispatchError(message)
    except DispatchError as exc:
        return pytest.ExceptionInfo.from_exception(exc).getrepr(style="value")


def restore_tuples(report: Any) -> None:
    """JSON turns tuples into lists; pytest expects tuples for skip longreprs and locations."""
    if isinstance(report.longrepr, list):
        report.longrepr = tuple(report.longrepr)
    if isinstance(report.location, list):
        report.location = tuple(report.location)


#: Options of other plugins that shape a test's run, applied on the worker when that plugin is
#: installed there too (a plain argument would make its pytest refuse to start otherwise):
#: pytest-timeout's --timeout, pytest-randomly's seed (so a worker's random values repeat), and
#: pytest-rerunfailures' --reruns / --reruns-delay (reruns happen on the worker).
PLUGIN_OPTIONS = ("timeout", "randomly_seed", "reruns", "reruns_delay")


def forwarded_plugin_options(config: pytest.Config) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in PLUGIN_OPTIONS:
        value = getattr(config.option, name, None)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and value != "":
            found[name] = value
    return found


def forwarded_pytest_args(config: pytest.Config) -> list[str]:
    """Options that shape how a test runs or reports, replayed on the worker's runner."""
    opt = config.option
    args: list[str] = []
    tbstyle = getattr(opt, "tbstyle", "auto")
    if tbstyle and tbstyle != "auto":
        args.append(f"--tb={tbstyle}")
    if getattr(opt, "showlocals", False):
        args.append("--showlocals")
    for item in getattr(opt, "override_ini", None) or []:
        args.extend(["-o", item])
    for warning in getattr(opt, "pythonwarnings", None) or []:
        args.extend(["-W", warning])
    importmode = getattr(opt, "importmode", None)
    if importmode and importmode != "prepend":
        args.append(f"--import-mode={importmode}")
    verbose = int(getattr(opt, "verbose", 0) or 0)
    if verbose > 1:
        args.append("-" + "v" * verbose)
    maxfail = int(getattr(opt, "maxfail", 0) or 0)
    if maxfail > 0:
        # A runner stops after its own failures too, without waiting for the controller's word.
        args.append(f"--maxfail={maxfail}")
    return args


class DispatchSession:
    """Registered as a plugin only with ``--celery-dispatch``; owns the run's dispatching."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.run_id = uuid.uuid4().hex[:16]
        self.reply_to = reply_queue_name(self.run_id)
        self.routes: dict[str, routing.Route] = {}
        self.items: dict[str, pytest.Item] = {}
        self.records: dict[str, TestRecord] = {}
        self.batches: dict[str, scheduling.Batch] = {}
        self.abandoned: set[str] = set()
        self.unsent: list[scheduling.Batch] = []
        self.buffers: dict[tuple[str, str], list[Any]] = {}
        self.finalized: set[str] = set()
        self.events: queue_mod.Queue[Event] = queue_mod.Queue()
        self.waiting_queues: dict[str, float] = {}  # queue -> deadline (monotonic)
        self.consumers: dict[str, int] = {}
        self.workers_by_queue: dict[str, list[str]] = {}
        self.broker_error: str | None = None
        self.started_at = time.time()
        self.finished_at: float | None = None
        self.interrupted = False
        self._broker: Any = None
        self._app: Any = None
        self._consumer: Any = None
        self._last_poll = 0.0
        self._no_consumer_since: dict[str, float] = {}
        self.queue_nodeids: dict[str, list[str]] = {}
        self.sessions: dict[str, scheduling.SessionState] = {}
        self.slots: dict[str, int] = {}
        self._session_numbers = itertools.count(1)
        self._session_not_before: dict[str, float] = {}
        self._stream_output = config.getoption("capture", "fd") == "no"
        self._local_workers: Any = None
        self._records_finalized = 0
        self._worker_slots: dict[str, dict[str, int]] = {}
        self._batches_of: dict[str, list[str]] = {}
        self._partial_output: dict[str, str] = {}
        self._last_activity = self._last_status = time.monotonic()
        self.queue_last_seen: dict[str, float] = {}
        self._session: pytest.Session | None = None
        self._event_log: Any = None
        self._digests: dict[str, str] = {}
        self._pytest_args = forwarded_pytest_args(config)
        self._outage_since: float | None = None
        self.running: set[str] = set()
        self.replays: dict[str, int] = {}
        self.stopped_early: dict[str, int] | None = None

    # ------------------------------------------------------------------ collection

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Route after every other plugin, so markers added in this hook count too."""
        self.routes.clear()
        for item in items:
            self.routes[item.nodeid] = self._route(item)

    def _route(self, item: pytest.Item) -> routing.Route:
        marker = item.get_closest_marker("queue")
        callspec = getattr(item, "callspec", None)
        fanout = callspec.params.get(routing.FANOUT_PARAM) if callspec is not None else None
        hook = None
        if marker is None:
            hook = item.config.hook.pytest_celery_dispatch_route(item=item)
        return routing.route(
            (marker.args, marker.kwargs) if marker is not None else None,
            self.settings.default_queue,
            self.settings.allowed_queues,
            nodeid=item.nodeid,
            fanout=fanout,
            hook=hook,
            rules=self.settings.routes,
        )

    def route_of(self, item: pytest.Item) -> routing.Route:
        found = self.routes.get(item.nodeid)
        if found is None:
            found = self.routes[item.nodeid] = self._route(item)
        return found

    def _write_plan(self, items: list[pytest.Item]) -> None:
        """--collect-only: where each test would run; nothing is sent."""
        plan: dict[str, list[str]] = {}
        errors: list[str] = []
        for item in items:
            route = self.route_of(item)
            if route.error is not None:
                errors.append(f"    {item.nodeid}: {route.error}")
            else:
                plan.setdefault(route.queue or "local (controller)", []).append(
                    f"    {item.nodeid}  [{route.source}]"
                )
        self._write_line("celery-dispatch plan (--collect-only: nothing is sent)", bold=True)
        for queue_name in sorted(plan, key=lambda q: (q.startswith("local"), q)):
            lines = plan[queue_name]
            self._write_line(f"  {queue_name}: {len(lines)} test{'s' if len(lines) != 1 else ''}")
            for line in lines:
                self._write_line(line)
        if errors:
            self._write_line(f"  invalid routing: {len(errors)} test(s)", red=True)
            for line in errors:
                self._write_line(line, red=True)

    # ------------------------------------------------------------------ reporting helpers

    def tag(self, nodeid: str) -> str | None:
        record = self.records.get(nodeid)
        if record is None or record.queue is None:
            return None
        return f"{record.worker or '?'}/{record.queue}"

    @pytest.hookimpl(wrapper=True)
    def pytest_report_teststatus(
        self, report: pytest.TestReport | pytest.CollectReport, config: pytest.Config
    ) -> Any:
        result = yield
        if (
            result
            and config.get_verbosity() > 0
            and isinstance(report, pytest.TestReport)
            and report.nodeid in self.finalized
        ):
            tag = self.tag(report.nodeid)
            category, letter, word = result
            if tag and word:
                if isinstance(word, tuple):
                    word = (f"{word[0]} [{tag}]", word[1])
                else:
                    word = f"{word} [{tag}]"
                return category, letter, word
        return result

    def _replay(self, item_nodeid: str, reports: list[Any]) -> None:
        """Feed one test's reports to pytest exactly as a local run would."""
        hook = self.config.hook
        record = self.records.get(item_nodeid)
        item = self.items.get(item_nodeid)
        location = reports[0].location if reports else (item.location if item else None)
        self.replays[item_nodeid] = self.replays.get(item_nodeid, 0) + 1
        self._last_activity = time.monotonic()
        if item_nodeid in self.finalized:
            return  # never report a test twice (counted above for the invariant check)
        self.finalized.add(item_nodeid)
        if item_nodeid in self.records:
            self._records_finalized += 1
        hook.pytest_runtest_logstart(nodeid=item_nodeid, location=location)
        duration = 0.0
        for index, report in enumerate(reports):
            duration += float(getattr(report, "duration", 0.0) or 0.0)
            if record is not None and record.queue is not None and index == len(reports) - 1:
                report.user_properties = [
                    *list(report.user_properties or []),
                    ("dispatch.worker", record.worker or ""),
                    ("dispatch.queue", record.queue),
                    ("dispatch.task_id", record.task_id or ""),
                    ("dispatch.host", record.hostname or ""),
                    ("dispatch.attempts", record.attempts),
                ]
            hook.pytest_runtest_logreport(report=report)
        hook.pytest_runtest_logfinish(nodeid=item_nodeid, location=location)
        if record is not None:
            record.duration = duration
            if record.finished is None:
                record.finished = time.time()
            self.log_event(
                "finished",
                item_nodeid,
                queue=record.queue,
                worker=record.worker,
                task_id=record.task_id,
                attempt=record.attempts,
                duration=duration,
                outcome=outcome_of_reports(reports),
                infrastructure_error=record.infrastructure_error,
            )

    def fail_test(self, nodeid: str, message: str, when: str = "call") -> None:
        """End a test with a synthetic failure (infrastructure or routing), once."""
        if nodeid in self.finalized:
            return
        item = self.items[nodeid]
        now = time.time()
        keywords = {name: 1 for name in item.keywords}
        first = pytest.TestReport(
            nodeid=nodeid,
            location=item.location,
            keywords=keywords,  # type: ignore[arg-type]
            outcome="failed",
            longrepr=make_error_longrepr(message),
            when=when,  # type: ignore[arg-type]
            start=now,
            stop=now,
        )
        teardown = pytest.TestReport(
            nodeid=nodeid,
            location=item.location,
            keywords=keywords,  # type: ignore[arg-type]
            outcome="passed",
            longrepr=None,
            when="teardown",
            start=now,
            stop=now,
        )
        record = self.records.get(nodeid)
        if record is not None:
            record.infrastructure_error = message
        self._replay(nodeid, [first, teardown])

    # ------------------------------------------------------------------ the run

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        if session.testsfailed and not session.config.option.continue_on_collection_errors:
            raise session.Interrupted(
                f"{session.testsfailed} error{'s' if session.testsfailed != 1 else ''} "
                "during collection"
            )
        if session.config.option.collectonly:
            self._write_plan(session.items)
            return True

        self._session = session
        self.started_at = time.time()
        local: list[pytest.Item] = []
        remote: dict[str, list[str]] = {}
        invalid: list[tuple[str, str]] = []
        for item in session.items:
            self.items[item.nodeid] = item
            route = self.route_of(item)
            if route.error is not None:
                invalid.append((item.nodeid, route.error))
            elif route.queue is None:
                local.append(item)
            else:
                remote.setdefault(route.queue, []).append(item.nodeid)
                self.records[item.nodeid] = TestRecord(nodeid=item.nodeid, queue=route.queue)

        try:
            for nodeid, error in invalid:
                self.fail_test(nodeid, f"invalid queue marker on {nodeid}: {error}", "setup")
            self._check_stop(session)
            if remote:
                self._start_remote(remote)
            self._run_local(session, local)
            self._run_remote(session)
        except KeyboardInterrupt:
            self.interrupted = True
            raise
        finally:
            self.finished_at = time.time()
            self._shutdown()
        return True

    def _check_stop(self, session: pytest.Session) -> None:
        if session.shouldfail or session.shouldstop:
            self._stop_workers_gracefully()
        if session.shouldfail:
            raise session.Failed(session.shouldfail)
        if session.shouldstop:
            raise session.Interrupted(session.shouldstop)

    def _write_line(self, line: str, **markup: bool) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(line, **markup)

    @functools.cached_property
    def embedded_root(self) -> Path | None:
        """The embedded broker's folder (``--celery-broker embedded``), else None."""
        if self.settings.broker != EMBEDDED:
            return None
        from .embedded import root_dir

        return root_dir(self.config.rootpath)

    def _start_remote(self, remote: Mapping[str, list[str]]) -> None:
        from . import transport

        # The dispatch engine needs no result backend (reports come on the reply queue); with
        # rpc:// every controller would leave a reply queue of its own on the broker for an hour.
        self._app = transport.make_app(
            self.settings.broker, "disabled", embedded_root=self.embedded_root
        )
        if self.embedded_root is not None:
            from .embedded import sweep

            sweep(self.embedded_root)
        try:
            conn = transport.connect(self._app)
        except transport.BrokerUnavailable as exc:
            self.broker_error = f"celery-dispatch: {exc}"
            self._write_line(self.broker_error, red=True, bold=True)
            for nodeids in remote.values():
                for nodeid in nodeids:
                    self.fail_test(nodeid, self.broker_error)
            return
        self._broker = transport.Broker(self._app, conn)
        self._broker.declare_reply_queue(self.reply_to)
        self._consumer = transport.ReplyConsumer(self._app, self.reply_to, self.events)
        self._consumer.start()
        self._consumer.ready.wait(5.0)

        for queue_name, nodeids in remote.items():
            self.queue_nodeids[queue_name] = list(nodeids)
            self._broker.declare_task_queue(queue_name)
        self._start_local_workers(remote)
        now = time.monotonic()
        for queue_name in remote:
            self.consumers[queue_name] = self._broker.consumer_count(queue_name) or 0
        present = {q for q, c in self.consumers.items() if c > 0}
        if present:
            # One consumer per worker and queue: a worker serving two of these queues answers
            # once, so the wait may run to its (short) timeout; otherwise it ends early.
            found = self._broker.inspect_workers(
                present,
                expected=sum(self.consumers[q] for q in present),
                timeout=min(1.0, max(0.2, self.settings.wait_workers)),
            )
            self.workers_by_queue = {q: [name for name, _ in found[q]] for q in found}
            self.slots = {q: sum(c for _, c in found[q]) or self.consumers[q] for q in found}
        later: list[scheduling.Batch] = []
        for queue_name in remote:
            if self.consumers[queue_name] > 0:
                later.extend(self._start_queue(queue_name))
            else:
                self.waiting_queues[queue_name] = now + self.settings.wait_workers
        for batch in later:
            self._publish(batch)
        self._write_header()
        from .jsonreport import prefetch_environment

        prefetch_environment()  # while the first results are on their way
        # Everything imported and collected so far lives to the end of the run: out of the
        # collector's way, so that neither the collections while reports are replayed nor
        # pytest's gc.collect() at unconfigure walk Celery's and the items' object graphs again.
        gc.freeze()

    def _start_local_workers(self, remote: Mapping[str, list[str]]) -> None:
        """--celery-local-workers: one worker per queue, started and awaited now."""
        settings = self.settings
        if not settings.local_workers and not settings.local_workers_auto:
            return
        from .localworkers import LocalWorkers

        queues = list(remote) if settings.local_workers_auto else list(settings.local_workers)
        env = dict(os.environ)
        if self.embedded_root is not None:
            env["DISPATCH_EMBEDDED_DIR"] = str(self.embedded_root)
        self._local_workers = LocalWorkers(settings.broker, str(self.config.rootpath), env)
        try:
            self._local_workers.start(queues, self._broker.consumer_count)
        except RuntimeError as exc:
            self._write_line(f"celery-dispatch: {exc}", red=True, bold=True)
            return
        names = ", ".join(f"{w.worker_id} ({w.queue})" for w in self._local_workers.workers)
        self._write_line(
            f"celery-dispatch: started local workers {names}; logs in "
            f"{self._local_workers.log_dir}",
            cyan=True,
        )

    def _write_header(self) -> None:
        parts = []
        for queue_name in sorted(self.consumers):
            count = self.consumers[queue_name]
            names = self.workers_by_queue.get(queue_name) or []
            shown = f" ({', '.join(names)})" if names else ""
            n_tests = len(self.queue_nodeids.get(queue_name, []))
            tests = f"{n_tests} test{'s' if n_tests != 1 else ''}"
            if count:
                slots = self.slots.get(queue_name, count)
                parts.append(
                    f"{queue_name}: {count} worker{'s' if count != 1 else ''}{shown}, "
                    f"{slots} slot{'s' if slots != 1 else ''}, {tests}"
                )
            else:
                parts.append(
                    f"{queue_name}: no worker yet, waiting up to "
                    f"{self.settings.wait_workers:g}s for {tests}"
                )
        self._write_line("celery-dispatch workers: " + "; ".join(parts), cyan=True)

    def _start_queue(self, queue_name: str) -> list[scheduling.Batch]:
        """Cut the queue's work into chunks, publish the first, start one session per worker
        slot, and return the other chunks for the caller to publish: the workers start their
        runners while the rest is sent. A session that finds the work queue empty just ends;
        ``_ensure_session`` starts another."""
        nodeids = self.queue_nodeids[queue_name]
        slots = max(1, self.slots.get(queue_name) or self.consumers.get(queue_name) or 1)
        self._broker.declare_work_queue(work_queue_name(self.run_id, queue_name))
        batches = [
            scheduling.Batch(scheduling.new_batch_id(self.run_id), queue_name, ids)
            for ids in scheduling.plan_chunks(nodeids, slots)
        ]
        if batches:
            self._publish(batches[0])
        for _ in range(min(slots, len(batches))):
            self._send_session(queue_name)
        return batches[1:]

    def _file_digests(self, nodeids: list[str]) -> dict[str, str]:
        """sha256 of each test file of these nodeids, computed once per run and file."""
        digests: dict[str, str] = {}
        for nodeid in nodeids:
            path = nodeid_path(nodeid)
            if path not in self._digests:
                try:
                    self._digests[path] = file_digest(str(self.config.rootpath / path))
                except OSError:
                    self._digests[path] = ""
            if self._digests[path]:
                digests[path] = self._digests[path]
        return digests

    def _publish(self, batch: scheduling.Batch) -> None:
        """Put a chunk on the queue's work queue (or retry shortly if the broker is away)."""
        if batch.batch_id not in self.batches:
            self._add_batch(batch)
        chunk: Chunk = {
            "batch_id": batch.batch_id,
            "attempt": batch.attempt,
            "nodeids": list(batch.nodeids),
        }
        try:
            self._broker.publish_work(work_queue_name(self.run_id, batch.queue), chunk)
        except Exception as exc:
            self._send_failed(batch, exc)
            return
        batch.send_failed_since = None
        batch.sent_at = time.monotonic()
        now = time.time()
        for nodeid in batch.nodeids:
            record = self.records[nodeid]
            record.attempts = batch.attempt
            record.sent = now
            self.log_event("sent", nodeid, queue=batch.queue, attempt=batch.attempt)

    def _send_failed(self, batch: scheduling.Batch, exc: Exception) -> None:
        from .transport import describe_error

        # The broker may be restarting: try again shortly, within a deadline.
        mono = time.monotonic()
        if batch.send_failed_since is None:
            batch.send_failed_since = mono
        limit = self.settings.wait_workers + scheduling.SILENCE_LIMIT
        if mono - batch.send_failed_since < limit:
            batch.not_before = mono + 1.0
            if batch not in self.unsent:
                self.unsent.append(batch)
            return
        for nodeid in batch.remaining:
            self.fail_test(
                nodeid,
                f"could not send {nodeid} to queue {batch.queue!r} on "
                f"{self.settings.broker_masked} for {limit:g}s: {describe_error(exc)}",
            )
            self._mark_done(nodeid)

    def _send_session(self, queue_name: str) -> None:
        """One more ``run_session`` task on a Celery queue: a slot that pulls this run's work."""
        session_id = f"{self.run_id}.s{next(self._session_numbers)}"
        payload: SessionPayload = {
            "protocol": PROTOCOL,
            "run_id": self.run_id,
            "reply_to": self.reply_to,
            "work_queue": work_queue_name(self.run_id, queue_name),
            "session_id": session_id,
            "queue": queue_name,
            "nodeids": list(self.queue_nodeids[queue_name]),
            "timeout": self.settings.timeout,
            "pytest_args": self._pytest_args,
            "files": self._file_digests(self.queue_nodeids[queue_name]),
            "stream": self._stream_output,
            "plugin_options": forwarded_plugin_options(self.config),
        }
        state = scheduling.SessionState(session_id, queue_name, sent_at=time.monotonic())
        self.sessions[session_id] = state
        try:
            state.task_id = self._broker.send_session(
                payload, f"{session_id}-{uuid.uuid4().hex[:8]}"
            )
        except Exception:
            state.lost = True  # _ensure_sessions sends another on the next poll

    def _run_local(self, session: pytest.Session, local: list[pytest.Item]) -> None:
        for index, item in enumerate(local):
            nextitem = local[index + 1] if index + 1 < len(local) else None
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
            self._check_stop(session)
            self.loop_once(block=False)
            self._check_stop(session)

    def _unfinished(self) -> list[str]:
        return [n for n in self.records if n not in self.finalized]

    def _run_remote(self, session: pytest.Session) -> None:
        while self._records_finalized < len(self.records):  # O(1): this loop runs per event
            self.loop_once(block=True)
            self._check_stop(session)

    # ------------------------------------------------------------------ the event loop

    def loop_once(self, block: bool = True) -> None:
        """Handle queued events (waiting up to 0.2 s for one), then check the clocks."""
        try:
            event = self.events.get(timeout=0.2) if block else self.events.get_nowait()
        except queue_mod.Empty:
            event = None
        while event is not None:
            self.handle_event(event)
            if self._should_stop():
                return  # -x / --maxfail: report nothing after the failure that tripped it
            try:
                event = self.events.get_nowait()
            except queue_mod.Empty:
                event = None
        now = time.monotonic()
        if now - self._last_poll >= POLL_INTERVAL:
            self._last_poll = now
            self._poll(now)
            self._write_status(now)

    def handle_event(self, event: Event) -> None:
        if event.get("run_id") != self.run_id:
            return
        kind = event.get("type")
        if kind == "results":
            self._handle_results(event)
            return
        now = time.monotonic()
        session = self.sessions.get(str(event.get("session_id", "")))
        if session is not None:
            session.last_seen = now
            session.worker = str(event.get("worker") or session.worker or "")
            self.queue_last_seen[session.queue] = now
            if kind == "session_started":
                session.started_at = now
                self._learn_slots(session, int(event.get("concurrency") or 0))
            elif kind == "session_finished":
                session.finished = True
        nodeid = str(event.get("nodeid", ""))
        if kind in ("missing", "refused"):
            self._not_runnable(event)
        elif kind == "output":
            self._write_output(event)
        elif kind == "warning":
            self._record_warning(event)
        elif kind == "session_finished" and str(event.get("session_id")) in self._partial_output:
            self._write_output({**event, "data": "\n"})  # a last line without its newline
        batch = self.batches.get(str(event.get("batch_id", "")))
        if batch is None:
            return
        batch.last_seen = now
        self.queue_last_seen[batch.queue] = now
        stream = str(event.get("session_id", ""))
        if kind == "alive" and nodeid and nodeid not in self.finalized:
            elapsed = float(event.get("elapsed") or 0.0)
            batch.current_since = now - elapsed
            self.running.add(nodeid)
            self._note_started(nodeid, event, batch, time.time() - elapsed)
        elif kind == "started":
            batch.started_at = batch.started_at or now
            batch.worker = str(event.get("worker"))
            batch.session_id = stream
            for n in batch.remaining:
                self._annotate(n, event, batch)
        elif kind == "logstart":
            batch.current_since = now
            self.running.add(nodeid)
            self._note_started(nodeid, event, batch, float(event.get("ts") or time.time()))
        elif kind == "report":
            if nodeid in self.finalized or nodeid not in self.records:
                return
            report = self.config.hook.pytest_report_from_serializable(
                config=self.config, data=event.get("report")
            )
            if report is not None:
                restore_tuples(report)
                self.buffers.setdefault((stream, nodeid), []).append(report)
        elif kind == "logfinish":
            batch.current_since = None
            self.running.discard(nodeid)
            reports = self.buffers.pop((stream, nodeid), [])
            if nodeid in self.records and nodeid not in self.finalized:
                self._annotate(nodeid, event, batch)
                record = self.records[nodeid]
                record.finished = float(event.get("ts") or time.time())
                self._replay(nodeid, reports)
            self._mark_done(nodeid)
        elif kind == "crashed":
            batch.current_since = None
            self.running.discard(nodeid)
            self.buffers.pop((stream, nodeid), None)
            if nodeid in self.records and nodeid not in self.finalized:
                self._annotate(nodeid, event, batch)
                message = str(event.get("message") or event.get("reason") or "crashed")
                self.fail_test(
                    nodeid,
                    f"{nodeid} crashed on {event.get('worker')} (queue {event.get('queue')}, "
                    f"attempt {batch.attempt}): {message}",
                )
            self._mark_done(nodeid)
        elif kind == "finished":
            for n in list(batch.remaining):
                if n not in self.finalized:
                    self.fail_test(
                        n,
                        f"{event.get('worker')} finished chunk {batch.batch_id} without a "
                        f"result for {n}",
                    )
                self._mark_done(n)

    def _record_warning(self, event: Event) -> None:
        """A worker's warning, fed to pytest_warning_recorded: the warnings summary shows it."""
        import builtins
        import warnings

        name = str(event.get("category") or "UserWarning")
        category = getattr(builtins, name, None) or getattr(pytest, name, None)
        if not (isinstance(category, type) and issubclass(category, Warning)):
            category = type(name, (UserWarning,), {"__module__": "worker"})
        message = warnings.WarningMessage(
            category(str(event.get("message", ""))),
            category,
            str(event.get("filename", "")),
            int(event.get("lineno") or 0),
        )
        self.config.hook.pytest_warning_recorded.call_historic(
            kwargs={
                "warning_message": message,
                "when": str(event.get("when") or "runtest"),
                "nodeid": str(event.get("nodeid", "")),
                "location": None,
            }
        )

    def _write_output(self, event: Event) -> None:
        """-s: what a dispatched test prints, shown as it arrives, each line tagged."""
        session = str(event.get("session_id", ""))
        text = self._partial_output.pop(session, "") + str(event.get("data", ""))
        *lines, rest = text.split("\n")
        if rest:
            self._partial_output[session] = rest
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None or not lines:
            return
        tag = f"[{event.get('worker')}] "
        reporter.ensure_newline()
        for line in lines:
            reporter.write_line(tag + line, cyan=True)

    def _write_status(self, now: float) -> None:
        """While slow benches keep everyone waiting: queued / running / done per queue."""
        if now - self._last_activity < STATUS_EVERY or now - self._last_status < STATUS_EVERY:
            return
        self._last_status = now
        parts = []
        for queue_name in sorted(self.queue_nodeids):
            nodeids = self.queue_nodeids[queue_name]
            done = sum(1 for n in nodeids if n in self.finalized)
            running = sum(1 for n in nodeids if n in self.running and n not in self.finalized)
            parts.append(
                f"{queue_name} {len(nodeids) - done - running} queued, {running} running, "
                f"{done} done"
            )
        if parts:
            self._write_line("celery-dispatch waiting: " + "; ".join(parts), cyan=True)

    def _note_started(
        self, nodeid: str, event: Event, batch: scheduling.Batch, started: float
    ) -> None:
        record = self.records.get(nodeid)
        if record is None or nodeid in self.finalized:
            return
        self._annotate(nodeid, event, batch)
        first = record.started is None
        record.started = started
        if first:
            self.log_event(
                "started",
                nodeid,
                queue=record.queue,
                worker=record.worker,
                task_id=record.task_id,
                attempt=record.attempts,
            )

    def _learn_slots(self, session: scheduling.SessionState, concurrency: int) -> None:
        """A session says how many slots its worker has: start more sessions to fill them
        (the broadcast at the start may have missed a worker on a busy broker)."""
        if concurrency <= 0 or not session.worker:
            return
        known = self._worker_slots.setdefault(session.queue, {})
        known[session.worker] = concurrency
        unknown_workers = max(0, self.consumers.get(session.queue, 0) - len(known))
        wanted = sum(known.values()) + unknown_workers
        self.slots[session.queue] = max(self.slots.get(session.queue, 0), wanted)
        live = sum(1 for s in self.sessions.values() if s.live and s.queue == session.queue)
        waiting = sum(
            1 for b in self._live_batches() if b.queue == session.queue and b.started_at is None
        )
        for _ in range(min(wanted - live, waiting)):
            self._send_session(session.queue)

    def _handle_results(self, event: Event) -> None:
        """Finished tests sent together: each is one logstart, its reports, one logfinish."""
        base: dict[str, Any] = {k: v for k, v in event.items() if k not in ("type", "tests")}
        tests: list[dict[str, Any]] = list(event.get("tests") or [])
        for test in tests:
            common = {**base, "nodeid": test.get("nodeid", ""), "batch_id": test.get("batch_id")}
            start = {**common, "type": "logstart", "location": test.get("location")}
            self.handle_event(cast(Event, {**start, "ts": test.get("started")}))
            for report in test.get("reports", []):
                self.handle_event(cast(Event, {**common, "type": "report", "report": report}))
            finish = {**common, "type": "logfinish", "ts": test.get("finished")}
            self.handle_event(cast(Event, finish))
            if self._should_stop():
                return  # -x / --maxfail: nothing after the failure that tripped it

    def _not_runnable(self, event: Event) -> None:
        """Tests a worker could not collect, or refused to run: each fails by name."""
        kind = event.get("type")
        reason = str(event.get("reason") or "")
        worker = event.get("worker")
        for nodeid in event.get("nodeids", []):
            if nodeid in self.records and nodeid not in self.finalized:
                self._annotate(nodeid, event, self.batches.get(str(event.get("batch_id", ""))))
                if kind == "missing":
                    text = (
                        f"{nodeid} was not found on {worker} (queue {event.get('queue')}): the "
                        "worker's workspace does not have this test. Check DISPATCH_WORKSPACE "
                        "on the worker: it must be the controller's rootdir with the same test "
                        "files."
                    )
                    if reason:
                        text += f"\n{reason}"
                else:
                    text = f"{worker} refused {nodeid}: {reason}"
                self.fail_test(nodeid, text)
            self._mark_done(nodeid)

    def _annotate(self, nodeid: str, event: Event, batch: scheduling.Batch | None) -> None:
        record = self.records.get(nodeid)
        if record is None or nodeid in self.finalized:
            return
        record.worker = str(event.get("worker") or record.worker or "")
        record.hostname = str(event.get("hostname") or record.hostname or "")
        record.task_id = str(event.get("task_id") or record.task_id or "")
        if batch is not None:
            record.attempts = batch.attempt
        record.session = str(event.get("session_id") or record.session or "") or None

    def _mark_done(self, nodeid: str) -> None:
        for batch_id in self._batches_of.get(nodeid, ()):
            self.batches[batch_id].done.add(nodeid)

    def _add_batch(self, batch: scheduling.Batch) -> None:
        self.batches[batch.batch_id] = batch
        for nodeid in batch.nodeids:
            self._batches_of.setdefault(nodeid, []).append(batch.batch_id)

    def _poll(self, now: float) -> None:
        """The clocks: queues without consumers, lost work, sessions, work waiting on backoff."""
        if self._broker is None:
            return
        if self._consumer is not None and not self._consumer.connected.is_set():
            if self._outage_since is None:
                self._outage_since = now
                self._write_line(
                    f"celery-dispatch: lost the connection to {self.settings.broker_masked}; "
                    "reconnecting (deadlines paused)",
                    yellow=True,
                )
            return
        if self._outage_since is not None:
            # Back from a broker outage: nobody could speak meanwhile; restart the clocks.
            self._write_line(
                f"celery-dispatch: reconnected after {now - self._outage_since:.1f}s", cyan=True
            )
            self._outage_since = None
            for batch in self.batches.values():
                if batch.started_at is not None:
                    batch.last_seen = now
                if batch.current_since is not None:
                    batch.current_since = max(batch.current_since, now - 1.0)
            for session in self.sessions.values():
                session.last_seen = now
            for queue_name in self.queue_last_seen:
                self.queue_last_seen[queue_name] = now
            self._no_consumer_since.clear()
        self._poll_waiting_queues(now)
        waiting: dict[str, list[scheduling.Batch]] = {}
        for batch in self._live_batches():
            if batch.started_at is None:
                waiting.setdefault(batch.queue, []).append(batch)
                continue
            why = scheduling.is_lost(batch, now, self.settings.timeout)
            if why is not None:
                self._lost(batch, now, why)
        for queue_name in list(self.queue_nodeids):
            if queue_name in self.waiting_queues or not self._unfinished_in(queue_name):
                continue
            count = self._broker.consumer_count(queue_name)
            if count is None:
                continue  # cannot tell right now
            self.consumers[queue_name] = count
            if count > 0:
                self._no_consumer_since.pop(queue_name, None)
            else:
                gone_for = now - self._no_consumer_since.setdefault(queue_name, now)
                if gone_for >= scheduling.CONSUMER_GONE_GRACE:
                    for batch in self._live_batches():
                        if batch.queue == queue_name and batch.started_at is not None:
                            self._lost(
                                batch, now, f"no worker consumes queue {queue_name!r} any more"
                            )
                if gone_for >= self.settings.wait_workers and waiting.get(queue_name):
                    self._requeue_waiting(
                        queue_name,
                        waiting[queue_name],
                        now,
                        f"no worker consumes queue {queue_name!r} any more",
                    )
                    continue
            # Work waiting while the queue makes no progress at all (a frozen worker holds
            # the session task): try another session, count it as an attempt.
            last_progress = self.queue_last_seen.get(queue_name)
            stalled = [
                why
                for b in waiting.get(queue_name, [])
                if (why := scheduling.is_lost(b, now, self.settings.timeout, last_progress))
            ]
            if stalled and not self._started_in(queue_name):
                self._requeue_waiting(queue_name, waiting[queue_name], now, stalled[0])
        for session in list(self.sessions.values()):
            last = session.last_seen
            if session.live and session.started_at is not None and last is not None:
                session.lost = now - last > scheduling.SILENCE_LIMIT
        for batch in list(self.unsent):
            if now >= batch.not_before:
                self.unsent.remove(batch)
                self._publish(batch)
        for queue_name in list(self.queue_nodeids):
            self._ensure_session(queue_name)

    def _unfinished_in(self, queue_name: str) -> bool:
        return any(b.queue == queue_name for b in self._live_batches()) or any(
            b.queue == queue_name for b in self.unsent
        )

    def _started_in(self, queue_name: str) -> bool:
        return any(b.queue == queue_name and b.started_at is not None for b in self._live_batches())

    def _ensure_session(self, queue_name: str) -> None:
        """While work for a queue is left, at least one live session must pull it."""
        if queue_name in self.waiting_queues or self._should_stop():
            return
        if not self._unfinished_in(queue_name):
            return
        if any(s.live and s.queue == queue_name for s in self.sessions.values()):
            return
        if time.monotonic() < self._session_not_before.get(queue_name, 0.0):
            return  # backing off before the next attempt
        self._send_session(queue_name)

    def _requeue_waiting(
        self, queue_name: str, batches: list[scheduling.Batch], now: float, why: str
    ) -> None:
        """Chunks still in the work queue, with nobody to take them: count an attempt, send a
        fresh session after the backoff, or fail them by name once the retries are used up."""
        self._no_consumer_since.pop(queue_name, None)
        self.queue_last_seen[queue_name] = now
        for session in self.sessions.values():
            if session.queue == queue_name and session.started_at is None:
                session.lost = True  # never started: another one replaces it
        retry = [b for b in batches if b.attempt <= self.settings.retries]
        if retry:
            attempt = max(b.attempt for b in retry) + 1
            self._session_not_before[queue_name] = now + scheduling.backoff(attempt)
        for batch in batches:
            if batch in retry:
                batch.attempt += 1
                batch.sent_at = now + scheduling.backoff(batch.attempt)
                for nodeid in batch.remaining:
                    self.records[nodeid].attempts = batch.attempt
            else:
                self._give_up(batch, why)
        if retry:
            attempt = max(b.attempt for b in retry)
            tests = sum(len(b.remaining) for b in retry)
            self._write_line(
                f"celery-dispatch: queue {queue_name}: {why}; re-dispatching {tests} test(s) "
                f"in {scheduling.backoff(attempt):g}s (attempt {attempt} of "
                f"{self.settings.retries + 1})",
                yellow=True,
            )

    def _poll_waiting_queues(self, now: float) -> None:
        """Queues that had no consumer at the start: start once one shows up, or give up."""
        for queue_name, deadline in list(self.waiting_queues.items()):
            count = self._broker.consumer_count(queue_name)
            nodeids = self.queue_nodeids.get(queue_name, [])
            if count:
                self.consumers[queue_name] = count
                del self.waiting_queues[queue_name]
                self._write_line(
                    f"celery-dispatch: a worker now consumes {queue_name}; sending "
                    f"{len(nodeids)} test{'s' if len(nodeids) != 1 else ''}",
                    cyan=True,
                )
                for batch in self._start_queue(queue_name):
                    self._publish(batch)
            elif now >= deadline:
                del self.waiting_queues[queue_name]
                for nodeid in nodeids:
                    self.fail_test(nodeid, self._no_consumer_message(queue_name))

    def _no_consumer_message(self, queue_name: str) -> str:
        return (
            f"no worker consumes queue {queue_name!r} (waited "
            f"{self.settings.wait_workers:g}s, --celery-wait-workers). Start one: "
            f"celery -A pytest_celery_dispatch.worker worker -Q {queue_name} "
            f"-n worker@%h"
        )

    def _lost(self, batch: scheduling.Batch, now: float, why: str) -> None:
        """Re-dispatch what a lost chunk had not finished, or fail it by name."""
        self.abandoned.add(batch.batch_id)
        for nodeid in batch.remaining:
            self.running.discard(nodeid)
        session = self.sessions.get(batch.session_id or "")
        if session is not None:
            session.lost = True
        follow_up = scheduling.redispatch(batch, self.run_id, self.settings.retries, now)
        where = f"{batch.worker} on {batch.queue}" if batch.worker else f"queue {batch.queue}"
        if follow_up is None:
            self._give_up(batch, why)
            return
        self._write_line(
            f"celery-dispatch: {where}: {why}; re-dispatching "
            f"{len(follow_up.nodeids)} test(s) in {follow_up.not_before - now:g}s "
            f"(attempt {follow_up.attempt} of {self.settings.retries + 1})",
            yellow=True,
        )
        self._add_batch(follow_up)
        self.unsent.append(follow_up)
        self._session_not_before[batch.queue] = follow_up.not_before

    def _give_up(self, batch: scheduling.Batch, why: str) -> None:
        self.abandoned.add(batch.batch_id)
        attempts = f"{batch.attempt} attempt{'s' if batch.attempt != 1 else ''}"
        lost_by = [*batch.lost_by, *([batch.worker] if batch.worker else [])]
        if lost_by:
            attempts += f" (worked on by {', '.join(dict.fromkeys(lost_by))})"
        for nodeid in batch.remaining:
            if batch.started_at is not None:
                what = f"{batch.worker} lost while running {nodeid} (queue {batch.queue})"
            else:
                what = f"no worker of queue {batch.queue} started {nodeid}"
            self.fail_test(
                nodeid,
                f"{what} after {attempts}: {why} (--celery-timeout "
                f"{self.settings.timeout:g}, --celery-retries {self.settings.retries})",
            )
            self._mark_done(nodeid)

    # ------------------------------------------------------------------ stopping

    def _should_stop(self) -> bool:
        session = self._session
        return bool(session is not None and (session.shouldfail or session.shouldstop))

    def _stop_workers_gracefully(self) -> None:
        """-x / --maxfail: revoke queued batches, let running tests finish, start no new one."""
        if self.stopped_early is not None or self._broker is None:
            return
        queued = sorted(
            {n for b in self._live_batches() if b.started_at is None for n in b.remaining}
            | {n for b in self.unsent for n in b.remaining}
        )
        running = sorted(self.running - self.finalized)
        self.unsent.clear()
        with contextlib.suppress(Exception):
            self._broker.declare_stop_queue(self.run_id)
        # Nothing is reported after this point: tell the workers right away. The consumer
        # stops first, or it would declare the reply queue again when it resubscribes.
        if self._consumer is not None:
            self._consumer.stop(timeout=0)
        self._broker.delete_queue(self.reply_to)
        for queue_name in self.queue_nodeids:
            self._broker.delete_queue(work_queue_name(self.run_id, queue_name))
        with contextlib.suppress(Exception):
            self._revoke_outstanding()
        self.stopped_early = {"queued_not_run": len(queued), "running_not_reported": len(running)}
        self._write_line(
            f"celery-dispatch: stopping: {len(queued)} queued test(s) revoked, "
            f"{len(running)} running test(s) left to finish on their workers (not reported)",
            yellow=True,
        )

    def _live_batches(self) -> list[scheduling.Batch]:
        return [
            b
            for b in self.batches.values()
            if not b.finished and b.batch_id not in self.abandoned and b.sent_at is not None
        ]

    def _shutdown(self) -> None:
        if self._should_stop() and not self.interrupted:
            self._stop_workers_gracefully()
        if self._consumer is not None:
            self._consumer.stop()
        if self._broker is not None:
            with contextlib.suppress(Exception):
                self._revoke_outstanding()
            # Deleting the reply queue tells every worker the run is over (after Ctrl-C: kill
            # the running test now; after -x: the stop queue says finish it first).
            self._broker.delete_queue(self.reply_to)
            for queue_name in self.queue_nodeids:
                self._broker.delete_queue(work_queue_name(self.run_id, queue_name))
            self._broker.close()
        if self._local_workers is not None:
            self._local_workers.stop()
        if not self.interrupted and not self._should_stop():
            self._check_invariant()
        self.close_event_log()

    def _check_invariant(self) -> None:
        """Every dispatched test ends with exactly one final outcome; say so loudly if not."""
        missing = self._unfinished()
        doubled = sorted(n for n, count in self.replays.items() if count > 1)
        if not missing and not doubled:
            return
        self._write_line(
            "celery-dispatch INTERNAL ERROR: exactly one final outcome per dispatched test "
            f"was violated; no outcome: {', '.join(missing) or 'none'}; "
            f"reported twice: {', '.join(doubled) or 'none'}",
            red=True,
            bold=True,
        )
        for nodeid in missing:
            self.fail_test(nodeid, f"celery-dispatch internal error: no final outcome for {nodeid}")

    def close_event_log(self) -> None:
        if self._event_log is not None:
            self._event_log.close()
            self._event_log = None

    def _revoke_outstanding(self) -> None:
        """Sessions still waiting in a Celery queue will not start (the worker skips them
        anyway once the run is over; revoking saves it the trip)."""
        ids = [s.task_id for s in self.sessions.values() if s.task_id and s.started_at is None]
        if ids and self._app is not None:
            self._app.control.revoke(ids)

    # ------------------------------------------------------------------ figures and event log

    def report_info(self) -> dict[str, Any]:
        """The run-level part of the JSON report's ``dispatch`` section."""
        end = self.finished_at or time.time()
        return {
            "run_id": self.run_id,
            "broker": self.settings.broker_masked,
            "backend": self.settings.backend_masked,
            "interrupted": self.interrupted,
            "stopped_early": self.stopped_early,
            "broker_error": self.broker_error,
            "consumers": dict(self.consumers),
            "slots": dict(self.slots),
            "sessions": len(self.sessions),
            "workers_by_queue": {q: list(w) for q, w in self.workers_by_queue.items()},
            "wall_time": max(0.0, end - self.started_at),
        }

    def log_event(self, kind: str, nodeid: str, **fields: Any) -> None:
        """One JSON line in --celery-event-log: sent / started / finished per test."""
        if self.settings.event_log is None:
            return
        if self._event_log is None:
            self._event_log = open(self.settings.event_log, "a", encoding="utf-8")  # noqa: SIM115
        line = {"ts": time.time(), "event": kind, "run_id": self.run_id, "nodeid": nodeid}
        line.update(fields)
        self._event_log.write(dumps(line) + "\n")
        self._event_log.flush()
