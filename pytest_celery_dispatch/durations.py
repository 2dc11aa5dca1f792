"""Recorded test durations: what the planner knows about each test's length.

After every run on the controller (dispatched tests and local ones), :class:`DurationRecorder`
adds up each test's setup, call and teardown durations and stores them in pytest's cache under
:data:`CACHE_KEY`, per queue (a bench may be slower than another; local tests under
:data:`LOCAL`). The next run's planner looks a test up in its own queue first, then in any other
queue, then in pytest-split's ``.test_durations`` file (a JSON object of nodeid -> seconds, or
the older list of ``[nodeid, seconds]`` pairs) when the project has one; a test found nowhere
gets the median of the queue's known tests (:meth:`DurationHistory.estimates`).

Without pytest's cache (``-p no:cacheprovider``) nothing is recorded or read, silently.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

#: The key of the recorded durations in pytest's cache (``.pytest_cache/v/celery-dispatch/``).
CACHE_KEY = "celery-dispatch/durations"
#: The queue name under which tests that ran on the controller are recorded.
LOCAL = "(local)"
#: pytest-split's durations file, at the project's root.
SPLIT_FILE = ".test_durations"

ByQueue = dict[str, dict[str, float]]


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return None
    return float(value)


def parse_by_queue(data: Any) -> ByQueue:
    """The cache's content, keeping only well-formed entries (a damaged cache is no error)."""
    queues = data.get("queues") if isinstance(data, dict) else None
    if not isinstance(queues, dict):
        return {}
    result: ByQueue = {}
    for queue, tests in queues.items():
        if isinstance(queue, str) and isinstance(tests, dict):
            kept = {n: s for n, v in tests.items() if (s := _seconds(v)) is not None}
            if kept:
                result[queue] = kept
    return result


def parse_split(text: str) -> dict[str, float]:
    """pytest-split's ``.test_durations``: ``{nodeid: seconds}`` or ``[[nodeid, seconds]]``."""
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    pairs = data.items() if isinstance(data, dict) else data if isinstance(data, list) else []
    result: dict[str, float] = {}
    for pair in pairs:
        if isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str):
            seconds = _seconds(pair[1])
            if seconds is not None:
                result[pair[0]] = seconds
    return result


class DurationHistory:
    """Pure: recorded durations per queue, plus pytest-split's, and the lookups."""

    def __init__(self, by_queue: Mapping[str, Mapping[str, float]], split: Mapping[str, float]):
        self.by_queue = {q: dict(tests) for q, tests in by_queue.items()}
        self.split = dict(split)

    def lookup(self, queue: str, nodeid: str) -> float | None:
        """Seconds recorded for ``nodeid`` on ``queue``, else on any queue (the latest queue
        in the cache wins), else in ``.test_durations``; None when unknown."""
        own = self.by_queue.get(queue, {}).get(nodeid)
        if own is not None:
            return own
        for tests in reversed(list(self.by_queue.values())):
            if nodeid in tests:
                return tests[nodeid]
        return self.split.get(nodeid)

    def estimates(self, queue: str, nodeids: Iterable[str]) -> dict[str, float] | None:
        """Seconds for each of ``nodeids``, unknown tests at the median of the known ones;
        None when none is known (then the queue is planned in collection order, no ETA)."""
        ids = list(nodeids)
        known = {n: s for n in ids if (s := self.lookup(queue, n)) is not None}
        if not known:
            return None
        median = statistics.median(known.values())
        return {n: known.get(n, median) for n in ids}

    def merged(self, measured: Mapping[str, Mapping[str, float]]) -> ByQueue:
        """The cache's new content: this run's measurements replace the older ones; tests
        that did not run this time keep theirs (a run with ``-k`` forgets nothing)."""
        result = {q: dict(tests) for q, tests in self.by_queue.items()}
        for queue, tests in measured.items():
            result.setdefault(queue, {}).update(tests)
        return result


def _cache(config: pytest.Config) -> Any:
    return getattr(config, "cache", None)  # absent with -p no:cacheprovider


def load(config: pytest.Config) -> DurationHistory | None:
    """The recorded durations, or None without pytest's cache."""
    cache = _cache(config)
    if cache is None:
        return None
    split: dict[str, float] = {}
    path = Path(config.rootpath) / SPLIT_FILE
    if path.is_file():
        try:
            split = parse_split(path.read_text(encoding="utf-8"))
        except OSError:
            split = {}
    return DurationHistory(parse_by_queue(cache.get(CACHE_KEY, None)), split)


#: pytest options whose order of the tests is the point: failed first, new first, stepwise.
USER_ORDER_OPTIONS = ("failedfirst", "newfirst", "stepwise")


def queue_estimates(
    config: pytest.Config, queue_nodeids: Mapping[str, list[str]]
) -> dict[str, dict[str, float]]:
    """Per queue, each test's estimate (see :meth:`DurationHistory.estimates`); queues with
    no history are left out, and so is every queue when the user asked for an order of their
    own (``--ff``, ``--nf``, ``--sw``): then the work goes out in collection order."""
    history = load(config)
    if history is None or any(config.getoption(name, False) for name in USER_ORDER_OPTIONS):
        return {}
    result: dict[str, dict[str, float]] = {}
    for queue, nodeids in queue_nodeids.items():
        estimates = history.estimates(queue, nodeids)
        if estimates is not None:
            result[queue] = estimates
    return result


class DurationRecorder:
    """A plugin on the controller: adds up each test's phase durations (local reports and the
    replayed reports of dispatched tests) and stores them in the cache at the end.

    ``where(nodeid)`` names the queue to record a test under, or None to leave it out (an
    infrastructure failure says nothing about the test's length).
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.where: Callable[[str], str | None] = lambda nodeid: LOCAL
        self.measured: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.measured[report.nodeid] = self.measured.get(report.nodeid, 0.0) + float(
            report.duration or 0.0
        )

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self) -> None:
        cache = _cache(self.config)
        if cache is None or not self.measured:
            return
        by_queue: ByQueue = {}
        for nodeid, seconds in self.measured.items():
            queue = self.where(nodeid)
            if queue is not None:
                by_queue.setdefault(queue, {})[nodeid] = round(seconds, 6)
        if not by_queue:
            return
        old = DurationHistory(parse_by_queue(cache.get(CACHE_KEY, None)), {})
        cache.set(CACHE_KEY, {"version": 1, "queues": old.merged(by_queue)})
