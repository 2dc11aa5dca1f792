"""Replaying dispatched tests into the local pytest session, once each.

A worker sends each test's phase reports as pytest's serializable dicts. :class:`Replayer`
buffers them per execution stream (a slot) and feeds a test to ``pytest_runtest_logstart`` /
``logreport`` / ``logfinish`` only when that stream has finished it, and only the first time:
a test run twice (broker redelivery, re-dispatch) is reported once. That is why terminal, ``-r``,
JUnit and every other reporter work unchanged. The invariant: every dispatched test ends with
exactly one final outcome (:meth:`Replayer.check_invariant`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import IO, Any

import pytest

from .outcome import outcome_of_reports
from .serialization import DispatchError, Event, dumps


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


class EventLog:
    """``--celery-event-log``: one JSON line per sent / started / finished test."""

    def __init__(self, path: str | None, run_id: str) -> None:
        self.path = path
        self.run_id = run_id
        self._file: IO[str] | None = None

    def write(self, kind: str, nodeid: str, **fields: Any) -> None:
        if self.path is None:
            return
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        line = {"ts": time.time(), "event": kind, "run_id": self.run_id, "nodeid": nodeid}
        line.update(fields)
        self._file.write(dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Replayer:
    """The run's test records, report buffers and the set of tests with a final outcome."""

    def __init__(self, config: pytest.Config, event_log: EventLog) -> None:
        self.config = config
        self.event_log = event_log
        self.items: dict[str, pytest.Item] = {}
        self.records: dict[str, TestRecord] = {}
        self.buffers: dict[tuple[str, str], list[Any]] = {}
        self.finalized: set[str] = set()
        self.replays: dict[str, int] = {}
        self._stamped: dict[str, int | None] = {}  # the attempt whose start the worker stamped
        self.last_activity = time.monotonic()
        self._records_finalized = 0

    def add(self, item: pytest.Item, queue: str | None) -> None:
        self.items[item.nodeid] = item
        if queue is not None:
            self.records[item.nodeid] = TestRecord(nodeid=item.nodeid, queue=queue)

    @property
    def all_done(self) -> bool:
        """Every dispatched test has its outcome (O(1): the event loop asks per event)."""
        return self._records_finalized >= len(self.records)

    def pending(self, nodeid: str) -> bool:
        """A dispatched test still waiting for its final outcome."""
        return nodeid in self.records and nodeid not in self.finalized

    def unfinished(self) -> list[str]:
        return [n for n in self.records if n not in self.finalized]

    def tag(self, nodeid: str) -> str | None:
        """``worker/queue`` of a dispatched test, for ``-v`` lines."""
        record = self.records.get(nodeid)
        if record is None or record.queue is None:
            return None
        return f"{record.worker or '?'}/{record.queue}"

    # ------------------------------------------------------------------ what workers say

    def annotate(self, nodeid: str, event: Event, attempt: int | None) -> None:
        record = self.records.get(nodeid)
        if record is None or nodeid in self.finalized:
            return
        record.worker = str(event.get("worker") or record.worker or "")
        record.hostname = str(event.get("hostname") or record.hostname or "")
        record.task_id = str(event.get("task_id") or record.task_id or "")
        if attempt is not None:
            record.attempts = attempt
        record.session = str(event.get("session_id") or record.session or "") or None

    def started(
        self,
        nodeid: str,
        event: Event,
        attempt: int | None,
        started: float,
        estimate: bool = False,
    ) -> None:
        """A test started at ``started``: the worker's own stamp (its ``logstart``), or an
        ``estimate`` from a heartbeat (the controller's clock less the elapsed time, later by
        the heartbeat's transit), which never replaces the stamp of the same attempt."""
        record = self.records.get(nodeid)
        if record is None or nodeid in self.finalized:
            return
        self.annotate(nodeid, event, attempt)
        if estimate and nodeid in self._stamped and self._stamped[nodeid] == attempt:
            return
        if not estimate:
            self._stamped[nodeid] = attempt
        first = record.started is None
        record.started = started
        if first:
            self.event_log.write(
                "started",
                nodeid,
                queue=record.queue,
                worker=record.worker,
                task_id=record.task_id,
                attempt=record.attempts,
            )

    def sent(self, nodeids: list[str], queue: str, attempt: int) -> None:
        now = time.time()
        for nodeid in nodeids:
            record = self.records[nodeid]
            record.attempts = attempt
            record.sent = now
            self.event_log.write("sent", nodeid, queue=queue, attempt=attempt)

    def buffer(self, stream: str, nodeid: str, data: Any) -> None:
        if self.pending(nodeid):
            self.buffers.setdefault((stream, nodeid), []).extend(self.rebuild([data]))

    def rebuild(self, datas: list[Any]) -> list[Any]:
        """Report objects from a worker's serializable dicts (pytest's own hook, so a plugin
        that serializes its own reports gets them back)."""
        from_serializable = self.config.hook.pytest_report_from_serializable
        reports = []
        for data in datas:
            report = from_serializable(config=self.config, data=data)
            if report is not None:
                restore_tuples(report)
                reports.append(report)
        return reports

    def take(self, stream: str, nodeid: str) -> list[Any]:
        return self.buffers.pop((stream, nodeid), [])

    # ------------------------------------------------------------------ final outcomes

    def replay(self, nodeid: str, reports: list[Any]) -> None:
        """Feed one test's reports to pytest exactly as a local run would."""
        hook = self.config.hook
        record = self.records.get(nodeid)
        item = self.items.get(nodeid)
        location = reports[0].location if reports else (item.location if item else None)
        self.replays[nodeid] = self.replays.get(nodeid, 0) + 1
        self.last_activity = time.monotonic()
        if nodeid in self.finalized:
            return  # never report a test twice (counted above for the invariant check)
        self.finalized.add(nodeid)
        if nodeid in self.records:
            self._records_finalized += 1
        hook.pytest_runtest_logstart(nodeid=nodeid, location=location)
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
        hook.pytest_runtest_logfinish(nodeid=nodeid, location=location)
        if record is not None:
            record.duration = duration
            if record.finished is None:
                record.finished = time.time()
            self.event_log.write(
                "finished",
                nodeid,
                queue=record.queue,
                worker=record.worker,
                task_id=record.task_id,
                attempt=record.attempts,
                duration=duration,
                outcome=outcome_of_reports(reports),
                infrastructure_error=record.infrastructure_error,
            )

    def fail_test(
        self, nodeid: str, message: str, when: str = "call", finished: float | None = None
    ) -> None:
        """End a test with a synthetic failure (infrastructure or routing), once.

        A test that had started (a crash, a kill at its deadline) lasted from its start to
        ``finished`` (the worker's verdict, on the worker's clock like the start) or now."""
        if nodeid in self.finalized:
            return
        item = self.items[nodeid]
        record = self.records.get(nodeid)
        stop = time.time() if finished is None else finished
        started = record.started if record is not None and when == "call" else None
        start = started if started is not None and started <= stop else stop
        keywords = {name: 1 for name in item.keywords}
        first = pytest.TestReport(
            nodeid=nodeid,
            location=item.location,
            keywords=keywords,  # type: ignore[arg-type]
            outcome="failed",
            longrepr=make_error_longrepr(message),
            when=when,  # type: ignore[arg-type]
            duration=stop - start,
            start=start,
            stop=stop,
        )
        teardown = pytest.TestReport(
            nodeid=nodeid,
            location=item.location,
            keywords=keywords,  # type: ignore[arg-type]
            outcome="passed",
            longrepr=None,
            when="teardown",
            start=stop,
            stop=stop,
        )
        if record is not None:
            record.infrastructure_error = message
            if finished is not None and record.finished is None:
                record.finished = finished
        self.replay(nodeid, [first, teardown])

    def check_invariant(self, write_line: Callable[..., None]) -> None:
        """Every dispatched test ends with exactly one final outcome; say so loudly if not."""
        missing = self.unfinished()
        doubled = sorted(n for n, count in self.replays.items() if count > 1)
        if not missing and not doubled:
            return
        write_line(
            "celery-dispatch INTERNAL ERROR: exactly one final outcome per dispatched test "
            f"was violated; no outcome: {', '.join(missing) or 'none'}; "
            f"reported twice: {', '.join(doubled) or 'none'}",
            red=True,
            bold=True,
        )
        for nodeid in missing:
            self.fail_test(nodeid, f"celery-dispatch internal error: no final outcome for {nodeid}")

    def record_warning(self, event: Event) -> None:
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
