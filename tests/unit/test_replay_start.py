"""When a dispatched test started: the worker's stamp, which heartbeats only estimate."""

from __future__ import annotations

import pytest

from pytest_celery_dispatch.replay import EventLog, Replayer

NODEID = "test_a_heartbeat.py::test_func"


class Reports:
    def __init__(self) -> None:
        self.reports: list[pytest.TestReport] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.reports.append(report)


@pytest.fixture
def replayer(pytester: pytest.Pytester) -> tuple[Replayer, Reports]:
    pytester.makepyfile(test_a_heartbeat="def test_func(): pass")
    item = pytester.getitem(pytester.path / "test_a_heartbeat.py")
    assert item.nodeid == NODEID
    seen = Reports()
    item.config.pluginmanager.register(seen)
    replayer = Replayer(item.config, EventLog(None, "run"))
    replayer.add(item, "queue_a")
    return replayer, seen


def test_a_heartbeat_does_not_move_the_start_the_worker_stamped(replayer):
    """A test killed at its deadline lasted the deadline: the heartbeats after its logstart
    arrive late by their transit, and an estimate from them would shorten it."""
    replayer, seen = replayer
    event = {"worker": "w", "task_id": "t"}
    replayer.started(NODEID, event, 1, 1000.0)  # the worker's logstart
    replayer.started(NODEID, event, 1, 1000.004, estimate=True)  # a heartbeat 4 ms in transit
    assert replayer.records[NODEID].started == 1000.0
    replayer.fail_test(NODEID, "timeout: killed", finished=1002.0)
    call = next(r for r in seen.reports if r.when == "call")
    assert call.duration == pytest.approx(2.0)
    assert call.duration >= 2.0


def test_a_heartbeat_estimates_the_start_of_a_test_whose_logstart_was_missed(replayer):
    replayer, _ = replayer
    replayer.started(NODEID, {}, 1, 1000.0, estimate=True)
    replayer.started(NODEID, {}, 1, 1000.5, estimate=True)
    assert replayer.records[NODEID].started == 1000.5


def test_a_new_attempt_s_heartbeat_replaces_the_last_attempt_s_start(replayer):
    """A test sent again (its worker lost) starts again: the first attempt's stamp is over."""
    replayer, _ = replayer
    replayer.started(NODEID, {}, 1, 1000.0)
    replayer.started(NODEID, {}, 2, 1010.0, estimate=True)
    assert replayer.records[NODEID].started == 1010.0
    replayer.started(NODEID, {}, 2, 1009.9)  # its logstart, late
    replayer.started(NODEID, {}, 2, 1010.2, estimate=True)
    assert replayer.records[NODEID].started == 1009.9
