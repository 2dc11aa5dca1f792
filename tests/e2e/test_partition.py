"""A silent network, end to end: a TCP proxy between one side and RabbitMQ stops forwarding
(as a partition or a dead NAT entry does: no reset, no error, the packets just stop).

Every bound below follows from the plugin's own constants (the AMQP heartbeat, the silence
limit, the socket timeouts) plus a margin, and every heal waits for the plugin's own word.
RabbitMQ itself is never stopped.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from pytest_celery_dispatch.celeryconf import BROKER_IO_TIMEOUT, SILENT_LIMIT
from pytest_celery_dispatch.retry import SILENCE_LIMIT
from pytest_celery_dispatch.settings import DEFAULT_BROKER_TIMEOUT
from tests.e2e.test_faults import log_lines, slow_tests
from tests.helpers import BROKER
from tests.pause_proxy import PauseProxy

#: The controller notices a silent broker within two heartbeats, plus one main-thread broker
#: call that may be waiting on its socket, plus a reconnect attempt's handshake timeout.
NOTICE_BOUND = SILENT_LIMIT + 2 * BROKER_IO_TIMEOUT + 4.0
MARGIN = 10.0
OUTAGE_LINE = "no word from the broker"


@pytest.fixture
def proxy() -> Iterator[PauseProxy]:
    target = urlsplit(BROKER)
    assert target.hostname is not None
    assert target.hostname.startswith("127.")
    p = PauseProxy(target.port or 5672, target.hostname)
    yield p
    p.close()


def through(proxy: PauseProxy) -> str:
    """The test broker's URL, with the proxy's port."""
    parts = urlsplit(BROKER)
    netloc = parts.netloc.rsplit(":", 1)[0] if parts.port else parts.netloc
    return urlunsplit(parts._replace(netloc=f"{netloc}:{proxy.port}"))


def finished(lines: list[dict]) -> int:
    return sum(1 for e in lines if e["event"] == "finished")


def wait_for_text(ctl, text: str, timeout: float) -> float:
    """Seconds until ``text`` shows in the controller's output (fails after ``timeout``)."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if text in ctl.text():
            return time.monotonic() - began
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not seen within {timeout:.0f}s:\n{ctl.text()}")


def report_of(ctl) -> dict:
    return json.loads(ctl.report.read_text())


def test_controller_cut_off_for_good_fails_what_is_left_and_ends(
    pytester, worker_factory, controller, proxy
):
    first = worker_factory(worker_id="worker-p1")
    worker_factory(queue=first.queue, worker_id="worker-p2")
    slow_tests(pytester, first.queue, count=16, sleep=1.0)
    junit = pytester.path / "junit.xml"
    ctl = controller("--celery-broker-timeout=20", f"--junitxml={junit}", broker=through(proxy))
    lines = ctl.wait_for(lambda lines: finished(lines) >= 2)
    proxy.pause()
    cut = time.monotonic()
    done_before = {e["nodeid"]: e.get("outcome") for e in lines if e["event"] == "finished"}

    noticed = wait_for_text(ctl, OUTAGE_LINE, NOTICE_BOUND + MARGIN)
    assert "waiting up to 20 s (--celery-broker-timeout)" in ctl.text()
    assert ctl.wait(20 + NOTICE_BOUND + MARGIN) == 1, ctl.text()
    ended = time.monotonic() - cut
    print(f"outage said {noticed:.1f}s after the cut, run ended {ended:.1f}s after it")
    assert noticed <= 30
    assert ended <= 60

    print(ctl.text())
    report = report_of(ctl)
    assert report["exitcode"] == 1
    assert 'tests="16"' in junit.read_text()
    tests = report["tests"]
    assert len(tests) == len({t["nodeid"] for t in tests}) == 16
    outcomes = {t["nodeid"]: t["outcome"] for t in tests}
    for nodeid in done_before:
        assert outcomes[nodeid] == "passed", nodeid  # finished before the cut: kept
    failed = [t for t in tests if t["outcome"] == "failed"]
    assert failed, "the tests left at the cut fail"
    for test in failed:
        error = test["dispatch"]["infrastructure_error"]
        assert error.startswith(f"{test['nodeid']} has no outcome: cut off from the broker")
        assert "(--celery-broker-timeout 20)" in error


def test_controller_cut_off_for_30s_then_healed_every_test_passes_once(
    pytester, worker_factory, controller, proxy
):
    first = worker_factory(worker_id="worker-h1")
    worker_factory(queue=first.queue, worker_id="worker-h2")
    log = slow_tests(pytester, first.queue, count=16, sleep=1.0)
    ctl = controller(broker=through(proxy))
    ctl.wait_for(lambda lines: finished(lines) >= 2)
    proxy.pause()
    cut = time.monotonic()
    wait_for_text(ctl, OUTAGE_LINE, NOTICE_BOUND + MARGIN)
    assert f"waiting up to {DEFAULT_BROKER_TIMEOUT:g} s" in ctl.text()
    time.sleep(max(0.0, 30.0 - (time.monotonic() - cut)))
    proxy.resume()
    assert ctl.wait(120) == 0, ctl.text()
    out = ctl.text()
    assert "16 passed" in out
    tests = report_of(ctl)["tests"]
    assert len(tests) == len({t["nodeid"] for t in tests}) == 16
    assert {t["outcome"] for t in tests} == {"passed"}
    ends = collections.Counter(n for kind, n, *_ in log_lines(log) if kind == "end")
    assert sorted(ends) == sorted(str(n) for n in range(16))


def test_worker_cut_off_for_good_its_twin_runs_the_rest_and_it_runs_nothing_after(
    pytester, worker_factory, controller, proxy
):
    cut_worker = worker_factory(worker_id="worker-c1", broker=through(proxy))
    worker_factory(queue=cut_worker.queue, worker_id="worker-c2")
    log = slow_tests(pytester, cut_worker.queue, count=12, sleep=1.0)
    ctl = controller("--celery-timeout=30")
    ctl.wait_for(lambda lines: any(e.get("worker") == "worker-c1" for e in lines))
    proxy.pause()
    cut = time.monotonic()
    started_before = sum(
        1 for kind, _n, w, *_ in log_lines(log) if kind == "start" and w == "worker-c1"
    )
    # The cut-off worker stops its runner once it has not been heard for SILENT_LIMIT (each
    # check waits at most BROKER_IO_TIMEOUT); its current test may still end meanwhile.
    time.sleep(SILENT_LIMIT + 2 * BROKER_IO_TIMEOUT + 2.0)
    started_at_stop = sum(
        1 for kind, _n, w, *_ in log_lines(log) if kind == "start" and w == "worker-c1"
    )
    assert started_at_stop <= started_before + 1
    assert ctl.wait(SILENCE_LIMIT + 12 * 1.0 + 60) == 0, ctl.text()
    proxy.resume()  # healed: it must run nothing of that run
    time.sleep(SILENT_LIMIT)
    tests = report_of(ctl)["tests"]
    assert len(tests) == len({t["nodeid"] for t in tests}) == 12
    assert {t["outcome"] for t in tests} == {"passed"}
    assert "re-dispatching" in ctl.text()
    started_after = [n for kind, n, w, *_ in log_lines(log) if kind == "start" and w == "worker-c1"]
    assert len(started_after) == started_at_stop, "the healed worker ran a test of the run"
    print(f"worker cut off {time.monotonic() - cut:.1f}s ago; it started {started_at_stop}")


def test_worker_cut_off_alone_stops_its_runner_and_its_tests_fail_by_name(
    pytester, worker_factory, controller, proxy
):
    alone = worker_factory(worker_id="worker-a1", broker=through(proxy))
    long = 25.0  # longer than the worker takes to notice: only a stopped runner never ends it
    log = slow_tests(pytester, alone.queue, count=3, sleep=long)
    ctl = controller(
        "--celery-timeout=60",
        "--celery-retries=1",
        "--celery-wait-workers=1",
        "--celery-ship=off",  # in place: no workspace hashing late in a suite (a big basetemp)
    )
    began = time.monotonic()
    while not any(kind == "start" for kind, *_ in log_lines(log)):
        assert time.monotonic() - began < 60, ctl.text()
        time.sleep(0.1)
    proxy.pause()
    cut = time.monotonic()
    assert ctl.wait(120) == 1, ctl.text()
    tests = report_of(ctl)["tests"]
    assert len(tests) == len({t["nodeid"] for t in tests}) == 3
    assert {t["outcome"] for t in tests} == {"failed"}
    for test in tests:
        error = test["dispatch"]["infrastructure_error"]
        assert test["nodeid"] in error, error
        assert "after 2 attempts" in error, error
    # The test running at the cut would have ended `long` s after it: the cut-off worker
    # stopped its runner long before (within SILENT_LIMIT plus one bounded socket wait).
    time.sleep(max(0.0, long + 2.0 - (time.monotonic() - cut)))
    assert [line for line in log_lines(log) if line[0] == "end"] == []
    proxy.resume()  # healed: nothing of the finished run starts again
    time.sleep(SILENT_LIMIT)
    assert sum(1 for kind, *_ in log_lines(log) if kind == "start") == 1
