"""The dispatcher's report of a run: live lines, the original's sections, the JSON record."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from pytest_celery_dispatch import taskrun
from pytest_celery_dispatch.jsonreport import TestsCollector
from pytest_celery_dispatch.taskrun import TaskResult

SCHEMA = json.loads(
    (Path(taskrun.__file__).parent / "report.schema.json").read_text(encoding="utf-8")
)


def result(tag: str, took: float, sent: float, received: float, **kw) -> TaskResult:
    value = {
        "message": f"Hello from Task {tag.upper()}",
        "worker": f"worker-{tag}",
        "queue": f"queue_{tag}",
        "task_id": f"id-{tag}",
        "execution_time": took,
        "timestamp": "2026-11-30T01:40:47.793697+00:00",
    }
    return TaskResult(
        f"pytest_celery_dispatch.task_{tag}", f"queue_{tag}", f"id-{tag}", value, sent, received,
        started_seen_at=sent + 0.01, started_on=f"worker-{tag}@host", **kw,
    )  # fmt: skip


def test_result_has_the_original_detailed_fields():
    res = result("a", 0.503, 100.0, 100.52)
    assert (res.message, res.worker, res.execution_time) == ("Hello from Task A", "worker-a", 0.503)
    assert res.timestamp.startswith("2026-11-30T")
    assert res.round_trip == pytest.approx(0.52)
    assert res.ok


def test_record_total_overhead_and_metrics():
    a, b = result("a", 0.503, 100.0, 100.515), result("b", 0.695, 100.001, 100.712)
    record = taskrun.run_record([a, b], 100.0, 100.712)
    assert record["total_time"] == pytest.approx(0.712)
    assert record["overhead"] == pytest.approx(0.017)
    assert (record["successes"], record["failures"]) == (2, 0)
    assert record["metrics"] == {
        "average": pytest.approx(0.599),
        "fastest": 0.503,
        "fastest_task": "task_a",
        "slowest": 0.695,
        "slowest_task": "task_b",
    }
    assert [t["worker"] for t in record["tasks"]] == ["worker-a", "worker-b"]


def test_a_failed_task_counts_as_a_failure_with_its_error():
    bad = TaskResult("x.task_c", "queue_c", "id-c", None, 1.0, 2.0, state="FAILURE",
                     error="ValueError: boom")  # fmt: skip
    record = taskrun.run_record([result("a", 0.5, 1.0, 1.6), bad], 1.0, 2.0)
    assert (record["successes"], record["failures"]) == (1, 1)
    assert "FAILURE  task_c: ValueError: boom" in taskrun.finished_line(bad)
    assert any("ValueError: boom" in line for line in taskrun.section_lines(record))


def test_sections_and_lines():
    a, b = result("a", 0.503, 100.0, 100.515), result("b", 0.695, 100.001, 100.712)
    lines = taskrun.section_lines(taskrun.run_record([a, b], 100.0, 100.712), "/r.json")
    text = "\n".join(lines)
    for heading in ("Execution results", "Detailed results", "Performance metrics"):
        assert heading in lines
    assert "total time 0.712s: 2 succeeded, 0 failed" in text
    assert "average 0.599s, fastest 0.503s (task_a), slowest 0.695s (task_b)" in text
    assert "slowest task + 17ms" in text
    assert "Results saved to: /r.json" in text
    assert "SUCCESS  task_a from worker-a via queue_a: Completed in 0.503s" in (
        taskrun.finished_line(a)
    )
    assert "SENT     task_b -> queue_b (task id-b)" in taskrun.sent_line(
        1.0, b.name, "queue_b", "id-b"
    )
    assert "STARTED  task_a on worker-a@h" in taskrun.started_line(
        1.0, a.name, "id-a", "worker-a@h"
    )


def test_the_json_report_gets_the_record_as_the_tests_dispatcher_section():
    record = taskrun.run_record([result("a", 0.5, 1.0, 1.6)], 1.0, 1.6)
    report = pytest.TestReport(
        "t.py::test_x", ("t.py", 1, "test_x"), {}, "passed", None, "call",
        user_properties=[(taskrun.PROPERTY, record), ("other", 1)],
    )  # fmt: skip
    collector = TestsCollector()
    collector.add(report, "passed")
    test = collector.tests["t.py::test_x"]
    assert test["dispatcher"] == [record]
    assert test["user_properties"] == [{"other": 1}]
    test["dispatch"] = {
        "queue": None, "worker": "local", "task_id": None, "attempts": 0,
        "sent": None, "started": None, "finished": None,
    }  # fmt: skip
    jsonschema.validate(test, {**SCHEMA["$defs"]["test"], "$defs": SCHEMA["$defs"]})
