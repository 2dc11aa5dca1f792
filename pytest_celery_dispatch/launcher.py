"""A slot's runner processes: how one is started (forked from the zygote, an activated spare,
or a new ``python -m pytest``) and the pipes the slot driver talks to it through.

PYTEST_DONT_REWRITE: spare runners import it before pytest configures (see spare_boot.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from .jsonlines import LineBuffer, LineWriter
from .names import ENV_COMMAND_FD, ENV_EVENT_FD, ENV_NODEIDS, ENV_STACKS
from .procutil import (
    CRASH_OUTPUT_TAIL,
    DUMP_SIGNAL,
    STOP_SIGNAL,
    interrupt_group,
    kill_group,
    stacks_path,
    tail,
)
from .runnerspec import RunnerSpec, runner_command, runner_process_env
from .spares import SparePool
from .zygote import ForkedProcess, Zygotes

#: How long a hung runner is given to write its stacks (:meth:`RunnerProcess.dump_stacks`):
#: faulthandler writes them at once, from its signal handler.
DUMP_WAIT = 1.0
#: The most of them quoted in the test's failure (the innermost frames come first).
STACKS_LIMIT = 8000


class RunnerState:
    """What the slot driver tracks of one runner, whatever process runs it."""

    def __init__(self, eligible: list[str]) -> None:
        self.eligible = set(eligible)  # what it collects: what it may be asked to run
        self.collected = False
        self.current: str | None = None  # the test it runs now
        self.current_since = 0.0
        self.shutdown_sent = False
        self.self_stopped = False  # it stopped on its own -x / --maxfail
        self.warm_start = False  # a spare or a fork: interpreter and pytest already loaded
        self.out_tail = ""  # its last output, for crash messages when it is streamed

    @property
    def forking(self) -> bool:
        return False

    @property
    def unborn(self) -> bool:
        return False


class RunnerProcess(RunnerState):
    """One warm runner process: pipes in and out, and what it was given."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes] | ForkedProcess,
        event_fd: int,
        command_fd: int,
        eligible: list[str],
        log_path: str,
    ) -> None:
        super().__init__(eligible)
        self.proc = proc
        self.event_fd = event_fd
        self.command_fd = command_fd
        self.log_path = log_path
        self.out_fd: int | None = proc.stdout.fileno() if proc.stdout else None
        self._events = LineBuffer()
        self._commands = LineWriter(command_fd, exact=True)

    @property
    def streams_output(self) -> bool:
        return self.out_fd is not None

    @property
    def forking(self) -> bool:
        """Asked of the run's zygote, which has not forked it yet (it is still collecting)."""
        return isinstance(self.proc, ForkedProcess) and self.proc.pending

    @property
    def unborn(self) -> bool:
        """The zygote never gave this runner (it went away, or the wait was given up): the
        slot starts one of its own in its place."""
        return isinstance(self.proc, ForkedProcess) and self.proc.unborn and not self.collected

    def _known_pid(self) -> bool:
        """Whether the process can be signalled; a fork not forked yet is given up instead
        (the zygote kills what it forks for a request given up)."""
        proc = self.proc
        if isinstance(proc, ForkedProcess) and proc.pending:
            if self.collected:  # it has spoken: its pid is on its way
                proc.wait_pid(1.0)
            if proc.pending:
                proc.abandon()
                return False
        return True

    def send(self, command: dict[str, Any]) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self._commands.write(command)

    def shutdown(self) -> None:
        if not self.shutdown_sent:
            self.send({"type": "shutdown"})
            self.shutdown_sent = True

    def wait(self, timeout: float) -> tuple[bool, bool]:
        """Wait up to ``timeout`` s for (output, events) to read; while it is forking, for the
        zygote's answer too (events "ready" once it is unborn: :meth:`read_events` says so)."""
        watched = [self.event_fd] + ([self.out_fd] if self.out_fd is not None else [])
        forked = self.proc if isinstance(self.proc, ForkedProcess) else None
        if forked is not None and forked.pending:
            if forked.conn.fileno() < 0:  # given up by another thread (the cut-off guard)
                return False, True
            watched.append(forked.conn.fileno())
        ready, _, _ = select.select(watched, [], [], timeout)
        if forked is not None and forked.pending:
            forked.poll()  # its pid, or the zygote gone
        return self.out_fd is not None and self.out_fd in ready, (
            self.event_fd in ready or self.unborn
        )

    def read_events(self) -> Iterator[dict[str, Any]]:
        """The events of one read; EOFError once the runner has closed its end (exited), or
        was never born."""
        if self.unborn:
            raise EOFError
        return self._events.read(self.event_fd)

    def read_output(self, timeout: float) -> str | None:
        """What the tests printed (under -s), waiting up to ``timeout`` s; None at its end or if
        nothing came."""
        assert self.out_fd is not None
        ready, _, _ = select.select([self.out_fd], [], [], timeout)
        if not ready:
            return None
        data = os.read(self.out_fd, 1 << 16)
        if not data:
            return None
        text = data.decode("utf-8", "replace")
        self.out_tail = (self.out_tail + text)[-CRASH_OUTPUT_TAIL:]
        return text

    def crash_output(self) -> str:
        return self.out_tail or tail(self.log_path)

    def dump_stacks(self) -> str:
        """Every thread's Python stack, asked of the runner before it is killed for hanging;
        "" when it wrote none within ``DUMP_WAIT`` (gone, not a Python frame to show)."""
        if self.unborn or not self._known_pid() or self.proc.poll() is not None:
            return ""
        path = stacks_path(self.log_path)  # made empty by the runner as it started
        try:
            os.kill(self.proc.pid, DUMP_SIGNAL)
        except OSError:
            return ""
        deadline, seen = time.monotonic() + DUMP_WAIT, ""
        while time.monotonic() < deadline:
            time.sleep(0.05)
            try:
                with open(path, encoding="utf-8", errors="replace") as fh:
                    text = fh.read()
            except OSError:
                return ""
            if text and text == seen:  # written, and no more since
                break
            seen = text
        # The thread that took the signal (the test's, as a rule) first, then the others.
        threads = sorted(seen.strip().split("\n\n"), key=lambda t: not t.startswith("Current"))
        return "\n\n".join(threads)[:STACKS_LIMIT]

    def kill(self) -> None:
        if self._known_pid():
            kill_group(self.proc)

    def interrupt(self) -> None:
        if self._known_pid():
            interrupt_group(self.proc)

    def request_stop(self) -> None:
        if self._known_pid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, STOP_SIGNAL)

    def close(self) -> int:
        for fd in (self.command_fd, self.event_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.forking:
            self.proc.kill()  # gives the request up
        code = self.proc.wait()
        kill_group(self.proc)  # grandchildren a test left behind (none for an unborn one)
        return code


class RunnerLauncher:
    """Starts a slot's runners: the first one forked from the run's zygote if it can, else an
    activated spare, else (and every later one) a new ``python -m pytest``. A fork the zygote
    never gives (see :attr:`RunnerProcess.unborn`) is followed by a spare or a new one."""

    def __init__(self, spec: RunnerSpec, spares: SparePool, zygotes: Zygotes) -> None:
        self.spec = spec
        self.spares = spares
        self.zygotes = zygotes
        self.zygote_asked = self.spare_asked = False

    def __call__(self, eligible: list[str], number: int, tmp: str) -> RunnerProcess:
        """Runner number ``number`` of the slot, collecting ``eligible``; files under ``tmp``."""
        spec = self.spec
        nodeids_file = os.path.join(tmp, f"nodeids-{number}.json")
        with open(nodeids_file, "w", encoding="utf-8") as fh:
            json.dump(eligible, fh)
        log_path = os.path.join(tmp, f"runner-{number}.log")
        command = runner_command(spec, eligible, os.path.join(tmp, "pytest-cache"))
        if not self.zygote_asked:
            self.zygote_asked = True
            forked = self.zygotes.fork(spec, log_path)
            if forked is not None:
                runner = RunnerProcess(*forked, eligible, log_path)
                runner.warm_start = True
                return runner
        if not self.spare_asked:
            self.spare_asked = True
            spare = self.spares.take(spec)
            if spare is not None:
                env = self._env(nodeids_file, spare.event_w, spare.command_r, log_path)
                if spare.activate(command[3:], env, None if spec.stream else log_path):
                    if not spec.stream:
                        spare.release_stdout()  # its output goes to the log file now
                    runner = RunnerProcess(
                        spare.proc, spare.event_fd, spare.command_fd, eligible, log_path
                    )
                    runner.warm_start = True
                    return runner
                spare.discard()
        return self._cold(command, nodeids_file, eligible, log_path)

    def _cold(
        self, command: list[str], nodeids_file: str, eligible: list[str], log_path: str
    ) -> RunnerProcess:
        spec = self.spec
        event_fd, event_w = os.pipe()
        command_r, command_fd = os.pipe()
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                command,
                cwd=spec.workspace,
                env=self._env(nodeids_file, event_w, command_r, log_path),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if spec.stream else log_file,
                stderr=subprocess.STDOUT,
                pass_fds=(event_w, command_r),
                start_new_session=True,
            )
        os.close(event_w)
        os.close(command_r)
        return RunnerProcess(proc, event_fd, command_fd, eligible, log_path)

    def _env(
        self, nodeids_file: str, event_w: int, command_r: int, log_path: str
    ) -> dict[str, str]:
        return runner_process_env(
            self.spec,
            {
                ENV_EVENT_FD: str(event_w),
                ENV_COMMAND_FD: str(command_r),
                ENV_NODEIDS: nodeids_file,
                ENV_STACKS: stacks_path(log_path),
            },
        )
