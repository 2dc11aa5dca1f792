"""jsonreport.py: outcomes, figures, summary, writing, and the shipped JSON Schema."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from pytest_celery_dispatch import jsonreport as jr
from pytest_celery_dispatch.outcome import outcome_of
from pytest_celery_dispatch.settings import mask_url

SCHEMA = json.loads(jr.SCHEMA_PATH.read_text(encoding="utf-8"))


def record(
    nodeid: str,
    outcome: str,
    queue: str | None,
    worker: str | None,
    call: float,
    setup: float = 0.0,
    teardown: float = 0.0,
) -> dict[str, Any]:
    """A hand-made JSON-report test record with phase durations and a dispatch section."""
    phase = "failed" if outcome == "failed" else "passed"
    return {
        "nodeid": nodeid,
        "lineno": 1,
        "keywords": [nodeid.rsplit("::", 1)[-1]],
        "outcome": outcome,
        "setup": {"duration": setup, "outcome": "passed"},
        "call": {"duration": call, "outcome": phase},
        "teardown": {"duration": teardown, "outcome": "passed"},
        "dispatch": {
            "queue": queue,
            "worker": worker,
            "hostname": "host-1" if queue else "controller",
            "task_id": "task-1" if queue else None,
            "attempts": 1 if queue else 0,
            "sent": 10.0 if queue else None,
            "started": 10.5 if queue else None,
            "finished": 11.0 if queue else None,
            "infrastructure_error": None,
        },
    }


def sample_tests() -> list[dict[str, Any]]:
    return [
        record("t.py::a1", "passed", "queue_a", "worker-1", call=0.8, setup=0.1, teardown=0.1),
        record("t.py::a2", "failed", "queue_a", "worker-1", call=0.5),
        record("t.py::b1", "passed", "queue_b", "worker-2", call=2.0),
        record("t.py::local", "passed", None, "local", call=0.5),
    ]


@pytest.mark.parametrize(
    ("categories", "expected"),
    [
        ({"setup": "error"}, "error"),
        ({"setup": "failed"}, "error"),
        ({"setup": "", "call": "passed", "teardown": "error"}, "error"),
        ({"setup": "", "call": "passed", "teardown": "failed"}, "error"),
        ({"setup": "", "call": "failed", "teardown": ""}, "failed"),
        ({"setup": "skipped", "teardown": ""}, "skipped"),
        ({"setup": "", "call": "xfailed", "teardown": ""}, "xfailed"),
        ({"setup": "", "call": "xpassed", "teardown": ""}, "xpassed"),
        ({"setup": "", "call": "passed", "teardown": ""}, "passed"),
        ({}, "error"),
    ],
)
def test_outcome_of(categories: dict[str, str], expected: str) -> None:
    assert outcome_of(categories) == expected


def test_dispatch_figures_per_queue_and_per_worker() -> None:
    figures = jr.dispatch_figures(
        sample_tests(), {"queue_a": 2, "queue_b": 1}, wall_time=2.0, predicted={"queue_a": 1.2}
    )
    assert figures["queues"] == {
        "queue_a": {
            "consumers": 2,
            "slots": None,
            "lanes_used": 0,
            "predicted_test_time": 1.2,  # from recorded durations
            "test_time": 0.5,  # first start (10.5) to last end (11.0)
            "tests": 2,
            "outcomes": {"passed": 1, "failed": 1},
            "total_duration": 1.5,
            "avg_duration": 0.75,
            "min_duration": 0.5,
            "max_duration": 1.0,
        },
        "queue_b": {
            "consumers": 1,
            "slots": None,
            "lanes_used": 0,
            "predicted_test_time": None,  # no history
            "test_time": 0.5,
            "tests": 1,
            "outcomes": {"passed": 1},
            "total_duration": 2.0,
            "avg_duration": 2.0,
            "min_duration": 2.0,
            "max_duration": 2.0,
        },
    }
    assert figures["workers"] == {
        "worker-1": {
            "queues": ["queue_a"],
            "hostname": "host-1",
            "slots": None,
            "lanes_used": 0,
            "tests": 2,
            "outcomes": {"passed": 1, "failed": 1},
            "busy_time": 1.5,
            "utilisation": 0.75,
        },
        "worker-2": {
            "queues": ["queue_b"],
            "hostname": "host-1",
            "slots": None,
            "lanes_used": 0,
            "tests": 1,
            "outcomes": {"passed": 1},
            "busy_time": 2.0,
            "utilisation": 1.0,
        },
    }
    # The local test counts in the run's total, not in any queue or worker.
    assert figures["wall_time"] == 2.0
    assert figures["sum_of_test_durations"] == 4.0
    assert figures["speedup"] == 2.0
    assert figures["test_total_duration"] == 4.0
    assert figures["test_avg_duration"] == 1.0
    assert figures["test_min_duration"] == 0.5
    assert figures["test_max_duration"] == 2.0


def test_dispatch_figures_without_wall_time_or_tests() -> None:
    figures = jr.dispatch_figures(sample_tests()[:1], {}, wall_time=0.0)
    assert figures["speedup"] is None
    assert figures["workers"]["worker-1"]["utilisation"] is None
    assert figures["queues"]["queue_a"]["consumers"] == 0
    empty = jr.dispatch_figures([], {}, wall_time=1.0)
    assert empty["queues"] == {}
    assert empty["workers"] == {}
    assert empty["speedup"] == 0.0
    assert empty["test_avg_duration"] is None


def _report(tests: list[dict[str, Any]], deselected: int = 0) -> dict[str, Any]:
    figures = jr.dispatch_figures(tests, {"queue_a": 2, "queue_b": 1}, wall_time=2.0)
    dispatch = {
        "report_version": jr.REPORT_VERSION,
        "run_id": "run-1",
        "broker": mask_url("amqp://user:secret@rabbit//"),
        "backend": "rpc://",
        **figures,
        "tests_dispatched": sum(1 for t in tests if t["dispatch"]["queue"]),
        "tests_local": sum(1 for t in tests if not t["dispatch"]["queue"]),
    }
    return jr.build_report(
        created=1_700_000_000.0,
        duration=2.5,
        exitcode=1,
        root="/work/project",
        collected=len(tests) + deselected,
        deselected=deselected,
        tests=tests,
        dispatch=dispatch,
    )


def test_build_report_summary_counts() -> None:
    tests = [*sample_tests(), record("t.py::e", "error", "queue_b", "worker-2", call=0.0)]
    report = _report(tests)
    assert report["summary"] == {"passed": 3, "failed": 1, "error": 1, "total": 5, "collected": 5}
    assert report["exitcode"] == 1
    assert report["tests"] is tests
    assert set(report["environment"]) == {"Python", "Platform", "Packages"}
    assert _report(tests, deselected=2)["summary"]["deselected"] == 2


def test_report_from_collected_reports_validates_against_the_shipped_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    collector = jr.TestsCollector()
    loc = ("t.py", 3, "test_fail")
    for when, outcome, longrepr, category in (
        ("setup", "passed", None, ""),
        ("call", "failed", "assert 1 == 2", "failed"),
        ("teardown", "passed", None, ""),
    ):
        collector.add(
            pytest.TestReport(
                "t.py::test_fail", loc, {"test_fail": 1}, outcome, longrepr, when, duration=0.25
            ),
            category,
        )
    collector.add(
        pytest.TestReport(
            "t.py::test_skip",
            ("t.py", 7, "test_skip"),
            {"test_skip": 1},
            "skipped",
            ("t.py", 7, "Skipped: not today"),
            "setup",
            user_properties=[("bench", object())],
        ),
        "skipped",
    )
    tests = list(collector.tests.values())
    assert [t["outcome"] for t in tests] == ["failed", "skipped"]
    tests[0]["dispatch"] = record("x", "passed", "queue_a", "worker-1", 0.0)["dispatch"]
    tests[1]["dispatch"] = jr.local_dispatch()

    report = json.loads(json.dumps(_report(tests), default=str))
    jsonschema.validate(report, SCHEMA)


def test_schema_refuses_a_report_that_leaks_the_broker_password() -> None:
    report = json.loads(json.dumps(_report(sample_tests())))
    jsonschema.validate(report, SCHEMA)
    report["dispatch"]["broker"] = "amqp://user:secret@rabbit//"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(report, SCHEMA)


def test_check_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert jr.check_writable(str(tmp_path / "report.json")) is None
    missing = tmp_path / "nope" / "report.json"
    assert jr.check_writable(str(missing)) == f"its directory {missing.parent} does not exist"
    assert jr.check_writable(str(tmp_path)) == f"{tmp_path} is a directory"
    monkeypatch.chdir(tmp_path)
    assert jr.check_writable("report.json") is None  # a bare name: the current directory


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root may write into a read-only directory: os.access returns True",
)
def test_check_writable_read_only_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert (
            jr.check_writable(str(locked / "r.json")) == f"its directory {locked} is not writable"
        )
    finally:
        locked.chmod(0o755)


def test_write_atomic_replaces_the_file_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old and not JSON")
    jr.write_atomic(str(target), {"nodeid": "t.py::ü", "path": Path("a")})
    assert json.loads(target.read_text(encoding="utf-8")) == {"nodeid": "t.py::ü", "path": "a"}
    assert os.listdir(tmp_path) == ["report.json"]


def test_write_atomic_failure_keeps_the_old_file_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text('{"old": true}')
    circular: dict[str, Any] = {}
    circular["self"] = circular
    with pytest.raises(ValueError, match="Circular"):
        jr.write_atomic(str(target), circular)
    assert target.read_text() == '{"old": true}'
    assert os.listdir(tmp_path) == ["report.json"]


@pytest.mark.parametrize(
    "data",
    [
        {"created": 1.5, "tests": [{"nodeid": "t.py::ü", "x": (1, 2)}, {"p": Path("a")}]},
        {"tests": [], "empty": {}, "nan": float("nan"), "none": None, "tuple": ("a", 3)},
        {1: "an int key", "b": [1, [2, 3]]},  # converted by json.dumps: written as it does
        {},
    ],
    ids=["report", "edges", "int-key", "empty"],
)
def test_the_report_is_written_as_json_dumps_writes_it(tmp_path: Path, data) -> None:
    target = tmp_path / "report.json"
    jr.write_atomic(str(target), data)
    expected = json.dumps(data, default=str, ensure_ascii=False) + "\n"
    assert target.read_text(encoding="utf-8") == expected


def test_a_big_report_is_never_held_whole_while_it_is_written(tmp_path: Path) -> None:
    """5,000 tests of ~900 bytes: the write allocates a small part of the text at most (the old
    write held it as a string, again with its newline, and encoded: ~3x its size)."""
    import tracemalloc

    record = {"nodeid": "w3/test_m.py::test_n[{}]", "keywords": ["x" * 40] * 20, "call": {}}
    data = {"created": 0.0, "tests": [dict(record, n=n) for n in range(5000)], "exitcode": 0}
    size = len(json.dumps(data))
    tracemalloc.start()
    try:
        jr.write_atomic(str(tmp_path / "report.json"), data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size > 4_000_000
    assert peak < size / 10, (peak, size)


def test_slots_are_configured_slots_and_lanes_used_are_counted_apart() -> None:
    # worker-1 (-c 2) serves queue_a alone and ran both its tests on one slot: 2 slots, 1 lane.
    tests = sample_tests()
    for test in tests:
        if test["dispatch"]["queue"]:
            test["dispatch"]["session"] = "run.s1" if test["nodeid"] != "t.py::b1" else "run.s2"
    figures = jr.dispatch_figures(
        tests,
        {"queue_a": 1, "queue_b": 1},
        wall_time=2.0,
        slots={"queue_a": 2, "queue_b": 1},
        worker_slots={"worker-1": 2, "worker-2": 1},
    )
    assert figures["queues"]["queue_a"]["slots"] == 2
    assert figures["queues"]["queue_a"]["lanes_used"] == 1
    assert figures["workers"]["worker-1"]["slots"] == 2
    assert figures["workers"]["worker-1"]["lanes_used"] == 1
    assert figures["workers"]["worker-2"]["slots"] == 1
    # A worker whose slots never said their concurrency: unknown, not guessed from its lanes.
    unknown = jr.dispatch_figures(tests, {}, wall_time=2.0)
    assert unknown["workers"]["worker-1"]["slots"] is None
    assert unknown["queues"]["queue_a"]["slots"] is None
