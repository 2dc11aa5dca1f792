"""The plugin's fixtures: ``dispatch_app``, ``dispatcher``, ``dispatch_context`` and
``dispatch_artifacts``.

Registered by :mod:`.plugin` (its ``pytest_plugins``), so ``-p no:celery_dispatch`` leaves
them out too. Celery is imported only when a fixture is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from . import settings as S
from . import taskrun
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
from .stashkeys import ARTIFACTS_KEY, JSON_KEY, SESSION_KEY, SETTINGS_ERROR_KEY, SETTINGS_KEY
from .taskrun import TaskResult as TaskResult


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


class Dispatcher:
    """Send tasks to queues from a test and gather their results concurrently."""

    def __init__(
        self,
        app: Any,
        dispatching: bool,
        live: Callable[[str | None], None] | None = None,
        on_run: Callable[[dict[str, Any]], None] | None = None,
        saved_to: str | None = None,
    ) -> None:
        self.app = app
        self.dispatching = dispatching
        self.live = live  # writes one line now (None: the run's heading), or no live report
        self.on_run = on_run  # gets each run's record (the JSON report's tests[].dispatcher)
        self.saved_to = saved_to  # the JSON report's path, for "Results saved to"
        self.runs: list[dict[str, Any]] = []
        self._warm = False

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
        self.warm()

    def warm(self) -> None:
        """Open the sending connection and, with a streaming result backend (``rpc://``,
        Redis), start its result consumer, before a run: the first send would pay for both
        (about 50 ms measured), and a run's tasks would leave that far apart."""
        if self._warm:
            return
        import uuid

        with self.app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=1)
            if getattr(self.app.backend, "is_async", False):
                self.app.backend.on_task_call(producer, str(uuid.uuid4()))
        self._warm = True

    def gather(
        self,
        calls: Sequence[tuple[str, str | None, dict[str, Any]]],
        timeout: float = 60.0,
        propagate: bool = True,
    ) -> list[TaskResult]:
        """Send every ``(task_name, queue, kwargs)`` at once; return results in call order.

        Each task's states are reported live (``SENT``, ``PENDING``, ``STARTED`` on which
        worker, ``SUCCESS`` / ``FAILURE``), then the run's sections; the run is kept for the
        JSON report. A failed task fails the test after the report, unless ``propagate=False``.
        """
        from celery.exceptions import TimeoutError as CeleryTimeout
        from celery.result import ResultSet

        self.warm()
        began = time.time()
        sent = []
        with self.app.producer_or_acquire() as producer:  # one producer: back-to-back sends
            for name, queue, kwargs in calls:
                options: dict[str, Any] = {"queue": queue} if queue else {}
                sent_at = time.time()
                async_result = self.app.send_task(name, kwargs=kwargs, producer=producer, **options)
                sent.append((name, queue, async_result, sent_at))
        # Written after every task is out, so the terminal never delays a send.
        if self.live is not None:
            self.live(None)  # the run's heading
            for name, queue, r, sent_at in sent:
                self.live(taskrun.sent_line(sent_at, name, queue, str(r.id)))
            for name, _, r, _ in sent:
                self.live(taskrun.pending_line(time.time(), name, str(r.id)))
        names = {str(r.id): name for name, _, r, _ in sent}
        started: dict[str, tuple[float, str | None]] = {}
        arrived: dict[str, float] = {}
        values: dict[str, Any] = {}

        def saw_started(task_id: str, info: Any) -> None:
            if task_id in started or task_id in arrived or task_id not in names:
                return
            host = info.get("hostname") if isinstance(info, dict) else None
            started[task_id] = (time.time(), None if host is None else str(host))
            if self.live is not None:
                self.live(taskrun.started_line(time.time(), names[task_id], task_id, host))

        def on_message(meta: dict[str, Any]) -> None:  # async backends: every state message
            if meta.get("status") == "STARTED":
                saw_started(str(meta.get("task_id")), meta.get("result"))

        def on_interval() -> None:  # polling backends: ask for the states still unknown
            for _, _, r, _ in sent:
                if str(r.id) not in started and str(r.id) not in arrived and r.state == "STARTED":
                    saw_started(str(r.id), r.info)

        def on_result(task_id: str, value: Any) -> None:
            arrived[task_id] = time.time()
            values[task_id] = value

        is_async = bool(getattr(self.app.backend, "is_async", False))
        results = ResultSet([async_result for _, _, async_result, _ in sent], app=self.app)
        try:
            # Results are taken as they arrive (the backend's native join), so each one's
            # round trip is its own, not the time until the slowest one came back.
            results.join_native(
                timeout=timeout,
                callback=on_result,
                propagate=False,
                interval=0.01,
                on_message=on_message if is_async else None,
                on_interval=None if is_async else on_interval,
            )
        except CeleryTimeout:
            waiting = [name for name, _, r, _ in sent if str(r.id) not in arrived]
            pytest.fail(f"dispatcher: no result within {timeout:g}s for {', '.join(waiting)}")
        out = []
        for name, queue, r, sent_at in sent:
            tid = str(r.id)
            seen, host = started.get(tid, (None, None))
            value = values[tid]
            failed = isinstance(value, BaseException)
            res = TaskResult(
                name, queue, tid, None if failed else value, sent_at, arrived[tid],
                state=str(r.state) if failed else "SUCCESS", started_seen_at=seen,
                started_on=host, error=f"{type(value).__name__}: {value}" if failed else None,
            )  # fmt: skip
            out.append(res)
        self._report(out, began, max(arrived.values()), propagate)
        return out

    def _report(self, out: list[TaskResult], began: float, ended: float, propagate: bool) -> None:
        """The finished lines and the run's sections; keep the run; fail on a failed task."""
        for res in sorted(out, key=lambda x: x.received_at):
            if self.live is not None:
                self.live(taskrun.finished_line(res))
        record = taskrun.run_record(out, began, ended)
        self.runs.append(record)
        if self.live is not None:
            for line in taskrun.section_lines(record, self.saved_to):
                self.live(line)
        if self.on_run is not None:
            self.on_run(record)
        failed_tasks = [r for r in out if not r.ok]
        if propagate and failed_tasks:
            pytest.fail(
                "dispatcher: "
                + "; ".join(f"{r.short_name} {r.state}: {r.error}" for r in failed_tasks)
            )

    def call(
        self, name: str, queue: str | None = None, timeout: float = 60.0, **kwargs: Any
    ) -> TaskResult:
        return self.gather([(name, queue, kwargs)], timeout=timeout)[0]


def live_writer(config: pytest.Config, title: str) -> Callable[[str | None], None] | None:
    """Lines written at once through the terminal reporter, past output capturing (as
    pytest's live logging does); ``None`` writes the heading. No terminal: no live lines."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return None
    capman = config.pluginmanager.get_plugin("capturemanager")

    def write(line: str | None) -> None:
        from .terminal import fresh_line  # the controller's terminal: not at every pytest start

        suspended = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
        with suspended:
            fresh_line(config)
            if line is None:
                reporter.write_sep("-", title)
            else:
                reporter.write_line(line)

    return write


@pytest.fixture
def dispatcher(
    dispatch_app: Any, pytestconfig: pytest.Config, request: pytest.FixtureRequest
) -> Dispatcher:
    """Send tasks to queues and gather results concurrently, with per-task timing; each task's
    states are reported live, each run's sections after it, and its record goes to the JSON
    report (``tests[].dispatcher``)."""
    json_plugin = pytestconfig.stash.get(JSON_KEY, None)
    node = request.node

    def keep(record: dict[str, Any]) -> None:
        node.user_properties.append((taskrun.PROPERTY, record))

    return Dispatcher(
        dispatch_app,
        dispatching=SESSION_KEY in pytestconfig.stash,
        live=live_writer(pytestconfig, f"dispatcher: {node.name}"),
        on_run=keep,
        saved_to=getattr(json_plugin, "path", None),
    )


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


@pytest.fixture
def dispatch_artifacts(request: pytest.FixtureRequest) -> Path:
    """A private, empty folder for this test's files: whatever the test leaves there comes home
    after it, whatever its outcome, into ``--celery-artifacts DIR/<nodeid as a path>/``. On a
    worker it is a fresh folder of this test and attempt; in a local run it is that folder under
    DIR itself, so the same test works dispatched or not."""
    from .artifactship import worker_folder

    folder = worker_folder(request.node, os.environ)
    if folder is not None:
        return Path(folder)
    store = request.config.stash.get(ARTIFACTS_KEY, None)
    if store is None:
        _settings_for_fixture(request.config)  # raises the settings' error, if that is why
        raise pytest.UsageError("celery-dispatch: dispatch_artifacts has no folder here")
    return Path(store.local_folder(request.node.nodeid))
