"""A worker's bench health: its health tests, the sessions' endings, its quarantine.

The rules are pure (:mod:`.healthrules`); this module keeps the state and runs the tests.

* The health tests are ``DISPATCH_HEALTH`` in the worker's environment (the bench's own), else
  the run's ini ``celery_dispatch_health`` (sent with each session: the tests come from the
  run's own tree). They run in a pytest process of their own, in the workspace, paths confined
  to it, before a session takes the run's work when they are due (every
  ``DISPATCH_HEALTH_EVERY`` / ini ``celery_dispatch_health_every`` minutes, and after a test
  crashed or timed out) and at once after a crashed or timed-out test.
* The state (quarantine and its reason, the last check, the last sessions' endings) is one
  JSON file in the worker's private folder (the slot locks' folder, made at ``worker_init``),
  shared by its pool processes under a ``flock``: no module-level state. A restarted worker
  starts in service.
* Quarantined, the worker sends each session back to its queue (a healthy worker of the queue
  takes it) and tells the session's controller (a ``quarantined`` event on its reply queue),
  which re-sends at once any work the worker had. It keeps consuming its queues: the
  controller's consumer count still counts it, so a queue whose workers are all quarantined
  fails with their reasons rather than as a queue nobody serves. ``celery-dispatch release``
  (a notice on the lab board, read by :mod:`.benchnotice`) puts it back; with
  ``DISPATCH_HEALTH_REJOIN=1`` a worker quarantined by a health test rejoins by itself once
  its health tests pass again.

Worker side only. PYTEST_DONT_REWRITE: imported by the worker app.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .driver import QUARANTINE, RUN
from .healthrules import (
    DEFAULT_HEALTH_EVERY,
    DEFAULT_QUARANTINE_AFTER,
    ENDINGS_KEPT,
    health_due,
    health_failure,
    parse_count,
    parse_minutes,
    parse_tests,
    streak_failure,
    streak_reached,
)
from .names import (
    ENV_HEALTH,
    ENV_HEALTH_EVERY,
    ENV_HEALTH_REJOIN,
    ENV_QUARANTINE_AFTER,
    ENV_RUNNER,
    ENV_SLOT_GATE,
)
from .procutil import describe_exit, kill_group
from .serialization import UnsafeNodeId, confine

log = logging.getLogger("pytest_celery_dispatch.health")

STATE_FILE = "health.json"
#: The tail of a failed health run quoted when pytest names no failed test.
REASON_TAIL = 300


@dataclasses.dataclass(frozen=True)
class HealthConfig:
    tests: tuple[str, ...] = ()
    every: float = DEFAULT_HEALTH_EVERY  # minutes
    after: int = DEFAULT_QUARANTINE_AFTER
    rejoin: bool = False


def worker_config(environ: Mapping[str, str] | None = None) -> HealthConfig:
    """The worker's own settings (``DISPATCH_HEALTH*``); a bad value is a ``ValueError`` that
    names the variable and the accepted form (the worker refuses to start)."""
    env = os.environ if environ is None else environ
    every, after = env.get(ENV_HEALTH_EVERY), env.get(ENV_QUARANTINE_AFTER)
    return HealthConfig(
        tests=tuple(parse_tests(env.get(ENV_HEALTH))),
        every=parse_minutes(every, f"env {ENV_HEALTH_EVERY}") if every else DEFAULT_HEALTH_EVERY,
        after=parse_count(after, f"env {ENV_QUARANTINE_AFTER}")
        if after
        else DEFAULT_QUARANTINE_AFTER,
        rejoin=env.get(ENV_HEALTH_REJOIN, "0").strip().lower() in ("1", "true", "yes", "on"),
    )


def session_config(
    payload: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> HealthConfig:
    """The worker's settings, with the run's health tests and interval where the worker names
    none (the worker's own win). What the payload holds is checked: a list of names (each is
    confined to the workspace before it runs), a number of minutes, else the worker's own."""
    env = os.environ if environ is None else environ
    own = worker_config(env)
    sent = payload.get("health")
    tests = own.tests or tuple(str(t) for t in (sent if isinstance(sent, list) else ()))
    every = own.every
    if not env.get(ENV_HEALTH_EVERY) and payload.get("health_every") is not None:
        try:
            every = parse_minutes(str(payload["health_every"]), "the run's health_every")
        except ValueError as exc:
            log.warning("%s; every %g minutes instead", exc, every)
    return dataclasses.replace(own, tests=tests, every=every)


class HealthBook:
    """The worker's health state: one JSON file in its private folder, changed under a lock."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, STATE_FILE)

    @classmethod
    def of_worker(cls, environ: Mapping[str, str] | None = None) -> HealthBook | None:
        """This worker's book (in a pool process or the main one); None where the worker made
        no private folder (an app used without ``celery worker``)."""
        folder = (os.environ if environ is None else environ).get(ENV_SLOT_GATE)
        return cls(folder) if folder and os.path.isdir(folder) else None

    def read(self) -> dict[str, Any]:
        try:
            with open(self.path) as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @contextlib.contextmanager
    def changing(self) -> Iterator[dict[str, Any]]:
        """The state, written back when the block ends; one pool process at a time."""
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            state = self.read()
            yield state
            tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "w") as fh:
                json.dump(state, fh)
            os.replace(tmp, self.path)
        finally:
            os.close(fd)  # releases the lock

    def quarantine(self) -> dict[str, Any] | None:
        found = self.read().get("quarantine")
        return found if isinstance(found, dict) else None

    def release(self, since: float | None, by: str = "celery-dispatch release") -> bool:
        """Back in service: the quarantine that began at ``since`` (as the releaser saw it on
        the lab board; None: whichever) ends, and the health tests run again before the next
        session takes work."""
        with self.changing() as state:
            found = state.get("quarantine")
            if not isinstance(found, dict) or since not in (None, found.get("since")):
                return False
            state.update(quarantine=None, endings=[], suspect=False, last_check=None)
        log.warning("back in service (%s); it was quarantined: %s", by, found.get("reason"))
        return True


def enter_quarantine(state: dict[str, Any], reason: str, by_health: bool) -> None:
    state["quarantine"] = {"reason": reason, "since": time.time(), "by_health": by_health}
    log.error(
        "quarantined: %s. This worker takes no session until `celery-dispatch release <worker>`"
        " puts it back",
        reason,
        extra={"reason": reason},
    )


def run_health_tests(
    workspace: str, tests: tuple[str, ...], env: Mapping[str, str], timeout: float
) -> str | None:
    """Run the health tests in a pytest process of their own: None when they pass, else the
    reason (``health test <nodeid> failed: <message>``)."""
    for test in tests:
        try:
            confine(workspace, test)
        except UnsafeNodeId as exc:
            return f"health test {test} refused: {exc}"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rfE",
        "--no-header",
        "-p",
        "no:cacheprovider",
    ]
    # ENV_RUNNER: dispatching is forced off there, whatever the project's addopts say (as in a
    # slot's runner); COLUMNS: the short summary's lines whole.
    with subprocess.Popen(
        [*command, "-o", "console_output_style=classic", "--", *tests],
        cwd=workspace,
        env={**env, ENV_RUNNER: "1", "COLUMNS": "10000"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group: a timeout kills what the tests started too
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            proc.communicate()
            return f"health tests {' '.join(tests)} still running after {timeout:g}s"
    if proc.returncode == 0:
        return None
    for line in stdout.splitlines():
        found = re.match(r"^(?:FAILED|ERROR) (\S+)(?: - (.*))?$", line.strip())
        if found:
            return health_failure(found.group(1), (found.group(2) or "").strip())
    if proc.returncode == 5:
        return f"health tests {' '.join(tests)} not found in {workspace} (pytest collected none)"
    tail = (stdout + stderr).strip()[-REASON_TAIL:].replace("\n", " | ")
    return f"health tests {' '.join(tests)} failed ({describe_exit(proc.returncode)}): {tail}"


def session_health(
    payload: Mapping[str, Any], workspace: str, env: Mapping[str, str]
) -> SessionHealth | None:
    """The session's health, in a pool process of a ``celery worker`` (else None)."""
    book = HealthBook.of_worker()
    if book is None:
        return None
    timeout = float(payload.get("timeout") or 300.0)
    return SessionHealth(book, session_config(payload), workspace, env, timeout)


class SessionHealth:
    """One session's view of its worker's health (``run_session``): the check before it takes
    work, what happens after a crash or timeout, the session's ending."""

    def __init__(
        self,
        book: HealthBook,
        config: HealthConfig,
        workspace: str,
        env: Mapping[str, str],
        timeout: float,
    ) -> None:
        self.book = book
        self.config = config
        self.workspace = workspace
        self.env = env
        self.timeout = timeout
        self.infra: str | None = None  # this session's infrastructure failure, if any
        self.quarantined: str | None = None  # why the worker quarantined itself, if it did

    def _check(self, state: dict[str, Any]) -> str | None:
        """Run the health tests (the book is locked: other slots wait for the answer)."""
        reason = run_health_tests(self.workspace, self.config.tests, self.env, self.timeout)
        state.update(last_check=time.time(), suspect=False)
        log.info("health tests %s", "passed" if reason is None else f"failed: {reason}")
        return reason

    def before_work(self) -> str | None:
        """Before the session takes work: the quarantine's reason, or None to go on."""
        with self.book.changing() as state:
            found = state.get("quarantine")
            rejoin = isinstance(found, dict) and found.get("by_health") and self.config.rejoin
            if isinstance(found, dict) and not rejoin:
                return str(found.get("reason"))
            due = health_due(
                state.get("last_check"), time.time(), self.config.every, bool(state.get("suspect"))
            )
            if not self.config.tests or not due:
                return str(found["reason"]) if isinstance(found, dict) else None
            reason = self._check(state)
            if reason is not None:
                enter_quarantine(state, reason, by_health=True)
                self.quarantined = reason
                return reason
            if isinstance(found, dict):
                state["quarantine"] = None
                log.warning(
                    "health tests pass again: back in service (was: %s)", found.get("reason")
                )
            return None

    def after_failure(self, kind: str, why: str) -> str | None:
        """A test crashed (``crash``) or timed out (``timeout``), or the runner crashed outside
        a test (``runner``): the quarantine's reason if the worker quarantines itself now."""
        if kind != "crash":
            self.infra = self.infra or why
        with self.book.changing() as state:
            state["suspect"] = True
            endings = [bool(e) for e in state.get("endings") or []]
            if kind != "crash" and streak_reached(endings, self.config.after):
                reason = streak_failure(self.config.after, why)
                enter_quarantine(state, reason, by_health=False)
                self.quarantined = reason
                return reason
            if not self.config.tests:
                return None
            failed = self._check(state)
            if failed is not None:
                enter_quarantine(state, failed, by_health=True)
                self.quarantined = failed
            return failed

    def control(self, control: Callable[[], str]) -> Callable[[], str]:
        """The slot's ``control()``, which also answers ``QUARANTINE`` once another slot of
        the worker quarantined it: this slot finishes its running test and takes no other."""

        def checked() -> str:
            wanted = control()
            if wanted == RUN and self.quarantined is None and self.book.quarantine() is not None:
                return QUARANTINE
            return wanted

        return checked

    def reason(self, stopped: bool) -> str | None:
        """Why the controller must hear this slot quarantined: it quarantined the worker, or
        it ``stopped`` for it (the reason another slot wrote)."""
        if self.quarantined is not None or not stopped:
            return self.quarantined
        found = self.book.quarantine()
        return str(found.get("reason")) if found else "quarantined"

    def ended(self, cut_off: bool, took_work: bool) -> str | None:
        """Note how the session ended (one that took no work and failed in nothing says nothing
        about the bench: not noted); the reason if that makes K infrastructure failures in a
        row (and the worker was not quarantined already)."""
        if cut_off:
            self.infra = self.infra or "the session was cut off from the broker"
        if self.infra is None and not took_work:
            return None
        with self.book.changing() as state:
            endings = [bool(e) for e in state.get("endings") or []]
            reached = self.infra is not None and streak_reached(endings, self.config.after)
            state["endings"] = [*endings, self.infra is not None][-ENDINGS_KEPT:]
            if reached and not isinstance(state.get("quarantine"), dict):
                reason = streak_failure(self.config.after, str(self.infra))
                enter_quarantine(state, reason, by_health=False)
                self.quarantined = reason
                return reason
        return None
