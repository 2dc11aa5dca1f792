"""The ``dispatcher`` fixture's report of one run of tasks, as the original demo printed it.

Pure formatting and figures (no Celery, no pytest): the live line per task state (``SENT``,
``PENDING``, ``STARTED``, ``SUCCESS`` / ``FAILURE``, each with its time and task id), the sections
after the run (execution results, detailed results, performance metrics) and the record the JSON
report keeps per test (``tests[].dispatcher``, see docs/report.md).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

#: The ``user_properties`` key under which a test's dispatcher runs travel to the JSON report
#: (a dispatched test's properties come home with its reports).
PROPERTY = "celery_dispatcher"


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """One finished task as seen by the dispatcher: its return value, state and timing.

    ``message``, ``worker``, ``queue``, ``task_id``, ``execution_time`` and ``timestamp`` are
    the original demo's detailed results (read from what the task returned when it returned a
    dict); ``sent_at`` / ``started_seen_at`` / ``received_at`` are this machine's clock.
    """

    name: str
    queue: str | None
    task_id: str
    result: Any
    sent_at: float
    received_at: float
    state: str = "SUCCESS"
    started_seen_at: float | None = None
    started_on: str | None = None  # the worker's host name from the STARTED state
    error: str | None = None

    @property
    def round_trip(self) -> float:
        return self.received_at - self.sent_at

    @property
    def ok(self) -> bool:
        return self.state == "SUCCESS"

    def _field(self, key: str) -> Any:
        return self.result.get(key) if isinstance(self.result, dict) else None

    @property
    def message(self) -> str | None:
        value = self._field("message")
        return None if value is None else str(value)

    @property
    def worker(self) -> str | None:
        value = self._field("worker") or self.started_on
        return None if value is None else str(value)

    @property
    def execution_time(self) -> float | None:
        value = self._field("execution_time")
        return float(value) if isinstance(value, int | float) else None

    @property
    def timestamp(self) -> str | None:
        value = self._field("timestamp")
        return None if value is None else str(value)

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def clock(ts: float) -> str:
    """``HH:MM:SS.mmm`` in local time, as the original's live lines."""
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def sent_line(ts: float, name: str, queue: str | None, task_id: str) -> str:
    return f"[{clock(ts)}] SENT     {short(name)} -> {queue or 'default queue'} (task {task_id})"


def pending_line(ts: float, name: str, task_id: str) -> str:
    return f"[{clock(ts)}] PENDING  {short(name)} task {task_id}"


def started_line(ts: float, name: str, task_id: str, hostname: str | None) -> str:
    where = f" on {hostname}" if hostname else ""
    return f"[{clock(ts)}] STARTED  {short(name)}{where} (task {task_id})"


def finished_line(res: TaskResult) -> str:
    if res.ok:
        took = f"Completed in {res.execution_time:.3f}s" if res.execution_time is not None else ""
        who = f" from {res.worker} via {res._field('queue') or res.queue}" if res.worker else ""
        return (
            f"[{clock(res.received_at)}] SUCCESS  {res.short_name}{who}: {took or 'done'} "
            f"(round trip {res.round_trip:.3f}s, task {res.task_id})"
        )
    return (
        f"[{clock(res.received_at)}] {res.state:<8} {res.short_name}: {res.error} "
        f"(task {res.task_id})"
    )


def _task_record(res: TaskResult) -> dict[str, Any]:
    return {
        "name": res.name,
        "queue": res._field("queue") or res.queue,
        "task_id": res.task_id,
        "state": res.state,
        "message": res.message,
        "worker": res.worker,
        "hostname": res._field("hostname") or res.started_on,
        "execution_time": res.execution_time,
        "timestamp": res.timestamp,
        "sent": res.sent_at,
        "started": res.started_seen_at,
        "received": res.received_at,
        "round_trip": round(res.round_trip, 6),
        "error": res.error,
    }


def run_record(results: Sequence[TaskResult], began: float, ended: float) -> dict[str, Any]:
    """One ``gather``: total time (first send to last result), successes and failures, each
    task's details, and average / fastest / slowest execution time. ``overhead`` is the total
    minus the slowest task's own execution time: what the run cost beyond its longest task."""
    timed = [(r.execution_time, r.short_name) for r in results if r.execution_time is not None]
    metrics: dict[str, Any] = {"average": None, "fastest": None, "slowest": None}
    if timed:
        fastest, slowest = min(timed), max(timed)
        metrics = {
            "average": round(sum(t for t, _ in timed) / len(timed), 6),
            "fastest": fastest[0],
            "fastest_task": fastest[1],
            "slowest": slowest[0],
            "slowest_task": slowest[1],
        }
    total = ended - began
    return {
        "total_time": round(total, 6),
        "sent": began,
        "finished": ended,
        "successes": sum(1 for r in results if r.ok),
        "failures": sum(1 for r in results if not r.ok),
        "overhead": round(total - metrics["slowest"], 6) if timed else None,
        "metrics": metrics,
        "tasks": [_task_record(r) for r in results],
    }


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]  # fmt: skip


def section_lines(record: dict[str, Any], saved_to: str | None = None) -> list[str]:
    """The original demo's sections for one run, from :func:`run_record`."""
    lines = ["Execution results"]
    lines.append(
        f"  total time {record['total_time']:.3f}s: {record['successes']} succeeded, "
        f"{record['failures']} failed"
    )
    lines.append("Detailed results")
    rows = [["task", "message", "worker", "queue", "task id", "execution time", "timestamp"]]
    for task in record["tasks"]:
        took = task["execution_time"]
        rows.append(
            [
                short(task["name"]),
                str(task["message"] if task["state"] == "SUCCESS" else task["error"]),
                str(task["worker"] or "-"),
                str(task["queue"] or "-"),
                task["task_id"],
                f"{took:.3f}s" if took is not None else "-",
                str(task["timestamp"] or "-"),
            ]
        )
    lines.extend(_table(rows))
    lines.append("Performance metrics")
    m = record["metrics"]
    if m["average"] is not None:
        lines.append(
            f"  average {m['average']:.3f}s, fastest {m['fastest']:.3f}s ({m['fastest_task']}), "
            f"slowest {m['slowest']:.3f}s ({m['slowest_task']})"
        )
        lines.append(
            f"  total time {record['total_time']:.3f}s = slowest task + "
            f"{record['overhead'] * 1000:.0f}ms"
        )
    else:
        lines.append("  no execution times (the tasks returned none)")
    if saved_to:
        lines.append(f"Results saved to: {saved_to} (the run's JSON report, written at its end)")
    return lines
