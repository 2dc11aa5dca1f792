"""Bench health's pure rules (fake clock), the worker's health book and one session's checks,
the controller's quarantine decisions, and the slot driver's quarantine, with fakes."""

from __future__ import annotations

import os
from typing import Any

import pytest

from pytest_celery_dispatch import healthrules as rules
from pytest_celery_dispatch.driver import QUARANTINE, RUN
from pytest_celery_dispatch.health import (
    HealthBook,
    HealthConfig,
    SessionHealth,
    session_config,
    worker_config,
)
from pytest_celery_dispatch.quarantine import Quarantines
from pytest_celery_dispatch.scheduling import Fail, Notice, Publish, StartSlot
from tests.unit.test_driver import Slot
from tests.unit.test_queue_scheduler import Lab, of

MINUTE = 60.0

# ----------------------------------------------------------------------------- the pure rules


def test_health_is_due_when_never_run_after_every_minutes_or_after_a_crash() -> None:
    every = rules.DEFAULT_HEALTH_EVERY
    now = 10_000.0
    assert rules.health_due(None, now, every, suspect=False)
    assert not rules.health_due(now, now, every, suspect=False)
    assert not rules.health_due(now - every * MINUTE + 0.1, now, every, suspect=False)
    assert rules.health_due(now - every * MINUTE, now, every, suspect=False)
    assert rules.health_due(now, now, every, suspect=True)  # a test crashed or timed out since
    assert rules.health_due(now, now, 0.0, suspect=False)  # 0: before every session


def test_k_infrastructure_failures_in_a_row_the_running_session_included() -> None:
    k = rules.DEFAULT_QUARANTINE_AFTER
    assert k == 3
    assert not rules.streak_reached([], k)
    assert not rules.streak_reached([True], k)
    assert rules.streak_reached([True, True], k)
    assert rules.streak_reached([False, True, True], k)
    assert not rules.streak_reached([True, False, True], k)  # a clean session breaks the row
    assert not rules.streak_reached([True, True], k, current=False)
    assert rules.streak_reached([], 1)
    assert not rules.streak_reached([True] * 10, 0)  # 0 turns the rule off


def test_a_queue_fails_only_when_every_consumer_is_a_quarantined_worker() -> None:
    one = {"worker-a": "health test t.py::test_uart failed: no UART"}
    assert rules.every_worker_quarantined("queue_a", one, 2) is None
    assert rules.every_worker_quarantined("queue_a", {}, 0) is None
    assert rules.every_worker_quarantined("queue_a", one, None) is None  # cannot tell now
    assert rules.every_worker_quarantined("queue_a", one, 1) == (
        "queue_a: every worker is quarantined "
        "(worker-a: health test t.py::test_uart failed: no UART)"
    )
    both = {**one, "worker-b": "3 sessions in a row ended in an infrastructure failure"}
    assert rules.every_worker_quarantined("queue_a", both, 2) == (
        "queue_a: every worker is quarantined (worker-a: health test t.py::test_uart failed: "
        "no UART; worker-b: 3 sessions in a row ended in an infrastructure failure)"
    )


def test_settings_from_the_worker_s_environment_win_over_the_run_s() -> None:
    payload = {"health": ["tests/health"], "health_every": 2.0}
    assert session_config(payload, {}) == HealthConfig(("tests/health",), 2.0, 3, False)
    env = {
        "DISPATCH_HEALTH": "tests/health/test_board.py::test_uart, tests/health/test_power.py",
        "DISPATCH_HEALTH_EVERY": "0.5",
        "DISPATCH_QUARANTINE_AFTER": "5",
        "DISPATCH_HEALTH_REJOIN": "1",
    }
    tests = ("tests/health/test_board.py::test_uart", "tests/health/test_power.py")
    assert session_config(payload, env) == HealthConfig(tests, 0.5, 5, True)


def test_what_a_run_sends_is_checked_before_it_is_used() -> None:
    payload = {"health": "tests/health", "health_every": "soon"}  # not a list, not minutes
    assert session_config(payload, {}) == HealthConfig((), rules.DEFAULT_HEALTH_EVERY, 3, False)


@pytest.mark.parametrize(
    ("name", "value", "form"),
    [
        ("DISPATCH_HEALTH_EVERY", "soon", "give minutes (a number >= 0, e.g. 10)"),
        ("DISPATCH_HEALTH_EVERY", "-1", "give minutes (a number >= 0, e.g. 10)"),
        ("DISPATCH_QUARANTINE_AFTER", "three", "give a whole number >= 0 (0 turns it off)"),
    ],
)
def test_a_bad_worker_setting_names_the_variable_and_the_form(name, value, form) -> None:
    with pytest.raises(ValueError) as info:
        worker_config({name: value})
    assert str(info.value) == f"invalid value {value!r} for env {name}: {form}"


# ----------------------------------------------------------------------------- the worker's book


def session(tmp_path, **config: Any) -> SessionHealth:
    return SessionHealth(HealthBook(str(tmp_path)), HealthConfig(**config), str(tmp_path), {}, 30)


def test_three_sessions_ending_in_infrastructure_failures_quarantine_the_worker(tmp_path) -> None:
    for _ in range(2):
        first = session(tmp_path)
        assert first.before_work() is None
        assert first.after_failure("runner", "the test process crashed outside a test") is None
        assert first.ended(cut_off=False, took_work=True) is None
    third = session(tmp_path)
    assert third.before_work() is None
    reason = third.after_failure("timeout", "timeout: still running after 5s")
    assert reason == (
        "3 sessions in a row ended in an infrastructure failure (the last: timeout: still "
        "running after 5s)"
    )
    assert third.quarantined == reason
    assert third.ended(cut_off=False, took_work=True) is None  # said once
    book = HealthBook(str(tmp_path))
    assert book.quarantine()["reason"] == reason
    assert session(tmp_path).before_work() == reason  # every later session is sent back


def test_a_test_s_own_crash_or_a_clean_session_never_counts(tmp_path) -> None:
    for _ in range(5):
        one = session(tmp_path)
        assert one.after_failure("crash", "the test process crashed (exit code 3)") is None
        assert one.ended(cut_off=False, took_work=True) is None
    a = session(tmp_path)
    a.after_failure("runner", "crashed outside a test")
    a.ended(cut_off=False, took_work=True)
    session(tmp_path).ended(cut_off=False, took_work=True)  # a clean one breaks the row
    b = session(tmp_path)
    b.after_failure("runner", "crashed outside a test")
    assert b.ended(cut_off=False, took_work=True) is None
    assert session(tmp_path).ended(cut_off=False, took_work=False) is None  # says nothing
    cut = session(tmp_path)
    assert cut.ended(cut_off=True, took_work=True) is None  # 2 in a row: b, then this one
    assert HealthBook(str(tmp_path)).quarantine() is None


def test_a_release_ends_only_the_quarantine_it_names(tmp_path) -> None:
    book = HealthBook(str(tmp_path))
    assert not book.release(None)  # nothing to release
    quarantined = session(tmp_path, after=1)
    quarantined.after_failure("runner", "crashed outside a test")
    since = book.quarantine()["since"]
    assert not book.release(since - 1)  # an older quarantine's release
    assert book.release(since)
    assert book.quarantine() is None
    assert session(tmp_path, after=1).before_work() is None


def write_health_test(tmp_path, passes: bool) -> str:
    (tmp_path / "test_board.py").write_text(
        f"def test_uart():\n    assert {passes}, 'no UART on /dev/ttyUSB0'\n"
    )
    return "test_board.py::test_uart"


def test_a_failing_health_test_quarantines_and_a_passing_one_rejoins_if_configured(
    tmp_path,
) -> None:
    nodeid = write_health_test(tmp_path, passes=False)
    env = dict(os.environ)
    one = SessionHealth(
        HealthBook(str(tmp_path)), HealthConfig((nodeid,), rejoin=True), str(tmp_path), env, 60
    )
    reason = one.before_work()
    assert reason == (
        "health test test_board.py::test_uart failed: AssertionError: no UART on /dev/ttyUSB0"
    )
    write_health_test(tmp_path, passes=True)
    two = SessionHealth(
        HealthBook(str(tmp_path)), HealthConfig((nodeid,), rejoin=True), str(tmp_path), env, 60
    )
    assert two.before_work() == reason  # not due yet: checked less than `every` minutes ago
    with HealthBook(str(tmp_path)).changing() as state:
        state["last_check"] -= rules.DEFAULT_HEALTH_EVERY * MINUTE
    assert two.before_work() is None  # passes again: back in service by itself
    assert HealthBook(str(tmp_path)).quarantine() is None


def test_a_health_test_outside_the_workspace_is_refused(tmp_path) -> None:
    one = SessionHealth(
        HealthBook(str(tmp_path)), HealthConfig(("../elsewhere/test_x.py",)), str(tmp_path), {}, 60
    )
    reason = one.before_work()
    assert reason is not None
    assert reason.startswith("health test ../elsewhere/test_x.py refused: ")


# ----------------------------------------------------------------------------- the controller


def test_a_quarantined_worker_s_chunks_are_sent_again_after_the_first_backoff_only() -> None:
    lab = Lab()
    lab.counts["queue_a"] = 2
    actions = lab.begin(["a", "b", "c"], consumers=2, slots=2)
    first = of(Publish, actions)[0].chunk
    slot_a, slot_b = (s.slot for s in of(StartSlot, actions))
    lab.take(first, slot_a, worker="worker-a")
    book = Quarantines(lab.sched)
    actions = book.quarantined("queue_a", "worker-a", "health test t.py::test_uart failed")
    assert next(n.text for n in of(Notice, actions)) == (
        "worker-a quarantined itself: health test t.py::test_uart failed"
    )
    assert slot_a.lost
    assert not slot_b.lost
    assert not of(Fail, actions)  # worker-b is healthy
    lab.clock.advance(lab.sched.policy.after_loss(1, 0.0, "").at)  # the first backoff
    resent = of(Publish, lab.poll())
    assert [p.chunk.nodeids for p in resent] == [first.nodeids]
    assert resent[0].chunk.attempt == 2


def test_a_queue_whose_workers_are_all_quarantined_fails_its_open_tests_at_once() -> None:
    lab = Lab()
    actions = lab.begin(["a", "b", "c"], consumers=2, slots=2)
    first = of(Publish, actions)[0].chunk
    slot_a, _slot_b = (s.slot for s in of(StartSlot, actions))
    lab.take(first, slot_a, worker="worker-a")
    lab.sched.done(first.nodeids[0])  # one test already has its outcome
    book = Quarantines(lab.sched)
    assert not of(Fail, book.quarantined("queue_a", "worker-a", "no UART"))
    actions = book.quarantined("queue_a", "worker-b", "3 sessions in a row ...")
    message = (
        "queue_a: every worker is quarantined (worker-a: no UART; worker-b: 3 sessions in a row "
        "...)"
    )
    fails = of(Fail, actions)
    assert sorted(f.nodeid for f in fails) == ["b", "c"]
    assert {f.message for f in fails} == {message}
    assert not lab.sched.unfinished_in("queue_a")
    lab.clock.advance(60)
    assert not of(Publish, lab.poll())  # nothing is sent again, and nothing waits
    assert book.quarantined("queue_a", "worker-b", "3 sessions in a row ...") == []


# ----------------------------------------------------------------------------- the slot driver


def test_a_runner_crash_outside_a_test_that_quarantines_leaves_its_tests_unanswered() -> None:
    told: list[tuple[str, str]] = []
    slot = Slot(["t.py::a", "t.py::b"], [["t.py::a", "t.py::b"]], collects=False)
    slot.driver.on_failure = lambda kind, why: told.append((kind, why)) is None
    summary = slot.run()
    assert told == [("runner", "the test process crashed outside a test (exit code 4)")]
    assert summary["state"] == QUARANTINE
    assert slot.of("crashed") == []  # for the controller to send again, at once
    assert slot.fetched == 0  # it died collecting, before it took any work: it takes none


def test_without_quarantine_a_crashed_test_is_still_answered_and_the_slot_goes_on() -> None:
    told: list[tuple[str, str]] = []
    ids = ["t.py::a", "t.py::b", "t.py::c"]
    slot = Slot(ids, [ids], crash_on=("t.py::b",))
    slot.driver.on_failure = lambda kind, why: bool(told.append((kind, why)))
    summary = slot.run()
    assert told == [("crash", "the test process crashed (killed by SIGSEGV)")]
    assert summary["state"] == RUN
    assert sorted(slot.results()) == ["t.py::a", "t.py::c"]


def test_a_slot_whose_worker_another_slot_quarantined_finishes_its_test_and_takes_no_other(
    tmp_path,
) -> None:
    ids = ["t.py::a", "t.py::b", "t.py::c"]
    slot = Slot(ids, [["t.py::a"], ["t.py::b"], ["t.py::c"]], hang_on=("t.py::a",))
    health = session(tmp_path)
    slot.driver.control = health.control(lambda: RUN)
    assert slot.driver.control() == RUN
    other = session(tmp_path, after=1)  # another slot of the same worker
    other.after_failure("runner", "the test process crashed outside a test (exit code 3)")
    summary = slot.run()
    assert summary["state"] == QUARANTINE
    assert slot.runners[0].stop_asked  # the running test was let finish
    assert sorted(slot.results()) == ["t.py::a"]
    # b was taken (one chunk ahead of the running test) and stays unanswered: the controller
    # re-sends it on the quarantined event; c stays in the work queue for a healthy worker.
    assert slot.fetched == 2
    assert slot.of("crashed") == []
    assert slot.of("missing") == []
    assert health.reason(stopped=True) == other.quarantined
    assert session(tmp_path).reason(stopped=False) is None


def test_a_hanging_health_test_is_killed_after_the_timeout_and_quarantines(tmp_path) -> None:
    (tmp_path / "test_hang.py").write_text("import time\n\ndef test_hang():\n    time.sleep(60)\n")
    one = SessionHealth(
        HealthBook(str(tmp_path)), HealthConfig(("test_hang.py",)), str(tmp_path), os.environ, 2
    )
    assert one.before_work() == "health tests test_hang.py still running after 2s"
