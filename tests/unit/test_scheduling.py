"""scheduling.py rules: chunks, slots, backoff, loss detection and the retry policy."""

from __future__ import annotations

from typing import Any

from pytest_celery_dispatch import scheduling as sch
from pytest_celery_dispatch.scheduling import ChunkState


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
    state = sch.SlotState("r.s1", "queue_a", sent_at=0.0)
    assert state.live
    state.finished = True
    assert not state.live
    assert not sch.SlotState("r.s2", "queue_a", sent_at=0.0, lost=True).live


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


def _batch(**fields: Any) -> ChunkState:
    return ChunkState(batch_id="r.1", queue="queue_a", nodeids=["a", "b"], **fields)


def test_a_chunk_is_finished_when_each_of_its_tests_is_done_once() -> None:
    chunk = ChunkState(batch_id="r.1", queue="queue_a", nodeids=["a", "b", "a"])
    assert not chunk.finished
    assert chunk.remaining == ["a", "b", "a"]
    chunk.done.add("a")
    assert not chunk.finished
    assert chunk.remaining == ["b"]
    chunk.done.add("b")
    assert chunk.finished
    assert chunk.remaining == []
    assert ChunkState(batch_id="r.2", queue="queue_a", nodeids=[]).finished


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


def test_waiting_chunk_counts_from_its_retry_time_too() -> None:
    chunk = _batch(sent_at=100.0, not_before=130.0)
    assert not sch.is_lost(chunk, now=140.0, timeout=5.0)
    assert sch.is_lost(chunk, now=140.5, timeout=5.0)


def test_retry_policy_after_loss_backs_off_then_gives_up() -> None:
    policy = sch.RetryPolicy(retries=2, base=3.0)
    assert policy.after_loss(1, now=1000.0, why="x") == sch.Retry(at=1003.0, attempt=2)
    assert policy.after_loss(2, now=2000.0, why="x") == sch.Retry(at=2006.0, attempt=3)
    assert policy.after_loss(3, now=3000.0, why="gone") == sch.GiveUp("gone")
    assert sch.RetryPolicy(retries=0).after_loss(1, now=0.0, why="y") == sch.GiveUp("y")


def test_retry_policy_after_send_failure_retries_the_same_attempt_until_its_limit() -> None:
    policy = sch.RetryPolicy(retries=2, resend_interval=1.0, send_limit=20.0)
    assert policy.after_send_failure(2, failing_since=100.0, now=100.0, why="e") == sch.Retry(
        at=101.0, attempt=2
    )
    assert policy.after_send_failure(2, 100.0, now=119.9, why="e") == sch.Retry(120.9, 2)
    assert policy.after_send_failure(2, 100.0, now=120.0, why="e") == sch.GiveUp("e")
