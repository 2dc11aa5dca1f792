"""The "celery dispatch" terminal summary, formatted from the JSON report's data (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .jsonreport import test_duration

Line = tuple[str, dict[str, bool]]

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
    if not remote:
        lines.append(("no test was dispatched (no queue marker, no default queue)", {}))
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
