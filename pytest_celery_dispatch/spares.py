"""Spare runners: interpreters started ahead of time, with pytest imported (see spare_boot.py).

Each worker process keeps one spare in its :class:`SparePool`; the first runner of a slot (or
the run's zygote) is an activated spare when one fits, so it skips the interpreter's start-up
and pytest's imports.

PYTEST_DONT_REWRITE: spare runners import it before pytest configures (see spare_boot.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Mapping

from . import spare_boot
from .jsonlines import encode
from .names import ENV_SPARE
from .procutil import close_quietly, kill_group
from .runnerspec import RunnerSpec, runner_env, startup_env

#: How long a spare started at the end of a slot waits before it warms up.
SPARE_DELAY = 1.5

log = logging.getLogger("pytest_celery_dispatch.spares")


class Spare:
    """A runner process started ahead of time, waiting for one slot's order on its boot pipe.

    Its event and command pipes are made now: ``event_w`` / ``command_r`` are its ends (their
    numbers are valid in the spare), ``event_fd`` / ``command_fd`` ours. It says on a pipe of
    its own when it has imported pytest and waits for an order: a thread of ours logs it
    ("spare runner ready").
    """

    def __init__(self, workspace: str, env: Mapping[str, str], delay: float = 0.0) -> None:
        self.workspace = os.path.realpath(workspace)
        env = runner_env(env)
        self.startup_env = startup_env(env)
        boot_r, self.boot_w = os.pipe()
        ready_r, ready_w = os.pipe()
        self.event_fd, self.event_w = os.pipe()
        self.command_r, self.command_fd = os.pipe()
        program = spare_boot.__file__
        assert program is not None
        try:
            self.proc = subprocess.Popen(
                [sys.executable, program, str(boot_r), str(delay), str(ready_w)],
                cwd=self.workspace,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(boot_r, ready_w, self.event_w, self.command_r),
                start_new_session=True,
            )
        except BaseException:
            close_quietly(self.boot_w, ready_r, self.event_fd, self.event_w, self.command_r)
            close_quietly(self.command_fd)
            raise
        finally:
            close_quietly(boot_r, ready_w)
        os.close(self.event_w)
        os.close(self.command_r)
        extra = {"pid": os.getpid(), "spare_pid": self.proc.pid}
        log.info("spare runner started", extra={**extra, "delay": delay})
        self.watcher = threading.Thread(
            target=self._log_when_ready, args=(ready_r, extra), name="spare-ready", daemon=True
        )
        self.watcher.start()

    @staticmethod
    def _log_when_ready(ready_r: int, extra: dict[str, object]) -> None:
        """Log "spare runner ready" when the spare says so; nothing if it ends or is activated
        first (its end of the pipe closes). This thread owns ``ready_r``."""
        try:
            said = os.read(ready_r, 1)
        except OSError:
            said = b""
        finally:
            close_quietly(ready_r)
        if said:
            log.info("spare runner ready", extra=extra)

    def unfit_reason(self, spec: RunnerSpec) -> str:
        """Why this spare cannot serve ``spec`` ("" if it can)."""
        if self.proc.poll() is not None:
            return f"it exited ({self.proc.returncode})"
        if os.path.realpath(spec.workspace) != self.workspace:
            return f"its workspace is {self.workspace}, the slot's {spec.workspace}"
        wanted = startup_env(runner_env(spec.env))
        if wanted != self.startup_env:
            names = sorted(
                k
                for k in wanted.keys() | self.startup_env.keys()
                if wanted.get(k) != self.startup_env.get(k)
            )
            return f"its start-up environment differs ({', '.join(names)})"
        return ""

    def fits(self, spec: RunnerSpec) -> bool:
        return not self.unfit_reason(spec)

    def activate(self, args: list[str], env: Mapping[str, str], log: str | None) -> bool:
        """Send the order: run ``pytest args`` with ``env``, output to ``log`` (None: keep the
        pipe). False if the spare is gone."""
        order = {"cwd": self.workspace, "env": dict(env), "args": args, "log": log}
        try:
            with os.fdopen(self.boot_w, "wb") as boot:
                boot.write(encode(order, exact=True))
            return True
        except OSError:
            return False

    def release_stdout(self) -> None:
        """Its output goes to the log file now: close our end of its stdout pipe."""
        if self.proc.stdout is not None:
            self.proc.stdout.close()
            self.proc.stdout = None

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.boot_w)  # end of file: the spare exits by itself
        close_quietly(self.event_fd, self.command_fd)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(2)
        kill_group(self.proc)
        with contextlib.suppress(Exception):
            self.proc.wait(2)


class SparePool:
    """The spare runner of one worker process: at most one, kept live, taken by one runner.

    The worker creates it when a pool process starts and calls :meth:`prepare` then and (with
    ``delay=SPARE_DELAY``) after each slot. A lock, as slots of a threads pool may overlap.
    """

    def __init__(self) -> None:
        self._spare: Spare | None = None
        self._lock = threading.Lock()

    @property
    def waiting(self) -> Spare | None:
        """The spare held now (None if there is none)."""
        return self._spare

    def prepare(self, workspace: str, env: Mapping[str, str], delay: float = 0.0) -> None:
        """Start a spare unless a live one waits (``DISPATCH_SPARE_RUNNER=0``: never)."""
        if env.get(ENV_SPARE, "1") == "0":
            return
        with self._lock:
            if self._spare is not None and self._spare.proc.poll() is None:
                return
            if self._spare is not None:
                self._spare.discard()
            try:
                self._spare = Spare(workspace, env, delay)
            except OSError:
                self._spare = None

    def take(self, spec: RunnerSpec) -> Spare | None:
        """The waiting spare if it fits ``spec`` (an unfit one is discarded), else None."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is None:
            return None
        reason = spare.unfit_reason(spec)
        if not reason:
            return spare
        log.info(
            "spare runner not used: %s",
            reason,
            extra={"pid": os.getpid(), "spare_pid": spare.proc.pid},
        )
        spare.discard()
        return None
