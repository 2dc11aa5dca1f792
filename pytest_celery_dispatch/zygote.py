"""The zygote: one collection per worker and run, and the slots' runners forked from it.

The first slot of a run on a worker starts a runner process in zygote mode (``ENV_ZYGOTE``: a
Unix socket). It listens from its start, collects the run's tests once and runs none; each
slot's driver connects and gets a runner forked from it, with the driver's pipes, log file and
environment (:class:`ZygoteServer`, in the runner process). The driver's side is
:class:`Zygotes` (in the worker's pool process): start the zygote if there is none, ask it for
a runner, and follow that runner's exit over the socket (:class:`ForkedProcess`).

PYTEST_DONT_REWRITE: spare runners import it before pytest configures (see spare_boot.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Protocol

import pytest

from .jsonlines import LineBuffer, decode, encode, send
from .names import (
    ENV_COMMAND_FD,
    ENV_EVENT_FD,
    ENV_FORK,
    ENV_NODEIDS,
    ENV_OPTIONS,
    ENV_PARENT,
    ENV_RUNNER,
    ENV_STACKS,
    ENV_ZYGOTE,
    ENV_ZYGOTE_HOME,
)
from .procutil import (
    Killable,
    close_quietly,
    die_with_parent,
    kill_group,
    private_top,
    stacks_path,
    worker_pid,
)
from .runnerspec import (
    RunnerSpec,
    runner_command,
    runner_env,
    runner_options,
    runner_process_env,
    startup_env,
)
from .spares import SparePool

#: A zygote with no driver connected ends after this long (the run is over or has its runners).
ZYGOTE_IDLE = 3.0
#: ... and one that nobody asked for a runner ends after this long.
ZYGOTE_FIRST_WAIT = 30.0
#: How long a driver waits for a zygote it starts to listen (a blocking wait: well under the
#: controller's 10 s heartbeat limit). Its wait for the forked runner, which comes once the
#: zygote has collected, is part of the slot's loop instead (heartbeats go on): see
#: ``driver.fork_wait``.
ZYGOTE_START_WAIT = 2.0
#: The file a zygote makes in its folder once it has collected and serves forks: one that has
#: not yet may be killed by the slot that started it when that slot gives up waiting for it.
SERVING = "serving"
#: The file a zygote started ahead of its run's slots has in its folder: its run and pid.
PREWARMED = "prewarmed.json"


# ============================================================================ server (runner)


def listen(path: str) -> socket.socket:
    """A zygote listens from its start (as its runner plugin registers): the slots' drivers
    connect while it loads the entry-point plugins and the conftest files and collects, and
    wait for their runners.

    The socket appears at ``path`` only once it listens: a driver takes the file for a zygote
    ready to connect to, and ``bind`` makes it before ``listen`` accepts anyone (a connection
    in between is refused). So it is bound under another name and renamed (atomic) after.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unready = path + ".new"  # path is < 100 characters (zygote_path): this fits sun_path
    with contextlib.suppress(FileNotFoundError):
        os.unlink(unready)  # left by a zygote killed between its bind and its rename
    try:
        listener.bind(unready)
        listener.listen(64)
        os.rename(unready, path)
    except BaseException:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(unready)
        raise
    return listener


class ZygoteServer:
    """A zygote's loop: it has collected and runs no test; each driver that connects gets a
    runner forked from it (a copy of the collected session, with the driver's pipes, log file
    and environment) and, later, that runner's exit status. A driver that goes away takes its
    runner with it."""

    def __init__(self, session: pytest.Session, listener: socket.socket, path: str) -> None:
        self.session = session
        self.listener = listener
        self.path = path  # where it listens (its bound name was another: see listen)
        self.clients: dict[socket.socket, int] = {}  # connection -> its runner's pid (0: none yet)
        self.served = False

    def serve(self) -> tuple[int, int] | None:
        """Serve until the zygote is no longer needed (None, in the zygote), or return the
        (event fd, command fd) of the driver in each forked runner, to run its commands."""
        last_active = time.monotonic()
        with contextlib.suppress(OSError):
            open(os.path.join(os.path.dirname(self.path), SERVING), "w").close()
        while self.clients or time.monotonic() - last_active < (
            ZYGOTE_IDLE if self.served else ZYGOTE_FIRST_WAIT
        ):
            ready, _, _ = select.select([self.listener, *self.clients], [], [], 0.05)
            for sock in ready:
                if sock is self.listener:
                    with contextlib.suppress(OSError):
                        self.clients[self.listener.accept()[0]] = 0
                elif self.clients.get(sock) == 0:
                    pipes = self._fork_for(sock)
                    if pipes is not None:
                        return pipes  # in the forked runner
                else:
                    self._closed(sock)
            self._reap()
            if self.clients:
                last_active = time.monotonic()
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        home = os.environ.get(ENV_ZYGOTE_HOME)
        if home:  # (pytest's own end may still write its cache there: swept with the dead ones)
            shutil.rmtree(home, ignore_errors=True)
        return None

    def _fork_for(self, sock: socket.socket) -> tuple[int, int] | None:
        """Fork a runner for the driver on ``sock``; its pipes in the child, None here."""
        request = read_request(sock)
        if request is None:
            self.clients.pop(sock)
            sock.close()
            return None
        env, fds = request
        sys.stdout.flush()
        sys.stderr.flush()
        zygote = os.getpid()
        pid = os.fork()
        if pid == 0:
            return self._become_runner(env, fds, zygote)
        for fd in fds:
            os.close(fd)
        self.clients[sock] = pid
        self.served = True
        try:
            send(sock, {"pid": pid})
        except OSError:  # the driver gave up waiting: nobody will feed this runner
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        return None

    def _closed(self, sock: socket.socket) -> None:
        """The driver closed its end: after its runner's exit status, or because it is gone."""
        with contextlib.suppress(OSError):
            if sock.recv(64):
                return
        pid = self.clients.pop(sock)
        sock.close()
        if pid > 0:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)

    def _reap(self) -> None:
        """Reap the runners, tell their drivers."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            for sock, child in self.clients.items():
                if child == pid:
                    self.clients[sock] = -pid
                    with contextlib.suppress(OSError):
                        send(sock, {"status": status})

    def _become_runner(self, env: dict[str, str], fds: list[int], zygote: int) -> tuple[int, int]:
        """In a freshly forked runner: drop the zygote's sockets, take the driver's pipes, log
        file and environment, re-open pytest's output capturing on files of its own. Session
        fixtures are set up here, per runner, as in any runner."""
        event_fd, command_fd, log_fd = fds
        for sock in [self.listener, *self.clients]:
            sock.close()
        os.setsid()  # its own process group: the driver kills it (and what its tests started)
        capman = self.session.config.pluginmanager.getplugin("capturemanager")
        if capman is not None:
            capman.stop_global_capturing()  # the zygote's capture files are shared with its runners
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        if capman is not None:
            capman.start_global_capturing()
        os.environ.clear()
        os.environ.update(env)
        os.environ[ENV_EVENT_FD] = str(event_fd)
        os.environ[ENV_COMMAND_FD] = str(command_fd)
        # Killed with the zygote, which is killed with the worker's pool process that started it
        # (a killed worker takes its running tests with it at once); a driver that goes away
        # while the zygote lives gets its runner killed by the zygote.
        os.environ[ENV_PARENT] = str(zygote)
        die_with_parent(os.environ.get(ENV_PARENT))
        return event_fd, command_fd


def read_request(sock: socket.socket) -> tuple[dict[str, str], list[int]] | None:
    """A driver's request: one JSON line (its environment) and its fds (events, commands, log)."""
    sock.settimeout(5.0)
    fds: list[int] = []
    try:
        data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 3)
        while not data.endswith(b"\n"):
            more = sock.recv(1 << 16)
            if not more:
                raise OSError("the driver went away")
            data += more
        if len(fds) != 3:
            raise OSError("expected 3 file descriptors")
        return decode(data), list(fds)
    except (OSError, ValueError):
        close_quietly(*fds)
        return None
    finally:
        sock.settimeout(None)


# ============================================================================ client (driver)


class ZygoteProcess(Killable, Protocol):
    """A zygote a slot may kill while it collects: one it started (``subprocess.Popen``) or one
    started ahead of the run's slots (:class:`Prewarmed`)."""

    def poll(self) -> int | None: ...


class ForkedProcess:
    """A runner asked of a zygote: not our child, so its pid and then its exit status come over
    the socket. The pid comes once the zygote has collected and forked (0 until then:
    :attr:`pending`); the driver waits for it in its loop (:meth:`poll`). A zygote that goes
    away first, or a wait given up (:meth:`abandon`), leaves it :attr:`unborn`."""

    stdout = None

    def __init__(
        self,
        conn: socket.socket,
        pid: int = 0,
        zygote: ZygoteProcess | None = None,
        home: str = "",
    ) -> None:
        self.conn = conn
        self.pid = pid
        self.returncode: int | None = None
        self.unborn = False
        # The zygote, when this process started it for this request or it was started ahead
        # of the run's slots (a prewarm: no slot started it), and its folder.
        self.zygote = zygote
        self.home = home
        self._lines = LineBuffer()

    @property
    def pending(self) -> bool:
        """Asked of the zygote, not forked (or not said so) yet."""
        return self.pid == 0 and self.returncode is None

    def _read(self, timeout: float) -> None:
        if self.returncode is not None:
            return
        if not select.select([self.conn], [], [], timeout)[0]:
            return
        data = b""
        with contextlib.suppress(OSError):
            data = self.conn.recv(4096)
        for line in self._lines.feed(data):
            with contextlib.suppress(ValueError):
                answer = decode(line)
                pid, status = answer.get("pid"), answer.get("status")
                if isinstance(pid, int) and pid > 0 and self.pid == 0:
                    self.pid = pid
                if isinstance(status, int):
                    self.returncode = os.waitstatus_to_exitcode(status)
        if not data and self.returncode is None:  # the zygote is gone: the status with it
            self.unborn = self.pid == 0
            self.returncode = 255
        if self.returncode is not None:
            self.conn.close()

    def poll(self) -> int | None:
        self._read(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = 0.5 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired("forked runner", timeout or 0)
            self._read(min(left, 0.5))
        self.conn.close()
        return self.returncode

    def wait_pid(self, timeout: float) -> None:
        """Read the pid if it is on its way (a runner that spoke has been forked)."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            self._read(0.05)

    def abandon(self) -> None:
        """Give the request up: the zygote kills the runner it forks (or forked) for it, as
        it does for any driver that goes away. One still collecting that this process started
        for it, or that was started ahead of the run's slots, is killed: nobody waits for it
        any more (the run is dropped or stopped, or it took longer than a slot waits: hung).
        Safe from another thread (the cut-off guard)."""
        if not self.pending:
            return
        self.unborn = True
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)  # closed by the thread that reads it
        self.returncode = 255
        if self.zygote is not None and self.zygote.poll() is None:
            kill_collecting(self.zygote, self.home)

    def kill(self) -> None:
        if self.pid <= 0:
            self.abandon()
            return
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)


def kill_collecting(zygote: ZygoteProcess, home: str) -> bool:
    """Kill ``zygote`` (its folder ``home``) unless it has collected and serves forks: its
    forked runners die with it. Whether it was killed (not if its folder is gone: so is it,
    or it is being killed)."""
    if not os.path.isdir(home) or os.path.exists(os.path.join(home, SERVING)):
        return False
    kill_group(zygote)
    shutil.rmtree(home, ignore_errors=True)
    return True


class Prewarmed:
    """A zygote started ahead of its run's slots (a prewarm, maybe in another pool process of
    the worker: not our child), known by the pid in its folder (:data:`PREWARMED`)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        """None while it runs (a zombie its parent has not reaped yet counts as ended)."""
        try:
            with open(f"/proc/{self.pid}/stat", encoding="utf-8", errors="replace") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return 0
        return 0 if state in ("Z", "X") else None

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)


def prewarmed_record(home: str) -> dict[str, Any] | None:
    """What folder ``home`` says of its zygote if a prewarm started it (:data:`PREWARMED`:
    its run and queue ``key``, ``pid``, ``worker``), else None."""
    try:
        with open(os.path.join(home, PREWARMED), encoding="utf-8") as fh:
            found = json.load(fh)
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def prewarmed_in(home: str, key: str) -> Prewarmed | None:
    """The zygote in folder ``home`` if it was started ahead of the slots of run and queue
    ``key``, else None."""
    found = prewarmed_record(home)
    if found is None or found.get("key") != key:
        return None
    return prewarmed_process(found)


def prewarmed_process(record: dict[str, Any]) -> Prewarmed | None:
    """The zygote a prewarm record names; None for a pid that is not one (0 and -1 would be
    our own process group, or every process)."""
    pid = record.get("pid")
    return Prewarmed(pid) if isinstance(pid, int) and pid > 0 else None


def prewarmed_by(top: str, worker: int) -> list[tuple[str, dict[str, Any]]]:
    """The folders under ``top`` of the zygotes that worker ``worker`` (the pid of its main
    process) prewarmed, each with its record (:func:`prewarmed_record`)."""
    try:
        folders = [e.path for e in os.scandir(top) if e.name.startswith("z-")]
    except OSError:
        return []
    found = ((folder, prewarmed_record(folder)) for folder in folders)
    return [(f, r) for f, r in found if r is not None and r.get("worker") == worker]


def drop_prewarmed(top: str, key: str) -> None:
    """Kill the zygotes this worker prewarmed for run and queue ``key``: a slot of that run is
    starting a zygote of its own, so its runners are not theirs (other tests, or another tree),
    and none of its slots will ask them for one. Another worker of the same queue on this
    machine keeps its own: its slots fork from it. (Called under the zygotes' lock, which a
    prewarm holds until its zygote listens; a live one answers on its socket.)"""
    for folder, found in prewarmed_by(top, worker_pid()):
        if found.get("key") != key:
            continue
        conn = connect(os.path.join(folder, "sock"))
        zygote = prewarmed_process(found)
        if conn is not None and zygote is not None:
            conn.close()
            with contextlib.suppress(OSError):
                os.killpg(zygote.pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)


def connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        return sock
    except OSError:
        sock.close()
        return None


def zygote_path(spec: RunnerSpec) -> str | None:
    """The socket of ``spec``'s zygote on this worker; None when slots must not share one."""
    if (
        not spec.key
        or spec.stream
        or spec.env.get(ENV_FORK, "1") == "0"
        or not sys.platform.startswith("linux")
    ):
        return None
    top = private_top()
    if top is None:
        return None
    identity = json.dumps(
        [
            worker_pid(),  # the worker's main process: one zygote per worker, not per machine
            spec.key,
            os.path.realpath(spec.workspace),
            spec.nodeids,
            spec.pytest_args,
            spec.plugin_options,
            startup_env(runner_env(spec.env)),
        ],
        sort_keys=True,
        default=str,
    )
    # <top>/z-<key>/sock: the zygote's folder also holds its nodeids, log and pytest cache.
    path = os.path.join(top, f"z-{hashlib.sha256(identity.encode()).hexdigest()[:20]}", "sock")
    return path if len(path) < 100 else None


def sweep_zygotes(top: str) -> None:
    """Remove the folders of zygotes that are gone without cleaning up (killed with their
    worker): a live zygote accepts a connection on its socket, a dead one's refuses it."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(top):
            if entry.name.startswith("z-") and entry.is_dir(follow_symlinks=False):
                conn = connect(os.path.join(entry.path, "sock"))
                if conn is None:
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    conn.close()


class Zygotes:
    """The zygotes one worker process started (reaped as they end), and the way to a runner
    forked from the run's zygote. A zygote started here may be an activated spare of ``spares``.
    """

    def __init__(self, spares: SparePool) -> None:
        self.spares = spares
        self._started: list[subprocess.Popen[bytes]] = []

    def fork(self, spec: RunnerSpec, log_path: str) -> tuple[ForkedProcess, int, int] | None:
        """A runner asked of the run's zygote on this worker (started here if there is none),
        as (process, event fd, command fd); None when that cannot be had (the caller starts a
        runner of its own). The slots of one run on one worker share one collection this way.

        Returns once the request is sent: the zygote forks the runner once it has collected,
        and the process is :attr:`ForkedProcess.pending` until it says so (the slot driver
        waits for that in its loop, heartbeats going on)."""
        path = zygote_path(spec)
        if path is None:
            return None
        conn, started = self._reach(spec, path)
        if conn is None:
            return None
        home = os.path.dirname(path)
        owner: ZygoteProcess | None = started or prewarmed_in(home, spec.key)
        event_fd, event_w = os.pipe()
        command_r, command_fd = os.pipe()
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        env = runner_env(spec.env)
        env.update(
            {
                ENV_RUNNER: "1",
                ENV_OPTIONS: json.dumps(runner_options(spec)),
                ENV_STACKS: stacks_path(log_path),
            }
        )
        try:
            socket.send_fds(conn, [encode(env, exact=True)], [event_w, command_r, log_fd])
        except OSError:
            conn.close()
            close_quietly(event_fd, command_fd)
            return None
        finally:
            close_quietly(event_w, command_r, log_fd)
        return ForkedProcess(conn, 0, owner, home), event_fd, command_fd

    def prewarm(self, spec: RunnerSpec, hung_after: float) -> subprocess.Popen[bytes] | None:
        """Start the zygote of ``spec``'s run on this worker ahead of the run's slots (see
        :mod:`.prewarm`): the process, if it was started here; None if one runs already or
        none can be had. Its folder says so (:data:`PREWARMED`), for :func:`drop_prewarmed`.
        Still collecting after ``hung_after`` seconds, it is killed: no slot waits longer for
        a fork (a slot's own zygote is killed by the slot that gives up on it); sooner if its
        run is gone from the lab board (:mod:`.prewarmwatch`)."""
        path = zygote_path(spec)
        if path is None:
            return None
        started = self._reach(spec, path, prewarm=True)[1]
        if started is not None:
            timer = threading.Timer(hung_after, kill_collecting, (started, os.path.dirname(path)))
            timer.daemon = True
            timer.start()
        return started

    def _reach(
        self, spec: RunnerSpec, path: str, prewarm: bool = False
    ) -> tuple[socket.socket | None, subprocess.Popen[bytes] | None]:
        """A connection to the zygote at ``path``, and the process if it was started here."""
        top = os.path.dirname(os.path.dirname(path))  # <top>/z-<key>/sock
        with open(os.path.join(top, "zygotes.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one zygote per run, queue and worker
            conn = connect(path)
            if conn is not None and prewarm:
                conn.close()  # it runs already: nothing to ask of it
                return None, None
            if conn is not None:
                return conn, None
            sweep_zygotes(top)  # this one's folder too, if its zygote was killed
            # A zygote prewarmed from the run's last plan that this run does not use (its
            # tests differ) collects for nothing: it makes way for the run's own.
            drop_prewarmed(top, spec.key)
            started = self._start(spec, path)
            if started is not None and prewarm:
                with open(os.path.join(os.path.dirname(path), PREWARMED), "w") as fh:
                    # The worker's too: other workers of this machine and user share ``top``.
                    record = {"key": spec.key, "pid": started.pid, "worker": worker_pid()}
                    json.dump(record, fh)
            if started is None or prewarm:
                return None, started
            return connect(path), started

    def _start(self, spec: RunnerSpec, path: str) -> subprocess.Popen[bytes] | None:
        """Start the zygote of ``spec``'s run on this worker; the process once it listens on
        ``path``, None if it does not within ``ZYGOTE_START_WAIT``."""
        for old in list(self._started):
            if old.poll() is not None:
                self._started.remove(old)
        home = os.path.dirname(path)
        os.makedirs(home, mode=0o700, exist_ok=True)
        nodeids_file = os.path.join(home, "nodeids.json")
        with open(nodeids_file, "w", encoding="utf-8") as fh:
            json.dump(spec.nodeids, fh)
        command = runner_command(spec, spec.nodeids, os.path.join(home, "pytest-cache"))
        env = runner_process_env(
            spec, {ENV_ZYGOTE: path, ENV_ZYGOTE_HOME: home, ENV_NODEIDS: nodeids_file}
        )
        log = os.path.join(home, "zygote.log")
        proc = self._from_spare(spec, command, env, log)
        if proc is None:
            with open(log, "wb") as log_file:
                proc = subprocess.Popen(
                    command,
                    cwd=spec.workspace,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        self._started.append(proc)
        deadline = time.monotonic() + ZYGOTE_START_WAIT
        while not os.path.exists(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                kill_group(proc)
                return None
            time.sleep(0.005)
        return proc

    def _from_spare(
        self, spec: RunnerSpec, command: list[str], env: dict[str, str], log: str
    ) -> subprocess.Popen[bytes] | None:
        spare = self.spares.take(spec)
        if spare is None:
            return None
        close_quietly(spare.event_fd, spare.command_fd)  # a zygote runs no test
        if not spare.activate(command[3:], env, log):
            spare.discard()
            return None
        spare.release_stdout()
        return spare.proc
