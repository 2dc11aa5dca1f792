"""Pure recovery rules: when work counts as lost, and what happens to it then.

:class:`Recovery` is mixed into :class:`~.scheduling.QueueScheduler` (as the session's
``on_<type>`` handlers are mixed into it from :mod:`.events`): the scheduler decides what to send
and when; these methods decide that a chunk is lost (silent, outlived the hard kill, its queue
has no consumer, stalled, or taken from its work queue by a slot that never said so), and answer
with a follow-up chunk after the backoff, or a named failure once the retries are used up.
No Celery, no pytest, no I/O but the scheduler's injected ``consumer_count`` and ``work_depth``.
"""

from __future__ import annotations

from collections.abc import Callable

from .retry import CONSUMER_GONE_GRACE, SILENCE_LIMIT, GiveUp, Retry, RetryPolicy, grace_for
from .work import Action, Attempt, ChunkState, Fail, Notice, SlotState


def is_lost(
    chunk: ChunkState,
    now: float,
    timeout: float,
    queue_last_seen: float | None = None,
    silence: float = SILENCE_LIMIT,
) -> str | None:
    """Why this unfinished chunk counts as lost, or ``None`` while it is fine.

    * A started chunk sends a heartbeat every couple of seconds: silent for ``silence``
      seconds, its worker is gone or cut off.
    * A test of a started chunk that is still running ``timeout + grace`` after it began has
      outlived the worker's own hard kill: the worker cannot be trusted with it any more.
    * A chunk still waiting in its queue is lost when neither it nor any other chunk of this
      run on that queue made progress for ``timeout + grace`` (counted from its send, or from
      its ``not_before`` after a retry): while the queue moves, waiting there is fine.
    """
    if chunk.finished or chunk.sent_at is None:
        return None
    grace = grace_for(timeout)
    if chunk.started_at is not None:
        last = chunk.last_seen if chunk.last_seen is not None else chunk.started_at
        if now - last > silence:
            return f"no heartbeat for {silence:g}s"
        if chunk.current_since is not None and now - chunk.current_since > timeout + grace:
            return f"a test still running {timeout + grace:g}s after it started"
        return None
    last = max(chunk.sent_at, chunk.not_before, queue_last_seen or 0.0)
    if now - last > timeout + grace:
        return f"not taken from the queue within {timeout + grace:g}s"
    return None


def taken_unannounced(waiting: list[ChunkState], depth: int) -> list[ChunkState]:
    """The chunks no longer in their work queue though no slot said it took them.

    ``waiting`` are a queue's sent chunks that no slot announced; ``depth`` is how many messages
    its work queue still holds. Slots take chunks first in, first out, so the ones gone are the
    oldest: a slot announces a chunk at once, so one still unannounced after
    ``SILENCE_LIMIT`` was taken by a worker that died or was cut off before it could say so."""
    in_order = sorted(waiting, key=lambda c: c.sent_order)
    return in_order[: max(0, len(in_order) - max(0, depth))]


def taken_for_too_long(waiting: list[ChunkState], depth: int, now: float) -> list[ChunkState]:
    """Note since when each waiting chunk is gone from its work queue; the ones no slot
    announced for more than ``SILENCE_LIMIT`` (without this they would wait forever, while
    fresh slots find the work queue empty)."""
    gone = taken_unannounced(waiting, depth)
    for chunk in waiting:
        if chunk not in gone:
            chunk.gone_since = None
        elif chunk.gone_since is None:
            chunk.gone_since = now
    return [c for c in gone if c.gone_since is not None and now - c.gone_since > SILENCE_LIMIT]


def taken_message(now: float, chunk: ChunkState) -> str:
    return (
        f"taken from its work queue {now - (chunk.gone_since or now):.0f}s ago by a slot that "
        "never said so (its worker died or was cut off as it took it)"
    )


def give_up_message(chunk: ChunkState, nodeid: str, why: str) -> str:
    """A test of a chunk lost once too often: where it was, the attempts, the workers, why."""
    attempts = plural(chunk.attempt, "attempt")
    lost_by = [*chunk.lost_by, *([chunk.worker] if chunk.worker else [])]
    if lost_by:
        attempts += f" (worked on by {', '.join(dict.fromkeys(lost_by))})"
    if chunk.started_at is not None:
        what = f"{chunk.worker} lost while running {nodeid} (queue {chunk.queue})"
    else:
        what = f"no worker of queue {chunk.queue} started {nodeid}"
    return f"{what} after {attempts}: {why}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


class Recovery:
    """The lost-work rules of :class:`~.scheduling.QueueScheduler` (its state, its helpers)."""

    timeout: float
    wait_workers: float
    policy: RetryPolicy
    consumer_count: Callable[[str], int | None]
    work_depth: Callable[[str], int | None]
    chunks: dict[str, ChunkState]
    abandoned: set[str]
    unsent: list[ChunkState]
    slots: dict[str, SlotState]
    consumers: dict[str, int]
    queue_last_seen: dict[str, float]
    running: set[str]
    _no_consumer_since: dict[str, float]
    _slot_not_before: dict[str, float]

    def live_chunks(self, queue: str | None = None) -> list[ChunkState]:
        raise NotImplementedError

    def done(self, nodeid: str) -> None:
        raise NotImplementedError

    def _new_chunk(self, queue: str, nodeids: list[str], **fields: object) -> ChunkState:
        raise NotImplementedError

    def _check_queue(self, queue: str, waiting: list[ChunkState], now: float) -> list[Action]:
        """A started queue with work left: still consumed, and moving?"""
        count = self.consumer_count(queue)
        if count is None:
            return []  # cannot tell right now
        self.consumers[queue] = count
        actions: list[Action] = []
        if count > 0:
            self._no_consumer_since.pop(queue, None)
        else:
            gone_for = now - self._no_consumer_since.setdefault(queue, now)
            why = f"no worker consumes queue {queue!r} any more"
            if gone_for >= CONSUMER_GONE_GRACE:
                for chunk in self.live_chunks(queue):
                    if chunk.started_at is not None:
                        actions.extend(self._lost(chunk, now, why))
            if gone_for >= self.wait_workers and waiting:
                return actions + self._requeue_waiting(queue, waiting, now, why)
        actions.extend(self._check_taken(queue, waiting, now))
        waiting = [c for c in waiting if c.batch_id not in self.abandoned]
        # Work waiting while the queue makes no progress at all (a frozen worker holds the
        # slot task): try another slot, count it as an attempt.
        last_progress = self.queue_last_seen.get(queue)
        stalled = [r for c in waiting if (r := is_lost(c, now, self.timeout, last_progress))]
        if stalled and not any(c.started_at is not None for c in self.live_chunks(queue)):
            actions.extend(self._requeue_waiting(queue, waiting, now, stalled[0]))
        return actions

    def _check_taken(self, queue: str, waiting: list[ChunkState], now: float) -> list[Action]:
        """Chunks gone from the work queue that no slot announced: lost with their worker."""
        depth = self.work_depth(queue) if waiting else None
        gone = [] if depth is None else taken_for_too_long(waiting, depth, now)
        return [a for c in gone for a in self._lost(c, now, taken_message(now, c))]

    def _requeue_waiting(
        self, queue: str, chunks: list[ChunkState], now: float, why: str
    ) -> list[Action]:
        """Chunks still in the work queue, with nobody to take them: count an attempt, start a
        fresh slot after the backoff, or fail them by name once the retries are used up."""
        self._no_consumer_since.pop(queue, None)
        self.queue_last_seen[queue] = now
        for slot in self.slots.values():
            if slot.queue == queue and slot.started_at is None:
                slot.lost = True  # never started: another one replaces it
        actions: list[Action] = []
        retried: list[tuple[ChunkState, Retry]] = []
        for chunk in chunks:
            decision = self.policy.after_loss(chunk.attempt, now, why)
            if isinstance(decision, Retry):
                retried.append((chunk, decision))
            else:
                actions.extend(self._give_up(chunk, why))
        if not retried:
            return actions
        for chunk, decision in retried:
            chunk.attempt, chunk.not_before = decision.attempt, decision.at
            actions.append(Attempt(tuple(chunk.remaining), chunk.attempt))
        latest = max((d for _, d in retried), key=lambda d: d.attempt)
        self._slot_not_before[queue] = latest.at
        tests = sum(len(c.remaining) for c, _ in retried)
        actions.append(
            Notice(
                f"queue {queue}: {why}; re-dispatching {tests} test(s) in {latest.at - now:g}s "
                f"(attempt {latest.attempt} of {self.policy.retries + 1})"
            )
        )
        return actions

    def _lost(self, chunk: ChunkState, now: float, why: str) -> list[Action]:
        """Re-dispatch what a lost chunk had not finished, or fail it by name."""
        self.abandoned.add(chunk.batch_id)
        for nodeid in chunk.remaining:
            self.running.discard(nodeid)
        slot = self.slots.get(chunk.session_id or "")
        if slot is not None:
            slot.lost = True
        decision = self.policy.after_loss(chunk.attempt, now, why)
        remaining = chunk.remaining
        if isinstance(decision, GiveUp) or not remaining:
            return self._give_up(chunk, why)
        follow_up = self._new_chunk(
            chunk.queue,
            remaining,
            attempt=decision.attempt,
            not_before=decision.at,
            lost_by=[*chunk.lost_by, *([chunk.worker] if chunk.worker else [])],
        )
        self.unsent.append(follow_up)
        self._slot_not_before[chunk.queue] = decision.at
        where = f"{chunk.worker} on {chunk.queue}" if chunk.worker else f"queue {chunk.queue}"
        return [
            Notice(
                f"{where}: {why}; re-dispatching {len(remaining)} test(s) in "
                f"{decision.at - now:g}s (attempt {decision.attempt} of "
                f"{self.policy.retries + 1})"
            )
        ]

    def _give_up(self, chunk: ChunkState, why: str) -> list[Action]:
        self.abandoned.add(chunk.batch_id)
        settings = f"--celery-timeout {self.timeout:g}, --celery-retries {self.policy.retries}"
        actions: list[Action] = []
        for nodeid in chunk.remaining:
            actions.append(Fail(nodeid, give_up_message(chunk, nodeid, f"{why} ({settings})")))
            self.done(nodeid)
        return actions
