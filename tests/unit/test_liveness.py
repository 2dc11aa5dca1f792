"""liveness.ControllerWatch: when a worker takes a run's controller for gone (fake clock)."""

from __future__ import annotations

import pytest

from pytest_celery_dispatch.embedded import PRESENCE_STALE
from pytest_celery_dispatch.liveness import (
    BENCH_RELEASE_LIMIT,
    CONTROLLER_CHECK_INTERVAL,
    CONTROLLER_GONE_GRACE,
    CONTROLLER_HEARTBEAT,
    CONTROLLER_RECONNECT_MAX,
    SILENT_CONTROLLER_DROPPED_AFTER,
    ControllerWatch,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def watch_for(answers: list[int | None], step: float = CONTROLLER_CHECK_INTERVAL) -> float | None:
    """Feed one answer per check; the time (from the first) at which the watch says gone."""
    clock = Clock()
    watch = ControllerWatch(clock=clock)
    for answer in answers:
        if watch.observe(answer):
            return clock.now - 100.0
        clock.now += step
    return None


def checks(seconds: float) -> int:
    return round(seconds / CONTROLLER_CHECK_INTERVAL)


def test_a_controller_that_consumes_is_alive():
    assert watch_for([1] * checks(60)) is None


def test_zero_consumers_for_the_grace_is_a_dead_controller():
    gone_at = watch_for([1, 1] + [0] * checks(CONTROLLER_GONE_GRACE + 1))
    assert gone_at is not None
    assert gone_at - 2 * CONTROLLER_CHECK_INTERVAL == pytest.approx(CONTROLLER_GONE_GRACE, abs=1e-6)


def test_a_short_gap_is_not_a_death():
    # The controller stops its consumer at the end of a run before it deletes the queue, or
    # re-subscribes after a channel error: a gap shorter than the grace.
    gap = [0] * (checks(CONTROLLER_GONE_GRACE) - 1)
    assert watch_for(([1, *gap]) * 20) is None


def test_a_broker_outage_is_not_a_dead_controller():
    # RabbitMQ restarts: every client is disconnected (the worker cannot ask: None) for 30 s;
    # then the worker reconnects first and sees no consumer until the controller has
    # re-subscribed, CONTROLLER_RECONNECT_MAX later at most; then the controller is back.
    outage = [None] * checks(30)
    reconnecting = [0] * checks(CONTROLLER_RECONNECT_MAX + 1)
    assert watch_for([1] * 5 + outage + reconnecting + [1] * 50) is None
    # Zeros on both sides of the outage do not add up either.
    before = [0] * (checks(CONTROLLER_GONE_GRACE) - 1)
    assert watch_for([1] + before + outage + reconnecting + [1] * 5) is None


def test_once_gone_always_gone():
    clock = Clock()
    watch = ControllerWatch(clock=clock)
    watch.observe(0)
    clock.now += CONTROLLER_GONE_GRACE
    assert watch.observe(0)
    assert not watch.absent
    assert watch.observe(1)


def test_absent_while_deciding():
    clock = Clock()
    watch = ControllerWatch(clock=clock)
    assert not watch.absent
    watch.observe(0)
    assert watch.absent
    watch.observe(None)
    assert not watch.absent


def test_the_budget_fits_the_release_limit():
    # Detection starts when the zeros do: at once on RabbitMQ for a killed process, about 2.5
    # heartbeats later for a vanished machine, at most PRESENCE_STALE later on the embedded broker
    # (a controller on another host); then the grace, then one more check.
    assert CONTROLLER_RECONNECT_MAX < CONTROLLER_GONE_GRACE
    for zeros_after in (PRESENCE_STALE, SILENT_CONTROLLER_DROPPED_AFTER):
        worst = zeros_after + CONTROLLER_GONE_GRACE + 2 * CONTROLLER_CHECK_INTERVAL
        assert worst < BENCH_RELEASE_LIMIT


def test_the_controller_s_reply_connection_has_the_heartbeat(monkeypatch):
    import queue

    from pytest_celery_dispatch import transport

    asked: list[object] = []

    class App:
        conf = type("Conf", (), {"broker_write_url": "amqp://x//"})()

        def connection_for_read(self, **kwargs: object) -> object:
            asked.append(kwargs.get("heartbeat"))
            consumer.stop_event.set()
            return Conn()

    class Conn:
        def ensure_connection(self, **kwargs: object) -> None:
            raise OSError("no broker here")

        def release(self) -> None:
            pass

    consumer = transport.ReplyConsumer(App(), "celery-dispatch.reply.R", queue.Queue())
    consumer.run()
    assert asked == [CONTROLLER_HEARTBEAT]
