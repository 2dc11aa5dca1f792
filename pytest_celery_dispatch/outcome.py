"""One rule for a test's final outcome: the controller, the worker's logs, the JSON report.

pytest-json-report's rule: the first phase (setup, call, teardown) whose category is not
``passed`` decides; a failed setup or teardown is an ``error``. Categories are pytest's
teststatus words, so an expected failure is ``xfailed`` and an unexpected pass ``xpassed``
everywhere (terminal, JSON report, event log, worker log lines).

PYTEST_DONT_REWRITE: spare runners import it before pytest configures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

PHASES = ("setup", "call", "teardown")
#: Categories that do not decide a test's outcome (pytest-rerunfailures' ``rerun`` is followed
#: by the phase's final report).
NEUTRAL = frozenset({"", "passed", "rerun"})


def category_of(report: Any) -> str:
    """pytest's teststatus category of one phase report, a report object or its JSON dict."""
    get = report.get if isinstance(report, Mapping) else lambda k, d=None: getattr(report, k, d)
    outcome = str(get("outcome", "") or "")
    if get("wasxfail", None) is not None:
        if outcome == "skipped":
            return "xfailed"
        if outcome == "passed":
            return "xpassed"
    return outcome


def outcome_of(categories: Mapping[str, str]) -> str:
    """The final outcome from each phase's category (``{"setup": "passed", "call": ...}``)."""
    for when in PHASES:
        category = categories.get(when, "")
        if category in NEUTRAL:
            continue
        if when != "call" and category == "failed":
            return "error"
        return category
    return "passed" if categories else "error"


def outcome_of_reports(reports: Iterable[Any]) -> str:
    """The final outcome of one test from its phase reports (objects or JSON dicts)."""
    categories: dict[str, str] = {}
    for report in reports:
        when = report.get("when") if isinstance(report, Mapping) else report.when
        categories[str(when)] = category_of(report)
    return outcome_of(categories)
