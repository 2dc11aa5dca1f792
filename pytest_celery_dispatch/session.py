"""The controller: pytest hooks, the main-thread event loop, and the Celery client's side.

:class:`DispatchSession` (xdist's ``DSession``) routes the collected tests, starts the broker
side, and loops: events from the reply consumer thread go to ``on_<type>`` methods, which tell
the :class:`~.scheduling.QueueScheduler` what the workers said and the
:class:`~.replay.Replayer` what to report; every :meth:`loop_once` also polls the scheduler's
clocks. The scheduler answers with actions, carried out here (:meth:`execute`).

Only the main thread calls pytest hooks; the consumer thread only puts events on a queue.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import queue as queue_mod
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from . import routing
from .artifactstore import ArtifactEvents
from .collection import group_key, route_item
from .discovery import find_workers, guess_queue_names, start_local_workers
from .durations import queue_estimates
from .events import EventHandlers
from .forwarding import SlotPayloads
from .identity import current_identity
from .names import EMBEDDED
from .prewarmplan import prewarm_collected, remember_plan, selection, start_prewarm
from .quarantine import Quarantines
from .replay import EventLog, Replayer
from .scheduling import (
    SILENCE_LIMIT,
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
from .serialization import Chunk, Event, reply_queue_name, work_queue_name
from .settings import Settings
from .shipcontrol import ShipHandlers, Shipper, resolve_ship, run_outputs
from .startup import Prestart
from .stashkeys import ARTIFACTS_KEY
from .terminal import DispatchTerminal
from .turns import QUEUES_KEY, RunTurns, remembered

#: How often the scheduler's clocks are polled (queues without consumers, lost work).
POLL_INTERVAL = 0.5


class DispatchSession(EventHandlers, ArtifactEvents, ShipHandlers):
    """Registered as a plugin only with ``--celery-dispatch``; owns the run's dispatching."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.run_id = uuid.uuid4().hex[:16]
        self.reply_to = reply_queue_name(self.run_id)
        self.routes: dict[str, routing.Route] = {}
        self.events: queue_mod.Queue[Event] = queue_mod.Queue()
        self.replayer = Replayer(config, EventLog(settings.event_log, self.run_id))
        self.records = self.replayer.records  # the JSON report's dispatch section per test
        self.terminal = DispatchTerminal(
            config, lambda n: self.replayer.tag(n) if n in self.replayer.finalized else None
        )
        config.pluginmanager.register(self.terminal, "celery_dispatch_terminal")
        self.scheduler = QueueScheduler(
            self.run_id,
            timeout=settings.timeout,
            wait_workers=settings.wait_workers,
            policy=RetryPolicy(settings.retries, send_limit=settings.wait_workers + SILENCE_LIMIT),
            broker=settings.broker_masked,
            consumer_count=self._consumer_count,
            work_depth=self._work_depth,
            dist=settings.dist,
            broker_timeout=settings.broker_timeout,
        )
        self.identity = current_identity()
        self.payloads = SlotPayloads(
            config,
            self.run_id,
            self.reply_to,
            settings.timeout,
            self.identity,
            (settings.health, settings.health_every),
        )
        outputs = run_outputs(
            config, settings.json_report, settings.event_log, settings.timeline, settings.artifacts
        )
        inifile = str(config.inipath) if config.inipath else None
        self.shipper = Shipper(str(config.rootpath), resolve_ship(config), outputs, inifile)
        self.quarantines = Quarantines(self.scheduler)  # workers that quarantined themselves
        self.artifacts = config.stash[ARTIFACTS_KEY]
        self.payloads.artifacts = settings.artifacts_limits.as_dict()
        self.workers_by_queue: dict[str, list[str]] = {}
        self.broker_error: str | None = None
        self.started_at = time.time()
        self.finished_at: float | None = None
        self.interrupted = False
        self.stopped_early: dict[str, int] | None = None
        self._broker: Any = None
        self._app: Any = None
        self._consumer: Any = None
        self._local_workers: Any = None
        self._prestart: Prestart | None = None  # the app and the lab board, made before collection
        self.turns: RunTurns | None = None  # this run in the line for shared benches
        self.prewarmed: dict[str, list[str]] = {}  # queue -> the tests its prewarms named
        self._session: pytest.Session | None = None
        self._last_poll = 0.0
        self._unknown_events: set[str] = set()

    # ------------------------------------------------------------------ collection

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Route after every other plugin, so markers added in this hook count too."""
        self.routes.clear()
        for item in items:
            self.routes[item.nodeid] = route_item(item, self.settings)

    def route_of(self, item: pytest.Item) -> routing.Route:
        found = self.routes.get(item.nodeid)
        if found is None:
            found = self.routes[item.nodeid] = route_item(item, self.settings)
        return found

    # ------------------------------------------------------------------ the run

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        if session.testsfailed and not session.config.option.continue_on_collection_errors:
            raise session.Interrupted(
                f"{session.testsfailed} error{'s' if session.testsfailed != 1 else ''} "
                "during collection"
            )
        if session.config.option.collectonly:
            routes = [(i.nodeid, self.route_of(i)) for i in session.items]
            self.terminal.write_plan(
                ((n, r.queue, r.source, r.error) for n, r in routes),
                self.settings.dist,
                {i.nodeid: group_key(i, self.settings.dist) for i in session.items},
            )
            return True

        self._session = session
        self.started_at = time.time()
        local: list[pytest.Item] = []
        invalid: list[tuple[str, str]] = []
        for item in session.items:
            route = self.route_of(item)
            self.replayer.add(item, route.queue if route.error is None else None)
            if route.error is not None:
                invalid.append((item.nodeid, route.error))
            elif route.queue is None:
                local.append(item)
            else:
                self.scheduler.queue_nodeids.setdefault(route.queue, []).append(item.nodeid)
                self.scheduler.group_of[item.nodeid] = group_key(item, self.settings.dist)
        try:
            for nodeid, error in invalid:
                self.replayer.fail_test(
                    nodeid, f"invalid queue marker on {nodeid}: {error}", "setup"
                )
            self._check_stop(session)
            if self.scheduler.queue_nodeids:
                self._start_remote()
            self._run_local(session, local)
            while not self.replayer.all_done:
                self.loop_once(block=True)
                self._check_stop(session)
        except KeyboardInterrupt:
            self.interrupted = True
            raise
        finally:
            self.finished_at = time.time()
            self._shutdown()
        return True

    def _check_stop(self, session: pytest.Session) -> None:
        if session.shouldfail or session.shouldstop:
            self._stop_workers_gracefully()
        if session.shouldfail:
            raise session.Failed(session.shouldfail)
        if session.shouldstop:
            raise session.Interrupted(session.shouldstop)

    def _run_local(self, session: pytest.Session, local: list[pytest.Item]) -> None:
        for index, item in enumerate(local):
            nextitem = local[index + 1] if index + 1 < len(local) else None
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
            self._check_stop(session)
            self.loop_once(block=False)
            self._check_stop(session)

    @functools.cached_property
    def embedded_root(self) -> Path | None:
        """The embedded broker's folder (``--celery-broker embedded``), else None."""
        if self.settings.broker != EMBEDDED:
            return None
        from .embedded import root_dir

        return root_dir(self.config.rootpath)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """The lab board opens before pytest collects (see :mod:`.startup`)."""
        if not session.config.option.collectonly and self._prestart is None:
            picked = selection(self.config)  # a run like the last: its line, its prewarm
            early = remembered(self._cache_get(QUEUES_KEY), picked)
            on_board = functools.partial(self._new_turns, early) if early else None
            self._prestart = Prestart(self.settings.broker, self.embedded_root, on_board)
            mode = self.shipper.settings.mode
            start_prewarm(
                self._prestart.app, self._cache, picked, self.payloads, mode, self.prewarmed
            )

    def pytest_sessionfinish(self) -> None:
        picked = selection(self.config)
        remember_plan(self._cache, picked, self.scheduler.queue_nodeids, self.workers_by_queue)
        if self.turns is not None:
            self.turns.close()  # joined early by a run that dispatched nothing (else: closed)
        if self._prestart is not None:
            self._prestart.close()  # opened for a run that dispatched nothing

    def _start_remote(self) -> None:
        from . import transport

        if self._prestart is None:
            self._prestart = Prestart(self.settings.broker, self.embedded_root)
        self._app, board = self._prestart.take()
        self._join_line(board)  # the line's wait (HELLO_WAIT) covers the rest of the start
        queues = self.scheduler.queue_nodeids
        if not self.prepare_ship([n for nodeids in queues.values() for n in nodeids]):
            return
        try:
            conn = transport.connect(self._app)
        except transport.BrokerUnavailable as exc:
            self.broker_error = f"celery-dispatch: {exc}"
            self.terminal.write_line(self.broker_error, red=True, bold=True)
            for nodeid in (n for nodeids in queues.values() for n in nodeids):
                self.replayer.fail_test(nodeid, self.broker_error)
            return
        self._broker = transport.Broker(self._app, conn)
        self._broker.declare_reply_queue(self.reply_to)
        self._consumer = transport.ReplyConsumer(self._app, self.reply_to, self.events)
        self._consumer.start()
        self._consumer.ready.wait(5.0)
        for queue_name in queues:
            self._broker.declare_task_queue(queue_name)
        self._local_workers = start_local_workers(
            self.settings,
            self.config.rootpath,
            self.embedded_root,
            list(queues),
            self._broker.consumer_count,
            self.terminal.write_line,
        )
        self.scheduler.estimates.update(queue_estimates(self.config, queues))  # longest first, ETA
        found = find_workers(self._broker, queues, self.settings.wait_workers)
        self.workers_by_queue = found.by_queue
        mode = self.shipper.settings.mode
        prewarm_collected(self._app, self.payloads, mode, queues, found.consumers, self.prewarmed)
        transport.warm_sending(self._app)  # within the line's wait, not on the first send
        self.execute(self.scheduler.begin(found.consumers, found.capacity))
        sch = self.scheduler
        if sch.waiting_queues:
            allowed = self.settings.allowed_queues
            sch.guesses.update(
                guess_queue_names(self._broker, sch.waiting_queues, sch.consumers, allowed)
            )
        self.terminal.write_header(sch, self.workers_by_queue, self.settings.wait_workers)
        from .jsonreport import prefetch_environment

        prefetch_environment()  # while the first results are on their way
        # Everything imported and collected so far lives to the end of the run: out of the
        # collector's way, so that neither the collections while reports are replayed nor
        # pytest's gc.collect() at unconfigure walk Celery's and the items' object graphs again.
        gc.freeze()

    def _join_line(self, board: Any) -> None:
        """On the lab board: this run's turn on shared benches (``--celery-priority``)."""
        queues = list(self.scheduler.queue_nodeids)
        turns = self.turns or self._new_turns([], board)
        turns.join(queues)  # nothing new if joined with these queues while collecting
        if (cache := getattr(self.config, "cache", None)) is not None:
            cache.set(QUEUES_KEY, {"args": selection(self.config), "queues": queues})
        self.scheduler.turns.grant = turns.grant

    def _new_turns(self, queues: list[str], board: Any) -> RunTurns:
        """This run on ``board``, waiting for ``queues`` (none: it joins after collection)."""
        self.turns = RunTurns(self.run_id, self.identity, self.settings.priority, board)
        if queues:
            self.turns.join(queues)
        return self.turns

    @property
    def _cache(self) -> Any:
        return getattr(self.config, "cache", None)  # absent with -p no:cacheprovider

    def _cache_get(self, key: str) -> Any:
        cache = self._cache
        return cache.get(key, None) if cache is not None else None

    def _consumer_count(self, queue_name: str) -> int | None:
        return self._broker.consumer_count(queue_name) if self._broker is not None else None

    def _work_depth(self, queue_name: str) -> int | None:
        """Chunks of this run still waiting in the work queue of ``queue_name``."""
        if self._broker is None:
            return None
        depth: int | None = self._broker.message_count(work_queue_name(self.run_id, queue_name))
        return depth

    # ------------------------------------------------------------------ actions

    def execute(self, actions: list[Action]) -> None:
        """Carry out what the scheduler decided, in order."""
        declared: set[str] = set()  # the work queues declared for this batch
        for action in actions:
            if isinstance(action, Publish):
                self._publish(action.chunk, declared)
            elif isinstance(action, StartSlot):
                self._start_slot(action.slot)
            elif isinstance(action, Fail):
                self.replayer.fail_test(action.nodeid, action.message)
            elif isinstance(action, Notice):
                self.terminal.notice(action.text, action.color)
            elif isinstance(action, Attempt):
                for nodeid in action.nodeids:
                    self.records[nodeid].attempts = action.attempt

    def _publish(self, chunk: ChunkState, declared: set[str]) -> None:
        """Put a chunk on its queue's work queue (the scheduler retries if the broker is away)."""
        from .transport import describe_error

        name = work_queue_name(self.run_id, chunk.queue)
        message: Chunk = {
            "batch_id": chunk.batch_id,
            "attempt": chunk.attempt,
            "nodeids": list(chunk.nodeids),
        }
        try:
            # Declared before every batch of chunks (a round trip): the workers delete a run's
            # work queue when they take its controller for gone (a cut network), and a chunk
            # published to a deleted queue is dropped without a word. Once per batch, not per
            # chunk: a run's start sends a queue's chunks in one batch (W2: 100 of them, each a
            # round trip to a broker that may be on another machine).
            if name not in declared:
                self._broker.declare_work_queue(name)
                declared.add(name)
            self._broker.publish_work(name, message)
        except Exception as exc:
            declared.discard(name)  # declared again after the broker is back
            self.execute(self.scheduler.send_failed(chunk, describe_error(exc)))
            return
        self.scheduler.sent(chunk)
        self.replayer.sent(chunk.nodeids, chunk.queue, chunk.attempt)

    def _start_slot(self, slot: SlotState) -> None:
        """One more ``run_session`` task on a Celery queue: a slot that pulls this run's work."""
        nodeids = self.scheduler.queue_nodeids[slot.queue]
        payload = self.payloads.for_slot(slot.session_id, slot.queue, nodeids)
        try:
            slot.task_id = self._broker.send_session(
                payload, f"{slot.session_id}-{uuid.uuid4().hex[:8]}"
            )
        except Exception:
            self.scheduler.slot_send_failed(slot)

    # ------------------------------------------------------------------ the event loop

    def loop_once(self, block: bool = True) -> None:
        """Handle queued events (waiting up to 0.2 s for one), then check the clocks."""
        try:
            event = self.events.get(timeout=0.2) if block else self.events.get_nowait()
        except queue_mod.Empty:
            event = None
        if (consumer := self._consumer) is not None:  # before the events: they may have come
            # with a reconnect; cut off, when the broker was last heard starts the wait
            self.execute(
                self.scheduler.connection(consumer.connected.is_set(), consumer.last_heard)
            )
        while event is not None:
            self.handle_event(event)
            if self._should_stop():
                return  # -x / --maxfail: report nothing after the failure that tripped it
            try:
                event = self.events.get_nowait()
            except queue_mod.Empty:
                event = None
        for line in self.turns.tick(self.scheduler) if self.turns is not None else ():
            self.terminal.notice(line, "cyan")  # renews this run's notice (every turn: cheap)
        now = time.monotonic()
        if now - self._last_poll >= POLL_INTERVAL and self._broker is not None:
            self._last_poll = now
            self.execute(self.scheduler.poll())
            last, finalized = self.replayer.last_activity, self.replayer.finalized
            self.terminal.write_status(now, last, finalized, self.scheduler)

    def handle_event(self, event: Event) -> None:
        """One event from a worker, to its ``on_<type>`` method (xdist's ``worker_<name>``)."""
        if event.get("run_id") != self.run_id:
            return
        kind = str(event.get("type"))
        handler = getattr(self, f"on_{kind}", None)
        if handler is None:
            if kind not in self._unknown_events:
                self._unknown_events.add(kind)
                self.terminal.notice(
                    f"ignoring an event of unknown type {kind!r} from {event.get('worker')} "
                    "(a worker with another version of pytest-celery-dispatch?)"
                )
            return
        if kind != "results":
            self.scheduler.slot_seen(str(event.get("session_id", "")), event.get("worker"))
        chunk = self.scheduler.chunk_seen(str(event.get("batch_id", "")))
        handler(event, chunk)

    # ------------------------------------------------------------------ stopping

    def _should_stop(self) -> bool:
        session = self._session
        return bool(session is not None and (session.shouldfail or session.shouldstop))

    def _stop_workers_gracefully(self) -> None:
        """-x / --maxfail: revoke queued chunks, let running tests finish, start no new one."""
        if self.stopped_early is not None or self._broker is None:
            return
        held, waiting = self.scheduler.held()  # a slot's tests behind its running one:
        queued = (set(self.scheduler.stop()) | waiting) - self.replayer.finalized  # never start
        running = held - self.replayer.finalized
        with contextlib.suppress(Exception):
            self._broker.declare_stop_queue(self.run_id)
        # Nothing is reported after this point: tell the workers right away. The consumer
        # stops first, or it would declare the reply queue again when it resubscribes.
        if self._consumer is not None:
            self._consumer.stop(timeout=0)
        self._delete_run_queues()
        with contextlib.suppress(Exception):
            self._revoke_outstanding()
        self.stopped_early = {"queued_not_run": len(queued), "running_not_reported": len(running)}
        self.terminal.notice(
            f"stopping: {len(queued)} test(s) not started will not run, "
            f"{len(running)} running test(s) left to finish on their workers (not reported)"
        )

    def _delete_run_queues(self) -> None:
        """Deleting the reply queue tells every worker the run is over (after Ctrl-C: kill the
        running test now; after -x: the stop queue says finish it first)."""
        self._broker.delete_queue(self.reply_to)
        for queue_name in self.scheduler.queue_nodeids:
            self._broker.delete_queue(work_queue_name(self.run_id, queue_name))

    def _shutdown(self) -> None:
        if self._consumer is not None:  # every report is in (or none is wanted any more):
            self._consumer.stop(timeout=0)  # its last wait for the broker ends meanwhile
        if self.turns is not None:
            self.turns.close()  # the next run in line goes now (waits for its board's send)
        if self._should_stop() and not self.interrupted:
            self._stop_workers_gracefully()
        if self._consumer is not None:
            self._consumer.stop()
        if self._broker is not None and self.scheduler.outage.given_up:
            self._broker.abandon()  # cut off: no call to a silent broker, the queues expire
        elif self._broker is not None:
            with contextlib.suppress(Exception):
                self._revoke_outstanding()
            self._delete_run_queues()
            self._broker.close()
        if self._local_workers is not None:
            self._local_workers.stop()
        if not self.interrupted and not self._should_stop():
            self.replayer.check_invariant(self.terminal.write_line)
        self.replayer.event_log.close()

    def _revoke_outstanding(self) -> None:
        """Slots still waiting in a Celery queue will not start (the worker skips them anyway
        once the run is over; revoking saves it the trip)."""
        ids = self.scheduler.unstarted_slot_task_ids()
        if ids and self._app is not None:
            self._app.control.revoke(ids)
