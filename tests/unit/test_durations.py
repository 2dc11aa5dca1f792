"""durations.py: recorded test durations (pytest's cache, pytest-split's file) and lookups."""

from __future__ import annotations

import json

import pytest

from pytest_celery_dispatch import durations as du


def test_pytest_splits_file_in_both_of_its_formats() -> None:
    assert du.parse_split('{"t.py::a": 1.5, "t.py::b": 0}') == {"t.py::a": 1.5, "t.py::b": 0.0}
    assert du.parse_split('[["t.py::a", 2], ["t.py::b", 0.25]]') == {
        "t.py::a": 2.0,
        "t.py::b": 0.25,
    }
    # Anything else is no history, not an error.
    assert du.parse_split("not json") == {}
    assert du.parse_split('{"t.py::a": "slow", "t.py::b": -1, "t.py::c": true}') == {}
    assert du.parse_split('[["t.py::a"], 3, "x"]') == {}


def test_a_damaged_cache_entry_is_no_history() -> None:
    assert du.parse_by_queue(None) == {}
    assert du.parse_by_queue({"queues": []}) == {}
    assert du.parse_by_queue({"queues": {"q": {"a": 1, "b": "x"}, "r": 5}}) == {"q": {"a": 1.0}}


def test_a_test_is_looked_up_in_its_queue_then_any_queue_then_pytest_split() -> None:
    history = du.DurationHistory(
        {"bench_a": {"t::x": 1.0}, "bench_b": {"t::x": 9.0, "t::y": 2.0}},
        {"t::x": 50.0, "t::y": 50.0, "t::z": 3.0},
    )
    assert history.lookup("bench_a", "t::x") == 1.0  # its own queue
    assert history.lookup("bench_a", "t::y") == 2.0  # another queue knows it
    assert history.lookup("bench_a", "t::z") == 3.0  # pytest-split's file
    assert history.lookup("bench_a", "t::new") is None


def test_unknown_tests_get_the_median_and_nothing_known_is_no_plan() -> None:
    history = du.DurationHistory({"q": {"a": 1.0, "b": 2.0, "c": 10.0}}, {})
    assert history.estimates("q", ["a", "b", "c", "new"]) == {
        "a": 1.0,
        "b": 2.0,
        "c": 10.0,
        "new": 2.0,
    }
    assert history.estimates("q", ["new", "other"]) is None


def test_a_run_replaces_what_it_measured_and_forgets_nothing_else() -> None:
    history = du.DurationHistory({"q": {"a": 1.0, "b": 2.0}}, {"a": 7.0})
    assert history.merged({"q": {"a": 3.0}, du.LOCAL: {"c": 0.5}}) == {
        "q": {"a": 3.0, "b": 2.0},
        du.LOCAL: {"c": 0.5},
    }


PROJECT = """
import time

def test_fast():
    pass

def test_slow():
    time.sleep(0.3)
"""


def recorded(pytester: pytest.Pytester) -> dict:
    path = pytester.path / ".pytest_cache" / "v" / "celery-dispatch" / "durations"
    return json.loads(path.read_text()) if path.exists() else {}


def test_a_plain_run_records_each_tests_setup_call_and_teardown(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import time, pytest

        @pytest.fixture
        def slow_setup():
            time.sleep(0.2)
            yield
            time.sleep(0.2)
        """
    )
    pytester.makepyfile(PROJECT + "\n\ndef test_fixture(slow_setup):\n    pass\n")
    pytester.runpytest_subprocess().assert_outcomes(passed=3)
    local = recorded(pytester)["queues"][du.LOCAL]
    assert set(local) == {
        "test_a_plain_run_records_each_tests_setup_call_and_teardown.py::" + name
        for name in ("test_fast", "test_slow", "test_fixture")
    }
    by_name = {n.split("::")[1]: s for n, s in local.items()}
    assert by_name["test_fast"] < 0.2
    assert 0.3 <= by_name["test_slow"] < 1.0
    assert 0.4 <= by_name["test_fixture"] < 1.0  # setup and teardown count


def test_without_the_cacheprovider_nothing_is_recorded_or_read(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(PROJECT)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert not (pytester.path / ".pytest_cache").exists()
    output = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in output
    assert "warning" not in output


def test_nothing_is_read_without_the_cacheprovider() -> None:
    class Config:  # what -p no:cacheprovider leaves: no config.cache
        rootpath = "."

    assert du.load(Config()) is None  # type: ignore[arg-type]
    assert du.queue_estimates(Config(), {"q": ["a"]}) == {}  # type: ignore[arg-type]


def test_the_cache_and_pytest_splits_file_feed_the_estimates(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(PROJECT)
    (pytester.path / ".test_durations").write_text('{"x.py::from_split": 4.0}')
    pytester.runpytest_subprocess().assert_outcomes(passed=2)
    config = pytester.parseconfigure()
    fast, slow = (
        f"test_the_cache_and_pytest_splits_file_feed_the_estimates.py::{n}"
        for n in ("test_fast", "test_slow")
    )
    estimates = du.queue_estimates(config, {"bench": [fast, slow, "x.py::from_split", "new"]})
    est = estimates["bench"]
    assert est["x.py::from_split"] == 4.0
    assert est[slow] > est[fast]
    assert est["new"] == sorted([est[fast], est[slow], 4.0])[1]  # the median
