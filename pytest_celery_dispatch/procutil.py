"""Process helpers of the worker side: die with the parent, kill a group, say how one ended.

Shared by the runner plugin, the zygote, the spare pool and the slot driver.

PYTEST_DONT_REWRITE: spare runners import it before pytest configures (see spare_boot.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import tempfile
from collections.abc import Mapping
from typing import Protocol

from .names import ENV_WORKER_PID

#: Where the tail of a crashed runner's own output is quoted from.
CRASH_OUTPUT_TAIL = 4000
#: Sent to the runner to make it stop after the running test (graceful stop, -x on the controller).
STOP_SIGNAL = signal.SIGUSR1
#: Sent to a runner about to be killed for hanging: it writes every thread's Python stack to its
#: stacks file (``faulthandler``, at the C level: it works while the test blocks in a read).
DUMP_SIGNAL = signal.SIGUSR2


def stacks_path(log_path: str) -> str:
    """Where a runner writes its stacks when asked: beside its log."""
    return log_path + ".stacks"


class Killable(Protocol):
    """A process we started (``subprocess.Popen``) or one a zygote forked for us."""

    @property
    def pid(self) -> int: ...

    def kill(self) -> None: ...


def die_with_parent(parent: str | None) -> None:
    """Linux: be SIGKILLed when the process that started us dies.

    ``parent`` is the pid that started us (from the environment); if it is already gone when the
    signal is armed, exit at once.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        return
    if parent and str(os.getppid()) != parent:
        os._exit(70)  # the parent died before we armed the signal


def kill_group(proc: Killable) -> None:
    """SIGKILL the process group led by ``proc`` (what its tests started too), then ``proc``.
    A pid not known yet (0: a fork the zygote has not answered) is never signalled: group 0
    would be our own."""
    if proc.pid > 0:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.kill()


def interrupt_group(proc: Killable) -> None:
    """SIGINT to the process group led by ``proc``, as Ctrl-C in a terminal: pytest raises
    KeyboardInterrupt in the running test and still tears its fixtures down."""
    if proc.pid > 0:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGINT)


def describe_exit(code: int | None) -> str:
    """``exit code 3``, ``killed by SIGKILL``... for crash messages."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exit code {code}"


def tail(path: str) -> str:
    """The last :data:`CRASH_OUTPUT_TAIL` characters of a log file ("" if it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - CRASH_OUTPUT_TAIL))
            return fh.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def private_dir(path: str) -> str | None:
    """``path``, created 0700 if missing, when it is a folder of this user's that others cannot
    write into; else None."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError:
        return None
    mine = not hasattr(os, "getuid") or info.st_uid == os.getuid()
    if not stat.S_ISDIR(info.st_mode) or not mine or info.st_mode & 0o022:
        return None
    return path


def private_top() -> str | None:
    """This user's folder under the temp directory (runner bytecode, zygote sockets)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return private_dir(os.path.join(tempfile.gettempdir(), f"pytest-celery-dispatch-{uid}"))


def worker_pid(environ: Mapping[str, str] | None = None) -> int:
    """The pid of the worker's main process, which names the worker on its machine (its
    prewarmed zygotes, the identity of its zygotes). Noted at ``worker_init`` (see
    ``worker.py``): a prefork pool process's parent, the process itself under the solo and
    threads pools, whose tasks run in the worker. Without the note (a task run outside a
    worker), the parent."""
    noted = (os.environ if environ is None else environ).get(ENV_WORKER_PID, "")
    return int(noted) if noted.isdigit() else os.getppid()


def close_quietly(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
