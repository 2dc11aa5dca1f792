"""Worker side: the warm pytest process that runs a session's tests, and its driver.

The Celery task (``worker.run_session``) never runs tests in its own process. It starts one
``python -m pytest -p pytest_celery_dispatch.runner`` in the workspace, in a new process group,
that collects the session's test files once and then runs chunk after chunk of nodeids as the
driver feeds them (JSON lines on a command pipe), like an xdist worker. It writes one JSON event
per line on an event pipe: logstart / report / logfinish per test. A test that kills its process,
segfaults or hangs past the deadline only takes that runner down: the driver names the test as
crashed and starts a new runner for the rest.

This module is also the pytest plugin loaded into that runner process (``-p``). It never
imports the controller side.

PYTEST_DONT_REWRITE: spare runners import it before pytest configures (runner.SPARE_BOOT).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from .serialization import HEARTBEAT_INTERVAL, dumps, nodeid_path

ENV_RUNNER = "PYTEST_CELERY_DISPATCH_RUNNER"
ENV_EVENT_FD = "PYTEST_CELERY_DISPATCH_EVENT_FD"
ENV_NODEIDS = "PYTEST_CELERY_DISPATCH_NODEIDS"
ENV_COMMAND_FD = "PYTEST_CELERY_DISPATCH_COMMAND_FD"
ENV_OPTIONS = "PYTEST_CELERY_DISPATCH_OPTIONS"
ENV_PARENT = "PYTEST_CELERY_DISPATCH_PARENT_PID"
#: Set on a zygote runner: the Unix socket on which it forks the slots' runners (see _serve_forks).
ENV_ZYGOTE = "PYTEST_CELERY_DISPATCH_ZYGOTE"
#: ... and its folder (nodeids, log, pytest cache), removed when it exits.
ENV_ZYGOTE_HOME = "PYTEST_CELERY_DISPATCH_ZYGOTE_HOME"

#: Where the tail of a crashed runner's own output is quoted from.
CRASH_OUTPUT_TAIL = 4000
#: Captured output kept per report section (stdout, stderr, log of one phase); the middle of a
#: longer section is cut out and replaced by a line that says how much was dropped.
MAX_SECTION_CHARS = 1_000_000
#: Sent to the runner to make it stop after the running test (graceful stop, -x on the controller).
STOP_SIGNAL = signal.SIGUSR1


# ============================================================================ runner plugin
# Loaded with ``-p pytest_celery_dispatch.runner`` inside the runner process only.


def _die_with_parent() -> None:
    """Linux: be SIGKILLed when the worker's pool process that started us dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        return
    parent = os.environ.get(ENV_PARENT)
    if parent and str(os.getppid()) != parent:
        os._exit(70)  # the parent died before we armed the signal


class _EventWriter:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def emit(self, event: dict[str, Any]) -> None:
        # "replace": a lone surrogate from odd output never makes the line undecodable.
        data = (dumps(event) + "\n").encode("utf-8", "replace")
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]


_writer: _EventWriter | None = None


def _emit(event: dict[str, Any]) -> None:
    if _writer is not None:
        _writer.emit(event)


_stop_requested = False


def _request_stop(signum: int, frame: Any) -> None:
    global _stop_requested
    _stop_requested = True


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    global _writer
    fd = os.environ.get(ENV_EVENT_FD)
    zygote = os.environ.get(ENV_ZYGOTE)
    if (fd is None and not zygote) or os.environ.get(ENV_RUNNER) != "1":
        return
    # The controller's values of other plugins' options, for the plugins installed here.
    for name, value in json.loads(os.environ.get(ENV_OPTIONS) or "{}").items():
        if hasattr(config.option, name):
            setattr(config.option, name, value)
    _die_with_parent()
    if zygote:
        _listen(zygote)
        _writer = _EventWriter(os.open(os.devnull, os.O_WRONLY))  # it runs no test
    else:
        _writer = _EventWriter(int(str(fd)))
    signal.signal(STOP_SIGNAL, _request_stop)


_listener: socket.socket | None = None


def _listen(path: str) -> None:
    """A zygote listens from its start: the slots' drivers connect while it loads the conftest
    files and collects, and wait for their runners."""
    global _listener
    if _listener is None:
        _listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _listener.bind(path)
        _listener.listen(64)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    zygote = os.environ.get(ENV_ZYGOTE)
    if zygote and os.environ.get(ENV_RUNNER) == "1":
        _listen(zygote)  # before the conftest files, which may take long to import


def truncate_section(text: str, limit: int = MAX_SECTION_CHARS) -> str:
    """Keep the head and tail of an over-long captured section, and say what was cut."""
    if len(text) <= limit:
        return text
    head = limit // 2
    tail = limit - head
    dropped = len(text) - limit
    return (
        f"{text[:head]}\n[... celery-dispatch: {dropped} characters of this section were cut; "
        f"each captured section keeps at most {limit} characters ...]\n{text[-tail:]}"
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Keep exactly the requested nodeids, in the requested order; name the missing ones."""
    path = os.environ.get(ENV_NODEIDS)
    if _writer is None or not path:
        return
    with open(path, encoding="utf-8") as fh:
        wanted: list[str] = json.load(fh)
    by_id = {item.nodeid: item for item in items}
    selected = [by_id[n] for n in wanted if n in by_id]
    chosen = {item.nodeid for item in selected}
    deselected = [item for item in items if item.nodeid not in chosen]
    missing = [n for n in wanted if n not in by_id]
    items[:] = selected
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    # The imported modules and the collected items live as long as this process: keep them out
    # of the collector's way (its full passes, pytest's gc.collect() at the end). What the tests
    # themselves leave behind is collected as usual.
    gc.freeze()
    _collected.update(
        {
            "type": "collected",
            "count": len(selected),
            "missing": missing,
            "reason": _collect_errors_for(missing) if missing else "",
        }
    )
    _emit(dict(_collected))


_collected: dict[str, Any] = {}  # this process's "collected" event, for the runners it forks


def _commands(fd: int) -> Iterator[dict[str, Any]]:
    """The driver's commands, one JSON object per line, until it closes the pipe."""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        buffer = bytearray()
        while True:
            chunk = pipe.read(1 << 16)
            if not chunk:
                return
            buffer.extend(chunk)
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                if line.strip():
                    yield json.loads(line)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> bool | None:
    """Run what the driver sends, chunk after chunk, on the items collected once.

    The last item received is held back until the next chunk (or the end) is known, so that
    ``nextitem`` is right and module / class fixtures are not torn down between chunks.
    """
    fd = os.environ.get(ENV_COMMAND_FD)
    if _writer is None or (fd is None and _listener is None):
        return None
    if session.config.option.collectonly:
        return True
    if _listener is not None:
        _serve_forks(session, _listener)
        fd = os.environ.get(ENV_COMMAND_FD)  # set in a forked runner; the zygote ends here
    if fd is None:
        return True
    return _run_commands(session, int(fd))


def _run_commands(session: pytest.Session, fd: int) -> bool:
    index = {item.nodeid: item for item in session.items}
    pending: list[pytest.Item] = []

    def run(item: pytest.Item, nextitem: pytest.Item | None) -> bool:
        item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
        return not (session.shouldfail or session.shouldstop or _stop_requested)

    for command in _commands(fd):
        if command.get("type") == "run":
            pending.extend(index[n] for n in command.get("nodeids", []) if n in index)
            while len(pending) > 1:
                if not run(pending.pop(0), pending[0]):
                    return True
        else:  # "shutdown": run what is left, the last one with nextitem=None
            while pending:
                item = pending.pop(0)
                if not run(item, pending[0] if pending else None):
                    return True
            return True
    return True


#: A zygote with no driver connected ends after this long (the run is over or has its runners).
ZYGOTE_IDLE = 3.0
#: ... and one that nobody asked for a runner ends after this long.
ZYGOTE_FIRST_WAIT = 30.0


def _serve_forks(session: pytest.Session, listener: socket.socket) -> None:
    """A zygote's loop: it has collected and runs no test; each driver that connects gets a
    runner forked from it (a copy of the collected session, with the driver's pipes, log file
    and environment) and, later, that runner's exit status. A driver that goes away takes its
    runner with it. Returns in the zygote when it is no longer needed, and in each forked runner
    (with ``ENV_COMMAND_FD`` set) to run the driver's commands."""
    path = listener.getsockname()
    clients: dict[socket.socket, int] = {}  # connection -> its runner's pid (0: none yet)
    last_active = time.monotonic()
    served = False
    while clients or time.monotonic() - last_active < (
        ZYGOTE_IDLE if served else ZYGOTE_FIRST_WAIT
    ):
        ready, _, _ = select.select([listener, *clients], [], [], 0.05)
        for sock in ready:
            if sock is listener:
                with contextlib.suppress(OSError):
                    clients[listener.accept()[0]] = 0
                continue
            if clients.get(sock) == 0:
                request = _read_request(sock)
                if request is None:
                    clients.pop(sock)
                    sock.close()
                    continue
                env, fds = request
                sys.stdout.flush()
                sys.stderr.flush()
                zygote = os.getpid()
                pid = os.fork()
                if pid == 0:
                    _become_runner(session, env, fds, [listener, *clients], zygote)
                    return
                for fd in fds:
                    os.close(fd)
                clients[sock] = pid
                served = True
                try:
                    _send_json(sock, {"pid": pid})
                except OSError:  # the driver gave up waiting: nobody will feed this runner
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signal.SIGKILL)
                continue
            # The driver closed its end: after its runner's exit status, or because it is gone.
            with contextlib.suppress(OSError):
                if sock.recv(64):
                    continue
            pid = clients.pop(sock)
            sock.close()
            if pid > 0:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
        while True:  # reap the runners, tell their drivers
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            for sock, child in clients.items():
                if child == pid:
                    clients[sock] = -pid
                    with contextlib.suppress(OSError):
                        _send_json(sock, {"status": status})
        if clients:
            last_active = time.monotonic()
    listener.close()
    with contextlib.suppress(OSError):
        os.unlink(path)
    home = os.environ.get(ENV_ZYGOTE_HOME)
    if home:  # (pytest's own end may still write its cache there: swept with the dead ones)
        shutil.rmtree(home, ignore_errors=True)


def _read_request(sock: socket.socket) -> tuple[dict[str, str], list[int]] | None:
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
        return json.loads(data), list(fds)
    except (OSError, ValueError):
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        return None
    finally:
        sock.settimeout(None)


def _send_json(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall((json.dumps(message) + "\n").encode())


def _become_runner(
    session: pytest.Session,
    env: dict[str, str],
    fds: list[int],
    sockets: list[socket.socket],
    zygote: int,
) -> None:
    """In a freshly forked runner: drop the zygote's sockets, take the driver's pipes, log file
    and environment, re-open pytest's output capturing on files of its own, announce what was
    collected. Session fixtures are set up here, per runner, as in any runner."""
    global _writer, _listener
    event_fd, command_fd, log_fd = fds
    for sock in sockets:
        sock.close()
    _listener = None
    os.setsid()  # its own process group: the driver kills it (and what its tests started) alone
    capman = session.config.pluginmanager.getplugin("capturemanager")
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
    _writer = _EventWriter(event_fd)
    # Killed with the zygote, which is killed with the worker's pool process that started it (a
    # killed worker takes its running tests with it at once); a driver that goes away while the
    # zygote lives gets its runner killed by the zygote.
    os.environ[ENV_PARENT] = str(zygote)
    _die_with_parent()
    _emit(dict(_collected))


_collect_errors: dict[str, str] = {}


def _collect_errors_for(missing: list[str]) -> str:
    reasons = []
    for nodeid in missing:
        for prefix, text in _collect_errors.items():
            if nodeid == prefix or nodeid.startswith(prefix + "::") or prefix in ("", "."):
                reasons.append(f"collection error in {prefix or 'rootdir'}:\n{text}")
                break
            if nodeid_path(nodeid) == prefix:
                reasons.append(f"collection error in {prefix}:\n{text}")
                break
    return "\n".join(dict.fromkeys(reasons))


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if _writer is not None and report.failed:
        _collect_errors[report.nodeid] = str(report.longreprtext)[-CRASH_OUTPUT_TAIL:]


def pytest_warning_recorded(
    warning_message: Any, when: str, nodeid: str, location: tuple[str, int, str] | None
) -> None:
    """Warnings raised on the worker travel home for the controller's warnings summary."""
    if _writer is None:
        return
    _emit(
        {
            "type": "warning",
            "nodeid": nodeid,
            "when": when,
            "category": getattr(warning_message.category, "__name__", "UserWarning"),
            "message": str(warning_message.message),
            "filename": str(warning_message.filename),
            "lineno": warning_message.lineno,
        }
    )


_started: set[str] = set()


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    # Once per test: a plugin that reruns a test (pytest-rerunfailures) logs each attempt.
    if nodeid not in _started:
        _started.add(nodeid)
        _emit({"type": "logstart", "nodeid": nodeid, "location": list(location), "ts": time.time()})


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """A test ends when its whole protocol has, reruns included, not at its first logfinish."""
    try:
        return (yield)
    finally:
        if item.nodeid in _started:
            _emit({"type": "logfinish", "nodeid": item.nodeid, "ts": time.time()})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _writer is None:
        return
    report.sections = [(name, truncate_section(text)) for name, text in report.sections]
    config = _config
    data = (
        config.hook.pytest_report_to_serializable(config=config, report=report)
        if config is not None
        else {}
    )
    _emit({"type": "report", "nodeid": report.nodeid, "report": data, "ts": time.time()})


_config: pytest.Config | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    global _config
    _config = session.config


def pytest_sessionfinish(session: pytest.Session) -> None:
    if session.shouldfail:  # the forwarded -x / --maxfail tripped in this runner
        _emit({"type": "stopping", "reason": str(session.shouldfail)})


# ============================================================================ runner driver
# Used by the Celery task in the worker's pool process.


@dataclasses.dataclass
class RunnerSpec:
    workspace: str
    nodeids: list[str]  # every test this session may be asked to run: what the runner collects
    timeout: float
    pytest_args: list[str]
    env: dict[str, str]
    stream: bool = False  # -s on the controller: forward the tests' output as it comes
    plugin_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: The run and queue: the sessions of one run on one worker share a zygote (see
    #: ``_fork_from_zygote``); empty: every session starts its own runner.
    key: str = ""


def runner_command(spec: RunnerSpec, nodeids: list[str], cache_dir: str) -> list[str]:
    paths = list(dict.fromkeys(nodeid_path(n) for n in nodeids))
    forwarded = list(spec.pytest_args)
    for index in range(len(forwarded) - 1, 0, -1):  # the worker keeps its own cache
        if forwarded[index - 1] == "-o" and forwarded[index].startswith("cache_dir="):
            del forwarded[index - 1 : index + 1]
    return [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "pytest_celery_dispatch.runner",
        "--rootdir",
        spec.workspace,
        "--continue-on-collection-errors",
        # -s: only the tests' own output may reach stdout, which is streamed home.
        *(["-s", "-p", "no:terminal"] if spec.stream else ["-q", "--no-header"]),
        *forwarded,
        # Never write into the (maybe read-only) workspace; --lf & co stay the controller's.
        "-o",
        f"cache_dir={cache_dir}",
        "--",
        *paths,
    ]


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exit code {code}"


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - CRASH_OUTPUT_TAIL))
            return fh.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _kill_group(proc: subprocess.Popen[bytes] | _ForkedProcess) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.kill()


def _read_lines(fd: int, buffer: bytearray) -> Iterator[dict[str, Any]]:
    chunk = os.read(fd, 1 << 16)
    if not chunk:
        raise EOFError
    buffer.extend(chunk)
    while True:
        end = buffer.find(b"\n")
        if end < 0:
            return
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        if line.strip():
            yield json.loads(line.decode("utf-8", "replace"))


#: What the task's control callback may answer while a session runs.
RUN, STOP, KILL = "run", "stop", "kill"


class _Coalescer:
    """Sends finished tests home together: one ``results`` message for up to ``max_tests``
    tests or ``max_age`` seconds, instead of five messages (logstart, three reports, logfinish)
    per test. Any other event first flushes what is pending, so the order is kept."""

    def __init__(
        self, emit: Callable[[dict[str, Any]], None], max_tests: int = 100, max_age: float = 0.05
    ) -> None:
        self._emit = emit
        self.max_tests = max_tests
        self.max_age = max_age
        self.open: dict[str, dict[str, Any]] = {}
        self.ready: list[dict[str, Any]] = []
        self.since: float | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind not in ("logstart", "report", "logfinish"):
            self.flush()
            self._emit(event)
            return
        nodeid = str(event.get("nodeid", ""))
        test = self.open.setdefault(
            nodeid, {"nodeid": nodeid, "batch_id": event.get("batch_id", ""), "reports": []}
        )
        if kind == "logstart":
            test["location"] = event.get("location")
            test["started"] = event.get("ts")
        elif kind == "report":
            test["reports"].append(event.get("report"))
        else:
            test["finished"] = event.get("ts")
            self.ready.append(self.open.pop(nodeid))
            if self.since is None:
                self.since = time.monotonic()
            if len(self.ready) >= self.max_tests:
                self.flush()

    @property
    def pending(self) -> bool:
        return bool(self.ready)

    def tick(self) -> None:
        if self.since is not None and time.monotonic() - self.since >= self.max_age:
            self.flush()

    def flush(self) -> None:
        if self.ready:
            tests, self.ready, self.since = self.ready, [], None
            self._emit({"type": "results", "tests": tests})


#: A chunk of work as fetched from the run's work queue.
Chunk = dict[str, Any]


#: What a spare runner does before it is needed: start the interpreter and import pytest with its
#: own plugins and this plugin's modules, then wait on the boot pipe for one session's command
#: line, environment and directory. It imports no test code, no conftest and no third-party
#: plugin (pytest refuses to rewrite the asserts of a plugin imported before it configures), so
#: a run sees nothing an earlier one left: each spare serves one runner and a new interpreter
#: replaces it.
SPARE_BOOT = """
import importlib, json, os, select, sys
boot = os.fdopen(int(os.environ.pop("PYTEST_CELERY_DISPATCH_BOOT_FD")), "rb")
# Warm up only once the worker is quiet: a spare is started as a session ends, when its tests'
# processes exit and the controller writes its reports; the next run is seconds away.
delay = float(os.environ.pop("PYTEST_CELERY_DISPATCH_SPARE_DELAY", "0"))
ready = select.select([boot], [], [], delay)
line = boot.readline() if ready[0] else None
if line == b"":
    sys.exit(0)  # the worker process went away (or no longer needs a spare)
import pytest
import importlib.metadata
from _pytest.config import default_plugins, essential_plugins
for name in (*essential_plugins, *default_plugins):
    try:
        importlib.import_module("_pytest." + name)
    except ImportError:
        pass
importlib.metadata.entry_points(group="pytest11")
# This plugin's own modules (marked PYTEST_DONT_REWRITE, so importing them early is allowed).
for name in ("pytest_celery_dispatch.runner", "pytest_celery_dispatch.plugin"):
    try:
        importlib.import_module(name)
    except Exception:
        pass
if line is None:
    line = boot.readline()
boot.close()
if not line:
    sys.exit(0)
order = json.loads(line)
os.chdir(order["cwd"])
sys.path[0] = os.getcwd()  # as "python -m pytest" started there would have it
os.environ.clear()
os.environ.update(order["env"])
if order.get("log"):
    log = os.open(order["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
sys.argv = [os.path.join(os.path.dirname(pytest.__file__), "__main__.py"), *order["args"]]
sys.exit(pytest.console_main())
"""
ENV_BOOT_FD = "PYTEST_CELERY_DISPATCH_BOOT_FD"
#: ``DISPATCH_SPARE_RUNNER=0`` on a worker: start every runner cold (a new ``python -m pytest``).
ENV_SPARE = "DISPATCH_SPARE_RUNNER"


#: ``DISPATCH_RUNNER_PYCACHE`` on a worker: where runners keep compiled and assert-rewritten
#: modules (a folder), or ``off``. Default: a folder of this user's under the temp directory.
ENV_PYCACHE = "DISPATCH_RUNNER_PYCACHE"


def runner_pycache(env: Mapping[str, str]) -> str | None:
    """The bytecode cache of this worker's runners, or None to leave Python's settings alone.

    Without it every runner parses, assert-rewrites and compiles each test module and conftest
    again: the workspace is often read-only (a container's mounted checkout) and images set
    ``PYTHONDONTWRITEBYTECODE``. The cache lives outside the workspace and is only used when it
    is this user's alone: whoever can write a cached module there can run code in the runners.
    A ``PYTHONPYCACHEPREFIX`` of the worker's own wins.
    """
    setting = env.get(ENV_PYCACHE, "").strip()
    if setting.lower() in ("0", "off", "no", "false") or env.get("PYTHONPYCACHEPREFIX"):
        return None
    if setting:
        # Absolute: a runner starts in the workspace, where a relative folder would land.
        return _private_dir(os.path.abspath(setting))
    top = _private_top()
    return os.path.join(top, "pycache") if top else None


def _private_dir(path: str) -> str | None:
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


def _private_top() -> str | None:
    """This user's folder under the temp directory (runner bytecode, zygote sockets)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return _private_dir(os.path.join(tempfile.gettempdir(), f"pytest-celery-dispatch-{uid}"))


def runner_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the runners' bytecode cache switched on (see :func:`runner_pycache`)."""
    result = dict(env)
    prefix = runner_pycache(env)
    if prefix is not None:
        result["PYTHONPYCACHEPREFIX"] = prefix
        result.pop("PYTHONDONTWRITEBYTECODE", None)  # it writes there, never in the workspace
    return result


def _startup_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables that shape an interpreter when it starts (PYTHONPATH, PYTHONHASHSEED...)."""
    return {k: v for k, v in env.items() if k.startswith("PYTHON")}


class _Spare:
    """A runner process started ahead of time (see :data:`SPARE_BOOT`)."""

    def __init__(self, workspace: str, env: Mapping[str, str], delay: float = 0.0) -> None:
        self.workspace = os.path.realpath(workspace)
        env = runner_env(env)
        self.startup_env = _startup_env(env)
        boot_r, self.boot_w = os.pipe()
        self.event_fd, self.event_w = os.pipe()
        self.command_r, self.command_fd = os.pipe()
        child_env = dict(env)
        child_env[ENV_BOOT_FD] = str(boot_r)
        child_env["PYTEST_CELERY_DISPATCH_SPARE_DELAY"] = str(delay)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SPARE_BOOT],
                cwd=self.workspace,
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(boot_r, self.event_w, self.command_r),
                start_new_session=True,
            )
        except BaseException:
            for fd in (boot_r, self.boot_w, self.event_fd, self.event_w, self.command_r):
                os.close(fd)
            os.close(self.command_fd)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.close(boot_r)
        os.close(self.event_w)
        os.close(self.command_r)

    def fits(self, spec: RunnerSpec) -> bool:
        return (
            self.proc.poll() is None
            and os.path.realpath(spec.workspace) == self.workspace
            and _startup_env(runner_env(spec.env)) == self.startup_env
        )

    def activate(self, args: list[str], env: Mapping[str, str], log: str | None) -> bool:
        order = {"cwd": self.workspace, "env": dict(env), "args": args, "log": log}
        try:
            with os.fdopen(self.boot_w, "wb") as boot:
                boot.write((json.dumps(order) + "\n").encode())
            return True
        except OSError:
            return False

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.boot_w)  # end of file: the spare exits by itself
        for fd in (self.event_fd, self.command_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(2)
        _kill_group(self.proc)
        with contextlib.suppress(Exception):
            self.proc.wait(2)


_spare: _Spare | None = None
_spare_lock = threading.Lock()


#: How long a spare started at the end of a session waits before it warms up.
SPARE_DELAY = 1.5


def prepare_spare(workspace: str, env: Mapping[str, str], delay: float = 0.0) -> None:
    """Start this process's spare runner unless it has a live one (the worker calls this when a
    pool process starts, and with ``delay=SPARE_DELAY`` after each session)."""
    global _spare
    if env.get(ENV_SPARE, "1") == "0":
        return
    with _spare_lock:
        if _spare is not None and _spare.proc.poll() is None:
            return
        if _spare is not None:
            _spare.discard()
        try:
            _spare = _Spare(workspace, env, delay)
        except OSError:
            _spare = None


def _take_spare(spec: RunnerSpec) -> _Spare | None:
    global _spare
    with _spare_lock:
        spare, _spare = _spare, None
    if spare is None:
        return None
    if spare.fits(spec):
        return spare
    spare.discard()
    return None


#: ``DISPATCH_FORK_RUNNERS=0`` on a worker: every slot's runner collects for itself.
ENV_FORK = "DISPATCH_FORK_RUNNERS"
#: How long a driver waits for a zygote it starts to listen, then for its forked runner (the
#: zygote may still be collecting): together well under the controller's 10 s heartbeat limit,
#: as the driver sends none meanwhile. A slower collection gets runners of their own.
ZYGOTE_START_WAIT = 2.0
ZYGOTE_REPLY_WAIT = 4.0

_zygotes: list[subprocess.Popen[bytes]] = []  # started by this process: reaped as they end


class _ForkedProcess:
    """A runner forked by a zygote: not our child, so its exit status comes over the socket."""

    stdout = None

    def __init__(self, conn: socket.socket, pid: int) -> None:
        self.conn = conn
        self.pid = pid
        self.returncode: int | None = None
        self._buffer = b""

    def _read(self, timeout: float) -> None:
        if self.returncode is not None:
            return
        if not select.select([self.conn], [], [], timeout)[0]:
            return
        data = b""
        with contextlib.suppress(OSError):
            data = self.conn.recv(4096)
        if not data:  # the zygote is gone: the status is lost with it
            self.returncode = 255
        self._buffer += data
        while b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            with contextlib.suppress(ValueError):
                status = json.loads(line).get("status")
                if isinstance(status, int):
                    self.returncode = os.waitstatus_to_exitcode(status)
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
        return self.returncode

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)


def _connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        return sock
    except OSError:
        sock.close()
        return None


def _zygote_path(spec: RunnerSpec) -> str | None:
    if (
        not spec.key
        or spec.stream
        or spec.env.get(ENV_FORK, "1") == "0"
        or not sys.platform.startswith("linux")
    ):
        return None
    top = _private_top()
    if top is None:
        return None
    identity = json.dumps(
        [
            os.getppid(),  # the worker's main process: one zygote per worker, not per machine
            spec.key,
            os.path.realpath(spec.workspace),
            spec.nodeids,
            spec.pytest_args,
            spec.plugin_options,
            _startup_env(runner_env(spec.env)),
        ],
        sort_keys=True,
        default=str,
    )
    # <top>/z-<key>/sock: the zygote's folder also holds its nodeids, log and pytest cache.
    path = os.path.join(top, f"z-{hashlib.sha256(identity.encode()).hexdigest()[:20]}", "sock")
    return path if len(path) < 100 else None


def _sweep_zygotes(top: str) -> None:
    """Remove the folders of zygotes that are gone without cleaning up (killed with their
    worker): a live zygote accepts a connection on its socket, a dead one's refuses it."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(top):
            if entry.name.startswith("z-") and entry.is_dir(follow_symlinks=False):
                conn = _connect(os.path.join(entry.path, "sock"))
                if conn is None:
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    conn.close()


def _start_zygote(spec: RunnerSpec, path: str) -> bool:
    """Start the zygote of ``spec``'s run on this worker; True once it listens on ``path``."""
    for old in list(_zygotes):
        if old.poll() is not None:
            _zygotes.remove(old)
    home = os.path.dirname(path)
    os.makedirs(home, mode=0o700, exist_ok=True)
    nodeids_file = os.path.join(home, "nodeids.json")
    with open(nodeids_file, "w", encoding="utf-8") as fh:
        json.dump(spec.nodeids, fh)
    command = runner_command(spec, spec.nodeids, os.path.join(home, "pytest-cache"))
    env = runner_env(spec.env)
    env.update(
        {
            ENV_RUNNER: "1",
            ENV_ZYGOTE: path,
            ENV_ZYGOTE_HOME: home,
            ENV_NODEIDS: nodeids_file,
            ENV_PARENT: str(os.getpid()),
            ENV_OPTIONS: json.dumps(spec.plugin_options),
        }
    )
    log = os.path.join(home, "zygote.log")
    spare = _take_spare(spec)
    proc: subprocess.Popen[bytes] | None = None
    if spare is not None:
        for fd in (spare.event_fd, spare.command_fd):
            os.close(fd)
        if spare.activate(command[3:], env, log):
            proc = spare.proc
            if proc.stdout is not None:
                proc.stdout.close()
                proc.stdout = None
        else:
            spare.discard()
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
    _zygotes.append(proc)
    deadline = time.monotonic() + ZYGOTE_START_WAIT
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill_group(proc)
            return False
        time.sleep(0.005)
    return True


def _fork_from_zygote(spec: RunnerSpec, log_path: str) -> tuple[_ForkedProcess, int, int] | None:
    """A runner forked from the run's zygote on this worker (started here if there is none), as
    (process, event fd, command fd); None when that cannot be had (the caller starts a runner
    of its own). The sessions of one run on one worker share one collection this way."""
    path = _zygote_path(spec)
    if path is None:
        return None
    top = os.path.dirname(os.path.dirname(path))  # <top>/z-<key>/sock
    with open(os.path.join(top, "zygotes.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one zygote per run, queue and worker
        conn = _connect(path)
        if conn is None:
            _sweep_zygotes(top)  # this one's folder too, if its zygote was killed
            if _start_zygote(spec, path):
                conn = _connect(path)
    if conn is None:
        return None
    event_fd, event_w = os.pipe()
    command_r, command_fd = os.pipe()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    env = runner_env(spec.env)
    env.update({ENV_RUNNER: "1", ENV_OPTIONS: json.dumps(spec.plugin_options)})
    pid = 0
    try:
        socket.send_fds(conn, [(json.dumps(env) + "\n").encode()], [event_w, command_r, log_fd])
        conn.settimeout(ZYGOTE_REPLY_WAIT)
        reply = b""
        while not reply.endswith(b"\n"):
            more = conn.recv(4096)
            if not more:
                break
            reply += more
        conn.settimeout(None)
        pid = int(json.loads(reply or b"{}").get("pid") or 0)
    except (OSError, ValueError):
        pid = 0
    finally:
        for fd in (event_w, command_r, log_fd):
            os.close(fd)
    if pid <= 0:
        conn.close()  # the zygote kills what it may still fork for us
        os.close(event_fd)
        os.close(command_fd)
        return None
    return _ForkedProcess(conn, pid), event_fd, command_fd


class _Runner:
    """One warm runner process: pipes in and out, and what it was given."""

    def __init__(self, spec: RunnerSpec, eligible: list[str], tmp: str, number: int) -> None:
        nodeids_file = os.path.join(tmp, f"nodeids-{number}.json")
        with open(nodeids_file, "w", encoding="utf-8") as fh:
            json.dump(eligible, fh)
        self.log_path = os.path.join(tmp, f"runner-{number}.log")
        command = runner_command(spec, eligible, os.path.join(tmp, "pytest-cache"))
        self.proc: subprocess.Popen[bytes] | _ForkedProcess
        self.warm_start = self.forked = False
        forked = _fork_from_zygote(spec, self.log_path) if number == 1 else None
        if forked is not None:
            self.proc, self.event_fd, self.command_fd = forked
            self.warm_start = self.forked = True
        spare = _take_spare(spec) if number == 1 and not self.forked else None
        if spare is not None:
            env = self._env(spec, nodeids_file, spare.event_w, spare.command_r)
            log = None if spec.stream else self.log_path
            if spare.activate(command[3:], env, log):
                self.proc = spare.proc
                self.event_fd, self.command_fd = spare.event_fd, spare.command_fd
                if not spec.stream and self.proc.stdout is not None:
                    self.proc.stdout.close()  # its output goes to the log file now
                    self.proc.stdout = None
                self.warm_start = True
            else:
                spare.discard()
        if not self.warm_start:
            self.event_fd, event_w = os.pipe()
            command_r, self.command_fd = os.pipe()
            with open(self.log_path, "wb") as log_file:
                self.proc = subprocess.Popen(
                    command,
                    cwd=spec.workspace,
                    env=self._env(spec, nodeids_file, event_w, command_r),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE if spec.stream else log_file,
                    stderr=subprocess.STDOUT,
                    pass_fds=(event_w, command_r),
                    start_new_session=True,
                )
            os.close(event_w)
            os.close(command_r)
        self.out_fd: int | None = self.proc.stdout.fileno() if self.proc.stdout else None
        self.out_tail = ""  # the last output, for crash messages when it is streamed
        self.eligible = set(eligible)
        self.collected = False
        self.buffer = bytearray()
        self.current: str | None = None
        self.current_since = 0.0
        self.shutdown_sent = False
        self.self_stopped = False

    @staticmethod
    def _env(spec: RunnerSpec, nodeids_file: str, event_w: int, command_r: int) -> dict[str, str]:
        env = runner_env(spec.env)
        env.update(
            {
                ENV_RUNNER: "1",
                ENV_EVENT_FD: str(event_w),
                ENV_COMMAND_FD: str(command_r),
                ENV_NODEIDS: nodeids_file,
                ENV_PARENT: str(os.getpid()),
                ENV_OPTIONS: json.dumps(spec.plugin_options),
            }
        )
        return env

    def send(self, command: dict[str, Any]) -> None:
        data = (json.dumps(command) + "\n").encode()
        with contextlib.suppress(BrokenPipeError, OSError):
            view = memoryview(data)
            while view:
                view = view[os.write(self.command_fd, view) :]

    def shutdown(self) -> None:
        if not self.shutdown_sent:
            self.send({"type": "shutdown"})
            self.shutdown_sent = True

    def close(self) -> int:
        for fd in (self.command_fd, self.event_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        code = self.proc.wait()
        _kill_group(self.proc)  # grandchildren a test left behind
        return code


def drive_session(
    spec: RunnerSpec,
    emit: Callable[[dict[str, Any]], None],
    fetch: Callable[[], Chunk | None],
    control: Callable[[], str] = lambda: RUN,
    check_interval: float = 0.2,
    heartbeat: float = HEARTBEAT_INTERVAL,
) -> dict[str, Any]:
    """Feed chunks from ``fetch()`` to a warm runner until the work runs out; forward events.

    * A chunk is ``{"batch_id", "attempt", "nodeids"}``; every event about one of its tests
      carries its ``batch_id``; ``started`` and ``finished`` frame it.
    * The next chunk is fetched when the runner holds at most one unfinished test (the one it
      keeps back for ``nextitem``), so the work spreads over every slot of every worker.
    * Every ``check_interval`` seconds (a passive queue declare, well under 1 ms) ``control()``
      says whether to go on (``RUN``), to let the running test finish and start no other
      (``STOP``: -x / --maxfail on the controller), or to kill the runner now (``KILL``: the run
      is over or interrupted). Every ``heartbeat`` seconds an ``alive`` event says the session
      still works.
    * A runner that dies (crash, timeout kill) costs only its current test: a new runner picks
      up the rest.
    """
    emit = coalesced = _Coalescer(emit)
    done: set[str] = set()
    assigned: dict[str, str] = {}  # nodeid -> batch_id, given to the runner, not finished
    chunk_left: dict[str, set[str]] = {}  # batch_id -> its unfinished nodeids
    missing: dict[str, str] = {}  # nodeid -> why the runner could not collect it
    broken: str | None = None  # set when runners cannot even collect: fail what comes
    state = RUN
    starts = chunks = 0
    out_of_work = False
    warm = False  # the first runner was a spare (interpreter and pytest already loaded)

    def finish(nodeid: str) -> None:
        done.add(nodeid)
        batch_id = assigned.pop(nodeid, None)
        if batch_id is None:
            return
        left = chunk_left.get(batch_id)
        if left is not None:
            left.discard(nodeid)
            if not left:
                del chunk_left[batch_id]
                emit({"type": "finished", "batch_id": batch_id})

    def take(chunk: Chunk, runner: _Runner | None) -> list[str]:
        batch_id = str(chunk["batch_id"])
        ids = [str(n) for n in chunk.get("nodeids", [])]
        emit(
            {
                "type": "started",
                "batch_id": batch_id,
                "attempt": int(chunk.get("attempt") or 1),
                "nodeids": ids,
            }
        )
        chunk_left[batch_id] = set(ids)
        runnable = []
        for nodeid in ids:
            assigned[nodeid] = batch_id
            if broken is not None:
                emit(_crashed(nodeid, batch_id, broken, ""))
                finish(nodeid)
            elif nodeid in done:
                finish(nodeid)
            elif runner is None or nodeid not in runner.eligible or nodeid in missing:
                why = missing.get(nodeid, "")
                emit({"type": "missing", "batch_id": batch_id, "nodeids": [nodeid], "reason": why})
                finish(nodeid)
            else:
                runnable.append(nodeid)
        return runnable

    with tempfile.TemporaryDirectory(prefix="celery-dispatch-") as tmp:
        runner: _Runner | None = None
        redo: list[str] = []
        reason: str | None = None
        progress_at_start = 0
        last_check = last_beat = time.monotonic()
        try:
            while True:
                if runner is None:
                    if state != RUN:
                        break
                    eligible = [n for n in spec.nodeids if n not in done and n not in missing]
                    if broken is not None or not eligible:
                        # Nothing can run here: answer for each test we are given, by name,
                        # until the work runs out (a retry may land on a better worker).
                        chunk = fetch()
                        if chunk is None:
                            break
                        chunks += 1
                        take(chunk, None)
                        continue
                    starts += 1
                    runner = _Runner(spec, eligible, tmp, starts)
                    warm = warm or runner.warm_start
                    redo = [n for n in assigned if n not in done]
                    progress_at_start = len(done)
                    reason = None
                if state == RUN and runner.collected and not runner.shutdown_sent:
                    if redo:
                        runner.send(
                            {"type": "run", "nodeids": [n for n in redo if n in runner.eligible]}
                        )
                        redo = []
                    elif not out_of_work and sum(1 for n in assigned if n not in done) <= 1:
                        chunk = fetch()
                        if chunk is None:
                            out_of_work = True
                        else:
                            chunks += 1
                            runnable = take(chunk, runner)
                            if runnable:
                                runner.send({"type": "run", "nodeids": runnable})
                            continue  # at once: the chunk may have been all done or missing
                    if out_of_work:
                        runner.shutdown()
                exited = _pump(
                    runner, emit, assigned, missing, finish, 0.05 if coalesced.pending else 0.2
                )
                coalesced.tick()
                now = time.monotonic()
                if runner.current is not None and now - runner.current_since > spec.timeout:
                    reason = (
                        f"timeout: still running after {spec.timeout:g}s (--celery-timeout); "
                        "the runner was killed"
                    )
                    _kill_group(runner.proc)
                if now - last_check >= check_interval:
                    last_check = now
                    wanted = control()
                    if wanted == KILL and state != KILL:
                        state = KILL
                        _kill_group(runner.proc)
                    elif wanted == STOP and state == RUN:
                        state = STOP  # finish the running test, start no other
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(runner.proc.pid, STOP_SIGNAL)
                if state == RUN and now - last_beat >= heartbeat:
                    last_beat = now
                    current = runner.current or ""
                    emit(
                        {
                            "type": "alive",
                            "nodeid": current,
                            "batch_id": assigned.get(current, ""),
                            "elapsed": round(now - runner.current_since, 3) if current else 0.0,
                        }
                    )
                if not exited:
                    continue
                # The runner is gone: a normal end, a crash, a kill, or its own --maxfail.
                while runner.out_fd is not None and _forward_output(runner, emit, assigned, 0.5):
                    pass  # what it printed last
                code = runner.close()
                gone, runner = runner, None
                if state != RUN:
                    break
                if gone.current is not None:
                    why = reason or f"the test process crashed ({_describe_exit(code)})"
                    emit(
                        _crashed(
                            gone.current,
                            assigned.get(gone.current, ""),
                            why,
                            gone.out_tail or _tail(gone.log_path),
                        )
                    )
                    finish(gone.current)
                if gone.self_stopped:
                    state = STOP  # -x / --maxfail: the controller stops the whole run too
                    break
                if out_of_work and all(n in done for n in assigned):
                    break  # all the work it was given is done: the normal end
                if not gone.collected or len(done) == progress_at_start:
                    # It died before running anything: do not loop; fail what it was given.
                    why = (
                        f"the test process exited before running any test ({_describe_exit(code)})"
                    )
                    tail = gone.out_tail or _tail(gone.log_path)
                    for nodeid in [n for n in assigned if n not in done]:
                        emit(_crashed(nodeid, assigned[nodeid], why, tail))
                        finish(nodeid)
                    broken = f"{why}\n{tail}".strip()
        except BaseException:
            if runner is not None:
                _kill_group(runner.proc)  # the reply channel failed, or the task was cancelled
                runner.close()
            raise
    coalesced.flush()
    return {
        "state": state,
        "done": len(done),
        "chunks": chunks,
        "runner_starts": starts,
        "warm_start": warm,
    }


def _pump(
    runner: _Runner,
    emit: Callable[[dict[str, Any]], None],
    assigned: dict[str, str],
    missing: dict[str, str],
    finish: Callable[[str], None],
    wait: float = 0.2,
) -> bool:
    """Forward what the runner wrote (waiting up to ``wait`` s); True once it has exited."""
    watched = [runner.event_fd] + ([runner.out_fd] if runner.out_fd is not None else [])
    ready, _, _ = select.select(watched, [], [], wait)
    if not ready:
        return False
    if runner.out_fd is not None and runner.out_fd in ready:
        _forward_output(runner, emit, assigned, 0)
        if runner.event_fd not in ready:
            return False
    try:
        for event in _read_lines(runner.event_fd, runner.buffer):
            kind = event.get("type")
            nodeid = str(event.get("nodeid", ""))
            if kind == "collected":
                runner.collected = True
                for n in event.get("missing", []):
                    missing[str(n)] = str(event.get("reason") or "")
                continue
            if kind == "stopping":
                runner.self_stopped = True
                continue
            if kind == "logstart":
                runner.current = nodeid
                runner.current_since = time.monotonic()
            if nodeid in assigned:
                event["batch_id"] = assigned[nodeid]
            emit(event)
            if kind == "logfinish":
                runner.current = None
                finish(nodeid)
    except EOFError:
        return True
    return False


def _forward_output(
    runner: _Runner,
    emit: Callable[[dict[str, Any]], None],
    assigned: dict[str, str],
    wait: float,
) -> bool:
    """Send what the tests printed (under -s) home as an ``output`` event; False at its end."""
    assert runner.out_fd is not None
    ready, _, _ = select.select([runner.out_fd], [], [], wait)
    if not ready:
        return False
    data = os.read(runner.out_fd, 1 << 16)
    if not data:
        return False
    text = data.decode("utf-8", "replace")
    runner.out_tail = (runner.out_tail + text)[-CRASH_OUTPUT_TAIL:]
    current = runner.current or ""
    emit({"type": "output", "data": text, "nodeid": current, "batch_id": assigned.get(current, "")})
    return True


def _crashed(nodeid: str, batch_id: str, why: str, tail: str) -> dict[str, Any]:
    message = f"{nodeid}: {why}"
    if tail:
        message += f"\n--- last output of the test process ---\n{tail}"
    return {
        "type": "crashed",
        "nodeid": nodeid,
        "batch_id": batch_id,
        "reason": why.splitlines()[0],
        "message": message,
    }
