"""What each event from a worker means: the ``on_<type>`` methods of the controller.

:meth:`DispatchSession.handle_event <.session.DispatchSession.handle_event>` has already told
the scheduler that the event's slot and chunk are alive, and passes the chunk (``None`` when the
event names none of this run's chunks). Each method updates the scheduler's bookkeeping and the
replayer's records, and replays a test once its final report is in.
"""

from __future__ import annotations

import time

from .quarantine import Quarantines
from .replay import Replayer
from .scheduling import Action, ChunkState, QueueScheduler
from .serialization import Event
from .terminal import DispatchTerminal


class EventHandlers:
    """Mixed into :class:`~.session.DispatchSession` (xdist's ``worker_<name>`` methods)."""

    scheduler: QueueScheduler
    replayer: Replayer
    terminal: DispatchTerminal
    quarantines: Quarantines

    def execute(self, actions: list[Action]) -> None:
        raise NotImplementedError

    def handle_event(self, event: Event) -> None:
        raise NotImplementedError

    def _should_stop(self) -> bool:
        raise NotImplementedError

    # ------------------------------------------------------------------ slots

    def on_session_started(self, event: Event, chunk: ChunkState | None) -> None:
        slot = self.scheduler.slots.get(str(event.get("session_id", "")))
        if slot is not None:
            self.execute(self.scheduler.slot_started(slot, int(event.get("concurrency") or 0)))

    def on_session_finished(self, event: Event, chunk: ChunkState | None) -> None:
        slot_id = str(event.get("session_id", ""))
        slot = self.scheduler.slots.get(slot_id)
        if slot is not None:
            slot.finished = True
        self.terminal.end_output(slot_id, event.get("worker"))

    def on_output(self, event: Event, chunk: ChunkState | None) -> None:
        slot_id = str(event.get("session_id", ""))
        self.terminal.write_output(slot_id, event.get("worker"), str(event.get("data", "")))

    def on_warning(self, event: Event, chunk: ChunkState | None) -> None:
        self.replayer.record_warning(event)

    def on_quarantined(self, event: Event, chunk: ChunkState | None) -> None:
        """A worker quarantined itself (see :mod:`.quarantine`): its work goes elsewhere now;
        a queue with only quarantined workers fails its tests now."""
        worker, reason = str(event.get("worker")), str(event.get("reason") or "unknown reason")
        self.execute(self.quarantines.quarantined(str(event.get("queue")), worker, reason))

    # ------------------------------------------------------------------ chunks

    def on_started(self, event: Event, chunk: ChunkState | None) -> None:
        if chunk is None:
            return
        self.scheduler.chunk_started(
            chunk, str(event.get("worker")), str(event.get("session_id", ""))
        )
        for nodeid in chunk.remaining:
            self.replayer.annotate(nodeid, event, chunk.attempt)

    def on_finished(self, event: Event, chunk: ChunkState | None) -> None:
        if chunk is None:
            return
        for nodeid in chunk.remaining:
            if self.replayer.pending(nodeid):
                self.replayer.fail_test(
                    nodeid,
                    f"{event.get('worker')} finished chunk {chunk.batch_id} without a "
                    f"result for {nodeid}",
                )
            self.scheduler.done(nodeid)

    def on_alive(self, event: Event, chunk: ChunkState | None) -> None:
        nodeid = str(event.get("nodeid", ""))
        if chunk is None or not nodeid or nodeid in self.replayer.finalized:
            return
        elapsed = float(event.get("elapsed") or 0.0)
        self.scheduler.test_started(chunk, nodeid, elapsed)
        self.replayer.started(nodeid, event, chunk.attempt, time.time() - elapsed, estimate=True)

    def on_missing(self, event: Event, chunk: ChunkState | None) -> None:
        """Tests a worker could not collect: each fails by name."""
        worker, reason = event.get("worker"), str(event.get("reason") or "")
        for nodeid in event.get("nodeids", []):
            text = (
                f"{nodeid} was not found on {worker} (queue {event.get('queue')}): the "
                "worker's workspace does not have this test. Check DISPATCH_WORKSPACE "
                "on the worker: it must be the controller's rootdir with the same test "
                "files."
            )
            self._not_runnable(event, chunk, nodeid, f"{text}\n{reason}" if reason else text)

    def on_refused(self, event: Event, chunk: ChunkState | None) -> None:
        """Tests a worker refused to run (outside its workspace, a different file)."""
        reason = str(event.get("reason") or "")
        for nodeid in event.get("nodeids", []):
            self._not_runnable(
                event, chunk, nodeid, f"{event.get('worker')} refused {nodeid}: {reason}"
            )

    def _not_runnable(
        self, event: Event, chunk: ChunkState | None, nodeid: str, message: str
    ) -> None:
        if self.replayer.pending(nodeid):
            self.replayer.annotate(nodeid, event, chunk.attempt if chunk else None)
            self.replayer.fail_test(nodeid, message)
        self.scheduler.done(nodeid)

    # ------------------------------------------------------------------ tests

    def on_logstart(self, event: Event, chunk: ChunkState | None) -> None:
        nodeid = str(event.get("nodeid", ""))
        if chunk is None:
            return
        self.scheduler.test_started(chunk, nodeid)
        self.replayer.started(nodeid, event, chunk.attempt, float(event.get("ts") or time.time()))

    def on_report(self, event: Event, chunk: ChunkState | None) -> None:
        if chunk is not None:
            stream = str(event.get("session_id", ""))
            self.replayer.buffer(stream, str(event.get("nodeid", "")), event.get("report"))

    def on_logfinish(self, event: Event, chunk: ChunkState | None) -> None:
        nodeid = str(event.get("nodeid", ""))
        if chunk is None:
            return
        self.scheduler.test_ended(chunk, nodeid)
        reports = self.replayer.take(str(event.get("session_id", "")), nodeid)
        if self.replayer.pending(nodeid):
            self.replayer.annotate(nodeid, event, chunk.attempt)
            self.replayer.records[nodeid].finished = float(event.get("ts") or time.time())
            self.replayer.replay(nodeid, reports)
        self.scheduler.done(nodeid)

    def on_crashed(self, event: Event, chunk: ChunkState | None) -> None:
        nodeid = str(event.get("nodeid", ""))
        if chunk is None:
            return
        self.scheduler.test_ended(chunk, nodeid)
        self.replayer.take(str(event.get("session_id", "")), nodeid)
        if self.replayer.pending(nodeid):
            self.replayer.annotate(nodeid, event, chunk.attempt)
            message = str(event.get("message") or event.get("reason") or "crashed")
            self.replayer.fail_test(
                nodeid,
                f"{nodeid} crashed on {event.get('worker')} (queue {event.get('queue')}, "
                f"attempt {chunk.attempt}): {message}",
                finished=float(event["ts"]) if event.get("ts") else None,
            )
        self.scheduler.done(nodeid)

    def on_results(self, event: Event, chunk: ChunkState | None) -> None:
        """Finished tests sent together: each as its logstart, reports and logfinish would
        be (:meth:`on_logstart`, :meth:`on_report`, :meth:`on_logfinish`), in one pass."""
        stream = str(event.get("session_id", ""))
        self.scheduler.slot_seen(stream, event.get("worker"))
        replayer = self.replayer
        for test in list(event.get("tests") or []):
            nodeid = str(test.get("nodeid", ""))
            chunk = self.scheduler.chunk_seen(str(test.get("batch_id", "")))
            if chunk is None:
                continue  # a chunk of another run, or one given up on: nothing to say
            self.scheduler.test_started(chunk, nodeid)
            replayer.started(
                nodeid, event, chunk.attempt, float(test.get("started") or time.time())
            )
            self.scheduler.test_ended(chunk, nodeid)
            buffered = replayer.take(stream, nodeid)  # what came in pieces before (none)
            if replayer.pending(nodeid):
                reports = buffered + replayer.rebuild(list(test.get("reports") or []))
                replayer.annotate(nodeid, event, chunk.attempt)
                replayer.records[nodeid].finished = float(test.get("finished") or time.time())
                replayer.replay(nodeid, reports)
            self.scheduler.done(nodeid)
            if self._should_stop():
                return  # -x / --maxfail: nothing after the failure that tripped it
