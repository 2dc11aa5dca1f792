"""The one outcome rule, on report objects and on their JSON dicts alike."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_celery_dispatch.outcome import category_of, outcome_of_reports


def phase(when: str, outcome: str, **extra: Any) -> dict[str, Any]:
    return {"when": when, "outcome": outcome, **extra}


@pytest.mark.parametrize(
    ("reports", "expected"),
    [
        (
            [phase("setup", "passed"), phase("call", "passed"), phase("teardown", "passed")],
            "passed",
        ),
        (
            [phase("setup", "passed"), phase("call", "failed"), phase("teardown", "passed")],
            "failed",
        ),
        ([phase("setup", "failed"), phase("teardown", "passed")], "error"),
        ([phase("setup", "passed"), phase("call", "passed"), phase("teardown", "failed")], "error"),
        ([phase("setup", "skipped"), phase("teardown", "passed")], "skipped"),
        (
            [
                phase("setup", "passed"),
                phase("call", "skipped", wasxfail=""),
                phase("teardown", "passed"),
            ],
            "xfailed",
        ),
        (
            [
                phase("setup", "passed"),
                phase("call", "passed", wasxfail="why"),
                phase("teardown", "passed"),
            ],
            "xpassed",
        ),
        ([], "error"),
    ],
)
def test_outcome_of_report_dicts(reports: list[dict[str, Any]], expected: str) -> None:
    assert outcome_of_reports(reports) == expected


def test_report_objects_and_dicts_agree() -> None:
    report = pytest.TestReport(
        nodeid="t.py::x",
        location=("t.py", 1, "x"),
        keywords={},
        outcome="skipped",
        longrepr=None,
        when="call",
    )
    report.wasxfail = "reason"  # type: ignore[attr-defined]
    assert category_of(report) == category_of(
        {"outcome": "skipped", "when": "call", "wasxfail": "reason"}
    )
    assert category_of(report) == "xfailed"
