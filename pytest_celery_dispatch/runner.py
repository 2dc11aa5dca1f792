"""Worker side: the pytest process that runs a batch's nodeids, and the loop that drives it.

The Celery task (``worker.run_tests``) never runs tests in its own process. It starts
``python -m pytest -p pytest_celery_dispatch.runner`` in the workspace, in a new process group,
and reads one JSON event per line from a pipe: logstart / report / logfinish per test. A test
that kills its process, segfaults or hangs past the deadline only takes that runner down: the
driver names the test as crashed and starts a new runner for the rest of the batch.

This module is also the pytest plugin loaded into that runner process (``-p``). It never
imports the controller side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .serialization import HEARTBEAT_INTERVAL, Event, dumps, nodeid_path

ENV_RUNNER = "PYTEST_CELERY_DISPATCH_RUNNER"
ENV_EVENT_FD = "PYTEST_CELERY_DISPATCH_EVENT_FD"
ENV_NODEIDS = "PYTEST_CELERY_DISPATCH_NODEIDS"
ENV_PARENT = "PYTEST_CELERY_DISPATCH_PARENT_PID"

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


def pytest_configure(config: pytest.Config) -> None:
    global _writer
    fd = os.environ.get(ENV_EVENT_FD)
    if fd is None or os.environ.get(ENV_RUNNER) != "1":
        return
    _die_with_parent()
    _writer = _EventWriter(int(fd))
    signal.signal(STOP_SIGNAL, _request_stop)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Any:
    result = yield
    if _stop_requested:
        item.session.shouldstop = "stopped by the controller (-x / --maxfail)"
    return result


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
    if missing:
        _emit({"type": "missing", "nodeids": missing, "reason": _collect_errors_for(missing)})


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


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    _emit({"type": "logstart", "nodeid": nodeid, "location": list(location), "ts": time.time()})


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


def pytest_runtest_logfinish(nodeid: str, location: tuple[str, int | None, str]) -> None:
    _emit({"type": "logfinish", "nodeid": nodeid, "ts": time.time()})


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
    nodeids: list[str]
    timeout: float
    pytest_args: list[str]
    env: dict[str, str]


@dataclasses.dataclass
class _Progress:
    done: set[str] = dataclasses.field(default_factory=set)
    current: str | None = None
    current_since: float = 0.0
    self_stopped: bool = False  # the runner hit the forwarded --maxfail


def runner_command(spec: RunnerSpec, nodeids: list[str]) -> list[str]:
    paths = list(dict.fromkeys(nodeid_path(n) for n in nodeids))
    return [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "pytest_celery_dispatch.runner",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        spec.workspace,
        "--continue-on-collection-errors",
        "-q",
        "--no-header",
        *spec.pytest_args,
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


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
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


#: What the task's control callback may answer while a batch runs.
RUN, STOP, KILL = "run", "stop", "kill"


def run_batch(
    spec: RunnerSpec,
    emit: Callable[[Event], None],
    control: Callable[[], str] = lambda: RUN,
    check_interval: float = 0.2,
    heartbeat: float = HEARTBEAT_INTERVAL,
) -> dict[str, Any]:
    """Run ``spec.nodeids`` in runner processes until each one has ended; forward every event.

    Every ``check_interval`` seconds (a passive queue declare, well under 1 ms) ``control()``
    says whether to go on (``RUN``), to let the running test finish and start no other
    (``STOP``: -x / --maxfail on the controller), or to kill the runner now (``KILL``: the run
    is over or interrupted). Every ``heartbeat``
    seconds an ``alive`` event tells the controller this batch is still being worked on.

    Returns a summary: tests done, crashed and missing, and how many runners were started.
    """
    progress = _Progress()
    remaining = list(spec.nodeids)
    crashed: list[str] = []
    missing: list[str] = []
    starts = 0
    state = RUN
    with tempfile.TemporaryDirectory(prefix="celery-dispatch-") as tmp:
        while remaining and state == RUN:
            state = control()
            if state != RUN:
                break
            starts += 1
            nodeids_file = os.path.join(tmp, f"nodeids-{starts}.json")
            with open(nodeids_file, "w", encoding="utf-8") as fh:
                json.dump(remaining, fh)
            log_path = os.path.join(tmp, f"runner-{starts}.log")
            read_fd, write_fd = os.pipe()
            env = dict(spec.env)
            env.update(
                {
                    ENV_RUNNER: "1",
                    ENV_EVENT_FD: str(write_fd),
                    ENV_NODEIDS: nodeids_file,
                    ENV_PARENT: str(os.getpid()),
                }
            )
            with open(log_path, "wb") as log_file:
                proc = subprocess.Popen(
                    runner_command(spec, remaining),
                    cwd=spec.workspace,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    pass_fds=(write_fd,),
                    start_new_session=True,
                )
            os.close(write_fd)
            progress.current = None
            reason: str | None = None
            buffer = bytearray()
            last_check = last_beat = time.monotonic()
            try:
                while True:
                    ready, _, _ = select.select([read_fd], [], [], 0.2)
                    if ready:
                        try:
                            for event in _read_lines(read_fd, buffer):
                                _track(event, progress, missing)
                                if state == RUN:
                                    emit(event)  # type: ignore[arg-type]
                        except EOFError:
                            break
                    now = time.monotonic()
                    if progress.current is not None and now - progress.current_since > spec.timeout:
                        reason = (
                            f"timeout: still running after {spec.timeout:g}s "
                            "(--celery-timeout); the runner was killed"
                        )
                        _kill_group(proc)
                    if now - last_check >= check_interval:
                        last_check = now
                        wanted = control()
                        if wanted == KILL:
                            state = KILL
                            _kill_group(proc)
                        elif wanted == STOP and state == RUN:
                            state = STOP  # finish the running test, start no other
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(proc.pid, STOP_SIGNAL)
                    if state == RUN and now - last_beat >= heartbeat:
                        last_beat = now
                        emit({"type": "alive", "nodeid": progress.current or ""})
            except BaseException:
                _kill_group(proc)  # the reply channel failed, or the task was cancelled
                raise
            finally:
                os.close(read_fd)
                code = proc.wait()
                _kill_group(proc)  # grandchildren a test left behind
            if state == RUN and progress.self_stopped:
                state = STOP  # -x / --maxfail: the controller stops the whole run too
            if state != RUN:
                break
            current = progress.current
            if current is not None:
                why = reason or f"the test process crashed ({_describe_exit(code)})"
                tail = _tail(log_path)
                message = f"{current}: {why}"
                if tail:
                    message += f"\n--- last output of the runner ---\n{tail}"
                crashed.append(current)
                progress.done.add(current)
                emit({"type": "crashed", "nodeid": current, "reason": why, "message": message})
            before = len(remaining)
            gone = progress.done | set(missing)
            remaining = [n for n in remaining if n not in gone]
            if remaining and len(remaining) == before:
                # The runner ended without touching any test: do not loop forever.
                why = f"the runner exited before running any test ({_describe_exit(code)})"
                tail = _tail(log_path)
                for nodeid in remaining:
                    crashed.append(nodeid)
                    emit(
                        {
                            "type": "crashed",
                            "nodeid": nodeid,
                            "reason": why,
                            "message": f"{nodeid}: {why}\n{tail}".strip(),
                        }
                    )
                remaining = []
    return {
        "state": state,
        "done": len(progress.done) - len(crashed),
        "crashed": crashed,
        "missing": missing,
        "starts": starts,
    }


def _track(event: dict[str, Any], progress: _Progress, missing: list[str]) -> None:
    kind = event.get("type")
    if kind == "logstart":
        progress.current = str(event["nodeid"])
        progress.current_since = time.monotonic()
    elif kind == "logfinish":
        progress.done.add(str(event["nodeid"]))
        progress.current = None
    elif kind == "missing":
        missing.extend(str(n) for n in event.get("nodeids", []))
    elif kind == "stopping":
        progress.self_stopped = True
