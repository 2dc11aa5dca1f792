"""Processes: timed pytest runs (wall, CPU and peak RSS via ``os.wait4``), CPU sampling from
/proc, and the bookkeeping that makes every process the bench starts die with it."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1

#: Process groups of everything started and not yet reaped (killed on the way out).
_live_groups: set[int] = set()


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """preexec_fn: the child gets ``sig`` when the bench dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def track(pid: int) -> None:
    _live_groups.add(pid)


def untrack(pid: int) -> None:
    _live_groups.discard(pid)


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def kill_all_tracked() -> None:
    for pgid in list(_live_groups):
        kill_group(pgid, signal.SIGKILL)
        _live_groups.discard(pgid)


class Terminated(BaseException):
    """SIGTERM / SIGHUP: unwind through every ``finally`` so the cleanup runs."""


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into an exception while the bench runs (SIGINT already is)."""

    def handler(signum: int, frame: object) -> None:
        raise Terminated(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------- /proc sampling


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _process_table() -> dict[int, list[str]]:
    table: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(entry)
            if fields is not None:
                table[int(entry)] = fields
    return table


def tree_cpu(root_pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds (user+sys, own + reaped children) of each root's whole live process tree.

    A runner process that exited and was reaped by a pool process is in that pool process's
    cutime / cstime, so the deltas between two samples count it too.
    """
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, fields in table.items():
        children.setdefault(int(fields[1]), []).append(pid)
    result: dict[int, float] = {}
    for root in root_pids:
        total = 0
        stack = [root] if root in table else []
        while stack:
            pid = stack.pop()
            fields = table[pid]
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))
            stack.extend(children.get(pid, []))
        result[root] = total / CLK_TCK
    return result


def wait_quiet(
    root_pids: Sequence[int],
    quiet_for: float = 2.0,
    window: float = 0.25,
    busy: float = 0.02,
    limit: float = 10.0,
) -> float:
    """Wait until the workers' process trees have used less than ``busy`` CPU seconds per
    ``window`` for ``quiet_for`` seconds in a row (at most ``limit`` seconds): every timed run
    starts on a quiet machine, whatever the workers still do after the previous one (runners
    exiting; spare runners, which wait 1.5 s before they warm up). Returns the time waited."""
    started = time.monotonic()
    quiet_since = started
    before = sum(tree_cpu(root_pids).values())
    while time.monotonic() - started < limit:
        time.sleep(window)
        now = sum(tree_cpu(root_pids).values())
        if now - before >= busy:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_for:
            break
        before = now
    return time.monotonic() - started


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in first[:8]]
    idle = values[3] + values[4]
    total = sum(values)
    return total - idle, total


def find_broker_pid() -> int | None:
    """RabbitMQ's Erlang VM (read only: its CPU use during a run is reported)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() == "beam.smp":
                    return int(entry)
    return None


def process_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ---------------------------------------------------------------------------- timed runs

_SUMMARY_LINE = re.compile(r"\bin \d+(?:\.\d+)?s\b")
_COUNT = re.compile(
    r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?|rerun)"
)


def parse_counts(output: str) -> dict[str, int] | None:
    """pytest's final line (``500 passed in 1.23s``) as ``{"passed": 500}``; None if absent."""
    for line in reversed(output.splitlines()):
        if _SUMMARY_LINE.search(line) and ("no tests ran" in line or _COUNT.search(line)):
            counts: dict[str, int] = {}
            for number, word in _COUNT.findall(line):
                word = {"error": "errors", "warning": "warnings"}.get(word, word)
                counts[word] = counts.get(word, 0) + int(number)
            counts.pop("warnings", None)  # not an outcome
            return counts
    return None


@dataclasses.dataclass
class Timed:
    """One finished ``python -m pytest ...`` subprocess."""

    wall: float
    cpu_user: float
    cpu_sys: float
    maxrss_mb: float
    returncode: int
    output_path: Path
    started_at: float  # time.time() just before the spawn
    timed_out: bool = False

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_sys

    def output(self) -> str:
        return self.output_path.read_text(encoding="utf-8", errors="replace")


def run_timed(
    command: Sequence[str], cwd: Path, env: dict[str, str], output_path: Path, timeout: float
) -> Timed:
    """Run ``command`` to completion; wall time from spawn to reap, rusage of that child.

    The child runs in its own process group (xdist's workers with it), killed on timeout or
    when the bench is interrupted. ``os.wait4`` gives the child's own user / sys time and peak
    RSS (ru_maxrss, KiB on Linux), not the bench's nor the workers'.
    """
    output_path.parent.mkdir(parents=True, exist_ok=True)
    timed_out = threading.Event()
    with open(output_path, "wb") as out:
        started_at = time.time()
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        track(proc.pid)

        def on_timeout() -> None:
            timed_out.set()
            kill_group(proc.pid)

        timer = threading.Timer(timeout, on_timeout)
        timer.daemon = True
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            timer.cancel()
            kill_group(proc.pid)  # anything the run left behind in its group
            untrack(proc.pid)
    return Timed(
        wall=wall,
        cpu_user=usage.ru_utime,
        cpu_sys=usage.ru_stime,
        maxrss_mb=usage.ru_maxrss / 1024.0,
        returncode=int(proc.returncode),
        output_path=output_path,
        started_at=started_at,
        timed_out=timed_out.is_set(),
    )
