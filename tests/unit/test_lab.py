"""The line for a shared bench (lab.grant, the waiting line, the status view), RunTurns with a
fake board and clocks, the scheduler waiting for its turn, and --celery-priority."""

from __future__ import annotations

import pytest

from pytest_celery_dispatch import lab
from pytest_celery_dispatch.cli import render
from pytest_celery_dispatch.retry import RetryPolicy
from pytest_celery_dispatch.scheduling import Publish, QueueScheduler, StartSlot
from pytest_celery_dispatch.settings import parse_priority
from pytest_celery_dispatch.turns import RunTurns, remembered

Q = "queue_a"


def run(rid, priority=5, arrived=0.0, state=None, **on):
    queues = {Q: {"state": state, **on}} if state else {}
    return {"kind": "run", "id": rid, "priority": priority, "arrived": arrived, "queues": queues,
            "identity": {"label": f"job {rid}"}}  # fmt: skip


def worker(busy=(), slots=1):
    return {"kind": "worker", "id": "worker-a@h", "worker": "worker-a", "host": "h",
            "queues": [Q], "slots": slots, "busy": list(busy), "last": None}  # fmt: skip


def test_a_free_bench_goes_to_the_first_in_line():
    assert lab.grant(run("b"), [], Q, 1) == 1


def test_a_held_bench_gives_nobody_a_slot():
    holder = run("a", state=lab.HOLDING, slots=1)
    assert lab.grant(run("c", priority=9), [holder], Q, 1) == 0


def test_higher_priority_goes_before_an_earlier_lower_one():
    b = run("b", priority=5, arrived=1.0, state=lab.WAITING)
    c = run("c", priority=9, arrived=2.0, state=lab.WAITING)
    assert lab.grant(c, [b], Q, 1) == 1
    assert lab.grant(b, [c], Q, 1) == 0


def test_equal_priorities_first_come_first_served():
    b = run("b", arrived=1.0, state=lab.WAITING)
    d = run("d", arrived=2.0, state=lab.WAITING)
    assert lab.grant(b, [d], Q, 1) == 1
    assert lab.grant(d, [b], Q, 1) == 0
    assert [n["id"] for n in lab.line([d, b], Q)] == ["b", "d"]


def test_two_free_slots_serve_the_first_two_and_gone_notices_do_not_count():
    b = run("b", arrived=1.0, state=lab.WAITING)
    d = run("d", arrived=2.0, state=lab.WAITING)
    gone = {**run("a", state=lab.HOLDING, slots=2), "gone": True}
    assert lab.grant(d, [b, gone], Q, 2) == 1
    assert lab.grant(d, [b, run("a", state=lab.HOLDING, slots=1)], Q, 2) == 0


def test_the_waiting_line_names_the_holder_its_progress_and_the_place():
    a = run("a1b2c3", state=lab.HOLDING, slots=1, done=37, total=120, since=760.0)
    c = run("c", priority=9, arrived=2.0, state=lab.WAITING)
    busy = worker([{"run_id": "a1b2c3", "queue": Q, "identity": "job a1b2c3", "since": 760.0}])
    text = lab.waiting_line(run("b", arrived=1.0), [a, c, busy], Q, now=1000.0)
    assert text == (
        "queue_a: worker-a busy with run a1b2 (job a1b2c3, 37/120 tests, started 4 min ago); "
        "this run is 2nd in line (priority 5)"
    )


def test_the_status_view_lists_workers_holders_and_the_line_in_order():
    a = run("a", state=lab.HOLDING, slots=1, done=3, total=10, since=90.0)
    b = run("b", arrived=1.0, state=lab.WAITING, total=2)
    c = run("c", priority=9, arrived=2.0, state=lab.WAITING, total=2)
    busy = worker([{"run_id": "a", "queue": Q, "identity": "job a", "since": 90.0}])
    view = lab.lab_view([b, busy, a, c], now=100.0)
    entry = view["queues"][Q]
    assert entry["workers"][0]["state"] == "busy"
    assert entry["workers"][0]["busy"][0]["done"] == 3
    assert [(w["run_id"], w["priority"], w["position"]) for w in entry["waiting"]] == [
        ("c", 9, 1),
        ("b", 5, 2),
    ]
    table = render(view)
    assert "worker-a" in table
    assert "1. run c priority 9" in table
    assert "3/10 tests" in table


class FakeBoard:
    ready = True
    error = None

    @property
    def settled(self):
        return self.ready

    def __init__(self, notices=()):
        self.others = list(notices)
        self.published = []

    def publish(self, notice):
        self.published.append(notice)

    def notices(self):
        return list(self.others)

    def close(self):
        pass


def scheduler(grant):
    sch = QueueScheduler(
        "run1", timeout=10, wait_workers=5, policy=RetryPolicy(1), broker="b",
        consumer_count=lambda q: 1, clock=lambda: 0.0,
    )  # fmt: skip
    sch.queue_nodeids[Q] = ["t.py::a", "t.py::b"]
    sch.turns.grant = grant
    return sch


def test_a_queue_waits_for_its_turn_then_starts_with_the_granted_slots():
    board = FakeBoard([run("a", state=lab.HOLDING, slots=2)])
    clock = [0.0]
    turns = RunTurns("me", {"label": "me@h"}, 5, board, wall=lambda: 50.0, clock=lambda: clock[0])
    sch = scheduler(turns.grant)
    assert sch.begin({Q: 1}, {Q: 2}) == []  # both slots held: nothing is sent
    assert set(sch.turns.waiting) == {Q}
    assert turns.tick(sch) == [
        "queue_a: held by run a (job a); this run is 1st in line (priority 5)"
    ]
    assert board.published[-1]["queues"][Q]["state"] == lab.WAITING
    assert sch.poll() == []
    board.others[0]["queues"][Q]["slots"] = 1  # one slot free
    actions = sch.poll()
    assert any(isinstance(a, Publish) for a in actions)
    assert sum(isinstance(a, StartSlot) for a in actions) == 1  # granted 1 of the 2 slots
    clock[0] += lab.LAB_INTERVAL
    assert turns.tick(sch) == ["queue_a: this run's turn; sending its tests"]
    assert board.published[-1]["queues"][Q]["state"] == lab.HOLDING
    turns.close()
    assert board.published[-1] == {"kind": "run", "id": "me", "gone": True}


def test_without_a_line_every_queue_starts_at_once():
    sch = scheduler(None)
    actions = sch.begin({Q: 1}, {Q: 1})
    assert any(isinstance(a, StartSlot) for a in actions)
    assert not sch.turns.waiting


@pytest.mark.parametrize("raw", ["-1", "10", "high", "4.5"])
def test_a_priority_outside_0_to_9_is_a_usage_error_naming_the_source(raw):
    with pytest.raises(pytest.UsageError, match=r"--celery-priority.*0 to 9"):
        parse_priority(raw, "--celery-priority")


def test_priorities_0_to_9_are_accepted():
    assert [parse_priority(str(n), "ini celery_dispatch_priority") for n in range(10)] == list(
        range(10)
    )


def test_a_slot_busy_with_a_run_without_notice_counts_as_held():
    """A killed controller's run, until its worker drops it; or a run of an earlier version."""
    dying = worker([{"run_id": "dead", "queue": Q, "identity": "x", "since": 1.0}])
    assert lab.grant(run("b"), [dying], Q, 1) == 0
    assert lab.grant(run("b"), [dying], Q, 2) == 1
    holder = run("dead", state=lab.HOLDING, slots=1)
    assert lab.grant(run("b"), [dying, holder], Q, 2) == 1  # not counted twice


def test_a_board_out_of_reach_at_the_start_leaves_the_run_out_of_the_line():
    board = FakeBoard()
    board.ready, board.error = False, "ACCESS_REFUSED"
    now = [0.0]

    def clock():
        now[0] += 1.0  # each look at the clock: a second later
        return now[0]

    turns = RunTurns("me", {"label": "me@h"}, 5, board, wall=lambda: 1.0, clock=clock)
    assert turns.grant(Q, 2) == 2  # as without a line, after BOARD_WAIT
    assert now[0] >= lab.BOARD_WAIT
    sch = scheduler(turns.grant)
    lines = turns.tick(sch)
    assert lines == [
        "the lab board is out of reach (ACCESS_REFUSED): this run does not wait in line for "
        "busy queues (docs/shared-benches.md)"
    ]
    assert turns.tick(sch) == []  # said once


def test_a_waiting_run_keeps_waiting_while_the_board_is_cut_off():
    board = FakeBoard([run("a", state=lab.HOLDING, slots=1)])
    turns = RunTurns("me", {"label": "me@h"}, 5, board, wall=lambda: 1.0, clock=lambda: 0.0)
    assert turns.grant(Q, 1) == 0
    board.ready, board.others = False, []  # a broker restart: the holder's notice is gone too
    assert turns.grant(Q, 1) == 0
    board.ready = True
    assert turns.grant(Q, 1) == 1


def test_a_run_starts_its_free_queue_while_its_busy_one_waits():
    sch = scheduler(lambda queue, slots, wanted: 0 if queue == Q else wanted)
    sch.queue_nodeids["queue_b"] = ["t.py::c"]
    actions = sch.begin({Q: 1, "queue_b": 1}, {Q: 1, "queue_b": 1})
    assert {a.slot.queue for a in actions if isinstance(a, StartSlot)} == {"queue_b"}
    assert set(sch.turns.waiting) == {Q}
    assert not [a for a in sch.poll() if isinstance(a, StartSlot) and a.slot.queue == Q]


def test_a_granted_queue_is_published_as_held_at_once():
    """A run arriving right after must count the slots as taken, before the next renewal."""
    board = FakeBoard()
    turns = RunTurns("me", {"label": "me@h"}, 5, board, wall=lambda: 7.0, clock=lambda: 0.0)
    turns.join([Q, "queue_b"])
    assert turns.grant(Q, 2) == 2
    queues = board.published[-1]["queues"]
    assert queues[Q] == {"state": lab.HOLDING, "slots": 2, "since": 7.0}
    assert queues["queue_b"] == {"state": lab.WAITING}
    assert lab.grant(run("late", priority=9), [board.published[-1]], Q, 2) == 0


def test_a_queue_that_learns_of_more_slots_takes_the_free_ones_as_the_line_allows():
    """The broadcast at the start missed the worker: the queue began with 1 slot of its 3.
    Its first slot tells the worker's 3 slots: the run asks the line again and takes what is
    free (a run that came meanwhile holds one of them), keeping the time it began holding."""
    board = FakeBoard()
    wall = [50.0]
    turns = RunTurns("me", {"label": "me@h"}, 5, board, wall=lambda: wall[0], clock=lambda: 0.0)
    sch = scheduler(turns.grant)
    sch.queue_nodeids[Q] = [f"t.py::t{i}" for i in range(12)]
    (first,) = sent(sch, sch.begin({Q: 1}, {Q: 1}))
    assert sch.turns.granted == {Q: 1}
    board.others = [run("other", state=lab.HOLDING, slots=1)]
    wall[0] = 60.0
    sch.slot_seen(first.session_id, "worker-a")
    more = [a for a in sch.slot_started(first, 3) if isinstance(a, StartSlot)]
    assert len(more) == 1  # 3 slots, 1 held by the other run: 2 for this run
    assert sch.turns.granted == {Q: 2}
    assert board.published[-1]["queues"][Q] == {"state": lab.HOLDING, "slots": 2, "since": 50.0}


def test_a_widened_queue_never_holds_fewer_slots_than_granted():
    board = FakeBoard()
    turns = RunTurns("me", {"label": "me@h"}, 5, board, wall=lambda: 50.0, clock=lambda: 0.0)
    sch = scheduler(turns.grant)
    sch.queue_nodeids[Q] = [f"t.py::t{i}" for i in range(12)]
    (first,) = sent(sch, sch.begin({Q: 1}, {Q: 1}))
    board.others = [run("other", state=lab.HOLDING, slots=3)]  # took the rest meanwhile
    sch.slot_seen(first.session_id, "worker-a")
    assert [a for a in sch.slot_started(first, 3) if isinstance(a, StartSlot)] == []
    assert sch.turns.granted == {Q: 1}


def sent(sch, actions):
    """Every chunk published as the controller does; the slots started."""
    for action in actions:
        if isinstance(action, Publish):
            sch.sent(action.chunk)
    return [a.slot for a in actions if isinstance(a, StartSlot)]


def test_a_run_holds_no_more_slots_of_a_shared_bench_than_it_has_tests():
    board = FakeBoard()
    turns = RunTurns("me", {"label": "me@h"}, 5, board, wall=lambda: 50.0, clock=lambda: 0.0)
    sch = scheduler(turns.grant)
    sch.queue_nodeids[Q] = ["t.py::only"]
    assert len(sent(sch, sch.begin({Q: 1}, {Q: 2}))) == 1
    assert board.published[-1]["queues"][Q]["slots"] == 1  # the other slot is free for others
    assert lab.grant(run("next"), [board.published[-1]], Q, 2) == 1


def test_a_board_has_settled_hello_wait_after_its_hello_and_after_its_notice_went_out():
    w = lab.HELLO_WAIT
    assert not lab.settled(w * 0.9, 0.0, None, pending=False)
    assert lab.settled(w, 0.0, None, pending=False)  # nothing published: the hello is all
    assert not lab.settled(w, None, None, pending=False)  # no hello said yet
    # Opened during collection: the hello long answered, the run's notice just given.
    assert not lab.settled(5.0, 0.0, None, pending=True)
    assert not lab.settled(5.0 + w * 0.9, 0.0, 5.0, pending=False)
    assert lab.settled(5.0 + w, 0.0, 5.0, pending=False)


class OpenedEarly(FakeBoard):
    """A board whose hello was answered before the run joined: it settles at ``at``."""

    def __init__(self, now, at):
        super().__init__()
        self.now, self.at = now, at

    @property
    def settled(self):
        return self.now[0] >= self.at


def test_a_run_decides_its_first_turn_only_once_the_board_has_settled():
    """A board opened while pytest collects is ready long before the run joins the line: the
    run still waits until its own notice has been out HELLO_WAIT (lab.settled), so runs that
    join together see each other before either decides."""
    now = [0.0]

    def clock():
        now[0] += 0.01
        return now[0]

    board = OpenedEarly(now, at=lab.HELLO_WAIT)
    turns = RunTurns("me", {"label": "me@h"}, 5, board, wall=lambda: 1.0, clock=clock)
    turns.join([Q])
    assert turns.grant(Q, 1) == 1
    assert now[0] >= lab.HELLO_WAIT
    assert turns.unreachable is None


def test_a_run_that_joined_while_collecting_for_the_same_queues_says_nothing_new():
    """Its notice (the last run's queues, during collection) has been out since then: the
    line's wait counts from it, unless the tests turned out to need other queues."""
    board = FakeBoard()
    turns = RunTurns("me", {"label": "me@h"}, 5, board, wall=lambda: 1.0, clock=lambda: 0.0)
    turns.join([Q, "queue_b"])
    turns.join(["queue_b", Q])
    assert len(board.published) == 1
    turns.join([Q])
    assert len(board.published) == 2
    assert set(board.published[-1]["queues"]) == {Q}


def test_the_queues_remembered_are_the_last_run_s_with_the_same_arguments_only():
    cached = {"args": ["tests", "-q"], "queues": [Q, "queue_b"]}
    assert remembered(cached, ["tests", "-q"]) == [Q, "queue_b"]
    assert remembered(cached, ["tests"]) == []
    assert remembered(None, ["tests", "-q"]) == []
    assert remembered({"args": ["tests"], "queues": "queue_a"}, ["tests"]) == []
    assert remembered({"args": ["tests"], "queues": [Q, 3]}, ["tests"]) == []


def test_a_run_closed_twice_says_it_is_gone_once():
    board = FakeBoard()
    turns = RunTurns("me", {"label": "me@h"}, 5, board, wall=lambda: 1.0, clock=lambda: 0.0)
    turns.close()
    turns.close()
    assert board.published == [{"kind": "run", "id": "me", "gone": True}]
