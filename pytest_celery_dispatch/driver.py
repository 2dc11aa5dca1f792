"""The slot driver: feeds chunks from the run's work queue to a warm runner, forwards events.

Used by the ``run_session`` task (one slot) in the worker's pool process. Everything it talks to
comes in as a callable (fetch, emit, control, the runner factory, the clock), so the rules below
are unit-tested with fakes.

PYTEST_DONT_REWRITE: spare runners import it before pytest configures (see spare_boot.py).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from .liveness import CONTROLLER_CHECK_INTERVAL, TEARDOWN_GRACE
from .procutil import describe_exit
from .runnerspec import RunnerSpec
from .serialization import HEARTBEAT_INTERVAL, RawTest

#: What the task's control callback may answer while a slot runs: go on, stop after the running
#: test (-x / --maxfail), or drop the run now (it is over, interrupted, or its controller is
#: gone): the running test is interrupted as Ctrl-C would, its fixtures tear down, and the
#: runner is killed if it has not ended ``TEARDOWN_GRACE`` seconds later.
RUN, STOP, KILL = "run", "stop", "kill"
#: The slot's state once its worker quarantined itself (see :mod:`.health`): it takes no more
#: work and leaves what it had unanswered, for the controller to re-send at once. Also what
#: ``control()`` answers when another slot of the worker quarantined it: the running test
#: finishes (as after ``STOP``), no other starts.
QUARANTINE = "quarantine"
#: What one read of the runner's pipe found (``SlotDriver._pump``).
READ, EXITED = "read", "exited"

#: While its runner is in a test, the slot reads the runner's lines at most this often (s): the
#: lines of quick tests gather in the pipe meanwhile, and neither process is woken per test.
#: W6 (15,000 quick tests a slot): the runner's and its zygote's CPU 9.0-9.5 s -> 7.4-7.9 s,
#: the driver's 1.1 s -> 0.7-0.8 s. A test's results reach the controller 5 ms later at most.
RELAY_PAUSE = 0.005

#: The least a slot waits for the runner it asked its run's zygote for (see :mod:`.zygote`):
#: the time a driver waited before the wait became part of its loop (2 s for the zygote to
#: listen, 4 s for the fork).
FORK_WAIT_MIN = 6.0


def fork_wait_limit(timeout: float) -> float:
    """How long a slot waits for its runner from the zygote, which forks it once it has
    collected: as long as one test may take (``--celery-timeout``), never less than
    ``FORK_WAIT_MIN``. A collection slower than that counts as hung: the slot gives the
    request up and starts a runner of its own (its heartbeats went on meanwhile)."""
    return max(timeout, FORK_WAIT_MIN)


#: The least a runner is given from its start to its first test (see :func:`start_wait_limit`).
#: A new ``python -m pytest`` with the usual plugins reaches its first test in ~0.7 s on an idle
#: 2-core machine, but a big suite's collection takes seconds (W6's 15,000 tests per worker:
#: 5-15 s on a loaded machine): 60 s leaves room for a busy bench under a short
#: ``--celery-timeout``, and a hang still ends within a minute.
START_WAIT_MIN = 60.0


def start_wait_limit(timeout: float) -> float:
    """How long a runner may take from its start (for a fork of the zygote: from the fork) to
    its first test, which is pytest's configure, session start and collection in it: as long as
    one test may take (``--celery-timeout``), never less than ``START_WAIT_MIN``. A runner
    slower than that counts as hung (a conftest.py that blocks, a device that never answers):
    it is killed and fails what it holds, as a runner that crashes before its first test."""
    return max(timeout, START_WAIT_MIN)


def start_hang(limit: float, timeout: float) -> str:
    """Why a runner that did not reach its first test in time was killed."""
    return (
        f"the test process did not start its first test within {limit:g}s of starting "
        "(a conftest.py, a plugin or the collection hung?); the runner was killed. Its start "
        f"(configure, collection, session start) may take as long as one test: --celery-timeout "
        f"({timeout:g}s), at least {START_WAIT_MIN:g}s; raise --celery-timeout if it is only slow"
    )


#: A chunk of work as fetched from the run's work queue.
Chunk = dict[str, Any]
Emit = Callable[[dict[str, Any]], None]
Clock = Callable[[], float]
#: ``on_failure(kind, why)``: a test crashed (``crash``), timed out (``timeout``), or the runner
#: crashed outside a test (``runner``); True when the worker quarantines itself now.
OnFailure = Callable[[str, str], bool]


class Runner(Protocol):
    """What the driver needs of a runner (:class:`.launcher.RunnerProcess`, or a fake)."""

    eligible: set[str]
    collected: bool
    current: str | None
    current_since: float
    shutdown_sent: bool
    self_stopped: bool
    warm_start: bool

    @property
    def streams_output(self) -> bool: ...

    @property
    def forking(self) -> bool:
        """Asked of the run's zygote, not forked yet (it is collecting)."""

    @property
    def unborn(self) -> bool:
        """Exited without ever being forked: the zygote went away, or the wait was given up."""

    def send(self, command: dict[str, Any]) -> None: ...

    def shutdown(self) -> None: ...

    def wait(self, timeout: float) -> tuple[bool, bool]: ...

    def read_events(self) -> Iterator[dict[str, Any]]: ...

    def read_output(self, timeout: float) -> str | None: ...

    def crash_output(self) -> str: ...

    def dump_stacks(self) -> str:
        """Every thread's Python stack, asked of it before it is killed for hanging."""

    def kill(self) -> None: ...

    def interrupt(self) -> None: ...

    def request_stop(self) -> None: ...

    def close(self) -> int: ...


#: ``start_runner(eligible, number, tmp)``: runner number ``number`` (1, 2...) of the slot,
#: collecting ``eligible``, its files under the folder ``tmp``.
StartRunner = Callable[[list[str], int, str], Runner]


def maxfail_of(pytest_args: list[str]) -> int:
    """The ``--maxfail=N`` the controller forwarded to the runners (:mod:`.forwarding`), or 0."""
    for arg in pytest_args:
        if arg.startswith("--maxfail="):
            return int(arg.split("=", 1)[1])
    return 0


class Coalescer:
    """Sends finished tests home together: one ``results`` message for up to ``max_tests``
    tests or ``max_age`` seconds, instead of a message or more per test. Any other event first
    flushes what is pending, so the order is kept."""

    def __init__(
        self,
        emit: Emit,
        max_tests: int = 100,
        max_age: float = 0.05,
        clock: Clock = time.monotonic,
    ) -> None:
        self._emit = emit
        self.max_tests = max_tests
        self.max_age = max_age
        self.clock = clock
        self.ready: list[RawTest] = []
        self.since: float | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "logstart":
            return  # the runner sends the whole test when it ends
        if kind != "test":
            self.flush()
            self._emit(event)
            return
        nodeid = str(event.get("nodeid", ""))
        batch_id = str(event.get("batch_id", ""))
        fields = bytes(event.get("raw") or b"")
        self._ready(RawTest.spliced(nodeid, str(event.get("outcome", "")), batch_id, fields))

    def _ready(self, test: RawTest) -> None:
        self.ready.append(test)
        if self.since is None:
            self.since = self.clock()
        if len(self.ready) >= self.max_tests:
            self.flush()

    @property
    def pending(self) -> bool:
        return bool(self.ready)

    def tick(self) -> None:
        if self.since is not None and self.clock() - self.since >= self.max_age:
            self.flush()

    def flush(self) -> None:
        if self.ready:
            tests, self.ready, self.since = self.ready, [], None
            self._emit({"type": "results", "tests": tests})


def where_it_was(stacks: str) -> str:
    """The part of a crash message that quotes a killed runner's stacks ("" without)."""
    if not stacks:
        return ""
    return f"\n--- where the test process was when it was killed ---\n{stacks.rstrip()}"


def crashed(nodeid: str, batch_id: str, why: str, tail: str, stacks: str = "") -> dict[str, Any]:
    """The ``crashed`` event of a test whose runner died (or was killed) while it ran; a runner
    killed for hanging said where it was (``stacks``, innermost frames first)."""
    message = f"{nodeid}: {why}{where_it_was(stacks)}"
    if tail:
        message += f"\n--- last output of the test process ---\n{tail}"
    return {
        "type": "crashed",
        "nodeid": nodeid,
        "batch_id": batch_id,
        "reason": why.splitlines()[0],
        "message": message,
    }


class SlotDriver:
    """Feeds chunks from ``fetch()`` to a warm runner until the work runs out; forwards events.

    * A chunk is ``{"batch_id", "attempt", "nodeids"}``; every event about one of its tests
      carries its ``batch_id``; ``started`` and ``finished`` frame it.
    * The next chunk is fetched when the runner holds at most one unfinished test (the one it
      keeps back for ``nextitem``), so the work spreads over every slot of every worker.
    * Every ``check_interval`` seconds (a passive queue declare, well under 1 ms) ``control()``
      says whether to go on (``RUN``), to let the running test finish and start no other
      (``STOP``: -x / --maxfail on the controller), or to drop the run now (``KILL``: the run is
      over, interrupted, or its controller is gone): the runner is interrupted as Ctrl-C would,
      so the fixtures tear down, and killed if it has not ended ``teardown_grace`` seconds
      later. Every ``heartbeat`` seconds an ``alive`` event says the slot still works.
    * The first runner may be a fork of the run's zygote, which comes once the zygote has
      collected (:attr:`Runner.forking`): the loop waits for it like for any runner's
      collection, heartbeats and the controller's word going on; a stop drops the request. A
      zygote that goes away first, or that has not forked after ``fork_wait`` seconds
      (:func:`fork_wait_limit`), leaves the runner :attr:`Runner.unborn`: a runner of the
      slot's own takes its place.
    * A runner must start its first test within ``start_wait`` seconds of its start (of its
      fork, for the zygote's) (:func:`start_wait_limit`): one that hangs before (a conftest.py
      that blocks at import, in ``pytest_configure`` or in collection) is killed, and fails
      what it holds as one that dies before running anything does (below).
    * A runner that dies (crash, timeout kill) costs only its current test: a new runner picks
      up the rest. One that dies before running anything fails what it was given, and every
      later test of the slot is answered as crashed with its reason (``broken``): no loop.
    """

    def __init__(
        self,
        spec: RunnerSpec,
        emit: Emit,
        fetch: Callable[[], Chunk | None],
        start_runner: StartRunner,
        control: Callable[[], str] = lambda: RUN,
        *,
        check_interval: float = CONTROLLER_CHECK_INTERVAL,
        heartbeat: float = HEARTBEAT_INTERVAL,
        teardown_grace: float = TEARDOWN_GRACE,
        clock: Clock = time.monotonic,
        on_failure: OnFailure = lambda kind, why: False,
        fork_wait: float | None = None,
        start_wait: float | None = None,
        pause: Callable[[float], None] = time.sleep,
    ) -> None:
        self.spec = spec
        self.pause = pause
        self.on_failure = on_failure
        self.emit = Coalescer(emit, clock=clock)
        self.fetch = fetch
        self.start_runner = start_runner
        self.control = control
        self.check_interval = check_interval
        self.heartbeat = heartbeat
        self.teardown_grace = teardown_grace
        self.fork_wait = fork_wait_limit(spec.timeout) if fork_wait is None else fork_wait
        self.start_wait = start_wait_limit(spec.timeout) if start_wait is None else start_wait
        self.clock = clock
        self.done: set[str] = set()
        # nodeid -> batch_id: given to the runner, not finished (``_finish`` takes it out as it
        # puts it in ``done``: the two never share a nodeid, and the loop counts it per turn)
        self.assigned: dict[str, str] = {}
        self.chunk_left: dict[str, set[str]] = {}  # batch_id -> its unfinished nodeids
        self.missing: dict[str, str] = {}  # nodeid -> why the runner could not collect it
        self.broken: str | None = None  # set when runners cannot even collect: fail what comes
        self.state = RUN
        self.starts = self.chunks = 0
        self.out_of_work = False
        self.warm = False  # the first runner was warm (a spare or a fork of the zygote)
        self.runner: Runner | None = None
        self.redo: list[str] = []  # given to a runner that died: for the next one
        self.kill_reason: str | None = None  # why the driver killed the current runner
        self.kill_stacks = ""  # where it was then (its threads' stacks), when it hung
        self.last_check = self.last_beat = 0.0
        self.runner_since = 0.0  # when the current runner was started (or asked of the zygote)
        self.runner_born = 0.0  # when it was started (or, a fork, came): its start-up counts
        self.began = False  # the current runner has started a test
        self.interrupted_at: float | None = None  # KILL: when the runner was interrupted
        self.run_over = False  # the run ended while the runner wound down: it was killed
        self.maxfail = maxfail_of(spec.pytest_args)  # the forwarded -x / --maxfail, or 0
        self.failures = 0  # failed tests of this slot, over all its runners

    def run(self) -> dict[str, Any]:
        """Drive the slot to its end; a summary (state, tests done, chunks, runner starts)."""
        with tempfile.TemporaryDirectory(prefix="celery-dispatch-") as tmp:
            self.last_check = self.last_beat = self.clock()
            try:
                self._loop(tmp)
            except BaseException:
                if self.runner is not None:
                    self.runner.kill()  # the reply channel failed, or the task was cancelled
                    self.runner.close()
                raise
        self.emit.flush()
        return {
            "state": self.state,
            "done": len(self.done),
            "chunks": self.chunks,
            "runner_starts": self.starts,
            "warm_start": self.warm,
        }

    def _loop(self, tmp: str) -> None:
        while True:
            if self.runner is None:
                if self.state != RUN:
                    return
                if not self._start_runner(tmp):
                    # Nothing can run here: answer for each test we are given, by name, until
                    # the work runs out (a retry may land on a better worker).
                    if not self._answer_without_runner():
                        return
                    continue
            runner = self.runner
            assert runner is not None
            if self._feed(runner):
                continue  # at once: the chunk may have been all done or missing
            read = self._pump(runner, 0.05 if self.emit.pending else 0.2)
            self.emit.tick()
            self._watch(runner)
            if read == EXITED and self._runner_gone(runner):
                return
            if read == READ and runner.current is not None and self.state == RUN:
                self.pause(RELAY_PAUSE)  # a test runs: let the next ones' lines gather

    def _start_runner(self, tmp: str) -> bool:
        eligible = [n for n in self.spec.nodeids if n not in self.done and n not in self.missing]
        if self.broken is not None or not eligible:
            return False
        self.starts += 1
        self.runner_since = self.runner_born = self.clock()
        self.began = False
        self.runner = self.start_runner(eligible, self.starts, tmp)
        self.redo = list(self.assigned)
        self.kill_reason = None
        self.kill_stacks = ""
        return True

    def _answer_without_runner(self) -> bool:
        chunk = self.fetch()
        if chunk is None:
            return False
        self.chunks += 1
        self._take(chunk, None)
        return True

    def _feed(self, runner: Runner) -> bool:
        """Give the runner work: what its dead predecessor left, or the next chunk when it
        holds at most one unfinished test. True when a chunk was taken (loop again at once)."""
        if self.state != RUN or not runner.collected or runner.shutdown_sent:
            return False
        if self.redo:
            runner.send({"type": "run", "nodeids": [n for n in self.redo if n in runner.eligible]})
            self.redo = []
        elif not self.out_of_work and len(self.assigned) <= 1:
            chunk = self.fetch()
            if chunk is None:
                self.out_of_work = True
                # The shutdown below starts the test the runner holds back: not before the
                # controller's word says the run goes on (no work also comes to a slot cut off
                # from its broker, or of a run that is over, and such a slot starts nothing).
                self._ask_controller(runner, self.clock())
                if self.state != RUN:
                    return False
            else:
                self.chunks += 1
                runnable = self._take(chunk, runner)
                if runnable:
                    runner.send({"type": "run", "nodeids": runnable})
                return True
        if self.out_of_work:
            runner.shutdown()
        return False

    def _take(self, chunk: Chunk, runner: Runner | None) -> list[str]:
        """Announce a chunk; answer at once for its tests that cannot run here (or are done);
        the ones for the runner."""
        batch_id = str(chunk["batch_id"])
        ids = [str(n) for n in chunk.get("nodeids", [])]
        self.emit(
            {
                "type": "started",
                "batch_id": batch_id,
                "attempt": int(chunk.get("attempt") or 1),
                "nodeids": ids,
            }
        )
        self.chunk_left[batch_id] = set(ids)
        runnable = []
        for nodeid in ids:
            self.assigned[nodeid] = batch_id
            if self.broken is not None:
                self.emit(crashed(nodeid, batch_id, self.broken, ""))
                self._finish(nodeid)
            elif nodeid in self.done:
                self._finish(nodeid)
            elif runner is None or nodeid not in runner.eligible or nodeid in self.missing:
                why = self.missing.get(nodeid, "")
                self.emit(
                    {"type": "missing", "batch_id": batch_id, "nodeids": [nodeid], "reason": why}
                )
                self._finish(nodeid)
            else:
                runnable.append(nodeid)
        return runnable

    def _finish(self, nodeid: str) -> None:
        """A test is over: once its chunk has no test left, say that it is ``finished``."""
        self.done.add(nodeid)
        batch_id = self.assigned.pop(nodeid, None)
        if batch_id is None:
            return
        left = self.chunk_left.get(batch_id)
        if left is not None:
            left.discard(nodeid)
            if not left:
                del self.chunk_left[batch_id]
                self.emit({"type": "finished", "batch_id": batch_id})

    def _pump(self, runner: Runner, wait: float) -> str | None:
        """Forward what the runner wrote (waiting up to ``wait`` s): ``READ`` when it wrote
        events, ``EXITED`` once it has exited, else None."""
        output_ready, events_ready = runner.wait(wait)
        if output_ready:
            self._forward_output(runner, 0)
        if not events_ready:
            return None
        try:
            for event in runner.read_events():
                self._on_event(runner, event)
        except EOFError:
            return EXITED
        return READ

    def _on_event(self, runner: Runner, event: dict[str, Any]) -> None:
        kind = event.get("type")
        nodeid = str(event.get("nodeid", ""))
        if kind == "collected":
            runner.collected = True
            self.warm = self.warm or runner.warm_start
            for n in event.get("missing", []):
                self.missing[str(n)] = str(event.get("reason") or "")
            return
        if kind == "stopping":
            runner.self_stopped = True
            return
        if kind == "logstart":
            self.began = True
            runner.current = nodeid
            runner.current_since = self.clock()
        if nodeid in self.assigned:
            event["batch_id"] = self.assigned[nodeid]
        self.emit(event)
        if kind == "test":
            self.failures += event.get("outcome") in ("failed", "error")
            runner.current = None
            self._finish(nodeid)

    def _forward_output(self, runner: Runner, wait: float) -> bool:
        """Send what the tests printed (under -s) home as an ``output`` event; False at its end
        (or when nothing came within ``wait`` s)."""
        text = runner.read_output(wait)
        if text is None:
            return False
        current = runner.current or ""
        self.emit(
            {
                "type": "output",
                "data": text,
                "nodeid": current,
                "batch_id": self.assigned.get(current, ""),
            }
        )
        return True

    def _watch(self, runner: Runner) -> None:
        """The per-test deadline, the controller's word (every ``check_interval`` s) and the
        heartbeat (every ``heartbeat`` s)."""
        now = self.clock()
        if runner.current is not None and now - runner.current_since > self.spec.timeout:
            if self.kill_reason is None:  # asked once: it is killed until it is gone
                self.kill_stacks = runner.dump_stacks()
            self.kill_reason = (
                f"timeout: still running after {self.spec.timeout:g}s (--celery-timeout); "
                "the runner was killed"
            )
            runner.kill()
        if runner.forking:
            self.runner_born = now  # not there yet: its start counts from its fork
            if now - self.runner_since > self.fork_wait:
                runner.kill()  # the zygote has not forked it: given up, unborn (_runner_gone)
        elif self._start_hung(runner, now):
            if self.kill_reason is None:
                self.kill_stacks = runner.dump_stacks()
            self.kill_reason = start_hang(self.start_wait, self.spec.timeout)
            runner.kill()
        if now - self.last_check >= self.check_interval:
            self._ask_controller(runner, now)
        if self.interrupted_at is not None and now - self.interrupted_at >= self.teardown_grace:
            self.interrupted_at = None
            runner.kill()  # its teardown took too long
        if self.state == RUN and now - self.last_beat >= self.heartbeat:
            self.last_beat = now
            current = runner.current or ""
            self.emit(
                {
                    "type": "alive",
                    "nodeid": current,
                    "batch_id": self.assigned.get(current, ""),
                    "elapsed": round(now - runner.current_since, 3) if current else 0.0,
                }
            )

    def _start_hung(self, runner: Runner, now: float) -> bool:
        """The runner is past ``start_wait`` without starting a test while it had one to start
        (or had not even collected). Only while the slot runs: after a stop or quarantine it is
        to start nothing, and a dropped run has its own grace."""
        if self.began or self.kill_reason is not None or self.state != RUN or runner.unborn:
            return False
        if runner.collected and not self.assigned:
            return False  # nothing to start: it waits for work, or ends
        return now - self.runner_born > self.start_wait

    def _quarantined(self, kind: str, why: str) -> bool:
        """Tell the worker's health what happened; True when it quarantined itself: the slot
        ends, what it holds unanswered (the controller re-sends it at once)."""
        self.emit.flush()
        if not self.on_failure(kind, why):
            return False
        self.state = QUARANTINE
        return True

    def _ask_controller(self, runner: Runner, now: float) -> None:
        """Act on ``control()``: drop the run now (``KILL``) or after the running test
        (``STOP``, or ``QUARANTINE``: the worker stepped aside)."""
        self.last_check = now
        wanted = self.control()
        if wanted == KILL and self.state != KILL and not self.run_over:
            if runner.shutdown_sent and runner.current is None:
                # The run is over and so is this slot's work (the controller ends the run
                # once the last results are in, while the runner winds down): nothing to
                # interrupt, the slot ends normally unless work is left undone.
                if not self._work_done():
                    self.state = KILL
                self.run_over = True
                runner.kill()
            else:
                self.state = KILL
                self.interrupted_at = now
                runner.interrupt()
        elif wanted in (STOP, QUARANTINE) and self.state == RUN:
            self.state = wanted  # finish the running test, start no other
            runner.request_stop()

    def _work_done(self) -> bool:
        """The work queue ran dry and every test taken from it is answered."""
        return self.out_of_work and not self.assigned

    def _runner_gone(self, runner: Runner) -> bool:
        """The runner exited: a normal end, a crash, a kill, or its own --maxfail. Name the
        test it ran; True when the slot ends here."""
        while runner.streams_output and self._forward_output(runner, 0.5):
            pass  # what it printed last
        code = runner.close()
        self.runner = None
        if self.state != RUN:
            return True
        if runner.unborn:
            return False  # the zygote gave no runner: one of the slot's own takes its place
        if runner.current is not None:
            why = self.kill_reason or f"the test process crashed ({describe_exit(code)})"
            batch_id = self.assigned.get(runner.current, "")
            tail = runner.crash_output()
            self.emit(crashed(runner.current, batch_id, why, tail, self.kill_stacks))
            self._finish(runner.current)
            if self._quarantined("timeout" if self.kill_reason else "crash", why):
                return True
            self.failures += 1
            if 0 < self.maxfail <= self.failures:  # -x / --maxfail: a crash counts, and a new
                self.state = STOP  # runner would count from zero: the run stops, as it would
                return True
        elif not runner.self_stopped and not self._work_done():
            outside = self.kill_reason or (
                f"the test process crashed outside a test ({describe_exit(code)})"
            )
            if self._quarantined("runner", outside):
                return True
        if runner.self_stopped:
            self.state = STOP  # -x / --maxfail: the controller stops the whole run too
            return True
        if self._work_done():
            return True  # all the work it was given is done: the normal end
        if not self.began:
            # It died (or hung) before running anything: do not loop; fail what it was given.
            why = self.kill_reason or (
                f"the test process exited before running any test ({describe_exit(code)})"
            )
            tail = runner.crash_output()
            for nodeid in list(self.assigned):
                self.emit(crashed(nodeid, self.assigned[nodeid], why, tail, self.kill_stacks))
                self._finish(nodeid)
            self.broken = f"{why}{where_it_was(self.kill_stacks)}\n{tail}".strip()
        return False
