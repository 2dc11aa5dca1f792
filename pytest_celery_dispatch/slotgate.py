"""At most N slots at once on a worker with N slots, whichever pool processes run them.

The worker's prefork pool has one process more than its slots (see :mod:`.workerpool`), so the
pool alone would let a ``-c 1`` bench run two ``run_session`` tasks at once: two runs' tests on
one board. Each slot holds one of N lock files (``flock``, released by the kernel when its
process ends, however it ends) for as long as it runs; a ``run_session`` that finds all N taken
is not for this worker now and goes back to its queue (see ``worker.run_session``), where a
worker with a free slot, or this one later, takes it.

The lock folder is made once per worker at ``worker_init`` and named in the environment the
pool processes inherit: no module-level state. Worker side only.

PYTEST_DONT_REWRITE: imported by the worker app.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import MutableMapping

from .names import ENV_SLOT_GATE

# A run_session that found every slot taken is sent back to its queue after this many seconds.
SLOT_BUSY_RETRY = 1.0


class SlotLease:
    """One slot held: the lock file stays locked until :meth:`release` (or the process ends)."""

    def __init__(self, fd: int, number: int) -> None:
        self.fd = fd
        self.number = number

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> SlotLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class SlotGate:
    """N lock files in one folder; :meth:`acquire` takes a free one or answers None."""

    def __init__(self, directory: str, slots: int) -> None:
        self.directory = directory
        self.slots = max(1, slots)

    def acquire(self) -> SlotLease | None:
        for number in range(self.slots):
            path = os.path.join(self.directory, f"slot-{number}.lock")
            # O_CLOEXEC: a runner or zygote this process starts must never hold the slot.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return SlotLease(fd, number)
        return None

    def free(self) -> bool:
        """Whether a slot is free now (one taken and given back at once)."""
        lease = self.acquire()
        if lease is None:
            return False
        lease.release()
        return True


def make_gate_folder(hostname: str, environ: MutableMapping[str, str] | None = None) -> str:
    """At ``worker_init``: a private folder for this worker's slot locks, named in the
    environment its pool processes inherit."""
    env = os.environ if environ is None else environ
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in hostname)[:60]
    folder = tempfile.mkdtemp(prefix=f"celery-dispatch-slots-{safe}-")
    env[ENV_SLOT_GATE] = folder
    return folder


def remove_gate_folder(environ: MutableMapping[str, str] | None = None) -> None:
    env = os.environ if environ is None else environ
    folder = env.get(ENV_SLOT_GATE)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def gate_of(slots: int, environ: MutableMapping[str, str] | None = None) -> SlotGate | None:
    """This worker's gate, in a pool process; None where the worker made none (a worker app
    used without ``celery worker``: nothing to share slots with)."""
    env = os.environ if environ is None else environ
    folder = env.get(ENV_SLOT_GATE)
    if not folder or not os.path.isdir(folder):
        return None
    return SlotGate(folder, slots)
