"""Pure scheduling: chunks and slots per queue, deadlines and retry decisions.

The controller's :class:`QueueScheduler` owns the run's work and clocks and answers with
*actions* (:class:`Publish`, :class:`StartSlot`, :class:`Fail`, :class:`Notice`,
:class:`Attempt`) that :class:`~.session.DispatchSession` carries out with the Celery client.
No Celery, no pytest, no I/O but the injected ``consumer_count``: unit-tested with a fake clock.

Words: a *chunk* is a list of nodeids published to the run's work queue of one Celery queue
(``batch_id`` on the wire); a *slot* is one ``run_session`` task, a worker process pulling
chunks (``session_id`` on the wire).

Invariants the controller relies on:

* every dispatched nodeid belongs to exactly one outstanding chunk until it has a final report;
* a chunk is *lost* when its heartbeats stop, when a test of it outlives the worker's own hard
  kill, when its queue has no consumer any more, when it waited in its queue for
  ``timeout + grace`` seconds while the queue made no progress (see :func:`is_lost`), or when it
  is no longer in its work queue and no slot said it took it for ``SILENCE_LIMIT`` seconds (a
  worker killed or cut off as it took it: see :func:`taken_unannounced`);
* every retry is decided by one :class:`RetryPolicy`, and every delay is a ``not_before``: a lost
  chunk's unfinished nodeids are re-dispatched as a new chunk (attempt + 1) after an exponential
  backoff until ``retries`` re-dispatches are used up, then they fail by name; the follow-up
  is one chunk, in the lost chunk's order, so a group (``--celery-dist``) stays on one slot.

How a queue's tests become chunks (``load`` or groups) is :mod:`.planning`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable

from .planning import LOAD, Forecast, plan_work
from .planning import plan_chunks as plan_chunks
from .recovery import Recovery, plural
from .recovery import give_up_message as give_up_message
from .recovery import is_lost as is_lost
from .recovery import taken_unannounced as taken_unannounced
from .retry import BACKOFF_BASE as BACKOFF_BASE
from .retry import BACKOFF_MAX as BACKOFF_MAX
from .retry import CONSUMER_GONE_GRACE as CONSUMER_GONE_GRACE
from .retry import DEFAULT_BROKER_TIMEOUT as DEFAULT_BROKER_TIMEOUT
from .retry import LOST_GRACE as LOST_GRACE
from .retry import SILENCE_LIMIT as SILENCE_LIMIT
from .retry import BrokerOutage as BrokerOutage
from .retry import GiveUp as GiveUp
from .retry import Retry as Retry
from .retry import RetryPolicy as RetryPolicy
from .retry import backoff as backoff
from .retry import grace_for as grace_for
from .work import Action as Action
from .work import Attempt as Attempt
from .work import ChunkState as ChunkState
from .work import Fail as Fail
from .work import Notice as Notice
from .work import Publish as Publish
from .work import SlotState as SlotState
from .work import StartSlot as StartSlot
from .work import TurnGate

# ----------------------------------------------------------------------------- the scheduler


def restart_clocks(
    chunks: Iterable[ChunkState],
    slots: Iterable[SlotState],
    last_seen: dict[str, float],
    now: float,
) -> None:
    """Back from a broker outage: nobody could speak meanwhile, so every silence counts from
    now (a running test's own clock only from a second ago)."""
    for chunk in chunks:
        if chunk.started_at is not None:
            chunk.last_seen = now
        if chunk.current_since is not None:
            chunk.current_since = max(chunk.current_since, now - 1.0)
        if chunk.gone_since is not None:
            chunk.gone_since = now
    for slot in slots:
        slot.last_seen = now
    for queue in last_seen:
        last_seen[queue] = now


def no_consumer_message(queue: str, wait_workers: float, guess: str | None = None) -> str:
    start = f"Did you mean {guess}? Otherwise start" if guess else "Start"
    return (
        f"no worker consumes queue {queue!r} (waited {wait_workers:g}s, --celery-wait-workers). "
        f"{start} one: celery -A pytest_celery_dispatch.worker worker -Q {queue} -n worker@%h"
    )


class QueueScheduler(Recovery):
    """The run's work per queue: chunks, slots, waiting queues, deadlines, retries.

    Event methods (``slot_seen``, ``chunk_started``, ``test_started``, ...) record what the
    workers said; :meth:`begin`, :meth:`poll`, :meth:`send_failed` and :meth:`slot_started`
    return the actions to take. Times come from ``clock`` (monotonic seconds).
    """

    def __init__(
        self,
        run_id: str,
        *,
        timeout: float,
        wait_workers: float,
        policy: RetryPolicy,
        broker: str,
        consumer_count: Callable[[str], int | None],
        work_depth: Callable[[str], int | None] = lambda queue: None,
        clock: Callable[[], float] = time.monotonic,
        dist: str = LOAD,
        broker_timeout: float = DEFAULT_BROKER_TIMEOUT,
    ) -> None:
        self.run_id = run_id
        self.timeout = timeout
        self.wait_workers = wait_workers
        self.policy = policy
        self.broker = broker  # masked, for messages
        self.consumer_count = consumer_count
        self.work_depth = work_depth  # messages left in a queue's work queue (None: unknown)
        self.clock = clock
        self.queue_nodeids: dict[str, list[str]] = {}
        self.dist = dist  # --celery-dist: how a queue's tests are cut into chunks
        self.group_of: dict[str, str | None] = {}  # nodeid -> its group key under ``dist``
        self.forecast = Forecast()  # recorded durations and the predicted test time per queue
        self.estimates, self.predicted = self.forecast.estimates, self.forecast.predicted
        self.chunks: dict[str, ChunkState] = {}
        self.abandoned: set[str] = set()
        self.unsent: list[ChunkState] = []
        self.slots: dict[str, SlotState] = {}
        self.capacity: dict[str, int] = {}  # queue -> worker slots known to consume it
        self.consumers: dict[str, int] = {}
        self.waiting_queues: dict[str, float] = {}  # queue -> deadline for a first consumer
        self.guesses: dict[str, str] = {}  # queue without consumer -> served names one edit away
        self.queue_last_seen: dict[str, float] = {}
        self.running: set[str] = set()
        self.stopping = False
        self._chunks_of: dict[str, list[str]] = {}
        self._worker_slots: dict[str, dict[str, int]] = {}
        self._no_consumer_since: dict[str, float] = {}
        self._slot_not_before: dict[str, float] = {}
        self.outage = BrokerOutage(broker_timeout)  # cut off from the broker
        self._chunk_numbers = itertools.count(1)
        self._sent_numbers = itertools.count(1)
        self._slot_numbers = itertools.count(1)
        self.turns = TurnGate()  # shared benches: a queue may wait for its turn (lab.grant)

    # ------------------------------------------------------------------ the start

    def begin(self, consumers: dict[str, int], capacity: dict[str, int]) -> list[Action]:
        """Queues with a consumer start now (their chunks, then a slot per worker slot); the
        others wait up to ``wait_workers`` for one."""
        self.consumers.update(consumers)
        self.capacity.update(capacity)
        actions: list[Action] = []
        for queue in self.queue_nodeids:
            if self.consumers.get(queue, 0) > 0:
                actions.extend(self._start_queue(queue))
            else:
                self.waiting_queues[queue] = self.clock() + self.wait_workers
        return actions

    def _start_queue(self, queue: str) -> list[Action]:
        """Every chunk of the queue, then a slot per worker slot: a slot that finds its work
        queue empty has no more to do and ends, and a warm slot (a prewarmed zygote) asks
        within milliseconds, before the rest of its work would be there if it were sent
        after. With recorded durations, longest first, the predicted test time; nothing before
        its turn."""
        nodeids = self.queue_nodeids[queue]
        slots = max(1, self.capacity.get(queue) or self.consumers.get(queue) or 1)
        # A shared bench: this run holds no more of its slots than it has tests.
        wanted = min(slots, len(nodeids))
        if queue not in self.turns.granted and not self.turns.take(queue, slots, wanted):
            return []
        planned = plan_work(nodeids, slots, self.dist, self.group_of, self.estimates.get(queue))
        self.forecast.planned(queue, planned, slots)
        chunks = [self._new_chunk(queue, ids) for ids in planned]
        actions: list[Action] = [Publish(c) for c in chunks]
        slots = min(slots, self.turns.granted.get(queue, slots))
        actions.extend(self._new_slot(queue) for _ in range(min(slots, len(chunks))))
        return actions

    def _new_chunk(self, queue: str, nodeids: list[str], **fields: object) -> ChunkState:
        chunk = ChunkState(f"{self.run_id}.{next(self._chunk_numbers)}", queue, nodeids)
        for name, value in fields.items():
            setattr(chunk, name, value)
        self.chunks[chunk.batch_id] = chunk
        for nodeid in nodeids:
            self._chunks_of.setdefault(nodeid, []).append(chunk.batch_id)
        return chunk

    def _new_slot(self, queue: str) -> StartSlot:
        slot_id = f"{self.run_id}.s{next(self._slot_numbers)}"
        slot = self.slots[slot_id] = SlotState(slot_id, queue, sent_at=self.clock())
        return StartSlot(slot)

    # ------------------------------------------------------------------ sending

    def sent(self, chunk: ChunkState) -> None:
        chunk.send_failed_since = None
        chunk.sent_at = self.clock()
        chunk.sent_order = next(self._sent_numbers)

    def send_failed(self, chunk: ChunkState, error: str) -> list[Action]:
        """The broker refused the chunk: send it again shortly, or fail its tests by name."""
        now = self.clock()
        if chunk.send_failed_since is None:
            chunk.send_failed_since = now
        decision = self.policy.after_send_failure(
            chunk.attempt, chunk.send_failed_since, now, error
        )
        if isinstance(decision, Retry):
            chunk.not_before = decision.at
            if chunk not in self.unsent:
                self.unsent.append(chunk)
            return []
        actions: list[Action] = []
        for nodeid in chunk.remaining:
            actions.append(
                Fail(
                    nodeid,
                    f"could not send {nodeid} to queue {chunk.queue!r} on {self.broker} for "
                    f"{self.policy.send_limit:g}s: {error}",
                )
            )
            self.done(nodeid)
        return actions

    def slot_send_failed(self, slot: SlotState) -> None:
        slot.lost = True  # the next poll starts another

    # ------------------------------------------------------------------ what workers say

    def slot_seen(self, slot_id: str, worker: str | None) -> SlotState | None:
        slot = self.slots.get(slot_id)
        if slot is not None:
            now = self.clock()
            slot.last_seen = now
            slot.worker = str(worker or slot.worker or "")
            self.queue_last_seen[slot.queue] = now
            if slot.held:
                slot.held = [c for c in slot.held if not c.finished]
                for chunk in slot.held:
                    chunk.last_seen = now
        return slot

    def slot_started(self, slot: SlotState, concurrency: int) -> list[Action]:
        """A slot says how many slots its worker has: start more slots to fill them (the
        broadcast at the start may have missed a worker on a busy broker)."""
        slot.started_at = self.clock()
        if concurrency <= 0 or not slot.worker:
            return []
        known = self._worker_slots.setdefault(slot.queue, {})
        known[slot.worker] = concurrency
        unknown_workers = max(0, self.consumers.get(slot.queue, 0) - len(known))
        wanted = sum(known.values()) + unknown_workers
        self.capacity[slot.queue] = max(self.capacity.get(slot.queue, 0), wanted)
        live = sum(1 for s in self.slots.values() if s.live and s.queue == slot.queue)
        waiting = sum(1 for c in self.live_chunks(slot.queue) if c.started_at is None)
        # A shared bench: the line decides on the slots this run has work for.
        wanted = self.turns.widen(slot.queue, wanted, min(wanted, live + waiting))
        more = [self._new_slot(slot.queue) for _ in range(min(wanted - live, waiting))]
        return self._revised_eta(slot.queue) + more

    def _revised_eta(self, queue: str) -> list[Action]:
        """More slots than planned (a worker missed the start's inspect): the ETA on them."""
        slots = self.capacity.get(queue, 0)
        if (eta := self.forecast.revise(queue, slots)) is None:
            return []
        return [Notice(f"{queue}: {plural(slots, 'slot')}; revised ETA {eta:.2f}s", "cyan")]

    def chunk_seen(self, batch_id: str) -> ChunkState | None:
        chunk = self.chunks.get(batch_id)
        if chunk is not None:
            now = self.clock()
            chunk.last_seen = now
            self.queue_last_seen[chunk.queue] = now
        return chunk

    def chunk_started(self, chunk: ChunkState, worker: str, slot_id: str) -> None:
        chunk.started_at = chunk.started_at or self.clock()
        chunk.worker = worker
        chunk.session_id = slot_id
        if (slot := self.slots.get(slot_id)) is not None and chunk not in slot.held:
            slot.held.append(chunk)

    def test_started(self, chunk: ChunkState, nodeid: str, elapsed: float = 0.0) -> None:
        chunk.current_since = self.clock() - elapsed
        self.running.add(nodeid)

    def test_ended(self, chunk: ChunkState, nodeid: str) -> None:
        chunk.current_since = None
        self.running.discard(nodeid)

    def done(self, nodeid: str) -> None:
        """The test has its final outcome: no chunk waits for it any more."""
        for batch_id in self._chunks_of.get(nodeid, ()):
            self.chunks[batch_id].done.add(nodeid)

    # ------------------------------------------------------------------ queries

    def live_chunks(self, queue: str | None = None) -> list[ChunkState]:
        return [
            c
            for c in self.chunks.values()
            if not c.finished
            and c.batch_id not in self.abandoned
            and c.sent_at is not None
            and (queue is None or c.queue == queue)
        ]

    def worker_slots(self) -> dict[str, int]:
        """Each worker's configured slots (its Celery concurrency), as its slots told us."""
        slots: dict[str, int] = {}
        for known in self._worker_slots.values():
            for worker, concurrency in known.items():
                slots[worker] = max(slots.get(worker, 0), concurrency)
        return slots

    def unfinished_in(self, queue: str) -> bool:
        """Work of this queue is sent, being sent, or waiting to be sent again."""
        return any(
            c.queue == queue and not c.finished and c.batch_id not in self.abandoned
            for c in self.chunks.values()
        )

    # ------------------------------------------------------------------ the clocks

    def connection(self, connected: bool, last_heard: float | None = None) -> list[Action]:
        """The reply consumer's connection, as seen now: say when it goes and comes back.
        Asked on every turn of the event loop (not only at each poll), so the return is said
        before the first event that came with it, even when that event ends the run. Cut off,
        every deadline waits up to ``--celery-broker-timeout`` from ``last_heard``."""
        now = self.clock()
        if not connected:
            return self._cut_off(now, last_heard)
        if self.outage.since is None:
            return []
        notice = Notice(f"reconnected after {self.outage.end(now):.1f}s", "cyan")
        restart_clocks(self.chunks.values(), self.slots.values(), self.queue_last_seen, now)
        self._no_consumer_since.clear()
        return [notice]

    def poll(self) -> list[Action]:
        """Queues without consumers, lost work, silent slots, work waiting on a backoff; nothing
        while cut off from the broker (every deadline is paused) or after giving up on it."""
        now = self.clock()
        actions: list[Action] = []
        if self.outage.since is not None or self.outage.given_up:
            return actions
        actions.extend(self._poll_waiting_queues(now))
        for queue in self.turns.due(self.stopping):
            actions.extend(self._start_queue(queue))
        waiting: dict[str, list[ChunkState]] = {}
        for chunk in self.live_chunks():
            if chunk.started_at is None:
                waiting.setdefault(chunk.queue, []).append(chunk)
            elif why := is_lost(chunk, now, self.timeout):
                actions.extend(self._lost(chunk, now, why))
        for queue in list(self.queue_nodeids):
            if queue not in self.waiting_queues and self.unfinished_in(queue):
                actions.extend(self._check_queue(queue, waiting.get(queue, []), now))
        for slot in self.slots.values():
            if slot.live and slot.started_at is not None and slot.last_seen is not None:
                slot.lost = now - slot.last_seen > SILENCE_LIMIT
        for chunk in list(self.unsent):
            if now >= chunk.not_before:
                self.unsent.remove(chunk)
                actions.append(Publish(chunk))
        for queue in self.queue_nodeids:
            actions.extend(self._ensure_slot(queue, now))
        return actions

    def _cut_off(self, now: float, last_heard: float | None) -> list[Action]:
        """Say once that the broker is silent; past the broker timeout, fail every dispatched
        test still without an outcome, by name."""
        if self.outage.since is None:
            return [Notice(self.outage.begin(now, last_heard, self.broker))]
        if not self.outage.over(now):
            return []
        self.stop()
        left = [
            n
            for ids in self.queue_nodeids.values()
            for n in ids
            if not any(n in self.chunks[b].done for b in self._chunks_of.get(n, ()))
        ]
        for nodeid in left:
            self.done(nodeid)
        return [Fail(n, self.outage.failure(n, self.broker)) for n in left]

    def _poll_waiting_queues(self, now: float) -> list[Action]:
        """Queues that had no consumer at the start: start once one shows up, or give up."""
        actions: list[Action] = []
        for queue, deadline in list(self.waiting_queues.items()):
            count = self.consumer_count(queue)
            nodeids = self.queue_nodeids.get(queue, [])
            if count:
                self.consumers[queue] = count
                del self.waiting_queues[queue]
                actions.append(
                    Notice(
                        f"a worker now consumes {queue}; sending {plural(len(nodeids), 'test')}",
                        "cyan",
                    )
                )
                actions.extend(self._start_queue(queue))
            elif now >= deadline:
                del self.waiting_queues[queue]
                why = no_consumer_message(queue, self.wait_workers, self.guesses.get(queue))
                actions.extend(Fail(n, why) for n in nodeids)
        return actions

    def _ensure_slot(self, queue: str, now: float) -> list[Action]:
        """While work for a queue is left, at least one live slot must pull it."""
        pulled = any(s.live and s.queue == queue for s in self.slots.values())
        if pulled or queue in self.waiting_queues or self.stopping or not self.unfinished_in(queue):
            return []
        if now < self._slot_not_before.get(queue, 0.0):
            return []  # backing off before the next attempt
        return [self._new_slot(queue)]

    def worker_out(self, worker: str, why: str) -> list[Action]:
        """A worker quarantined itself (:mod:`.quarantine`): its started chunks are lost now."""
        ours = [c for c in self.live_chunks() if c.worker == worker and c.started_at]
        return [a for c in ours for a in self._lost(c, self.clock(), why)]

    # ------------------------------------------------------------------ stopping

    def stop(self) -> list[str]:
        """-x / --maxfail: start nothing more; the tests queued and not started, sorted."""
        self.stopping = True
        queued = {n for c in self.live_chunks() if c.started_at is None for n in c.remaining}
        queued |= {n for c in self.unsent for n in c.remaining}
        self.unsent.clear()
        return sorted(queued)

    def held(self) -> tuple[set[str], set[str]]:
        """The tests slots took and have not finished, as ``(running, waiting)``: a slot runs
        what it holds in order, so its first unfinished test is running (or just ended, its
        report on the way) and the rest wait behind it (the rest of a group, of a chunk); a
        test a heartbeat named is running too."""
        running, waiting = set(self.running), set()
        by_slot: dict[str | None, list[ChunkState]] = {}
        for chunk in self.live_chunks():
            if chunk.started_at is not None:
                by_slot.setdefault(chunk.session_id, []).append(chunk)
        for chunks in by_slot.values():
            chunks.sort(key=lambda c: c.started_at or 0.0)
            left = [n for c in chunks for n in c.remaining]
            running.update(left[:1])
            waiting.update(left[1:])
        return running, waiting - running

    def unstarted_slot_task_ids(self) -> list[str]:
        return [s.task_id for s in self.slots.values() if s.task_id and s.started_at is None]
