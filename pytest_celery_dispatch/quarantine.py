"""Pure: what the controller does when a worker says it quarantined itself.

A worker that quarantines itself (see :mod:`.health`) sends a ``quarantined`` event, with its
reason, to the controller of each session it gives up or sends back. :class:`Quarantines`
answers with the scheduler's actions:

* the worker's started chunks are lost at once (not after the silence limit): their unfinished
  tests are re-sent, as the next attempt, to the queue's other workers;
* once every consumer of the queue is a quarantined worker, the queue's tests still without an
  outcome fail at once: ``queue_a: every worker is quarantined (worker-a: health test ...
  failed: ...)`` (:func:`.healthrules.every_worker_quarantined`).

No Celery, no pytest, no I/O but the scheduler's injected consumer count.
"""

from __future__ import annotations

from .healthrules import every_worker_quarantined
from .scheduling import Action, Fail, Notice, QueueScheduler


class Quarantines:
    """The workers of this run's queues that quarantined themselves, and why."""

    def __init__(self, scheduler: QueueScheduler) -> None:
        self.scheduler = scheduler
        self.by_queue: dict[str, dict[str, str]] = {}  # queue -> worker -> reason
        self.failed: set[str] = set()  # queues failed as every worker is quarantined

    def quarantined(self, queue: str, worker: str, reason: str) -> list[Action]:
        """``worker`` of ``queue`` said it quarantined itself for ``reason``."""
        known = self.by_queue.setdefault(queue, {})
        actions: list[Action] = []
        if known.get(worker) != reason:
            known[worker] = reason
            actions.append(Notice(f"{worker} quarantined itself: {reason}"))
        for slot in self.scheduler.slots.values():
            if slot.worker == worker and slot.started_at is not None:
                slot.lost = True  # it takes no more work: another slot may start
        actions.extend(self.scheduler.worker_out(worker, f"{worker} quarantined itself"))
        return actions + self.check(queue)

    def check(self, queue: str) -> list[Action]:
        """Fail the queue's open tests at once when all its workers are quarantined."""
        if queue in self.failed or not self.scheduler.unfinished_in(queue):
            return []
        consumers = self.scheduler.consumer_count(queue)
        message = every_worker_quarantined(queue, self.by_queue.get(queue, {}), consumers)
        if message is None:
            return []
        self.failed.add(queue)
        return [Notice(message), *fail_queue(self.scheduler, queue, message)]


def fail_queue(scheduler: QueueScheduler, queue: str, message: str) -> list[Action]:
    """Every test of ``queue`` without an outcome fails with ``message``; nothing of the queue
    is sent or re-sent after this."""
    actions: list[Action] = []
    for chunk in list(scheduler.chunks.values()):
        if chunk.queue != queue or chunk.finished or chunk.batch_id in scheduler.abandoned:
            continue
        scheduler.abandoned.add(chunk.batch_id)
        for nodeid in chunk.remaining:
            scheduler.running.discard(nodeid)
            actions.append(Fail(nodeid, message))
            scheduler.done(nodeid)
    scheduler.unsent[:] = [c for c in scheduler.unsent if c.queue != queue]
    return actions
