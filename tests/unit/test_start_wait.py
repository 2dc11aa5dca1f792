"""A runner that hangs before its first test (a conftest.py that blocks at import, in
``pytest_configure`` or in collection): the slot kills it once it is past ``start_wait_limit``
and fails what it holds, once each, as it does for a runner that dies before its first test
(fake runners and a fake clock)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from pytest_celery_dispatch.driver import (
    START_WAIT_MIN,
    fork_wait_limit,
    start_hang,
    start_wait_limit,
)
from pytest_celery_dispatch.serialization import HEARTBEAT_INTERVAL
from tests.unit.test_driver import Slot
from tests.unit.test_fork_wait import IDS, ForkSlot

#: One loop turn of the driver with nothing to read (the fake clock moves on by it).
TURN = 0.25


def assert_each_crashed_once(slot: Slot, why: str) -> list[dict[str, Any]]:
    crashes = slot.of("crashed")
    assert sorted(c["nodeid"] for c in crashes) == IDS  # each test once, by name
    assert {c["reason"] for c in crashes} == {why}
    for crash in crashes:
        assert crash["message"].startswith(f"{crash['nodeid']}: {why}")
    assert slot.results() == {}
    assert sorted(e["batch_id"] for e in slot.of("finished")) == sorted(
        e["batch_id"] for e in slot.of("started")
    )
    return crashes


def test_the_start_limit_is_one_test_s_timeout_and_never_less_than_the_floor():
    assert start_wait_limit(300.0) == 300.0
    assert start_wait_limit(1.0) == START_WAIT_MIN
    assert start_wait_limit(START_WAIT_MIN + 0.5) == START_WAIT_MIN + 0.5


@pytest.mark.parametrize("stalls_at", ["collection", "first test"])
@pytest.mark.parametrize("timeout", [2.0, START_WAIT_MIN + 20], ids=["short", "long"])
def test_a_runner_hung_before_its_first_test_is_killed_at_the_limit_and_fails_each_test_once(
    stalls_at, timeout
):
    slot = Slot(IDS, [IDS[:2], IDS[2:]], timeout=timeout, stalls_at=stalls_at)
    failures: list[tuple[str, str]] = []
    slot.driver.on_failure = lambda kind, why: failures.append((kind, why)) is not None
    summary = slot.run()
    limit = start_wait_limit(timeout)
    why = start_hang(limit, timeout)
    crashes = assert_each_crashed_once(slot, why)
    (runner,) = slot.runners  # not started again: the same hang would come back
    assert runner.killed
    # Where it hung, asked of it before the kill, is in each test's message.
    assert runner.stacks_asked
    assert all(f"in stalled at {stalls_at}\n" in c["message"] for c in crashes), crashes
    assert runner.began == []
    assert 1000 + limit <= crashes[0]["at"] <= 1000 + limit + TURN
    # The worker's health counts it once, as an infrastructure failure (a runner crashed
    # outside a test): K of them in a row quarantine the worker.
    assert failures == [("runner", why)]
    assert summary["runner_starts"] == 1
    assert summary["done"] == len(IDS)
    # Heartbeats went on meanwhile: the controller was told the slot lives.
    beats = [e["at"] for e in slot.of("alive") if e["at"] <= crashes[0]["at"]]
    gaps = [b - a for a, b in itertools.pairwise([1000, *beats, crashes[0]["at"]])]
    assert max(gaps) <= HEARTBEAT_INTERVAL + TURN, gaps


def test_the_message_says_what_happened_and_how_to_fix_it():
    why = start_hang(10.0, 5.0)
    assert why.startswith("the test process did not start its first test within 10s")
    assert "conftest.py" in why
    assert "raise --celery-timeout" in why
    assert "\n" not in why  # the crash's reason is its first line


def test_a_fork_s_start_counts_from_when_the_zygote_forked_it():
    timeout = START_WAIT_MIN + 20
    forked = fork_wait_limit(timeout) - 5  # the zygote collected slowly, within the wait
    slot = ForkSlot([IDS], timeout=timeout, forks_after=forked, stalls_at="first test")
    slot.run()
    crashes = assert_each_crashed_once(slot, start_hang(start_wait_limit(timeout), timeout))
    (fork,) = slot.runners
    assert fork.killed
    assert not fork.given_up
    # Not from when it was asked of the zygote: from its last loop turn still forking.
    kill_at = 1000 + forked + start_wait_limit(timeout)
    assert kill_at - TURN <= crashes[0]["at"] <= kill_at + TURN


@pytest.mark.parametrize("timeout", [2.0, START_WAIT_MIN + 20], ids=["short", "long"])
def test_a_hung_zygote_then_a_hung_runner_of_the_slot_s_own_end_within_both_limits(timeout):
    slot = ForkSlot(
        [IDS[:1], IDS[1:]], timeout=timeout, forks_after=None, own={"stalls_at": "collection"}
    )
    summary = slot.run()
    fork, own = slot.runners
    assert fork.given_up
    assert own.killed
    crashes = assert_each_crashed_once(slot, start_hang(start_wait_limit(timeout), timeout))
    worst = fork_wait_limit(timeout) + start_wait_limit(timeout)
    assert 1000 + worst <= crashes[0]["at"] <= 1000 + worst + 2 * TURN
    slot.assert_heartbeats_cover(1000, crashes[0]["at"])
    assert summary["runner_starts"] == 2


def test_tests_answered_as_missing_do_not_make_a_hung_runner_count_as_one_that_ran():
    # t.py::x is not collected there; the runner then hangs before t.py::a: a is failed with
    # the hang, not given to a new runner (it would hang again).
    slot = Slot(
        ["t.py::a", "t.py::x"],
        [["t.py::x", "t.py::a"]],
        missing=("t.py::x",),
        stalls_at="first test",
    )
    summary = slot.run()
    assert [e["nodeids"] for e in slot.of("missing")] == [["t.py::x"]]
    (crash,) = slot.of("crashed")
    assert crash["nodeid"] == "t.py::a"
    assert crash["reason"] == start_hang(start_wait_limit(300.0), 300.0)
    assert summary["runner_starts"] == 1
