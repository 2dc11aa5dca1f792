"""The JSON report: pytest-json-report's layout plus ``dispatch`` sections; and its figures.

The layout (``created``, ``duration``, ``exitcode``, ``root``, ``environment``, ``summary``,
``tests[]`` with ``setup`` / ``call`` / ``teardown``) is a superset of pytest-json-report's, so
tools written for it read ours. ``report.schema.json`` beside this module is its JSON Schema.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from .outcome import outcome_of
from .taskrun import PROPERTY as DISPATCHER_PROPERTY

REPORT_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("report.schema.json")

#: Outcome names as pytest-json-report writes them.
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _environment() -> dict[str, Any]:
    return {
        "Python": platform.python_version(),
        "Platform": platform.platform(),
        "Packages": {
            name: _version(name)
            for name in ("pytest", "celery", "kombu", "pluggy", "pytest-celery-dispatch")
        },
    }


_environment_cache: list[dict[str, Any]] = []
_environment_thread: threading.Thread | None = None


def prefetch_environment() -> None:
    """Work out the report's ``environment`` in a thread while the controller waits for
    results: package metadata and ``platform.platform()`` cost about 0.2 s at the very end of
    a run otherwise."""
    global _environment_thread
    if _environment_thread is None and not _environment_cache:
        _environment_thread = threading.Thread(
            target=lambda: _environment_cache.append(_environment()),
            name="celery-dispatch-environment",
            daemon=True,
        )
        _environment_thread.start()


def environment() -> dict[str, Any]:
    if _environment_thread is not None:
        _environment_thread.join(10.0)
    return dict(_environment_cache[0]) if _environment_cache else _environment()


def phase_dict(report: pytest.TestReport) -> dict[str, Any]:
    data: dict[str, Any] = {
        "duration": float(report.duration or 0.0),
        "outcome": report.outcome,
    }
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        data["crash"] = _fileloc(crash)
        entries = getattr(getattr(report.longrepr, "reprtraceback", None), "reprentries", None)
        locations = [getattr(e, "reprfileloc", None) for e in entries or []]
        if locations and all(loc is not None for loc in locations):
            data["traceback"] = [_fileloc(loc) for loc in locations]
    if report.capstdout:
        data["stdout"] = report.capstdout
    if report.capstderr:
        data["stderr"] = report.capstderr
    if report.caplog:
        # pytest-json-report keeps log records; a dispatched report carries the captured text,
        # so each line becomes a record with its text as "msg".
        data["log"] = [{"msg": line} for line in report.caplog.splitlines()]
    if report.longrepr is not None and report.longreprtext:
        data["longrepr"] = str(report.longreprtext)
    return data


def _fileloc(loc: Any) -> dict[str, Any]:
    return {"path": str(loc.path), "lineno": loc.lineno, "message": str(loc.message)}


class TestsCollector:
    """Gathers every phase report (local and replayed) into json-report test records."""

    __test__ = False

    def __init__(self) -> None:
        self.tests: dict[str, dict[str, Any]] = {}
        self.categories: dict[str, dict[str, str]] = {}
        self.times: dict[str, tuple[float, float]] = {}  # first start, last stop

    def add(self, report: pytest.TestReport, category: str) -> None:
        record = self.tests.get(report.nodeid)
        if record is None:
            record = self.tests[report.nodeid] = {
                "nodeid": report.nodeid,
                "lineno": report.location[1],
                "keywords": sorted(str(k) for k in report.keywords),
                "outcome": "passed",
            }
        record[report.when] = phase_dict(report)
        start, stop = getattr(report, "start", None), getattr(report, "stop", None)
        if start and stop:
            first, last = self.times.get(report.nodeid, (start, stop))
            self.times[report.nodeid] = (min(first, start), max(last, stop))
        cats = self.categories.setdefault(report.nodeid, {})
        cats[report.when] = category
        record["outcome"] = outcome_of(cats)
        # The dispatcher fixture's runs travel as user properties (home with a dispatched
        # test's reports too); they become the test's ``dispatcher`` section.
        runs = [v for k, v in report.user_properties if k == DISPATCHER_PROPERTY]
        if runs:
            record["dispatcher"] = [dict(v) for v in runs if isinstance(v, Mapping)]
        other = [(k, v) for k, v in report.user_properties if k != DISPATCHER_PROPERTY]
        if other:
            record["user_properties"] = [
                {str(k): v if isinstance(v, (str, int, float, bool)) else str(v)} for k, v in other
            ]


def dispatch_figures(
    tests: Iterable[Mapping[str, Any]],
    consumers: Mapping[str, int],
    wall_time: float,
    slots: Mapping[str, int] | None = None,
    worker_slots: Mapping[str, int] | None = None,
    predicted: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Per-queue and per-worker figures, the speed-up and duration statistics.

    ``tests`` are JSON-report test records carrying ``dispatch`` and phase durations.
    ``slots`` (per queue) and ``worker_slots`` are the *configured* slots (Celery concurrency);
    ``lanes_used`` counts the slots' ``run_session`` tasks that ran tests (the timeline's lanes).
    ``predicted`` is each queue's predicted test time from recorded durations, reported beside
    its ``test_time`` (first test's start to last test's end).
    """
    slots = slots or {}
    worker_slots = worker_slots or {}
    predicted = predicted or {}
    spans: dict[str, list[float]] = {}
    lanes: dict[tuple[str, str], set[str]] = {}
    queues: dict[str, dict[str, Any]] = {}
    workers: dict[str, dict[str, Any]] = {}
    all_durations: list[float] = []
    for test in tests:
        duration = test_duration(test)
        all_durations.append(duration)
        info = test.get("dispatch") or {}
        queue = info.get("queue")
        if not queue:
            continue
        q = queues.setdefault(
            queue,
            {
                "consumers": consumers.get(queue, 0),
                "slots": slots.get(queue),
                "tests": 0,
                "outcomes": {},
                "_d": [],
            },
        )
        if info.get("started") is not None and info.get("finished") is not None:
            span = spans.setdefault(queue, [info["started"], info["finished"]])
            span[:] = [min(span[0], info["started"]), max(span[1], info["finished"])]
        q["tests"] += 1
        q["outcomes"][test["outcome"]] = q["outcomes"].get(test["outcome"], 0) + 1
        q["_d"].append(duration)
        worker = info.get("worker") or "unknown"
        w = workers.setdefault(
            worker,
            {
                "queues": [],
                "hostname": info.get("hostname"),
                "slots": worker_slots.get(worker),
                "tests": 0,
                "outcomes": {},
            },
        )
        if info.get("session"):
            lanes.setdefault(("queue", queue), set()).add(str(info["session"]))
            lanes.setdefault(("worker", worker), set()).add(str(info["session"]))
        w.setdefault("busy_time", 0.0)
        w["tests"] += 1
        w["busy_time"] += duration
        w["outcomes"][test["outcome"]] = w["outcomes"].get(test["outcome"], 0) + 1
        if queue not in w["queues"]:
            w["queues"].append(queue)
    for name, q in queues.items():
        durations = q.pop("_d")
        q["lanes_used"] = len(lanes.get(("queue", name), ()))
        q["predicted_test_time"] = (
            round(predicted[name], 6) if predicted.get(name) is not None else None
        )
        q["test_time"] = round(spans[name][1] - spans[name][0], 6) if name in spans else None
        q.update(duration_stats(durations))
    for name, w in workers.items():
        w["lanes_used"] = len(lanes.get(("worker", name), ()))
        w["busy_time"] = round(w["busy_time"], 6)
        w["utilisation"] = round(w["busy_time"] / wall_time, 4) if wall_time > 0 else None
    total = sum(all_durations)
    return {
        "queues": dict(sorted(queues.items())),
        "workers": dict(sorted(workers.items())),
        "wall_time": round(wall_time, 6),
        "sum_of_test_durations": round(total, 6),
        "speedup": round(total / wall_time, 4) if wall_time > 0 else None,
        **{f"test_{k}": v for k, v in duration_stats(all_durations).items()},
    }


def duration_stats(durations: list[float]) -> dict[str, float | None]:
    if not durations:
        return {
            "total_duration": 0.0,
            "avg_duration": None,
            "min_duration": None,
            "max_duration": None,
        }
    return {
        "total_duration": round(sum(durations), 6),
        "avg_duration": round(statistics.fmean(durations), 6),
        "min_duration": round(min(durations), 6),
        "max_duration": round(max(durations), 6),
    }


def test_duration(test: Mapping[str, Any]) -> float:
    return float(
        sum(float(test[w]["duration"]) for w in ("setup", "call", "teardown") if w in test)
    )


test_duration.__test__ = False  # type: ignore[attr-defined]


def build_report(
    *,
    created: float,
    duration: float,
    exitcode: int,
    root: str,
    collected: int,
    deselected: int,
    tests: list[dict[str, Any]],
    dispatch: dict[str, Any],
) -> dict[str, Any]:
    summary: dict[str, int] = {}
    for test in tests:
        summary[test["outcome"]] = summary.get(test["outcome"], 0) + 1
    summary["total"] = len(tests)
    summary["collected"] = collected
    if deselected:
        summary["deselected"] = deselected
    return {
        "created": created,
        "duration": duration,
        "exitcode": int(exitcode),
        "root": root,
        "environment": environment(),
        "summary": summary,
        "tests": tests,
        "dispatch": dispatch,
    }


def check_writable(path: str) -> str | None:
    """Why ``path`` cannot be written, or None. Checked before any test runs."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        return f"{path} is a directory"
    if not parent.exists():
        return f"its directory {parent} does not exist"
    if not os.access(parent, os.W_OK):
        return f"its directory {parent} is not writable"
    if target.exists() and not os.access(target, os.W_OK):
        return f"{path} exists and is not writable"
    return None


def write_atomic(path: str, data: Mapping[str, Any]) -> None:
    """Write JSON to a temp file beside ``path`` and rename it into place."""
    write_text_atomic(path, json_chunks(data))


def json_chunks(data: Mapping[str, Any]) -> Iterator[str]:
    """The text of ``json.dumps(data, default=str, ensure_ascii=False)`` and a newline, a
    top-level value at a time and a top-level list's items one by one: a report of many tests
    is never one string beside its data (W3's 5,000 tests: a 4.6 MB string, and a copy for the
    newline, and one encoded, on top of the controller's peak). Compact, like
    pytest-json-report: with indent the json module falls back from C to Python (0.14 s for
    500 tests); each piece is encoded by the C encoder."""
    encode = json.JSONEncoder(default=str, ensure_ascii=False).encode
    if not all(isinstance(key, str) for key in data):
        yield encode(data) + "\n"  # keys json.dumps would convert: as it does
        return
    yield "{"
    for index, (key, value) in enumerate(data.items()):
        yield (", " if index else "") + encode(key) + ": "
        if isinstance(value, (list, tuple)):
            yield "["
            for position, item in enumerate(value):
                yield (", " if position else "") + encode(item)
            yield "]"
        else:
            yield encode(value)
    yield "}\n"


def write_text_atomic(path: str, text: str | Iterable[str]) -> None:
    """Write text (a string, or its pieces in order) to a temp file beside ``path`` and
    rename it into place."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as fh:
            for piece in [text] if isinstance(text, str) else text:
                fh.write(piece)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class JsonReportPlugin:
    """Writes the report at session finish. ``dispatch_info(nodeid)`` and ``session_info()``
    come from the controller."""

    def __init__(
        self,
        config: pytest.Config,
        path: str,
        dispatch_info: Callable[[str], dict[str, Any] | None],
        session_info: Callable[[], dict[str, Any]],
        timeline: str | None = None,
        path_asked: bool = True,
        artifacts: Any = None,
    ) -> None:
        self.config = config
        self.path = path
        # A --collect-only run writes the report only when it was asked for by path.
        self.path_asked = path_asked
        self.timeline = timeline
        self.artifacts = artifacts  # the run's artifactstore.ArtifactStore
        self.timeline_written: str | None = None
        self.dispatch_info = dispatch_info
        self.session_info = session_info
        self.collector = TestsCollector()
        self.created = time.time()
        self.collected = 0
        self.deselected = 0
        self.written: str | None = None
        self.data: dict[str, Any] | None = None
        self.collectors: list[dict[str, Any]] = []
        self.warnings: list[dict[str, Any]] = []
        # id(report) -> (report, teststatus category); the report is kept so the id stays its own
        self._status: dict[int, tuple[pytest.TestReport, str]] = {}

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        self.deselected += len(items)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        collector: dict[str, Any] = {
            "nodeid": report.nodeid,
            "outcome": report.outcome,
            "result": [
                {"nodeid": node.nodeid, "type": type(node).__name__} for node in report.result
            ],
        }
        if report.longrepr:
            collector["longrepr"] = str(report.longrepr)
        self.collectors.append(collector)

    def pytest_warning_recorded(
        self, warning_message: Any, when: str, nodeid: str, location: Any
    ) -> None:
        self.warnings.append(
            {
                "message": str(warning_message.message),
                "category": warning_message.category.__name__,
                "when": when,
                "filename": warning_message.filename,
                "lineno": warning_message.lineno,
            }
        )

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.collected = len(session.items) + self.deselected

    @pytest.hookimpl(wrapper=True)
    def pytest_report_teststatus(
        self, report: pytest.TestReport | pytest.CollectReport, config: pytest.Config
    ) -> Any:
        """Keep the category the terminal asked for, instead of asking the hook a second time
        for every phase of every test (a third of this plugin's time on 5,000 tests)."""
        result = yield
        if result and isinstance(report, pytest.TestReport):
            self._status[id(report)] = (report, str(result[0]))
        return result

    @pytest.hookimpl(trylast=True)  # after the terminal reporter, which asks for the status
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        known = self._status.pop(id(report), None)
        if known is not None and known[0] is report:
            category = known[1]
        else:
            status = self.config.hook.pytest_report_teststatus(report=report, config=self.config)
            category = str(status[0])
            self._status.pop(id(report), None)
        self.collector.add(report, category)

    def build(self, exitstatus: int) -> dict[str, Any]:
        tests = []
        for nodeid, record in self.collector.tests.items():
            info = self.dispatch_info(nodeid)
            if info is None:
                info = local_dispatch()
                if nodeid in self.collector.times:
                    info["started"], info["finished"] = self.collector.times[nodeid]
            record["dispatch"] = info
            self._add_artifacts(nodeid, record)
            tests.append(record)
        extra = self.session_info()
        wall = float(extra.pop("wall_time", time.time() - self.created))
        figures = dispatch_figures(
            tests,
            extra.pop("consumers", {}),
            wall,
            slots=extra.get("slots"),
            worker_slots=extra.pop("worker_slots", None),
            predicted=extra.pop("predicted", None),
        )
        dispatch = {"report_version": REPORT_VERSION, **extra, **figures}
        dispatch["tests_dispatched"] = sum(1 for t in tests if t["dispatch"]["queue"])
        dispatch["tests_local"] = len(tests) - dispatch["tests_dispatched"]
        if self.artifacts is not None:
            dispatch["artifacts"] = {"dir": self._relative(self.artifacts.root)}
            dispatch["artifacts"].update(self.artifacts.totals())
        report = build_report(
            created=self.created,
            duration=time.time() - self.created,
            exitcode=exitstatus,
            root=str(self.config.rootpath),
            collected=self.collected,
            deselected=self.deselected,
            tests=tests,
            dispatch=dispatch,
        )
        report["collectors"] = self.collectors
        if self.warnings:
            report["warnings"] = self.warnings
        return report

    def _relative(self, path: str) -> str:
        return os.path.relpath(path, os.path.dirname(os.path.abspath(self.path)))

    def _add_artifacts(self, nodeid: str, record: dict[str, Any]) -> None:
        """``tests[].artifacts``: the test's files, paths relative to the report's folder."""
        entries = self.artifacts.entries.get(nodeid) if self.artifacts is not None else None
        if entries:
            from .artifactreport import report_entries

            base = os.path.dirname(os.path.abspath(self.path))
            record["artifacts"] = report_entries(entries, base)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        data = self.data = self.build(int(exitstatus))
        # --co: nothing ran; the report at its default path would only litter the folder.
        if self.path_asked or not self.config.option.collectonly:
            write_atomic(self.path, data)
            self.written = self.path
        if self.timeline:
            from .timeline import render_timeline

            write_text_atomic(self.timeline, render_timeline(data, self._link_base()))
            self.timeline_written = self.timeline

    def _link_base(self) -> str:
        """The report's folder as seen from the timeline's: the prefix of artifact links."""
        timeline_dir = os.path.dirname(os.path.abspath(str(self.timeline)))
        return os.path.relpath(os.path.dirname(os.path.abspath(self.path)), timeline_dir)


def local_dispatch() -> dict[str, Any]:
    return {
        "queue": None,
        "worker": "local",
        "hostname": platform.node(),
        "task_id": None,
        "attempts": 0,
        "sent": None,
        "started": None,
        "finished": None,
        "infrastructure_error": None,
        "session": None,
    }


def run_section(session: Any) -> dict[str, Any]:
    """The run-level part of the ``dispatch`` section, from the controller's
    :class:`~.session.DispatchSession` (not imported: the session imports this module)."""
    end = session.finished_at or time.time()
    sch = session.scheduler
    settings = session.settings
    return {
        "run_id": session.run_id,
        "identity": dict(session.identity),
        "priority": settings.priority,
        "broker": settings.broker_masked,
        "backend": settings.backend_masked,
        "interrupted": session.interrupted,
        "stopped_early": session.stopped_early,
        "broker_error": session.broker_error,
        "consumers": dict(sch.consumers),
        "slots": dict(sch.capacity),
        "worker_slots": sch.worker_slots(),  # into dispatch.workers[...].slots
        "sessions": len(sch.slots),
        "workers_by_queue": {q: list(w) for q, w in session.workers_by_queue.items()},
        "wall_time": max(0.0, end - session.started_at),
        "collect_only": bool(session.config.option.collectonly),
        "dist": settings.dist,
        "predicted": dict(sch.predicted),  # into dispatch.queues[...].predicted_test_time
        "ship": session.shipper.report(),
    }
