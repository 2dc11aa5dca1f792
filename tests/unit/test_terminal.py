"""terminal.py: the "celery dispatch" summary from a report dict."""

from __future__ import annotations

from typing import Any

from pytest_celery_dispatch import jsonreport as jr
from pytest_celery_dispatch.terminal import (
    DETAIL_LIMIT,
    DispatchTerminal,
    fmt_seconds,
    summary_lines,
)

SECTIONS = [
    "Execution results",
    "Detailed results",
    "Performance metrics",
    "Per queue",
    "Per worker",
]


def rec(nodeid: str, outcome: str, queue: str | None, worker: str, call: float) -> dict[str, Any]:
    return {
        "nodeid": nodeid,
        "outcome": outcome,
        "call": {"duration": call, "outcome": "failed" if outcome == "failed" else "passed"},
        "dispatch": {"queue": queue, "worker": worker, "attempts": 1 if queue else 0},
    }


def make_report(tests: list[dict[str, Any]], wall_time: float = 2.0) -> dict[str, Any]:
    dispatch = {
        **jr.dispatch_figures(tests, {"queue_a": 1, "queue_b": 2}, wall_time),
        "tests_local": sum(1 for t in tests if not t["dispatch"]["queue"]),
    }
    return {"tests": tests, "dispatch": dispatch}


def small_report() -> dict[str, Any]:
    return make_report(
        [
            rec("t.py::test_fast", "passed", "queue_a", "worker-a", 0.25),
            rec("t.py::test_bad", "failed", "queue_b", "worker-b", 1.5),
            rec("t.py::test_here", "passed", None, "local", 0.25),
        ]
    )


def texts(lines: list[tuple[str, dict[str, bool]]]) -> list[str]:
    return [text for text, _ in lines]


def test_summary_has_every_section_in_order_with_the_figures() -> None:
    lines = summary_lines(small_report())
    out = texts(lines)
    assert [t for t in out if t in SECTIONS] == SECTIONS
    joined = "\n".join(out)
    assert "2 dispatched, 1 local: 1 failed, 1 passed" in joined
    assert "wall time 2.00s, sum of test durations 2.00s, speed-up 1.00x" in joined
    assert "fastest 250ms (t.py::test_fast), slowest 1.50s (t.py::test_bad)" in joined
    assert "t.py::test_here" not in joined  # local tests are not in the dispatched tables
    # Per-queue and per-worker rows.
    assert any(t.split()[:3] == ["queue_b", "2", "1"] for t in out)
    assert any(t.split()[:3] == ["worker-b", "queue_b", "1"] and t.endswith("75%") for t in out)
    # A failed run's headline is red, and so is the failed test's row.
    markup = dict(lines)
    assert markup[out[1]] == {"red": True}
    bad_row = next(t for t in out if t.lstrip().startswith("t.py::test_bad"))
    assert markup[bad_row] == {"red": True}


def test_per_test_table_is_hidden_above_the_limit_unless_verbose() -> None:
    many = make_report(
        [
            rec(f"t.py::test_{i}", "passed", "queue_a", "worker-a", 0.01)
            for i in range(DETAIL_LIMIT + 1)
        ]
    )
    quiet = texts(summary_lines(many))
    assert "Detailed results" not in quiet
    assert f"  ({DETAIL_LIMIT + 1} tests: per-test table with -v)" in quiet
    assert not any("t.py::test_3 " in t for t in quiet)
    verbose = texts(summary_lines(many, verbose=1))
    assert "Detailed results" in verbose
    assert any(t.lstrip().startswith("t.py::test_3 ") for t in verbose)

    at_limit = make_report(many["tests"][:DETAIL_LIMIT])
    assert "Detailed results" in texts(summary_lines(at_limit))


def test_nothing_dispatched() -> None:
    report = make_report([rec("t.py::x", "passed", None, "local", 0.1)])
    assert texts(summary_lines(report)) == [
        "no test was dispatched (no queue marker, no default queue)"
    ]


def test_fmt_seconds() -> None:
    assert fmt_seconds(None) == "-"
    assert fmt_seconds(0) == "0ms"
    assert fmt_seconds(0.25) == "250ms"
    assert fmt_seconds(1) == "1.00s"
    assert fmt_seconds(12.345) == "12.35s"


def test_a_collect_only_run_says_so_instead_of_nothing_dispatched() -> None:
    report = make_report([])
    report["dispatch"]["collect_only"] = True
    assert texts(summary_lines(report)) == [
        "nothing was sent: a collect-only run (--co); the plan is above"
    ]


def test_the_header_shows_the_eta_and_the_status_the_time_left() -> None:
    from types import SimpleNamespace

    from pytest_celery_dispatch.scheduling import ChunkState
    from pytest_celery_dispatch.terminal import time_left

    chunk = ChunkState("run.1", "queue_a", ["soak", "short"], sent_at=1.0, started_at=1.0)
    chunk.current_since = 100.0
    sch = SimpleNamespace(
        estimates={"queue_a": {"soak": 4.0, "short": 1.0, "done": 3.0}},
        queue_nodeids={"queue_a": ["soak", "short", "done"], "queue_b": ["x"]},
        capacity={"queue_a": 2},
        consumers={"queue_a": 1},
        live_chunks=lambda queue: [chunk],
    )
    # "soak" has run 1 s of its 4 s: 3 s left, more than the spread (4 s / 2 slots).
    assert time_left(sch, "queue_a", {"done"}, now=101.0) == 3.0  # type: ignore[arg-type]
    assert time_left(sch, "queue_b", set(), now=101.0) is None  # type: ignore[arg-type]
    lines: list[str] = []
    terminal = DispatchTerminal.__new__(DispatchTerminal)
    terminal.write_line = lambda line, **markup: lines.append(line)  # type: ignore[method-assign]
    header = SimpleNamespace(
        consumers={"queue_a": 1, "queue_b": 1},
        capacity={"queue_a": 2},
        queue_nodeids={"queue_a": ["soak", "short"], "queue_b": ["x"]},
        guesses={},
        predicted={"queue_a": 8.04},
    )
    terminal.write_header(header, {"queue_a": ["w1"]}, 10.0)  # type: ignore[arg-type]
    assert lines == [
        "celery-dispatch workers: queue_a: 1 worker (w1), 2 slots, 2 tests, ETA 8.04s; "
        "queue_b: 1 worker, 1 slot, 1 test"
    ]
