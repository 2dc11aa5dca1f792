"""The slot driver (driver.SlotDriver) through its callables: fake fetch, emit, runners, clock."""

from __future__ import annotations

import itertools
import json
import types
from collections.abc import Iterator
from typing import Any, cast

import pytest

from pytest_celery_dispatch.driver import KILL, RELAY_PAUSE, RUN, STOP, Coalescer, SlotDriver
from pytest_celery_dispatch.jsonlines import LineWriter, decode, encode_split, read_until_closed
from pytest_celery_dispatch.launcher import RunnerState
from pytest_celery_dispatch.runnerspec import RunnerSpec
from pytest_celery_dispatch.serialization import HEARTBEAT_INTERVAL, encode_event


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def finished_line(nodeid: str, outcome: str) -> dict[str, Any]:
    """A finished test as the runner writes it (one line, encoded once), as the driver reads
    it: the header decoded, the rest left as bytes to relay."""
    header = {"type": "test", "nodeid": nodeid, "outcome": outcome, "ts": 2.0}
    fields = {"nodeid": nodeid, "location": [nodeid, 1, "t"], "started": 1.0, "finished": 2.0}
    line = encode_split(header, {**fields, "reports": [{"outcome": outcome}]})
    return cast(dict[str, Any], decode(line.rstrip(b"\n")))


class FakeRunner(RunnerState):
    """Runs what it is sent at once: logstart, then the finished test in one line.

    ``crash_on``: the process dies in that test (after its logstart); ``hang_on``: that test
    never ends unless the runner is asked to stop; ``collects=False``: it dies at start-up;
    ``stalls_at``: it hangs at start-up until killed, ``"collection"`` (it never collects) or
    ``"first test"`` (it collects, then starts no test);
    ``holds_back``: like the real runner, it keeps the last test it was sent (for ``nextitem``)
    until the next command. Waiting for it moves the fake clock on.
    """

    streams_output = False

    def __init__(
        self,
        eligible: list[str],
        clock: FakeClock,
        *,
        missing: tuple[str, ...] = (),
        crash_on: tuple[str, ...] = (),
        hang_on: tuple[str, ...] = (),
        collects: bool = True,
        ignores_interrupt: bool = False,
        winds_down: bool = False,
        holds_back: bool = False,
        stalls_at: str | None = None,
        fail_on: tuple[str, ...] = (),
    ) -> None:
        super().__init__(eligible)
        self.fail_on = fail_on
        self.clock = clock
        self.crash_on = crash_on
        self.hang_on = hang_on
        self.outbox: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self.exited = not collects
        self.code = 0 if collects else 4
        self.killed = self.stop_asked = self.closed = self.interrupted = False
        self.stacks_asked = False
        self.ignores_interrupt = ignores_interrupt
        self.winds_down = winds_down  # after its shutdown, it stays until killed
        self.hanging: str | None = None
        self.holds_back = holds_back
        self.held: list[str] = []
        self.began: list[str] = []  # every test it started
        self.stalls_at = stalls_at
        if collects and stalls_at != "collection":
            self.outbox.append(
                {"type": "collected", "missing": list(missing), "reason": "not found: x"}
            )

    def _run(self, nodeid: str) -> None:
        if self.exited or self.hanging or self.stalls_at:
            return
        self.began.append(nodeid)
        self.outbox.append({"type": "logstart", "nodeid": nodeid, "ts": 1.0})
        if nodeid in self.crash_on:
            self.exited, self.code = True, -11
        elif nodeid in self.hang_on:
            self.hanging = nodeid
        else:
            self._end(nodeid)

    def _end(self, nodeid: str) -> None:
        self.outbox.append(finished_line(nodeid, "failed" if nodeid in self.fail_on else "passed"))

    def send(self, command: dict[str, Any]) -> None:
        self.sent.append(command)
        self.held.extend(command.get("nodeids", []))
        while len(self.held) > (1 if self.holds_back else 0):
            self._run(self.held.pop(0))

    def shutdown(self) -> None:
        self.shutdown_sent = True
        self.sent.append({"type": "shutdown"})
        while self.held:
            self._run(self.held.pop(0))
        if not self.hanging and not self.winds_down and not self.stalls_at:
            self.exited = True

    def wait(self, timeout: float) -> tuple[bool, bool]:
        if self.outbox or self.exited:
            return False, True
        self.clock.now += timeout
        return False, False

    def read_events(self) -> Iterator[dict[str, Any]]:
        events, self.outbox = self.outbox, []
        if not events and self.exited:
            raise EOFError
        yield from events

    def read_output(self, timeout: float) -> str | None:
        return None

    def crash_output(self) -> str:
        return "Fatal Python error: Segmentation fault"

    def dump_stacks(self) -> str:
        """Where a hung runner is: in its hung test, or still starting."""
        self.stacks_asked = True
        where = self.hanging or (f"stalled at {self.stalls_at}" if self.stalls_at else "")
        return f'Current thread 0x1 (most recent call first):\n  File "t.py" in {where}\n'

    def kill(self) -> None:
        self.killed = self.exited = True
        self.code = -9

    def interrupt(self) -> None:
        """Ctrl-C: the running test is interrupted, the fixtures torn down, the runner ends
        (unless the test swallows it)."""
        self.interrupted = True
        if self.ignores_interrupt:
            return
        if self.hanging:
            self.outbox.append(finished_line(self.hanging, "failed"))
            self.hanging = None
        self.exited, self.code = True, 2

    def request_stop(self) -> None:
        self.stop_asked = True
        if self.hanging:  # the running test ends, then the runner
            self._end(self.hanging)
            self.hanging = None
        self.exited = True

    def close(self) -> int:
        self.closed = True
        return self.code


class Slot:
    """A driver wired to fakes: chunks to fetch, what it emitted (and when), its runners."""

    def __init__(
        self,
        nodeids: list[str],
        chunks: list[list[str]],
        *,
        timeout: float = 300.0,
        control: Any = None,
        pytest_args: tuple[str, ...] = (),
        **runner_options: Any,
    ) -> None:
        self.clock = FakeClock()
        self.chunks = [
            {"batch_id": f"b{i}", "attempt": 1, "nodeids": ids} for i, ids in enumerate(chunks, 1)
        ]
        self.fetched = 0
        self.events: list[dict[str, Any]] = []
        self.runners: list[FakeRunner] = []
        self.runner_options = runner_options
        spec = RunnerSpec(
            workspace=".", nodeids=nodeids, timeout=timeout, pytest_args=list(pytest_args), env={}
        )
        self.driver = SlotDriver(
            spec,
            self.emit,
            self.fetch,
            self.start_runner,
            control=control or (lambda: RUN),
            clock=self.clock,
        )

    def emit(self, event: dict[str, Any]) -> None:
        """What the controller gets: the message's bytes, decoded."""
        self.events.append({**json.loads(encode_event(event)), "at": self.clock.now})

    def fetch(self) -> dict[str, Any] | None:
        if self.fetched < len(self.chunks):
            self.fetched += 1
            return self.chunks[self.fetched - 1]
        return None

    def start_runner(self, eligible: list[str], number: int, tmp: str) -> FakeRunner:
        options = self.runner_options if number == 1 else {}
        runner = FakeRunner(eligible, self.clock, **options)
        self.runners.append(runner)
        return runner

    def run(self) -> dict[str, Any]:
        return self.driver.run()

    def kinds(self) -> list[str]:
        return [e["type"] for e in self.events if e["type"] != "alive"]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    def results(self) -> dict[str, dict[str, Any]]:
        return {t["nodeid"]: t for e in self.of("results") for t in e["tests"]}


def test_a_fetched_chunk_runs_and_its_events_come_home_framed_by_started_and_finished():
    slot = Slot(["t.py::a", "t.py::b"], [["t.py::a", "t.py::b"]])
    summary = slot.run()
    assert slot.kinds() == ["started", "results", "finished"]
    started = slot.of("started")[0]
    assert started["batch_id"] == "b1"
    assert started["nodeids"] == ["t.py::a", "t.py::b"]
    results = slot.results()
    assert sorted(results) == ["t.py::a", "t.py::b"]
    assert {t["batch_id"] for t in results.values()} == {"b1"}
    assert results["t.py::a"]["reports"] == [{"outcome": "passed"}]
    assert slot.of("finished")[0]["batch_id"] == "b1"
    (runner,) = slot.runners
    assert runner.sent == [{"type": "run", "nodeids": ["t.py::a", "t.py::b"]}, {"type": "shutdown"}]
    assert summary == {
        "state": RUN,
        "done": 2,
        "chunks": 1,
        "runner_starts": 1,
        "warm_start": False,
    }


def test_the_next_chunk_is_fetched_only_when_the_runner_holds_at_most_one_test():
    ids = ["t.py::a", "t.py::b", "t.py::c"]
    slot = Slot(ids, [["t.py::a"], ["t.py::b"], ["t.py::c"]], hang_on=("t.py::a",))
    slot.driver.control = lambda: STOP if slot.clock.now >= 1010 else RUN
    slot.run()
    # While t.py::a runs, one more chunk is taken (the runner keeps one test back for
    # nextitem), never a third: the rest stays in the work queue for the other slots.
    assert slot.fetched == 2
    assert slot.runners[0].sent == [
        {"type": "run", "nodeids": ["t.py::a"]},
        {"type": "run", "nodeids": ["t.py::b"]},
    ]


def test_the_driver_pauses_after_a_read_that_leaves_a_test_running_and_only_then():
    ids = ["t.py::a", "t.py::b", "t.py::c"]
    slot = Slot(ids, [["t.py::a", "t.py::b"], ["t.py::c"]], hang_on=("t.py::b",))
    pauses: list[float] = []
    slot.driver.pause = pauses.append
    slot.driver.control = lambda: STOP if slot.clock.now >= 1010 else RUN
    slot.run()
    # One read: t.py::a's end and t.py::b's start; t.py::b runs on, silent (no read, no
    # pause), until the stop ends it; t.py::c never starts.
    assert pauses == [RELAY_PAUSE]
    assert sorted(slot.results()) == ["t.py::a", "t.py::b"]


def test_a_dropped_run_interrupts_the_running_test_as_ctrl_c_would_and_ends_the_slot():
    # The worker's control() answers KILL once the run's reply queue is gone (run over,
    # Ctrl-C) or its controller is gone: the test is interrupted, its fixtures tear down.
    slot = Slot(["t.py::a", "t.py::b"], [["t.py::a"], ["t.py::b"]], hang_on=("t.py::a",))
    slot.driver.control = lambda: KILL if slot.clock.now >= 1005 else RUN
    summary = slot.run()
    (runner,) = slot.runners
    assert runner.interrupted
    assert not runner.killed  # it ended by itself after its teardown
    assert runner.closed
    assert summary["state"] == KILL
    assert slot.of("crashed") == []  # the run is over: nobody to tell
    assert slot.clock.now < 1005 + 1  # at the next check, not at the per-test deadline
    assert "t.py::b" not in slot.results()  # nothing more of the run starts


def test_a_slot_that_gets_no_more_work_starts_its_held_test_only_on_the_controller_s_word():
    # The runner holds the last test of its chunk back (nextitem) until told what comes next;
    # "shutdown" starts it. No more work also comes to a slot cut off from its broker, whose
    # control() then says KILL: the held test must not start (its twin runs it).
    ids = ["t.py::a", "t.py::b"]
    cut = [False]

    def fetch() -> dict[str, Any] | None:
        if slot.fetched:
            cut[0] = True  # the broker went silent while the slot asked for more
            return None
        slot.fetched += 1
        return slot.chunks[0]

    slot = Slot(ids, [ids], holds_back=True)
    slot.driver.fetch = fetch
    slot.driver.control = lambda: KILL if cut[0] else RUN
    summary = slot.run()
    (runner,) = slot.runners
    assert runner.began == ["t.py::a"]
    assert {"type": "shutdown"} not in runner.sent
    assert runner.interrupted
    assert summary["state"] == KILL

    slot = Slot(ids, [ids], holds_back=True)  # the same slot heard: the held test runs
    summary = slot.run()
    (runner,) = slot.runners
    assert runner.began == ids
    assert summary["state"] == RUN
    assert sorted(slot.results()) == ids


def test_a_runner_whose_teardown_outlasts_the_grace_is_killed():
    slot = Slot(["t.py::a"], [["t.py::a"]], hang_on=("t.py::a",), ignores_interrupt=True)
    slot.driver.control = lambda: KILL if slot.clock.now >= 1005 else RUN
    slot.run()
    (runner,) = slot.runners
    assert runner.interrupted
    assert runner.killed
    grace = slot.driver.teardown_grace
    assert 1005 + grace <= slot.clock.now < 1005 + grace + 1


def test_a_run_that_ends_while_the_runner_winds_down_after_all_its_work_ends_the_slot_normally():
    # The controller ends the run (deletes its reply queue) once the last results are in, while
    # the runner still winds down: nothing to interrupt, the runner is killed, and the slot has
    # done all its work: a normal end (the worker reports it and readies the next spare).
    slot = Slot(["t.py::a"], [["t.py::a"]], winds_down=True)
    slot.driver.control = lambda: KILL if slot.runners[0].shutdown_sent else RUN
    summary = slot.run()
    (runner,) = slot.runners
    assert runner.killed
    assert not runner.interrupted
    assert summary["state"] == RUN
    assert summary["done"] == 1
    assert slot.of("crashed") == []


def test_a_run_dropped_with_work_left_undone_is_a_kill_even_when_the_runner_was_told_to_end():
    slot = Slot(["t.py::a", "t.py::b"], [["t.py::a", "t.py::b"]], winds_down=True)
    slot.driver.out_of_work = True  # as if the work queue were already gone
    slot.driver.assigned["t.py::z"] = "b0"  # taken, never answered
    slot.driver.control = lambda: KILL if slot.runners and slot.runners[0].shutdown_sent else RUN
    summary = slot.run()
    assert slot.runners[0].killed
    assert summary["state"] == KILL


def test_a_stop_from_the_controller_lets_the_running_test_finish_and_starts_no_other():
    slot = Slot(
        ["t.py::a", "t.py::b", "t.py::c"],
        [["t.py::a"], ["t.py::b"], ["t.py::c"]],
        hang_on=("t.py::b",),
    )
    slot.driver.control = lambda: STOP if slot.clock.now >= 1003 else RUN
    summary = slot.run()
    (runner,) = slot.runners
    assert runner.stop_asked
    assert not runner.killed
    assert summary["state"] == STOP
    assert sorted(slot.results()) == ["t.py::a", "t.py::b"]  # b finished after the stop
    assert slot.of("crashed") == []
    assert [e["batch_id"] for e in slot.of("finished")] == ["b1", "b2"]
    assert len(slot.runners) == 1  # no runner started for c


def test_a_runner_that_dies_in_a_test_names_that_test_as_crashed_and_a_new_one_goes_on():
    ids = ["t.py::a", "t.py::b", "t.py::c"]
    slot = Slot(ids, [ids], crash_on=("t.py::b",))
    summary = slot.run()
    (crash,) = slot.of("crashed")
    assert crash["nodeid"] == "t.py::b"
    assert crash["batch_id"] == "b1"
    assert crash["reason"] == "the test process crashed (killed by SIGSEGV)"
    assert "t.py::b: the test process crashed" in crash["message"]
    assert "Segmentation fault" in crash["message"]  # the runner's last output
    assert sorted(slot.results()) == ["t.py::a", "t.py::c"]
    _first, second = slot.runners
    assert second.eligible == {"t.py::c"}  # collects only what is left
    assert second.sent[0] == {"type": "run", "nodeids": ["t.py::c"]}
    assert slot.kinds()[-1] == "finished"
    assert summary["runner_starts"] == 2
    assert summary["done"] == 3


@pytest.mark.parametrize(
    ("maxfail", "fails", "ran"),
    [("1", (), []), ("2", ("t.py::a",), []), ("3", ("t.py::a",), ["t.py::c"])],
)
def test_a_crash_that_reaches_maxfail_ends_the_slot_without_a_new_runner(maxfail, fails, ran):
    # -x / --maxfail: a crash or a timeout counts as a failure, as on the controller; the slot
    # starts no runner for the rest (the new one would count its failures from zero).
    ids = ["t.py::a", "t.py::b", "t.py::c"]
    slot = Slot(
        ids, [ids], crash_on=("t.py::b",), fail_on=fails, pytest_args=(f"--maxfail={maxfail}",)
    )
    summary = slot.run()
    assert [e["nodeid"] for e in slot.of("crashed")] == ["t.py::b"]
    assert sorted(slot.results()) == ["t.py::a", *ran]
    assert summary["state"] == (STOP if not ran else RUN)
    assert summary["runner_starts"] == (1 if not ran else 2)


def test_a_test_past_the_deadline_is_killed_and_named_with_the_timeout():
    slot = Slot(["t.py::a", "t.py::b"], [["t.py::a", "t.py::b"]], timeout=5, hang_on=("t.py::a",))
    slot.run()
    (crash,) = slot.of("crashed")
    assert crash["nodeid"] == "t.py::a"
    assert crash["reason"] == (
        "timeout: still running after 5s (--celery-timeout); the runner was killed"
    )
    assert slot.runners[0].killed
    assert 1005 <= slot.clock.now < 1006
    assert sorted(slot.results()) == ["t.py::b"]  # the next runner ran the rest
    # Asked where it was before it was killed: the message says it, the next runner's not.
    assert slot.runners[0].stacks_asked
    assert not slot.runners[1].stacks_asked
    assert crash["message"].startswith(
        "t.py::a: timeout: still running after 5s (--celery-timeout); the runner was killed\n"
        "--- where the test process was when it was killed ---\n"
        "Current thread 0x1 (most recent call first):\n"
        '  File "t.py" in t.py::a\n'
        "--- last output of the test process ---\n"
    ), crash["message"]


def test_heartbeats_name_the_running_test_every_heartbeat_interval():
    slot = Slot(["t.py::a"], [["t.py::a"]], hang_on=("t.py::a",))
    slot.driver.control = lambda: KILL if slot.clock.now >= 1000 + 5 * HEARTBEAT_INTERVAL else RUN
    slot.run()
    beats = slot.of("alive")
    assert len(beats) in (4, 5)  # in 5 intervals (the last one may meet the kill first)
    times = [beat["at"] for beat in beats]
    assert times[0] - 1000 == pytest.approx(HEARTBEAT_INTERVAL, abs=0.21)
    for earlier, later in itertools.pairwise(times):
        assert later - earlier == pytest.approx(HEARTBEAT_INTERVAL, abs=0.21)
    assert {beat["nodeid"] for beat in beats} == {"t.py::a"}
    assert {beat["batch_id"] for beat in beats} == {"b1"}
    assert beats[1]["elapsed"] == pytest.approx(2 * HEARTBEAT_INTERVAL, abs=0.5)


def test_tests_the_runner_could_not_collect_or_was_not_given_are_answered_as_missing():
    # t.py::x is not collected there (a file missing on the worker); ../evil.py::t was refused
    # by the worker before the runner started, so it is not among the slot's nodeids at all.
    slot = Slot(
        ["t.py::a", "t.py::x"],
        [["t.py::a", "t.py::x", "../evil.py::t"]],
        missing=("t.py::x",),
    )
    slot.run()
    missing = {e["nodeids"][0]: e for e in slot.of("missing")}
    assert sorted(missing) == ["../evil.py::t", "t.py::x"]
    assert missing["t.py::x"]["reason"] == "not found: x"
    assert missing["t.py::x"]["batch_id"] == "b1"
    assert missing["../evil.py::t"]["reason"] == ""
    assert sorted(slot.results()) == ["t.py::a"]
    assert slot.runners[0].sent[0] == {"type": "run", "nodeids": ["t.py::a"]}
    assert slot.kinds()[-1] == "finished"


def test_a_runner_that_cannot_even_start_fails_each_test_by_name_and_is_not_restarted():
    slot = Slot(["t.py::a", "t.py::b"], [["t.py::a"], ["t.py::b"]], collects=False)
    summary = slot.run()
    assert summary["runner_starts"] == 1
    crashes = slot.of("crashed")
    assert [c["nodeid"] for c in crashes] == ["t.py::a", "t.py::b"]
    assert crashes[0]["reason"] == "the test process exited before running any test (exit code 4)"
    assert "Segmentation fault" in crashes[0]["message"]
    assert [e["batch_id"] for e in slot.of("finished")] == ["b1", "b2"]


def test_finished_tests_are_sent_together_and_any_other_event_flushes_them_first():
    sent: list[dict[str, Any]] = []
    clock = FakeClock()
    coalesce = Coalescer(sent.append, max_tests=2, max_age=0.05, clock=clock)
    for nodeid in ("a", "b", "c"):
        coalesce({"type": "logstart", "nodeid": nodeid, "ts": 1.0})
        coalesce(finished_line(nodeid, "passed"))
    assert [len(e["tests"]) for e in sent] == [2]  # max_tests
    coalesce.tick()
    assert len(sent) == 1
    clock.now += 0.06
    coalesce.tick()  # max_age
    assert [len(e["tests"]) for e in sent] == [2, 1]
    coalesce({"type": "logstart", "nodeid": "d", "ts": 3.0})
    coalesce(finished_line("d", "passed"))
    coalesce({"type": "finished", "batch_id": "b1"})
    assert [e["type"] for e in sent] == ["results", "results", "results", "finished"]


# ---------------------------------------------------------------------------- the worker's side


def test_the_worker_tells_the_driver_the_run_s_state_from_the_run_s_queues():
    from pytest_celery_dispatch.liveness import ControllerWatch
    from pytest_celery_dispatch.worker import MISSING, _Reply

    reply = object.__new__(_Reply)  # no broker: only what control() reads
    reply.reply_to = "celery-dispatch.reply.R"
    reply.base = {"run_id": "R"}
    reply.watch = ControllerWatch()
    queues: dict[str, int | None] = {"celery-dispatch.reply.R": 1}
    reply._consumers = lambda q: queues.get(q, MISSING)  # type: ignore[method-assign]
    reply.clock, reply.last_heard, reply.cut_off = lambda: 0.0, 0.0, False
    assert reply.control() == RUN
    queues["celery-dispatch.reply.R"] = None  # the broker cannot tell now: keep working
    assert reply.control() == RUN
    queues["celery-dispatch.reply.R"] = MISSING  # the reply queue is gone: the run is over
    assert reply.control() == KILL
    queues["celery-dispatch.stop.R"] = 0  # ... after -x / --maxfail on the controller
    assert reply.control() == STOP


def test_the_worker_drops_the_run_of_a_controller_gone_past_the_grace_and_deletes_its_queues():
    from pytest_celery_dispatch.liveness import CONTROLLER_GONE_GRACE, ControllerWatch
    from pytest_celery_dispatch.worker import _Reply

    clock = FakeClock()
    reply = object.__new__(_Reply)
    reply.reply_to, reply.work_queue = "celery-dispatch.reply.R", "celery-dispatch.work.R.q"
    reply.base = {"run_id": "R"}
    reply.identity = "pipeline 7"
    reply.watch = ControllerWatch(clock=clock)
    reply.clock, reply.last_heard, reply.cut_off = clock, clock(), False
    deleted: list[str] = []

    class Channel:
        def queue_delete(self, queue: str) -> None:
            deleted.append(queue)

    reply._check_channel = Channel()
    reply._consumers = lambda q: 0  # type: ignore[method-assign]  # the controller is gone
    assert reply.control() == RUN
    clock.now += CONTROLLER_GONE_GRACE - 0.2
    assert reply.control() == RUN
    assert deleted == []
    clock.now += 0.2
    assert reply.control() == KILL
    assert deleted == ["celery-dispatch.reply.R", "celery-dispatch.work.R.q"]
    reply._consumers = lambda q: -1  # type: ignore[method-assign]  # deleted: still KILL, not STOP
    assert reply.control() == KILL


def test_a_worker_cut_off_from_the_broker_stops_its_slot_after_the_silent_limit():
    from pytest_celery_dispatch.celeryconf import SILENT_LIMIT
    from pytest_celery_dispatch.liveness import ControllerWatch
    from pytest_celery_dispatch.worker import _Reply

    now = [100.0]
    reply = object.__new__(_Reply)  # no broker: a connection that never answers
    reply.reply_to = "celery-dispatch.reply.R"
    reply.base = {"run_id": "R", "task_id": "T", "session_id": "S"}
    reply.clock, reply.last_heard, reply.cut_off = (lambda: now[0]), 100.0, False
    reply._conn = types.SimpleNamespace(collect=lambda: None)
    reply.watch = ControllerWatch()
    reply._consumers = lambda queue: None  # type: ignore[method-assign]
    now[0] += SILENT_LIMIT
    assert reply.control() == RUN  # briefly away: keep working
    now[0] += 0.1
    assert reply.control() == KILL  # it cannot be heard: stop the runner
    assert reply.cut_off
    assert reply.fetch() is None  # and take no more work
    reply.emit({"type": "alive"})  # dropped, without touching the dead connection
    reply._consumers = lambda queue: 1  # type: ignore[method-assign]
    assert reply.control() == KILL  # healed later: the slot stays stopped


def test_a_test_file_that_differs_from_the_controller_s_is_refused_by_name(tmp_path):
    from pytest_celery_dispatch.admission import different_files
    from pytest_celery_dispatch.serialization import file_digest

    (tmp_path / "test_same.py").write_text("def test_x(): pass\n")
    (tmp_path / "test_other.py").write_text("def test_y(): assert False\n")
    files = {
        "test_same.py": file_digest(str(tmp_path / "test_same.py")),
        "test_other.py": "0" * 64,
    }
    found = different_files(str(tmp_path), files, ["test_same.py::test_x", "test_other.py::test_y"])
    assert list(found) == ["test_other.py"]
    assert "has a different test_other.py" in found["test_other.py"]
    assert f"update the worker's checkout at {tmp_path}" in found["test_other.py"]


def test_a_slot_asking_for_work_from_a_silent_broker_gives_up_one_attempt_past_the_limit(
    monkeypatch,
):
    # Each broker call against a silent network waits its whole bound (a read: the socket's
    # timeout; a connection: the connect timeout). The slot checks the silence before every
    # attempt and makes one connection attempt at a time (kombu's own retries would add up to
    # ~30 s more): fetch() ends within SILENT_LIMIT plus one attempt's waits.
    from pytest_celery_dispatch import worker
    from pytest_celery_dispatch.celeryconf import BROKER_IO_TIMEOUT, SILENT_LIMIT, celery_config

    connect_timeout = celery_config("amqp://h//", "rpc://")["broker_connection_timeout"]
    clock = FakeClock()
    attempts: list[Any] = []

    class SilentConnection:
        def ensure_connection(self, max_retries: Any = None) -> None:
            attempts.append(max_retries)
            clock.now += connect_timeout
            raise TimeoutError("timed out")

        def collect(self) -> None:
            pass

    class SilentChannel:
        def basic_get(self, queue: str, no_ack: bool) -> None:
            clock.now += BROKER_IO_TIMEOUT
            raise TimeoutError()

    reply = object.__new__(worker._Reply)
    reply.task = types.SimpleNamespace(
        app=types.SimpleNamespace(connection_for_write=SilentConnection)
    )
    reply.work_queue = "celery-dispatch.work.R.q"
    reply.base = {"run_id": "R", "task_id": "T", "session_id": "S"}
    reply.clock, reply.last_heard, reply.cut_off = clock, clock(), False
    reply._conn, reply._work_channel = SilentConnection(), SilentChannel()
    monkeypatch.setattr(worker.time, "sleep", lambda s: setattr(clock, "now", clock.now + s))
    began = clock()
    assert reply.fetch() is None
    assert reply.cut_off
    assert attempts
    assert set(attempts) == {0}  # no connection attempt retried inside kombu
    assert clock() - began <= SILENT_LIMIT + 2.0 + connect_timeout  # + one pause, one attempt
    assert reply.silence() is None


class GuardedRunner:
    def __init__(self) -> None:
        self.interrupted = self.killed = False

    def interrupt(self) -> None:
        self.interrupted = True

    def kill(self) -> None:
        self.killed = True


def test_the_guard_stops_the_runner_of_a_slot_stuck_in_a_broker_call():
    # The driver's thread is held inside a broker call (it cannot look at the silence): the
    # guard, on its own thread, marks the slot cut off, interrupts the runner past GUARD_LIMIT
    # and kills it after the teardown grace.
    from pytest_celery_dispatch.cutoffguard import GUARD_LIMIT, CutOffGuard
    from pytest_celery_dispatch.liveness import TEARDOWN_GRACE

    clock = FakeClock()
    heard = clock()
    given_up: list[bool] = []
    runner = GuardedRunner()
    guard = CutOffGuard(
        lambda: None if given_up else clock() - heard,
        lambda: runner,
        lambda: given_up.append(True),
        clock=clock,
    )
    clock.now += GUARD_LIMIT
    guard.check()
    assert not runner.interrupted
    assert not given_up
    clock.now += 0.5
    guard.check()
    assert runner.interrupted
    assert given_up == [True]
    assert not runner.killed
    clock.now += TEARDOWN_GRACE - 0.1
    guard.check()
    assert not runner.killed  # its fixtures are tearing down
    clock.now += 0.1
    guard.check()
    assert runner.killed


def test_the_guard_leaves_a_slot_that_knows_it_is_cut_off_or_a_closed_runner_alone():
    from pytest_celery_dispatch.cutoffguard import GUARD_LIMIT, CutOffGuard
    from pytest_celery_dispatch.liveness import TEARDOWN_GRACE

    clock = FakeClock()
    runner: GuardedRunner | None = GuardedRunner()
    guard = CutOffGuard(lambda: None, lambda: runner, lambda: None, clock=clock)
    clock.now += 10 * GUARD_LIMIT
    guard.check()  # the slot's driver saw the silence itself and stops its runner
    assert runner is not None
    assert not runner.interrupted

    stopped = GuardedRunner()
    runner = stopped
    guard = CutOffGuard(lambda: clock() - 1000.0, lambda: runner, lambda: None, clock=clock)
    guard.check()
    assert stopped.interrupted
    runner = None  # it ended, the driver closed it: its pid may be someone else's now
    clock.now += TEARDOWN_GRACE
    guard.check()
    assert not stopped.killed


def test_the_guard_looks_on_its_own_thread_while_the_slot_runs():
    import threading

    from pytest_celery_dispatch.cutoffguard import run_guarded

    interrupted = threading.Event()

    class StuckSlot:
        runner = types.SimpleNamespace(interrupt=interrupted.set, kill=lambda: None)

        def run(self) -> dict[str, Any]:
            assert interrupted.wait(30)  # its thread is held in a broker call meanwhile
            return {"state": KILL}

    given_up: list[bool] = []
    assert run_guarded(StuckSlot(), lambda: 1e9, lambda: given_up.append(True)) == {"state": KILL}
    assert given_up == [True]


def test_a_finished_test_is_relayed_home_as_its_runner_encoded_it():
    """The runner's line: a header the driver reads, the rest relayed byte for byte; a tab
    or a newline in a test's text never cuts the line (JSON escapes them)."""
    text = "out\twith a tab\nand a newline, é, \udcff"
    header = {"type": "test", "nodeid": "t.py::a[\t]", "outcome": "failed", "ts": 2.0}
    fields = {"nodeid": "t.py::a[\t]", "reports": [{"outcome": "failed", "sections": [text]}]}
    line = encode_split(header, fields)
    assert line.count(b"\n") == 1
    assert line.count(b"\t") == 1
    event = decode(line.rstrip(b"\n"))
    assert {k: v for k, v in event.items() if k != "raw"} == header
    sent: list[dict[str, Any]] = []
    coalesce = Coalescer(sent.append, max_tests=1)
    coalesce({"type": "logstart", "nodeid": "t.py::a[\t]", "ts": 1.0})
    assert not sent
    coalesce({**event, "batch_id": "b7"})
    (results,) = sent
    (raw,) = results["tests"]
    assert (raw.nodeid, raw.outcome) == ("t.py::a[\t]", "failed")
    message = json.loads(encode_event({"type": "results", "run_id": "r", **results}))
    assert message == {
        "type": "results",
        "run_id": "r",
        "tests": [
            {
                "batch_id": "b7",
                "nodeid": "t.py::a[\t]",
                "reports": [{"outcome": "failed", "sections": [text.replace("\udcff", "?")]}],
            }
        ],
    }


def test_a_held_line_goes_out_with_the_next_write_or_before_the_runner_waits():
    """The runner holds a finished test back for the next test's logstart (one write per
    test), and never waits for a command with a line still held."""
    import os

    events_r, events_w = os.pipe()
    commands_r, commands_w = os.pipe()
    writer = LineWriter(events_w)
    writer.hold(encode_split({"type": "test", "nodeid": "a"}, {"nodeid": "a"}))
    assert not select_ready(events_r)
    writer.write({"type": "logstart", "nodeid": "b"})
    lines = os.read(events_r, 1 << 16).splitlines()
    assert [decode(line)["type"] for line in lines] == ["test", "logstart"]
    writer.hold(encode_split({"type": "test", "nodeid": "b"}, {"nodeid": "b"}))
    os.write(commands_w, b'{"type": "shutdown"}\n')
    os.close(commands_w)
    flushed: list[bytes] = []

    def before_read() -> None:
        writer.flush()
        flushed.append(os.read(events_r, 1 << 16) if select_ready(events_r) else b"")

    assert [c["type"] for c in read_until_closed(commands_r, before_read)] == ["shutdown"]
    assert decode(flushed[0].rstrip(b"\n"))["nodeid"] == "b"
    os.close(events_r)
    os.close(events_w)


def select_ready(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])
