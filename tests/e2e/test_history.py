"""End to end: recorded durations make the second run longest first, with an ETA (issue #15).

One queue, one private worker with two slots: 40 tests of 0.1 s collected before 3 tests of
4 s. In collection order the three long tests are the run's tail (about 10 s); the first run
records the durations in the project's pytest cache, and the second sends the long tests first
(about 8 s, the longest-first optimum on two slots).

What is asserted is the order work is sent in and the prediction made from the recorded
durations: both follow from the plugin's decisions alone. The times themselves depend on the
machine's load: they are printed here and measured in ``make bench`` (W5), never asserted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from pytest_celery_dispatch import planning
from pytest_celery_dispatch.durations import CACHE_KEY
from tests.conftest import SCHEMA
from tests.helpers import BROKER

TAIL = """
import time
import pytest

pytestmark = pytest.mark.queue("QUEUE")


@pytest.mark.parametrize("n", range(40))
def test_short(n):
    time.sleep(0.1)


@pytest.mark.parametrize("n", range(3))
def test_soak(n):
    time.sleep(4)
"""


def run(pytester: pytest.Pytester, workspace: Path, name: str) -> tuple[pytest.RunResult, dict]:
    """A dispatched run with pytest's cache on, in this project's own cache folder."""
    report = pytester.path / f"{name}.json"
    result = pytester.runpytest_subprocess(
        "--celery-dispatch",
        f"--celery-broker={BROKER}",
        f"--rootdir={workspace}",
        f"--celery-json-report={report}",
        "-o",
        f"cache_dir={pytester.path / 'cache'}",
        timeout=120,
    )
    data = json.loads(report.read_text())
    jsonschema.validate(data, SCHEMA)
    return result, data


def test_time(report: dict) -> float:
    """First test's start to last test's end, from the tests' own timestamps."""
    tests = [t["dispatch"] for t in report["tests"]]
    return max(t["finished"] for t in tests) - min(t["started"] for t in tests)


test_time.__test__ = False  # type: ignore[attr-defined]


def test_the_second_run_sends_the_long_tests_first_and_predicts_its_time(
    pytester, workspace, worker_factory
):
    worker = worker_factory(worker_id="worker-history", concurrency=2)
    pytester.makepyfile(test_tail=TAIL.replace("QUEUE", worker.queue))

    first, first_report = run(pytester, workspace, "first")
    first.assert_outcomes(passed=43)
    assert "ETA" not in first.stdout.str()  # nothing recorded yet: no prediction
    assert first_report["dispatch"]["queues"][worker.queue]["predicted_test_time"] is None

    cache = pytester.path / "cache" / "v" / CACHE_KEY
    recorded = json.loads(cache.read_text())["queues"][worker.queue]
    assert len(recorded) == 43
    # The longest-first optimum on 2 slots, from what was recorded (list scheduling of the
    # tests longest first).
    ordered = planning.longest_first(list(recorded), recorded)
    optimum = planning.predict_time([[n] for n in ordered], recorded, 2)
    soak = {n for n in recorded if "test_soak" in n}
    # No history: collection order, the long tests are sent last.
    assert set(sent_order(first_report)[-3:]) == soak

    second, second_report = run(pytester, workspace, "second")
    second.assert_outcomes(passed=43)
    assert {t["nodeid"]: t["outcome"] for t in second_report["tests"]} == {
        t["nodeid"]: t["outcome"] for t in first_report["tests"]
    }
    # Longest first: each long test goes out alone, followed by one single-test chunk (what a
    # slot fetches while its long test runs), so the three are among the first six sent.
    assert soak <= set(sent_order(second_report)[:6]), sent_order(second_report)[:8]

    # The ETA (or its revision once the slots said how many they are, when the start's inspect
    # missed one on a busy machine) is the longest-first prediction from the recorded durations.
    etas = re.findall(rf"{worker.queue}: .*ETA ([\d.]+)(ms|s)", second.stdout.str())
    assert etas, second.stdout.str()
    eta = float(etas[-1][0]) / (1000 if etas[-1][1] == "ms" else 1)
    assert abs(eta - optimum) <= 0.2 * optimum, (eta, optimum)
    queue = second_report["dispatch"]["queues"][worker.queue]
    assert queue["predicted_test_time"] == pytest.approx(eta, abs=0.01)
    history_order = test_time(second_report)
    assert queue["test_time"] == pytest.approx(history_order, abs=0.01)
    print(
        f"collection order {test_time(first_report):.2f}s, history {history_order:.2f}s, "
        f"optimum {optimum:.2f}s, ETA {eta:.2f}s"
    )


def sent_order(report: dict) -> list[str]:
    """The run's nodeids in the order their chunks were published."""
    tests = sorted(report["tests"], key=lambda t: (t["dispatch"]["sent"], t["nodeid"]))
    return [t["nodeid"] for t in tests]
