"""QueueScheduler, one test per row of the fault table (docs/reliability.md), on a fake clock.

The scheduler is driven as the controller drives it: events from workers go to its event
methods, ``poll()`` runs the clocks, and the returned actions are checked. Deadlines come from
the scheduler's own constants, never from wall-clock time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pytest_celery_dispatch import celeryconf, retry
from pytest_celery_dispatch import scheduling as sch
from pytest_celery_dispatch.scheduling import (
    Action,
    Attempt,
    ChunkState,
    Fail,
    Notice,
    Publish,
    QueueScheduler,
    RetryPolicy,
    SlotState,
    StartSlot,
)

BROKER = "amqp://guest:**@127.0.0.1:5672//"


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Lab:
    """A scheduler with a fake clock and fake consumer counts; sends always succeed."""

    clock: Clock = field(default_factory=Clock)
    counts: dict[str, int | None] = field(default_factory=dict)
    depths: dict[str, int | None] = field(default_factory=dict)  # messages in a work queue
    retries: int = 2
    timeout: float = 300.0
    wait_workers: float = 10.0
    dist: str = "load"
    broker_timeout: float = retry.DEFAULT_BROKER_TIMEOUT
    sched: QueueScheduler = field(init=False)

    def __post_init__(self) -> None:
        self.sched = QueueScheduler(
            "run",
            timeout=self.timeout,
            wait_workers=self.wait_workers,
            policy=RetryPolicy(self.retries, send_limit=self.wait_workers + sch.SILENCE_LIMIT),
            broker=BROKER,
            consumer_count=lambda q: self.counts.get(q),
            work_depth=lambda q: self.depths.get(q),
            clock=self.clock,
            dist=self.dist,
            broker_timeout=self.broker_timeout,
        )

    def send(self, actions: list[Action]) -> list[Action]:
        """Carry out Publish as a successful send; return every action."""
        for action in actions:
            if isinstance(action, Publish):
                self.sched.sent(action.chunk)
        return actions

    def begin(self, nodeids: list[str], consumers: int = 1, slots: int = 1) -> list[Action]:
        self.sched.queue_nodeids["queue_a"] = list(nodeids)
        self.counts["queue_a"] = consumers
        return self.send(self.sched.begin({"queue_a": consumers}, {"queue_a": slots}))

    def poll(self, connected: bool = True, last_heard: float | None = None) -> list[Action]:
        """One turn of the event loop: the connection as seen now, then the clocks."""
        return self.send(self.sched.connection(connected, last_heard) + self.sched.poll())

    def take(self, chunk: ChunkState, slot: SlotState, worker: str = "w1") -> None:
        """The slot starts and takes the chunk (the events a worker sends)."""
        self.sched.slot_seen(slot.session_id, worker)
        self.sched.slot_started(slot, 1)
        self.sched.chunk_seen(chunk.batch_id)
        self.sched.chunk_started(chunk, worker, slot.session_id)

    def heartbeat(self, chunk: ChunkState, slot: SlotState) -> None:
        self.sched.slot_seen(slot.session_id, slot.worker)
        self.sched.chunk_seen(chunk.batch_id)


def of(kind: type, actions: list[Action]) -> list:  # type: ignore[type-arg]
    return [a for a in actions if isinstance(a, kind)]


def started_run(lab: Lab, nodeids: list[str]) -> tuple[ChunkState, SlotState]:
    """One slot takes the first chunk; with up to 4 tests a queue has one chunk per test."""
    actions = lab.begin(nodeids)
    chunk = of(Publish, actions)[0].chunk
    (start,) = of(StartSlot, actions)
    lab.take(chunk, start.slot)
    return chunk, start.slot


TWELVE = [f"t{i}" for i in range(12)]  # one slot: chunks of 3, 2, 1, ...


def test_start_publishes_every_chunk_of_a_queue_before_its_slots() -> None:
    # A slot that finds its work queue empty ends: a warm one asks within milliseconds, so
    # none may go out before all of its queue's work is there.
    lab = Lab()
    actions = lab.begin([f"t{i}" for i in range(20)], consumers=1, slots=2)
    kinds = [type(a).__name__ for a in actions]
    assert kinds[-2:] == ["StartSlot", "StartSlot"]
    assert set(kinds[:-2]) == {"Publish"}
    sent = [n for a in of(Publish, actions) for n in a.chunk.nodeids]
    assert sent == [f"t{i}" for i in range(20)]


def test_silent_slot_its_work_is_sent_again_after_the_backoff() -> None:
    lab = Lab()
    _chunk, slot = started_run(lab, ["a"])
    lab.clock.advance(sch.SILENCE_LIMIT)
    assert lab.poll() == []  # silent for exactly the limit: still fine
    lab.clock.advance(0.1)
    actions = lab.poll()
    (notice,) = of(Notice, actions)
    assert notice.text == (
        "w1 on queue_a: no heartbeat for 10s; re-dispatching 1 test(s) in 1s (attempt 2 of 3)"
    )
    assert slot.lost
    assert not of(Publish, actions)
    assert not of(StartSlot, actions)
    lab.clock.advance(sch.backoff(2))
    actions = lab.poll()
    (publish,) = of(Publish, actions)
    assert publish.chunk.nodeids == ["a"]
    assert publish.chunk.attempt == 2
    assert publish.chunk.lost_by == ["w1"]
    assert len(of(StartSlot, actions)) == 1  # a fresh slot pulls it


def test_only_unfinished_tests_of_a_lost_chunk_are_sent_again() -> None:
    lab = Lab()
    chunk, _slot = started_run(lab, TWELVE)
    assert chunk.nodeids == ["t0", "t1", "t2"]
    lab.sched.done("t1")
    lab.clock.advance(sch.SILENCE_LIMIT + 0.1)
    lab.poll()
    lab.clock.advance(sch.backoff(2))
    (publish,) = of(Publish, lab.poll())
    assert publish.chunk.nodeids == ["t0", "t2"]


def test_queue_lost_its_last_consumer() -> None:
    lab = Lab()
    chunk, slot = started_run(lab, ["a"])
    lab.counts["queue_a"] = 0
    assert lab.poll() == []  # the first poll that sees no consumer starts the grace
    lab.clock.advance(sch.CONSUMER_GONE_GRACE - 0.1)
    lab.heartbeat(chunk, slot)
    assert lab.poll() == []
    lab.clock.advance(0.1)
    (notice,) = of(Notice, lab.poll())
    assert "no worker consumes queue 'queue_a' any more; re-dispatching 1 test(s)" in notice.text


def test_no_consumer_ever_fails_each_test_by_name_after_wait_workers() -> None:
    lab = Lab()
    assert lab.begin(["a", "b"], consumers=0) == []
    assert lab.sched.waiting_queues == {"queue_a": 1000.0 + lab.wait_workers}
    lab.clock.advance(lab.wait_workers - 0.1)
    assert lab.poll() == []
    lab.clock.advance(0.1)
    fails = of(Fail, lab.poll())
    assert [f.nodeid for f in fails] == ["a", "b"]
    assert fails[0].message == (
        "no worker consumes queue 'queue_a' (waited 10s, --celery-wait-workers). Start one: "
        "celery -A pytest_celery_dispatch.worker worker -Q queue_a -n worker@%h"
    )


def test_a_consumer_that_shows_up_while_waiting_gets_all_the_work() -> None:
    lab = Lab()
    lab.begin([f"t{i}" for i in range(10)], consumers=0)
    lab.clock.advance(lab.wait_workers / 2)
    lab.counts["queue_a"] = 1
    actions = lab.poll()
    assert of(Notice, actions)[0] == Notice(
        "a worker now consumes queue_a; sending 10 tests", "cyan"
    )
    assert sorted(n for a in of(Publish, actions) for n in a.chunk.nodeids) == sorted(
        f"t{i}" for i in range(10)
    )
    assert len(of(StartSlot, actions)) == 1


def test_stalled_queue_a_frozen_worker_holds_the_slot_task() -> None:
    # The consumer is there but nothing on the queue moves: after timeout + grace the waiting
    # chunk counts an attempt and a fresh slot is sent after the backoff.
    lab = Lab(timeout=5.0)
    actions = lab.begin(["a"])
    (chunk,) = (a.chunk for a in of(Publish, actions))
    (first_slot,) = (a.slot for a in of(StartSlot, actions))
    limit = lab.timeout + sch.grace_for(lab.timeout)
    lab.clock.advance(limit)
    assert lab.poll() == []
    lab.clock.advance(0.1)
    actions = lab.poll()
    assert of(Attempt, actions) == [Attempt(("a",), 2)]
    (notice,) = of(Notice, actions)
    assert notice.text == (
        "queue queue_a: not taken from the queue within 10s; re-dispatching 1 test(s) in 1s "
        "(attempt 2 of 3)"
    )
    assert first_slot.lost
    assert chunk.attempt == 2
    assert not of(StartSlot, actions)
    lab.clock.advance(sch.backoff(2))
    assert len(of(StartSlot, lab.poll())) == 1
    assert not of(Publish, lab.poll())  # the chunk is still in the work queue


def begin_two_slots(lab: Lab, nodeids: list[str]) -> tuple[list[ChunkState], SlotState]:
    """Two worker slots, one chunk per test; the first slot takes the first chunk."""
    actions = lab.begin(nodeids, consumers=2, slots=2)
    chunks = [a.chunk for a in of(Publish, actions)]
    first = of(StartSlot, actions)[0].slot
    lab.take(chunks[0], first)
    return chunks, first


def test_a_chunk_taken_by_a_worker_that_died_before_saying_so_is_sent_again() -> None:
    # The other worker took chunk b from the work queue (no ack) and died before its
    # "started" went out: the controller still counts b as waiting, while the queue is empty
    # and the live slot keeps the queue "moving". Without this rule it waits forever.
    lab = Lab()
    chunks, slot = begin_two_slots(lab, ["a", "b"])
    lab.depths["queue_a"] = 0
    for _ in range(int(sch.SILENCE_LIMIT)):
        assert of(Notice, lab.poll()) == []
        lab.clock.advance(1.0)
        lab.heartbeat(chunks[0], slot)
    assert of(Notice, lab.poll()) == []  # gone for exactly the limit: a slot may still say so
    lab.clock.advance(0.1)
    lab.heartbeat(chunks[0], slot)
    actions = lab.poll()
    (notice,) = of(Notice, actions)
    assert notice.text == (
        "queue queue_a: taken from its work queue 10s ago by a slot that never said so (its "
        "worker died or was cut off as it took it); re-dispatching 1 test(s) in 1s "
        "(attempt 2 of 3)"
    )
    assert chunks[1].batch_id in lab.sched.abandoned
    assert chunks[0].batch_id not in lab.sched.abandoned
    lab.clock.advance(sch.backoff(2))
    lab.heartbeat(chunks[0], slot)
    (publish,) = of(Publish, lab.poll())
    assert publish.chunk.nodeids == ["b"]
    assert publish.chunk.attempt == 2


def test_a_chunk_announced_within_the_limit_is_not_lost() -> None:
    lab = Lab()
    chunks, slot = begin_two_slots(lab, ["a", "b"])
    lab.depths["queue_a"] = 0
    lab.poll()
    lab.clock.advance(sch.SILENCE_LIMIT - 1.0)
    lab.heartbeat(chunks[0], slot)
    lab.poll()
    second = next(s for s in lab.sched.slots.values() if s is not slot)
    lab.take(chunks[1], second, worker="w2")  # its "started" was only late
    lab.clock.advance(5.0)
    lab.heartbeat(chunks[0], slot)
    lab.heartbeat(chunks[1], second)
    assert of(Notice, lab.poll()) == []
    assert not lab.sched.abandoned


def test_only_the_oldest_chunks_count_as_taken_first_in_first_out() -> None:
    lab = Lab()
    chunks, slot = begin_two_slots(lab, ["a", "b", "c", "d"])
    lab.depths["queue_a"] = 2  # c and d are still in the work queue: b was taken
    lab.poll()
    lab.clock.advance(sch.SILENCE_LIMIT + 0.1)
    lab.heartbeat(chunks[0], slot)
    lab.poll()
    assert lab.sched.abandoned == {chunks[1].batch_id}


@pytest.mark.parametrize("depth", [None, 3])
def test_an_unknown_or_full_work_queue_loses_nothing(depth: int | None) -> None:
    lab = Lab()
    chunks, slot = begin_two_slots(lab, ["a", "b", "c", "d"])
    lab.depths["queue_a"] = depth
    for _ in range(3):
        lab.clock.advance(sch.SILENCE_LIMIT)
        lab.heartbeat(chunks[0], slot)
        assert of(Notice, lab.poll()) == []
    assert not lab.sched.abandoned


def test_send_failure_is_retried_each_second_then_fails_by_name() -> None:
    lab = Lab()
    lab.sched.queue_nodeids["queue_a"] = TWELVE
    actions = lab.sched.begin({"queue_a": 1}, {"queue_a": 1})
    publish = of(Publish, actions)[0]
    for other in of(Publish, actions)[1:]:
        lab.sched.sent(other.chunk)
    assert lab.sched.send_failed(publish.chunk, "[Errno 111] Connection refused") == []
    assert lab.sched.poll() == []  # not before the resend interval
    lab.clock.advance(retry.RESEND_INTERVAL)
    again = of(Publish, lab.sched.poll())
    assert [a.chunk for a in again] == [publish.chunk]
    lab.clock.advance(lab.wait_workers + sch.SILENCE_LIMIT)
    fails = lab.sched.send_failed(publish.chunk, "[Errno 111] Connection refused")
    assert [f.nodeid for f in fails] == ["t0", "t1", "t2"]
    assert fails[0].message == (
        f"could not send t0 to queue 'queue_a' on {BROKER} for 20s: [Errno 111] Connection refused"
    )


def test_broker_outage_pauses_every_deadline() -> None:
    lab = Lab()
    _chunk, _slot = started_run(lab, ["a"])
    (lost,) = lab.poll(connected=False)
    assert lost == Notice(
        f"no word from the broker {BROKER} for 0 s; waiting up to 300 s (--celery-broker-timeout)"
    )
    lab.clock.advance(sch.SILENCE_LIMIT * 3)
    assert lab.poll(connected=False) == []  # said once
    actions = lab.poll(connected=True)
    assert actions == [Notice("reconnected after 30.0s", "cyan")]
    lab.clock.advance(sch.SILENCE_LIMIT)
    assert lab.poll() == []  # the silence counts from the reconnection
    lab.clock.advance(0.1)
    assert of(Notice, lab.poll())


def test_the_outage_counts_from_when_the_broker_was_last_heard() -> None:
    lab = Lab(broker_timeout=20.0)
    started_run(lab, ["a"])
    heard = lab.clock.now
    lab.clock.advance(2 * celeryconf.BROKER_HEARTBEAT)  # noticed two missed heartbeats later
    (said,) = lab.poll(connected=False, last_heard=heard)
    assert said.text == (
        f"no word from the broker {BROKER} for 10 s; waiting up to 20 s (--celery-broker-timeout)"
    )
    lab.clock.advance(20.0 - 2 * celeryconf.BROKER_HEARTBEAT - 0.1)
    assert lab.poll(connected=False) == []
    lab.clock.advance(0.1)
    assert of(Fail, lab.poll(connected=False))


def test_cut_off_past_the_broker_timeout_every_unfinished_test_fails_by_name_once() -> None:
    lab = Lab(broker_timeout=20.0)
    lab.counts["queue_b"] = 0
    lab.sched.queue_nodeids["queue_b"] = ["b0"]  # waits for a consumer: no chunk yet
    started_run(lab, ["a", "b", "c"])
    lab.sched.done("a")  # finished before the cut: keeps its outcome
    assert lab.poll(connected=False)  # said once
    lab.clock.advance(20.0 - 0.1)
    assert lab.poll(connected=False) == []
    lab.clock.advance(0.1)
    actions = lab.poll(connected=False)
    assert [a.nodeid for a in of(Fail, actions)] == ["b0", "b", "c"]
    why = f"cut off from the broker {BROKER}: no word from it for 20s (--celery-broker-timeout 20)"
    assert of(Fail, actions)[1].message == f"b has no outcome: {why}"
    assert of(Publish, actions) == of(StartSlot, actions) == []
    lab.clock.advance(600)
    assert lab.poll(connected=False) == []  # given up once
    assert of(Notice, lab.poll(connected=True)) == [Notice("reconnected after 620.0s", "cyan")]
    lab.clock.advance(600)
    assert lab.poll() == []  # nothing is sent or failed again after giving up


def test_a_short_cut_ends_the_wait_and_a_later_one_waits_the_whole_timeout_again() -> None:
    lab = Lab(broker_timeout=20.0)
    chunk, slot = started_run(lab, ["a"])
    lab.poll(connected=False)
    lab.clock.advance(15.0)
    assert of(Notice, lab.poll())  # reconnected
    lab.heartbeat(chunk, slot)
    lab.poll(connected=False)
    lab.clock.advance(19.9)
    assert lab.poll(connected=False) == []
    lab.clock.advance(0.1)
    assert of(Fail, lab.poll(connected=False))


def test_gives_up_after_the_retries_naming_every_worker() -> None:
    lab = Lab(retries=1)
    _chunk, _slot = started_run(lab, ["a"])
    lab.clock.advance(sch.SILENCE_LIMIT + 0.1)
    lab.poll()
    lab.clock.advance(sch.backoff(2))
    actions = lab.poll()
    (retry,) = (a.chunk for a in of(Publish, actions))
    (second,) = (a.slot for a in of(StartSlot, actions))
    lab.take(retry, second, worker="w2")
    lab.clock.advance(sch.SILENCE_LIMIT + 0.1)
    (fail,) = of(Fail, lab.poll())
    assert fail.message == (
        "w2 lost while running a (queue queue_a) after 2 attempts (worked on by w1, w2): "
        "no heartbeat for 10s (--celery-timeout 300, --celery-retries 1)"
    )
    lab.clock.advance(60)
    assert lab.poll() == []  # nothing left: no slot, no publish


def test_a_test_outliving_the_workers_hard_kill_is_lost_even_with_heartbeats() -> None:
    lab = Lab(timeout=5.0)
    chunk, slot = started_run(lab, ["a"])
    lab.sched.test_started(chunk, "a")
    for _ in range(5):
        lab.clock.advance(2.0)
        lab.heartbeat(chunk, slot)
        assert lab.poll() == []
    lab.clock.advance(0.1)
    (notice,) = of(Notice, lab.poll())
    assert "a test still running 10s after it started" in notice.text


def test_stop_revokes_queued_work_and_starts_nothing_more() -> None:
    lab = Lab()
    actions = lab.begin([f"t{i}" for i in range(12)], consumers=1, slots=1)
    chunks = [a.chunk for a in of(Publish, actions)]
    first_slot = of(StartSlot, actions)[0].slot
    lab.take(chunks[0], first_slot)
    queued = lab.sched.stop()
    assert queued == sorted(n for c in chunks[1:] for n in c.nodeids)
    first_slot.lost = True
    lab.clock.advance(5)
    assert not of(StartSlot, lab.poll())


def test_a_slot_that_reports_more_worker_slots_brings_more_slots() -> None:
    lab = Lab()
    actions = lab.begin([f"t{i}" for i in range(40)], consumers=1, slots=1)
    slot = of(StartSlot, actions)[0].slot
    lab.sched.slot_seen(slot.session_id, "w1")
    more = lab.sched.slot_started(slot, 3)
    assert len(of(StartSlot, more)) == 2
    assert lab.sched.capacity["queue_a"] == 3


@pytest.mark.parametrize("count", [None, 1])
def test_an_unknown_consumer_count_changes_nothing(count: int | None) -> None:
    lab = Lab()
    chunk, slot = started_run(lab, ["a"])
    lab.counts["queue_a"] = count
    for _ in range(10):
        lab.clock.advance(1.0)
        lab.heartbeat(chunk, slot)
        assert lab.poll() == []


def test_no_consumer_failure_guesses_a_served_queue_one_edit_away() -> None:
    lab = Lab()
    lab.begin(["a"], consumers=0)
    lab.sched.guesses["queue_a"] = "queue_b"  # the controller's guess (routing.did_you_mean)
    lab.clock.advance(lab.wait_workers)
    (fail,) = of(Fail, lab.poll())
    assert fail.message == (
        "no worker consumes queue 'queue_a' (waited 10s, --celery-wait-workers). Did you mean "
        "queue_b? Otherwise start one: "
        "celery -A pytest_celery_dispatch.worker worker -Q queue_a -n worker@%h"
    )


# ----------------------------------------------------------------------------- --celery-dist

# A file of eight (a class of five, three functions), then a file of two; collection order.
GROUPED = [
    *(f"b.py::TestSeq::test_{i}" for i in range(5)),
    *(f"b.py::test_free_{i}" for i in range(3)),
    "a.py::test_1",
    "a.py::test_2",
]


def grouped_lab(dist: str, keys: dict[str, str | None]) -> tuple[Lab, list[Action]]:
    lab = Lab(dist=dist)
    lab.sched.group_of.update(keys)
    return lab, lab.begin(GROUPED, consumers=1, slots=2)


def test_load_sends_todays_chunks_even_with_group_keys() -> None:
    _lab, actions = grouped_lab("load", {n: "one" for n in GROUPED})
    assert [a.chunk.nodeids for a in of(Publish, actions)] == sch.plan_chunks(GROUPED, 2)


def test_loadfile_sends_one_chunk_per_file_biggest_first_then_the_slots() -> None:
    _lab, actions = grouped_lab("loadfile", {n: n.split("::")[0] for n in GROUPED})
    kinds = [type(a).__name__ for a in actions]
    assert kinds == ["Publish", "Publish", "StartSlot", "StartSlot"]
    assert [a.chunk.nodeids for a in of(Publish, actions)] == [GROUPED[:8], GROUPED[8:]]


def test_loadscope_never_starts_more_slots_than_there_are_groups() -> None:
    keys: dict[str, str | None] = {n: n.rsplit("::", 1)[0] for n in GROUPED}
    lab = Lab(dist="loadscope")
    lab.sched.group_of.update(keys)
    actions = lab.begin(GROUPED, consumers=2, slots=8)
    assert [a.chunk.nodeids for a in of(Publish, actions)] == [
        GROUPED[:5],
        GROUPED[5:8],
        GROUPED[8:],
    ]
    assert len(of(StartSlot, actions)) == 3


def test_a_lost_group_goes_out_again_as_one_chunk_in_order() -> None:
    keys: dict[str, str | None] = {n: "flash" for n in GROUPED[:5]}
    lab, actions = grouped_lab("loadgroup", keys)
    (group,) = (a.chunk for a in of(Publish, actions) if a.chunk.nodeids == GROUPED[:5])
    slot = of(StartSlot, actions)[0].slot
    lab.take(group, slot)
    lab.sched.done(GROUPED[0])
    lab.sched.done(GROUPED[2])  # reported out of order: the rest keeps collection order
    lab.clock.advance(sch.SILENCE_LIMIT + 0.1)
    (notice,) = of(Notice, lab.poll())
    assert "re-dispatching 3 test(s)" in notice.text
    lab.clock.advance(sch.backoff(2))
    (publish,) = of(Publish, lab.poll())
    assert publish.chunk.nodeids == [GROUPED[1], GROUPED[3], GROUPED[4]]
    assert publish.chunk.attempt == 2


def test_at_a_stop_the_rest_of_a_group_a_slot_holds_waits_behind_its_running_test() -> None:
    keys: dict[str, str | None] = {n: "flash" for n in GROUPED[:5]}
    lab, actions = grouped_lab("loadgroup", keys)
    publishes = of(Publish, actions)
    (group,) = (a.chunk for a in publishes if a.chunk.nodeids == GROUPED[:5])
    lab.take(group, of(StartSlot, actions)[0].slot)
    lab.sched.done(GROUPED[0])
    running, waiting = lab.sched.held()
    assert (running, waiting) == ({GROUPED[1]}, set(GROUPED[2:5]))
    queued = lab.sched.stop()  # the chunks no slot took
    assert queued == sorted(n for a in publishes if a.chunk is not group for n in a.chunk.nodeids)


# ----------------------------------------------------------------------------- recorded durations


def test_recorded_durations_send_the_long_tests_first_and_predict_the_test_time() -> None:
    ids = [f"t.py::short_{i}" for i in range(40)] + [f"t.py::soak_{i}" for i in range(3)]
    lab = Lab()
    lab.sched.estimates["queue_a"] = {n: (4.0 if "soak" in n else 0.1) for n in ids}
    actions = lab.begin(ids, slots=2)
    published = [a.chunk.nodeids for a in actions if isinstance(a, Publish)]
    assert published[:3] == [[n] for n in ids[40:]]
    assert sorted(n for c in published for n in c) == sorted(ids)
    assert lab.sched.predicted == {"queue_a": pytest.approx(8.0)}


def test_without_history_the_chunks_are_todays_and_nothing_is_predicted() -> None:
    ids = [f"t.py::test_{i}" for i in range(43)]
    lab = Lab()
    actions = lab.begin(ids, slots=2)
    published = [a.chunk.nodeids for a in actions if isinstance(a, Publish)]
    assert published == sch.plan_chunks(ids, 2)
    assert lab.sched.predicted == {}


def test_more_slots_than_the_plan_assumed_revise_the_eta() -> None:
    ids = [f"t.py::test_{i}" for i in range(4)]
    lab = Lab()
    lab.sched.estimates["queue_a"] = dict.fromkeys(ids, 1.0)
    first = lab.begin(ids, slots=1)  # the inspect at the start missed the worker's slots
    assert lab.sched.predicted["queue_a"] == pytest.approx(4.0)
    slot = next(a.slot for a in first if isinstance(a, StartSlot))
    lab.sched.slot_seen(slot.session_id, "worker-1")
    actions = lab.sched.slot_started(slot, concurrency=2)
    assert lab.sched.predicted["queue_a"] == pytest.approx(2.0)
    assert Notice("queue_a: 2 slots; revised ETA 2.00s", "cyan") in actions
    assert lab.sched.slot_started(slot, concurrency=2) == []  # said once


def test_a_chunk_a_slot_took_beside_a_long_test_is_not_lost_while_the_slot_lives() -> None:
    """A slot takes its next chunk while its current test runs: that chunk says nothing until
    the test ends, which may be long after SILENCE_LIMIT. The slot's heartbeats keep it."""
    lab = Lab()
    actions = lab.begin(["long", "next", "other", "last"], consumers=1, slots=1)
    chunks = [a.chunk for a in of(Publish, actions)]
    (start,) = of(StartSlot, actions)
    lab.take(chunks[0], start.slot)
    lab.sched.test_started(chunks[0], "long")
    lab.take(chunks[1], start.slot)  # announced at once, held until "long" ends
    lab.depths["queue_a"] = len(chunks) - 2
    for _ in range(int(3 * sch.SILENCE_LIMIT)):
        lab.clock.advance(1.0)
        lab.heartbeat(chunks[0], start.slot)  # the driver's "alive" names the running test
        assert lab.poll() == []
    lab.clock.advance(sch.SILENCE_LIMIT + 1)  # the slot falls silent: both chunks are lost
    lost = of(Notice, lab.poll())
    assert len(lost) == 2, lost
