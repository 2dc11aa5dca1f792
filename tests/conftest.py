"""Fixtures for the plugin's own tests.

End-to-end tests run real ``celery worker`` processes against the real RabbitMQ (address from
``CELERY_DISPATCH_TEST_BROKER``, default guest on 127.0.0.1:5672). Their queues carry a unique
prefix per test session, so nothing else on the broker is disturbed. A worker's workspace is
this session's base temp dir, which holds every pytester project; dispatched runs pass
``--rootdir`` there so the controller's nodeids match the worker's.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import BROKER, WorkerProcess, consumer_count, delete_queues

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


@pytest.fixture(scope="session")
def workers(queues: Queues, workspace: Path) -> Iterator[dict[str, WorkerProcess]]:
    """worker-a on queue A and worker-b on queue B, for the whole session."""
    if not broker_reachable():
        pytest.fail(f"RabbitMQ is not reachable at {BROKER}: start it (rabbitmq-server -detached)")
    logs = workspace / "worker-logs"
    logs.mkdir(exist_ok=True)
    started: dict[str, WorkerProcess] = {}
    try:
        for key, queue in (("a", queues.a), ("b", queues.b)):
            started[key] = WorkerProcess(queue, f"worker-{key}", workspace, logs).start()
        yield started
    finally:
        for worker in started.values():
            worker.stop()


@dataclasses.dataclass
class Dispatched:
    """A finished ``pytest --celery-dispatch`` subprocess run and its JSON report."""

    result: pytest.RunResult
    report_path: Path

    @property
    def report(self) -> dict:
        return json.loads(self.report_path.read_text())

    def outcomes_by_nodeid(self) -> dict[str, str]:
        return {t["nodeid"].split("/", 1)[-1]: t["outcome"] for t in self.report["tests"]}


@pytest.fixture
def run_dispatched(pytester: pytest.Pytester, workspace: Path, queues: Queues):
    """Run pytest --celery-dispatch in a subprocess against the test broker and workers."""

    def run(*args: str, timeout: float = 120, broker: str = BROKER) -> Dispatched:
        report = pytester.path / "dispatch-report.json"
        result = pytester.runpytest_subprocess(
            "--celery-dispatch",
            f"--celery-broker={broker}",
            f"--rootdir={workspace}",
            f"--celery-json-report={report}",
            "-p",
            "no:cacheprovider",
            *args,
            timeout=timeout,
        )
        return Dispatched(result, report)

    return run
