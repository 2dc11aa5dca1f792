"""Fixtures for the plugin's own tests.

End-to-end tests run real ``celery worker`` processes against the real RabbitMQ (address from
``CELERY_DISPATCH_TEST_BROKER``, default guest on 127.0.0.1:5672). Their queues carry a unique
prefix per test session, so nothing else on the broker is disturbed. A worker's workspace is
this session's base temp dir, which holds every pytester project; dispatched runs pass
``--rootdir`` there so the controller's nodeids match the worker's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_celery_dispatch.embedded import EMBEDDED
from tests.helpers import (
    BROKER,
    WorkerProcess,
    consumer_count,
    delete_queues,
    dispatch_args,
    dispatch_command,
    stop_all,
)

# pytest-randomly (a dev dependency, tests/e2e/test_compat.py) reorders every run it is loaded
# in and reseeds `random`; many tests here rely on order. Keep it off in every pytest process
# this suite starts (pytester runs, the workers' runner processes); a test that wants it passes
# `-p randomly`, which re-enables it.
os.environ["PYTEST_ADDOPTS"] = (os.environ.get("PYTEST_ADDOPTS", "") + " -p no:randomly").strip()

# A suite started in the background by a shell without job control (`make test &` in a script,
# some CI runners) inherits SIGINT ignored, and so would every controller it starts: the Ctrl-C
# tests' SIGINT would do nothing. A handled signal is reset to the default across exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _randomly_off_in_pytester_runs(request: pytest.FixtureRequest) -> None:
    """pytester deletes PYTEST_ADDOPTS for its runs: put ``-p no:randomly`` back (see above).

    Otherwise a pytester controller would run with pytest-randomly and forward its seed to
    workers whose runners have it off ("unrecognized arguments: --randomly-seed=...").
    """
    if "pytester" in request.fixturenames:
        request.getfixturevalue("pytester")
        request.getfixturevalue("monkeypatch").setenv("PYTEST_ADDOPTS", "-p no:randomly")


SCHEMA = json.loads(
    (Path(__file__).parents[1] / "pytest_celery_dispatch" / "report.schema.json").read_text()
)


def broker_reachable() -> bool:
    try:
        consumer_count("amq.does-not-matter")
        return True
    except Exception:
        return False


@dataclasses.dataclass(frozen=True)
class Queues:
    a: str
    b: str
    empty: str  # nobody ever consumes it

    def render(self, source: str) -> str:
        return (
            source.replace("QUEUE_A", self.a)
            .replace("QUEUE_B", self.b)
            .replace("QUEUE_EMPTY", self.empty)
        )


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp().resolve()


@pytest.fixture(scope="session")
def queues() -> Iterator[Queues]:
    prefix = f"cdtest-{uuid.uuid4().hex[:8]}"
    q = Queues(a=f"{prefix}-a", b=f"{prefix}-b", empty=f"{prefix}-empty")
    yield q
    if broker_reachable():
        delete_queues(q.a, q.b, q.empty)


#: Workers shared by the whole session never quarantine themselves for infrastructure failures
#: (bench health, tests/e2e/test_bench_health.py, uses workers of its own).
SHARED = {"DISPATCH_QUARANTINE_AFTER": "0"}


@pytest.fixture(scope="session")
def workers(queues: Queues, workspace: Path) -> Iterator[dict[str, WorkerProcess]]:
    """worker-a on queue A and worker-b on queue B, for the whole session.

    They see the deliberate faults of many tests (timeouts, runners that cannot start): they
    must not quarantine themselves between tests (``SHARED``)."""
    if not broker_reachable():
        pytest.fail(f"RabbitMQ is not reachable at {BROKER}: start it (rabbitmq-server -detached)")
    logs = workspace / "worker-logs"
    logs.mkdir(exist_ok=True)
    started: dict[str, WorkerProcess] = {}
    try:
        for key, queue in (("a", queues.a), ("b", queues.b)):
            worker = WorkerProcess(queue, f"worker-{key}", workspace, logs, extra_env=SHARED)
            started[key] = worker.start()
        yield started
    finally:
        stop_all(list(started.values()))


@pytest.fixture(scope="session")
def embedded_workers(queues: Queues, workspace: Path) -> Iterator[dict[str, WorkerProcess]]:
    """worker-a and worker-b on the embedded broker (its default folder under the workspace,
    which is also the dispatched runs' rootdir), for the whole session."""
    logs = workspace / "worker-logs"
    logs.mkdir(exist_ok=True)
    started: dict[str, WorkerProcess] = {}
    try:
        for key, queue in (("a", queues.a), ("b", queues.b)):
            worker = WorkerProcess(
                queue, f"worker-{key}", workspace, logs, broker=EMBEDDED, extra_env=SHARED
            )
            started[key] = worker.start()
        yield started
    finally:
        stop_all(list(started.values()))


@pytest.fixture(params=["rabbitmq", "embedded"])
def transport(request: pytest.FixtureRequest) -> str:
    """The broker URL of a run on each transport, with worker-a / worker-b consuming on it."""
    if request.param == "embedded":
        request.getfixturevalue("embedded_workers")
        return EMBEDDED
    request.getfixturevalue("workers")
    return BROKER


@dataclasses.dataclass
class Dispatched:
    """A finished ``pytest --celery-dispatch`` subprocess run and its JSON report."""

    result: pytest.RunResult
    report_path: Path

    @property
    def report(self) -> dict:
        """The run's JSON report, validated against the shipped schema on every read."""
        import jsonschema

        data = json.loads(self.report_path.read_text())
        jsonschema.validate(data, SCHEMA)
        return data

    def outcomes_by_nodeid(self) -> dict[str, str]:
        return {t["nodeid"].split("/", 1)[-1]: t["outcome"] for t in self.report["tests"]}


@pytest.fixture
def run_dispatched(
    pytester: pytest.Pytester, workspace: Path, queues: Queues, request: pytest.FixtureRequest
):
    """Run pytest --celery-dispatch in a subprocess against the test broker and workers
    (on the transport of the ``transport`` fixture when the test uses it)."""
    uses_transport = "transport" in request.fixturenames
    default = request.getfixturevalue("transport") if uses_transport else BROKER

    def run(*args: str, timeout: float = 120, broker: str = default) -> Dispatched:
        report = pytester.path / "dispatch-report.json"
        result = pytester.runpytest_subprocess(
            *dispatch_args(broker, workspace, report), *args, timeout=timeout
        )
        return Dispatched(result, report)

    return run


@pytest.fixture
def worker_factory(workspace: Path):
    """Start private workers for one test; every one is stopped (and its queue deleted) after."""
    started: list[WorkerProcess] = []

    def start(
        queue: str | None = None,
        worker_id: str = "worker-x",
        concurrency: int = 1,
        root: Path | None = None,
        extra_env: dict[str, str] | None = None,
        broker: str = BROKER,
        pool: str | None = None,
    ) -> WorkerProcess:
        name = queue or f"cdtest-{uuid.uuid4().hex[:8]}"
        logs = workspace / "worker-logs"
        logs.mkdir(exist_ok=True)
        worker = WorkerProcess(
            name,
            worker_id,
            root or workspace,
            logs,
            concurrency=concurrency,
            broker=broker,
            extra_env=extra_env,
            pool=pool,
        )
        started.append(worker)
        return worker.start()

    yield start
    stop_all(started)
    if broker_reachable():
        delete_queues(*{w.queue for w in started})


class Controller:
    """``pytest --celery-dispatch`` running in the background, for faults injected mid-run."""

    def __init__(
        self, pytester: pytest.Pytester, workspace: Path, args: list[str], broker: str = BROKER
    ) -> None:
        import subprocess

        self.events = pytester.path / "events.jsonl"
        self.report = pytester.path / "dispatch-report.json"
        self.output = pytester.path / "controller.out"
        command = dispatch_command(
            broker, workspace, self.report, f"--celery-event-log={self.events}", *args
        )
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                command, cwd=pytester.path, stdout=out, stderr=subprocess.STDOUT
            )

    def event_lines(self) -> list[dict]:
        if not self.events.exists():
            return []
        lines = []
        for line in self.events.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line being written
                lines.append(json.loads(line))
        return lines

    def wait_for(self, predicate, timeout: float = 60.0) -> list[dict]:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.event_lines()
            if predicate(lines):
                return lines
            if self.proc.poll() is not None:
                raise AssertionError(f"controller ended early:\n{self.text()}")
            time.sleep(0.05)
        raise AssertionError(f"condition not met within {timeout}s:\n{self.text()}")

    def wait(self, timeout: float = 120.0) -> int:
        """The controller's exit code; a hang fails with what it printed and its last events."""
        import subprocess

        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            tail = "\n".join(json.dumps(e) for e in self.event_lines()[-30:])
            raise AssertionError(
                f"controller still running after {timeout}s:\n{self.text()}\nlast events:\n{tail}"
            ) from None

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def controller(pytester: pytest.Pytester, workspace: Path):
    running: list[Controller] = []

    def start(*args: str, broker: str = BROKER) -> Controller:
        ctl = Controller(pytester, workspace, list(args), broker)
        running.append(ctl)
        return ctl

    yield start
    for ctl in running:
        ctl.kill()


@pytest.fixture(scope="module")
def vhost_broker() -> Iterator[str]:
    """A private RabbitMQ vhost, for tests that need the real queue names queue_a / queue_b."""
    import shutil
    import subprocess

    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        pytest.skip("rabbitmqctl is needed to create a private vhost for queue_a / queue_b")
    name = f"cdtest-{uuid.uuid4().hex[:8]}"
    subprocess.run([rabbitmqctl, "add_vhost", name], check=True, capture_output=True)
    try:
        subprocess.run(
            [rabbitmqctl, "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
            check=True,
            capture_output=True,
        )
        yield f"amqp://guest:guest@127.0.0.1:5672/{name}"
    finally:
        subprocess.run([rabbitmqctl, "delete_vhost", name], capture_output=True)
