"""scheduling.py: chunks, sessions, backoff, loss detection and re-dispatch."""

from __future__ import annotations

from typing import Any

from pytest_celery_dispatch import scheduling as sch
from pytest_celery_dispatch.scheduling import Batch


def test_plan_chunks_is_contiguous_ordered_and_shrinking() -> None:
    for n in range(0, 300, 7):
        for slots in (1, 2, 4, 8):
            items = [f"t{i}" for i in range(n)]
            chunks = sch.plan_chunks(items, slots)
            assert [x for chunk in chunks for x in chunk] == items, (n, slots)
            sizes = [len(c) for c in chunks]
            assert all(size >= 1 for size in sizes)
            assert sizes == sorted(sizes, reverse=True), (n, slots, sizes)
            if sizes:
                assert sizes[-1] == 1  # the tail is single tests: no slot waits on a long one


def test_plan_chunks_sizes_follow_remaining_over_four_slots() -> None:
    sizes = [len(c) for c in sch.plan_chunks([str(i) for i in range(100)], slots=2)]
    assert sizes[:4] == [12, 11, 9, 8]  # 100 // 8, 88 // 8, 77 // 8, 68 // 8
    assert sum(sizes) == 100
    assert [len(c) for c in sch.plan_chunks(list("abc"), slots=4)] == [1, 1, 1]
    assert sch.plan_chunks([], slots=3) == []
    assert max(len(c) for c in sch.plan_chunks([str(i) for i in range(5000)], 1)) == 200


def test_session_state_is_live_until_finished_or_lost() -> None:
    state = sch.SessionState("r.s1", "queue_a", sent_at=0.0)
    assert state.live
    state.finished = True
    assert not state.live
    assert not sch.SessionState("r.s2", "queue_a", sent_at=0.0, lost=True).live


def test_backoff_is_exponential_and_capped() -> None:
    assert sch.backoff(1) == 0.0
    assert [sch.backoff(a, base=1.0, cap=30.0) for a in (2, 3, 4, 5, 6)] == [1, 2, 4, 8, 16]
    assert sch.backoff(7, base=1.0, cap=30.0) == 30.0
    assert sch.backoff(50, base=1.0, cap=30.0) == 30.0
    assert sch.backoff(3, base=0.5) == 1.0


def test_backoff_stays_capped_for_huge_attempts() -> None:
    assert sch.backoff(2000, base=1.0, cap=30.0) == 30.0


def test_grace_for_is_between_two_and_ten_seconds() -> None:
    assert sch.grace_for(0.5) == 2.0
    assert sch.grace_for(5.0) == 5.0
    assert sch.grace_for(300.0) == sch.LOST_GRACE == 10.0


def _batch(**fields: Any) -> Batch:
    return Batch(batch_id="r.1", queue="queue_a", nodeids=["a", "b"], **fields)


def test_started_batch_is_lost_when_its_heartbeats_stop() -> None:
    # Heartbeats every 2 s; silent for more than SILENCE_LIMIT (10 s) means the worker is gone,
    # whatever the per-test timeout.
    batch = _batch(sent_at=50.0, started_at=90.0, last_seen=100.0)
    assert not sch.is_lost(batch, now=110.0, timeout=300.0)
    assert sch.is_lost(batch, now=110.5, timeout=300.0) == "no heartbeat for 10s"
    assert sch.is_lost(batch, now=101.5, timeout=300.0, silence=1.0)
    # Progress elsewhere on the queue does not excuse a silent started batch.
    assert sch.is_lost(batch, now=110.5, timeout=300.0, queue_last_seen=110.0)
    # Without any event yet, silence counts from the start.
    fresh = _batch(sent_at=50.0, started_at=90.0)
    assert not sch.is_lost(fresh, now=100.0, timeout=300.0)
    assert sch.is_lost(fresh, now=100.5, timeout=300.0)


def test_a_test_outliving_the_workers_hard_kill_loses_its_batch() -> None:
    # timeout 5 -> grace 5: a test still running 10 s after it began, heartbeats or not.
    batch = _batch(sent_at=50.0, started_at=90.0, last_seen=109.0, current_since=100.0)
    assert not sch.is_lost(batch, now=110.0, timeout=5.0)
    reason = sch.is_lost(batch, now=110.5, timeout=5.0)
    assert reason == "a test still running 10s after it started"


def test_waiting_batch_counts_from_sent_or_queue_progress_whichever_is_later() -> None:
    batch = _batch(sent_at=100.0)
    assert not sch.is_lost(batch, now=110.0, timeout=5.0)
    assert sch.is_lost(batch, now=110.5, timeout=5.0)
    # The queue made progress at 150: waiting there is fine until 160.
    assert not sch.is_lost(batch, now=159.0, timeout=5.0, queue_last_seen=150.0)
    assert sch.is_lost(batch, now=160.5, timeout=5.0, queue_last_seen=150.0)
    # Older queue progress than the send does not move the deadline back.
    assert sch.is_lost(batch, now=110.5, timeout=5.0, queue_last_seen=20.0)


def test_finished_or_unsent_batches_are_never_lost() -> None:
    finished = _batch(sent_at=0.0, started_at=0.0, last_seen=0.0, done={"a", "b"})
    assert finished.finished
    assert not sch.is_lost(finished, now=1e9, timeout=1.0)
    assert not sch.is_lost(_batch(), now=1e9, timeout=1.0)


def test_redispatch_sends_only_remaining_nodeids_after_backoff() -> None:
    batch = Batch(batch_id="r.own", queue="queue_a", nodeids=["a", "b", "c"], attempt=1, done={"b"})
    follow = sch.redispatch(batch, "r", retries=2, now=1000.0, base=3.0)
    assert follow is not None
    assert follow.nodeids == ["a", "c"]
    assert follow.queue == "queue_a"
    assert follow.attempt == 2
    assert follow.not_before == 1000.0 + 3.0
    assert follow.batch_id != batch.batch_id
    assert follow.sent_at is None
    assert follow.done == set()

    second = sch.redispatch(follow, "r", retries=2, now=2000.0, base=3.0)
    assert second is not None
    assert second.attempt == 3
    assert second.not_before == 2000.0 + 6.0


def test_redispatch_gives_up_when_retries_are_used_or_nothing_remains() -> None:
    assert sch.redispatch(_batch(attempt=3), "r", retries=2, now=0.0) is None
    assert sch.redispatch(_batch(attempt=1), "r", retries=0, now=0.0) is None
    assert sch.redispatch(_batch(attempt=1, done={"a", "b"}), "r", retries=5, now=0.0) is None
