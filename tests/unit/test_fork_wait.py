"""A slot waiting for the runner it asked its run's zygote for: the wait is part of the driver's
loop (heartbeats, the controller's word), bounded by ``fork_wait_limit``, and a zygote that
gives no runner leaves the slot one of its own (fake runners and a fake clock)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from pytest_celery_dispatch.driver import FORK_WAIT_MIN, KILL, RUN, STOP, fork_wait_limit
from pytest_celery_dispatch.serialization import HEARTBEAT_INTERVAL
from pytest_celery_dispatch.zygote import ZYGOTE_START_WAIT
from tests.unit.test_driver import FakeClock, FakeRunner, Slot

IDS = ["t.py::a", "t.py::b", "t.py::c"]


class FakeForkedRunner(FakeRunner):
    """A runner asked of a zygote: forked ``forks_after`` seconds after it was asked (None:
    never, a hung collection), unless the zygote goes away ``gone_after`` seconds after.
    Until then it says nothing (its ``collected`` comes with the fork); stopping it gives the
    request up."""

    def __init__(
        self,
        eligible: list[str],
        clock: FakeClock,
        *,
        forks_after: float | None,
        gone_after: float | None = None,
        **options: Any,
    ) -> None:
        super().__init__(eligible, clock, **options)
        self.warm_start = True
        self.asked_at = clock.now
        self.forks_after = forks_after
        self.gone_after = gone_after
        self.after_fork, self.outbox = self.outbox, []
        self.pending = True
        self.given_up = self.gone = False

    def _tick(self) -> None:
        if not self.pending:
            return
        waited = self.clock.now - self.asked_at
        if self.gone_after is not None and waited >= self.gone_after:
            self.pending, self.gone = False, True
        elif self.forks_after is not None and waited >= self.forks_after:
            self.pending, self.outbox = False, self.after_fork

    @property
    def forking(self) -> bool:
        self._tick()
        return self.pending

    @property
    def unborn(self) -> bool:
        return self.gone or self.given_up

    def wait(self, timeout: float) -> tuple[bool, bool]:
        self._tick()
        if self.unborn:
            return False, True
        return super().wait(timeout)

    def read_events(self) -> Iterator[dict[str, Any]]:
        if self.unborn:
            raise EOFError
        return super().read_events()

    def _give_up(self) -> bool:
        if self.forking:
            self.pending, self.given_up = False, True
        return self.given_up

    def kill(self) -> None:
        if not self._give_up():
            super().kill()

    def interrupt(self) -> None:
        if not self._give_up():
            super().interrupt()

    def request_stop(self) -> None:
        if not self._give_up():
            super().request_stop()


class ForkSlot(Slot):
    """A slot whose first runner is asked of the zygote (``fork`` options), later ones its own
    (``own``: their options)."""

    def __init__(
        self,
        chunks: list[list[str]],
        *,
        timeout: float = 300.0,
        own: dict[str, Any] | None = None,
        **fork: Any,
    ) -> None:
        super().__init__(IDS, chunks, timeout=timeout)
        self.fork = fork
        self.own = own or {}
        self.started_at: list[float] = []

    def start_runner(self, eligible: list[str], number: int, tmp: str) -> FakeRunner:
        self.started_at.append(self.clock.now)
        if number > 1:
            own = FakeRunner(eligible, self.clock, **self.own)
            self.runners.append(own)
            return own
        runner = FakeForkedRunner(eligible, self.clock, **self.fork)
        self.runners.append(runner)
        return runner

    def beats(self) -> list[float]:
        return [e["at"] for e in self.of("alive")]

    def assert_heartbeats_cover(self, start: float, end: float) -> None:
        """An ``alive`` at least every heartbeat interval (plus one loop turn) in [start, end]."""
        times = [start, *[t for t in self.beats() if start <= t <= end], end]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert max(gaps) <= HEARTBEAT_INTERVAL + 0.25, (gaps, times)


#: A collection longer than the wait a slot had before the wait became part of its loop.
SLOW = ZYGOTE_START_WAIT + FORK_WAIT_MIN + 20


def test_the_wait_is_one_test_s_timeout_and_never_less_than_the_old_wait():
    assert fork_wait_limit(300.0) == 300.0
    assert fork_wait_limit(1.0) == FORK_WAIT_MIN
    assert fork_wait_limit(FORK_WAIT_MIN + 0.5) == FORK_WAIT_MIN + 0.5


def test_a_slot_waits_for_a_slow_zygote_heartbeating_and_runs_on_its_fork():
    slot = ForkSlot([IDS[:2], IDS[2:]], forks_after=SLOW)
    summary = slot.run()
    fork = slot.runners[0]
    assert len(slot.runners) == 1  # no second collection
    assert not fork.given_up
    assert sorted(slot.results()) == IDS
    assert summary["warm_start"] is True
    assert summary["runner_starts"] == 1
    # Nothing was taken from the work queue before the fork came (the chunks stayed there
    # for the other slots), and the slot told the controller it was alive all along.
    first_chunk = slot.of("started")[0]["at"]
    assert first_chunk >= 1000 + SLOW
    slot.assert_heartbeats_cover(1000, first_chunk)


@pytest.mark.parametrize("timeout", [1.0, SLOW + 30], ids=["short-timeout", "long-timeout"])
def test_a_zygote_that_never_forks_is_given_up_after_the_wait_and_the_slot_runs_its_own(
    timeout,
):
    slot = ForkSlot([IDS], timeout=timeout, forks_after=None)
    summary = slot.run()
    fork, own = slot.runners
    assert fork.given_up
    assert fork.closed
    assert slot.started_at[1] - slot.started_at[0] == pytest.approx(
        fork_wait_limit(timeout), abs=0.25
    )
    slot.assert_heartbeats_cover(1000, slot.started_at[1])
    assert sorted(slot.results()) == IDS
    assert own.began == IDS
    assert "crashed" not in slot.kinds()
    assert "missing" not in slot.kinds()
    assert summary["state"] == RUN
    assert summary["warm_start"] is False
    assert summary["runner_starts"] == 2


def test_a_zygote_gone_while_the_slot_waits_leaves_it_a_runner_of_its_own():
    slot = ForkSlot([IDS[:1], IDS[1:]], forks_after=SLOW, gone_after=3.0)
    summary = slot.run()
    fork, _own = slot.runners
    assert fork.gone
    assert not fork.given_up
    assert slot.started_at[1] - slot.started_at[0] == pytest.approx(3.0, abs=0.25)
    # Each test answered once, by the slot's own runner: nothing crashed, nothing was lost.
    assert sorted(slot.results()) == IDS
    assert [e["nodeids"] for e in slot.of("started")] == [IDS[:1], IDS[1:]]
    assert "crashed" not in slot.kinds()
    assert summary["state"] == RUN


@pytest.mark.parametrize("word", [KILL, STOP])
def test_a_run_dropped_or_stopped_while_the_slot_waits_gives_the_request_up_and_ends(word):
    slot = ForkSlot([IDS], forks_after=SLOW)
    slot.driver.control = lambda: word if slot.clock.now >= 1005 else RUN
    summary = slot.run()
    (fork,) = slot.runners  # no runner of its own either
    assert fork.given_up
    assert fork.closed
    assert slot.clock.now < 1005 + 1  # at once, not after the collection
    assert slot.fetched == 0  # the work stays in the queue
    assert slot.kinds() == []
    slot.assert_heartbeats_cover(1000, 1005)
    assert summary["state"] == word
    assert summary["runner_starts"] == 1
