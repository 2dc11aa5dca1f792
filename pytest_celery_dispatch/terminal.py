"""What the controller writes to the terminal.

:class:`DispatchTerminal` (registered as a plugin, like xdist's ``TerminalDistReporter``): the
plan of ``--collect-only``, the workers header, notices, "waiting" status lines, ``-s`` output of
remote tests and the ``[worker/queue]`` tags of ``-v`` lines. :func:`summary_lines` formats the
"celery dispatch" summary from the JSON report's data (pure).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest

from .jsonreport import test_duration
from .planning import LOAD, plan_groups, remaining_time
from .scheduling import QueueScheduler

Line = tuple[str, dict[str, bool]]

#: With nothing reported for this long, a status line says what each queue is doing.
STATUS_EVERY = 5.0
#: The summary of a ``--collect-only`` run, and of a run whose tests all ran locally.
COLLECT_ONLY_SUMMARY = "nothing was sent: a collect-only run (--co); the plan is above"
NOTHING_DISPATCHED = "no test was dispatched (no queue marker, no default queue)"
#: Above this many dispatched tests the per-test table is shown only with -v.
DETAIL_LIMIT = 50

_OUTCOME_MARKUP = {
    "passed": {"green": True},
    "failed": {"red": True},
    "error": {"red": True},
    "skipped": {"yellow": True},
    "xfailed": {"yellow": True},
    "xpassed": {"yellow": True},
}


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    return f"{value:.2f}s"


def _counts(outcomes: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in sorted(outcomes.items())) or "none"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip()
        for row in rows
    ]


def summary_lines(report: Mapping[str, Any], verbose: int = 0) -> list[Line]:
    """The sections of the original demo's report: execution results, detailed results,
    performance metrics; then per queue and per worker."""
    dispatch = report["dispatch"]
    tests = report["tests"]
    remote = [t for t in tests if t["dispatch"]["queue"]]
    lines: list[Line] = []
    if dispatch.get("collect_only"):
        lines.append((COLLECT_ONLY_SUMMARY, {}))
        return lines
    if not remote:
        lines.append((NOTHING_DISPATCHED, {}))
        return lines

    outcomes: dict[str, int] = {}
    for test in remote:
        outcomes[test["outcome"]] = outcomes.get(test["outcome"], 0) + 1
    bad = outcomes.get("failed", 0) + outcomes.get("error", 0)
    lines.append(("Execution results", {"bold": True}))
    lines.append(
        (
            f"  {len(remote)} dispatched, {dispatch['tests_local']} local: {_counts(outcomes)}",
            {"red": True} if bad else {"green": True},
        )
    )

    if len(remote) <= DETAIL_LIMIT or verbose > 0:
        lines.append(("Detailed results", {"bold": True}))
        rows = [["test", "outcome", "worker", "queue", "duration", "attempts"]]
        for test in remote:
            info = test["dispatch"]
            rows.append(
                [
                    test["nodeid"],
                    test["outcome"],
                    str(info.get("worker") or "-"),
                    str(info.get("queue")),
                    fmt_seconds(test_duration(test)),
                    str(info.get("attempts") or 1),
                ]
            )
        table = _table(rows)
        lines.append((table[0], {"bold": True}))
        for test, text in zip(remote, table[1:], strict=False):
            lines.append((text, _OUTCOME_MARKUP.get(test["outcome"], {})))
    else:
        lines.append((f"  ({len(remote)} tests: per-test table with -v)", {}))

    lines.append(("Performance metrics", {"bold": True}))
    speedup = dispatch.get("speedup")
    lines.append(
        (
            f"  wall time {fmt_seconds(dispatch['wall_time'])}, sum of test durations "
            f"{fmt_seconds(dispatch['sum_of_test_durations'])}, speed-up "
            f"{f'{speedup:.2f}' if speedup is not None else '-'}x",
            {},
        )
    )
    durations = sorted((test_duration(t), t["nodeid"]) for t in remote)
    lines.append(
        (
            f"  per dispatched test: average "
            f"{fmt_seconds(sum(d for d, _ in durations) / len(durations))}, fastest "
            f"{fmt_seconds(durations[0][0])} ({durations[0][1]}), slowest "
            f"{fmt_seconds(durations[-1][0])} ({durations[-1][1]})",
            {},
        )
    )

    lines.extend(_per_queue_and_worker(dispatch))
    return lines


def _per_queue_and_worker(dispatch: Mapping[str, Any]) -> list[Line]:
    """The "Per queue" and "Per worker" tables of the summary."""
    lines: list[Line] = []
    lines.append(("Per queue", {"bold": True}))
    rows = [["queue", "workers", "tests", "outcomes", "total", "avg", "min", "max"]]
    for name, q in dispatch["queues"].items():
        rows.append(
            [
                name,
                str(q["consumers"]),
                str(q["tests"]),
                _counts(q["outcomes"]),
                fmt_seconds(q["total_duration"]),
                fmt_seconds(q["avg_duration"]),
                fmt_seconds(q["min_duration"]),
                fmt_seconds(q["max_duration"]),
            ]
        )
    lines.extend((text, {}) for text in _table(rows))

    lines.append(("Per worker", {"bold": True}))
    rows = [["worker", "queues", "tests", "outcomes", "busy", "utilisation"]]
    for name, w in dispatch["workers"].items():
        util = w.get("utilisation")
        rows.append(
            [
                name,
                ",".join(w["queues"]),
                str(w["tests"]),
                _counts(w["outcomes"]),
                fmt_seconds(w["busy_time"]),
                f"{util * 100:.0f}%" if util is not None else "-",
            ]
        )
    lines.extend((text, {}) for text in _table(rows))
    return lines


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _guess(queue_name: str, guesses: Mapping[str, str] | None) -> str:
    """`` (no worker; did you mean queue_a?)`` for a queue without consumer, else nothing."""
    guess = (guesses or {}).get(queue_name)
    return f" (no worker; did you mean {guess}?)" if guess else ""


def time_left(
    sch: QueueScheduler, queue_name: str, finalized: set[str], now: float
) -> float | None:
    """The estimated time left for a queue from its recorded durations (None without): the
    unfinished tests' estimates, a running test's less the time it has run, on the queue's
    slots (:func:`.planning.remaining_time`)."""
    estimates = sch.estimates.get(queue_name)
    if estimates is None:
        return None
    ran: dict[str, float] = {}  # the running test of each started chunk -> seconds so far
    for chunk in sch.live_chunks(queue_name):
        current = [n for n in chunk.remaining if n not in finalized][:1]
        if chunk.current_since is not None and current:
            ran[current[0]] = max(0.0, now - chunk.current_since)
    left = [
        max(0.0, estimates.get(n, 0.0) - ran.get(n, 0.0))
        for n in sch.queue_nodeids.get(queue_name, [])
        if n not in finalized
    ]
    slots = sch.capacity.get(queue_name) or sch.consumers.get(queue_name) or 1
    return remaining_time(left, slots)


def fresh_line(config: pytest.Config) -> Any:
    """The terminal reporter with its cursor at the start of a line (None without one).

    pytest's ``ensure_newline()`` only ends a line it knows it began (a test file's progress
    line); after a line of ours written while a test ran (the ``dispatcher``'s live lines), the
    test's letter goes to the start of the next line, and it knows nothing of that one: the
    writer's column says it.
    """
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        if config.get_terminal_writer().width_of_current_line:
            reporter.write("\n")
    return reporter


class DispatchTerminal:
    """The controller's lines in pytest's terminal."""

    def __init__(self, config: pytest.Config, tag: Callable[[str], str | None]) -> None:
        self.config = config
        self.tag = tag  # nodeid -> "worker/queue" once the test is replayed, else None
        self._partial_output: dict[str, str] = {}
        self._last_status = time.monotonic()

    def write_line(self, line: str, **markup: bool) -> None:
        if (reporter := fresh_line(self.config)) is not None:
            reporter.write_line(line, **markup)

    def notice(self, text: str, color: str = "yellow") -> None:
        self.write_line(f"celery-dispatch: {text}", **{color: True})

    @pytest.hookimpl(wrapper=True)
    def pytest_report_teststatus(
        self, report: pytest.TestReport | pytest.CollectReport, config: pytest.Config
    ) -> Any:
        result = yield
        if result and config.get_verbosity() > 0 and isinstance(report, pytest.TestReport):
            tag = self.tag(report.nodeid)
            category, letter, word = result
            if tag and word:
                if isinstance(word, tuple):
                    word = (f"{word[0]} [{tag}]", word[1])
                else:
                    word = f"{word} [{tag}]"
                return category, letter, word
        return result

    def write_plan(
        self,
        routes: Iterable[tuple[str, str | None, str, str | None]],
        dist: str = LOAD,
        group_of: Mapping[str, str | None] | None = None,
    ) -> None:
        """--collect-only: where each test would run, from (nodeid, queue, source, error);
        with a grouping ``--celery-dist``, each queue's groups in the order they are sent."""
        plan: dict[str, list[tuple[str, str]]] = {}
        errors: list[str] = []
        for nodeid, queue, source, error in routes:
            if error is not None:
                errors.append(f"    {nodeid}: {error}")
            else:
                plan.setdefault(queue or "local (controller)", []).append((nodeid, source))
        self.write_line("celery-dispatch plan (--collect-only: nothing is sent)", bold=True)
        for queue_name in sorted(plan, key=lambda q: (q.startswith("local"), q)):
            tests = plan[queue_name]
            source_of = dict(tests)
            groups: list[tuple[str, list[str]]] = []
            free = [nodeid for nodeid, _ in tests]
            if not queue_name.startswith("local"):
                groups, free = plan_groups(free, dist, group_of or {})
            header = f"  {queue_name}: {_plural(len(tests), 'test')}"
            if groups:
                header += f" in {_plural(len(groups), 'group')} (--celery-dist {dist})"
            self.write_line(header)
            for key, nodeids in groups:
                self.write_line(f"    group {key}: {_plural(len(nodeids), 'test')}, one slot")
                for nodeid in nodeids:
                    self.write_line(f"      {nodeid}  [{source_of[nodeid]}]")
            if groups and free:
                self.write_line(f"    not grouped: {_plural(len(free), 'test')}, shared as load")
            indent = "      " if groups else "    "
            for nodeid in free:
                self.write_line(f"{indent}{nodeid}  [{source_of[nodeid]}]")
        if errors:
            self.write_line(f"  invalid routing: {len(errors)} test(s)", red=True)
            for line in errors:
                self.write_line(line, red=True)

    def write_header(
        self, sch: QueueScheduler, workers_by_queue: Mapping[str, list[str]], wait_workers: float
    ) -> None:
        """Per queue: its workers and slots, or how long the run waits for one."""
        consumers, capacity, queue_nodeids, guesses = (
            sch.consumers, sch.capacity, sch.queue_nodeids, sch.guesses
        )  # fmt: skip
        parts = []
        for queue_name in sorted(consumers):
            count = consumers[queue_name]
            names = workers_by_queue.get(queue_name) or []
            shown = f" ({', '.join(names)})" if names else ""
            tests = _plural(len(queue_nodeids.get(queue_name, [])), "test")
            if count:
                slots = capacity.get(queue_name, count)
                predicted = sch.predicted.get(queue_name)
                eta = f", ETA {fmt_seconds(predicted)}" if predicted is not None else ""
                parts.append(
                    f"{queue_name}: {_plural(count, 'worker')}{shown}, "
                    f"{_plural(slots, 'slot')}, {tests}{eta}"
                )
            else:
                guess = (guesses or {}).get(queue_name)
                parts.append(
                    f"{queue_name}: no worker yet, waiting up to {wait_workers:g}s for {tests}"
                    + (f" (did you mean {guess}?)" if guess else "")
                )
        self.write_line("celery-dispatch workers: " + "; ".join(parts), cyan=True)

    def write_status(
        self, now: float, last_activity: float, finalized: set[str], sch: QueueScheduler
    ) -> None:
        """While slow benches keep everyone waiting: queued / running / done per queue."""
        if now - last_activity < STATUS_EVERY or now - self._last_status < STATUS_EVERY:
            return
        self._last_status = now
        queue_nodeids, running = sch.queue_nodeids, sch.running
        guesses = {q: g for q, g in sch.guesses.items() if q in sch.waiting_queues}
        parts = []
        for queue_name in sorted(queue_nodeids):
            nodeids = queue_nodeids[queue_name]
            done = sum(1 for n in nodeids if n in finalized)
            busy = sum(1 for n in nodeids if n in running and n not in finalized)
            left = time_left(sch, queue_name, finalized, now)
            parts.append(
                f"{queue_name} {len(nodeids) - done - busy} queued, {busy} running, {done} done"
                + (f", ~{fmt_seconds(left)} left" if left is not None else "")
                + _guess(queue_name, guesses)
            )
        if parts:
            self.write_line("celery-dispatch waiting: " + "; ".join(parts), cyan=True)

    def write_output(self, slot_id: str, worker: object, data: str) -> None:
        """-s: what a dispatched test prints, shown as it arrives, each line tagged."""
        text = self._partial_output.pop(slot_id, "") + data
        *lines, rest = text.split("\n")
        if rest:
            self._partial_output[slot_id] = rest
        if not lines or (reporter := fresh_line(self.config)) is None:
            return
        for line in lines:
            reporter.write_line(f"[{worker}] {line}", cyan=True)

    def end_output(self, slot_id: str, worker: object) -> None:
        """A slot ended: its last line without a newline is shown too."""
        if slot_id in self._partial_output:
            self.write_output(slot_id, worker, "\n")
