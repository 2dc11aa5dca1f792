"""The plugin's fixtures: ``dispatch_app``, ``dispatcher`` and ``dispatch_context``.

Registered by :mod:`.plugin` (its ``pytest_plugins``), so ``-p no:celery_dispatch`` leaves
them out too. Celery is imported only when a fixture is used.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from . import settings as S
from .names import (
    ENV_CTX_ATTEMPT,
    ENV_CTX_HOSTNAME,
    ENV_CTX_QUEUE,
    ENV_CTX_RUN_ID,
    ENV_CTX_TASK_ID,
    ENV_CTX_WORKER_ID,
    ENV_RUNNER,
    ENV_WORKSPACE,
)
from .stashkeys import SESSION_KEY, SETTINGS_ERROR_KEY, SETTINGS_KEY


def _settings_for_fixture(config: pytest.Config) -> S.Settings:
    error = config.stash.get(SETTINGS_ERROR_KEY, None)
    if error is not None:
        raise pytest.UsageError(error)
    return config.stash[SETTINGS_KEY]


@pytest.fixture(scope="session")
def dispatch_app(pytestconfig: pytest.Config) -> Iterator[Any]:
    """The Celery app configured from this run's settings (broker, backend, JSON only)."""
    from .embedded import EMBEDDED, root_dir
    from .transport import make_app

    settings = _settings_for_fixture(pytestconfig)
    root = root_dir(pytestconfig.rootpath) if settings.broker == EMBEDDED else None
    app = make_app(settings.broker, settings.backend, embedded_root=root)
    yield app
    app.close()


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """One finished task as seen by the dispatcher: its return value and the timing."""

    name: str
    queue: str | None
    task_id: str
    result: Any
    sent_at: float
    received_at: float

    @property
    def round_trip(self) -> float:
        return self.received_at - self.sent_at


class Dispatcher:
    """Send tasks to queues from a test and gather their results concurrently."""

    def __init__(self, app: Any, dispatching: bool) -> None:
        self.app = app
        self.dispatching = dispatching

    def require(self, *queues: str, wait: float = 3.0) -> None:
        """Skip (plain run) or fail (``--celery-dispatch`` run) unless each queue has a worker."""
        from .transport import Broker, BrokerUnavailable, connect, wait_until

        react = pytest.fail if self.dispatching else pytest.skip
        try:
            conn = connect(self.app, timeout=3.0)
        except BrokerUnavailable as exc:
            react(f"dispatcher needs a broker: {exc}")
        broker = Broker(self.app, conn)
        try:
            for queue in queues:
                broker.declare_task_queue(queue)
                if not wait_until(lambda q=queue: (broker.consumer_count(q) or 0) > 0, wait, 0.1):
                    react(
                        f"dispatcher needs a worker on queue {queue!r}: none consumes it "
                        f"(start one: celery -A pytest_celery_dispatch.worker worker -Q {queue})"
                    )
        finally:
            broker.close()

    def gather(
        self, calls: Sequence[tuple[str, str | None, dict[str, Any]]], timeout: float = 60.0
    ) -> list[TaskResult]:
        """Send every ``(task_name, queue, kwargs)`` at once; return results in call order."""
        sent = []
        for name, queue, kwargs in calls:
            options: dict[str, Any] = {"queue": queue} if queue else {}
            sent_at = time.time()
            async_result = self.app.send_task(name, kwargs=kwargs, **options)
            sent.append((name, queue, async_result, sent_at))
        from celery.exceptions import TimeoutError as CeleryTimeout
        from celery.result import ResultSet

        arrived: dict[str, float] = {}
        values: dict[str, Any] = {}

        def on_result(task_id: str, value: Any) -> None:
            arrived[task_id] = time.time()
            values[task_id] = value

        results = ResultSet([async_result for _, _, async_result, _ in sent], app=self.app)
        try:
            # Results are taken as they arrive (the backend's native join), so each one's
            # round trip is its own, not the time until the slowest one came back.
            results.join_native(timeout=timeout, callback=on_result, propagate=True, interval=0.05)
        except CeleryTimeout:
            waiting = [name for name, _, r, _ in sent if str(r.id) not in arrived]
            pytest.fail(f"dispatcher: no result within {timeout:g}s for {', '.join(waiting)}")
        return [
            TaskResult(name, queue, str(r.id), values[str(r.id)], sent_at, arrived[str(r.id)])
            for name, queue, r, sent_at in sent
        ]

    def call(
        self, name: str, queue: str | None = None, timeout: float = 60.0, **kwargs: Any
    ) -> TaskResult:
        return self.gather([(name, queue, kwargs)], timeout=timeout)[0]


@pytest.fixture
def dispatcher(dispatch_app: Any, pytestconfig: pytest.Config) -> Dispatcher:
    """Send tasks to queues and gather results concurrently, with per-task timing."""
    return Dispatcher(dispatch_app, dispatching=SESSION_KEY in pytestconfig.stash)


@dataclasses.dataclass(frozen=True)
class DispatchContext:
    """Where this test runs: on a worker (``dispatched``) or locally."""

    dispatched: bool
    worker: str
    queue: str | None
    hostname: str | None
    task_id: str | None
    attempt: int
    run_id: str | None
    workspace: str | None


def current_context() -> DispatchContext:
    env = os.environ
    if env.get(ENV_RUNNER) == "1":
        return DispatchContext(
            dispatched=True,
            worker=env.get(ENV_CTX_WORKER_ID, ""),
            queue=env.get(ENV_CTX_QUEUE) or None,
            hostname=env.get(ENV_CTX_HOSTNAME) or None,
            task_id=env.get(ENV_CTX_TASK_ID) or None,
            attempt=int(env.get(ENV_CTX_ATTEMPT, "1") or 1),
            run_id=env.get(ENV_CTX_RUN_ID) or None,
            workspace=env.get(ENV_WORKSPACE) or None,
        )
    import socket

    return DispatchContext(False, "local", None, socket.gethostname(), None, 0, None, None)


@pytest.fixture
def dispatch_context() -> DispatchContext:
    """Where this test runs: worker id, queue and host on a worker; ``worker='local'`` here."""
    return current_context()
