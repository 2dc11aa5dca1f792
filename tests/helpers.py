"""Real worker processes for the end-to-end tests: start, wait until consuming, stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kombu import Connection

from pytest_celery_dispatch.celeryconf import broker_ssl_options
from pytest_celery_dispatch.embedded import EMBEDDED, consumers_of, root_dir

BROKER = os.environ.get("CELERY_DISPATCH_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672//")


def consumer_count(queue: str, broker: str = BROKER, environ: dict[str, str] | None = None) -> int:
    if broker == EMBEDDED:
        env = os.environ if environ is None else environ
        return consumers_of(root_dir(env.get("DISPATCH_WORKSPACE"), env), queue)
    ssl = broker_ssl_options(broker, environ)
    with Connection(broker, connect_timeout=3, ssl=ssl or False) as conn:
        channel = conn.channel()
        try:
            return int(channel.queue_declare(queue=queue, passive=True).consumer_count)
        except Exception:
            return 0


def delete_queues(*queues: str, broker: str = BROKER) -> None:
    with Connection(broker, connect_timeout=3) as conn:
        for queue in queues:
            with contextlib.suppress(Exception):
                conn.channel().queue_delete(queue=queue)


class WorkerProcess:
    """``celery -A pytest_celery_dispatch.worker worker -Q <queue>`` as a child process."""

    def __init__(
        self,
        queue: str,
        worker_id: str,
        workspace: Path,
        log_dir: Path,
        concurrency: int = 2,
        broker: str = BROKER,
        extra_env: dict[str, str] | None = None,
        pool: str | None = None,
    ) -> None:
        self.queue = queue
        self.pool = pool  # Celery's -P: None for its default (prefork)
        self.worker_id = worker_id
        self.workspace = workspace
        self.broker = broker
        self.log_path = log_dir / f"{worker_id}-{queue}.log"
        self.env = dict(os.environ)
        self.env.update(
            {
                "CELERY_BROKER_URL": broker,
                "BROKER_URL": broker,  # the celery command's --broker: it beats the line above
                "WORKER_ID": worker_id,
                "DISPATCH_WORKSPACE": str(workspace),
                "DISPATCH_LOG_FORMAT": "json",
                "PYTHONUNBUFFERED": "1",
                # The shared workspace holds every test's project and the worker logs, which
                # change while a run goes: the run's tree never matches it, and these workers
                # run in place as before (tests/e2e/test_ship.py starts benches that ship).
                "DISPATCH_SHIP_UNSIGNED": "refuse",
            }
        )
        self.env.update(extra_env or {})
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "pytest_celery_dispatch.worker",
            "worker",
            "-Q",
            self.queue,
            "-n",
            f"{self.worker_id}-{self.queue}@%h",
            "-c",
            str(self.concurrency),
            "--without-gossip",
            "--without-mingle",
            "-l",
            "INFO",
            *(("-P", self.pool) if self.pool else ()),
        ]

    def start(self, wait: float = 30.0) -> WorkerProcess:
        before = consumer_count(self.queue, self.broker, self.env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                env=self.env,
                cwd=str(self.workspace),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + wait
        while consumer_count(self.queue, self.broker, self.env) <= before:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early; log: {self.log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"worker not consuming after {wait}s: {self.log_path}")
            time.sleep(0.1)
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(5)


def stop_all(workers: list[WorkerProcess], timeout: float = 4.0) -> None:
    """Stop workers at the end of a test or session: warm shutdowns in parallel, then a kill
    (a prefork worker on the embedded broker needs 3-7 s for a warm shutdown; nothing is left
    for them to do by then)."""
    running = [w for w in workers if w.proc is not None and w.proc.poll() is None]
    for worker in running:
        worker.signal(signal.SIGCONT)
        worker.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for worker in running:
        worker.stop(timeout=max(0.1, deadline - time.monotonic()))
        worker.signal(signal.SIGKILL)  # what is left of its process group


def orphaned_spare_runners() -> list[str]:
    """Spare runner processes whose parent is no celery worker any more (left behind)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
            if b"pytest_celery_dispatch/spare_boot.py" not in cmdline:
                continue
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            with open(f"/proc/{fields[1]}/cmdline", "rb") as fh:
                parent = fh.read()
        except OSError:
            continue
        if b"celery" not in parent:
            found.append(f"{entry} (parent {fields[1]}: {parent[:80]!r})")
    return found


def dispatch_command(broker: str, workspace: Path, report: Path, *args: str) -> list[str]:
    """The command line of a dispatched run in a pytester project (rootdir: the workspace)."""
    return [sys.executable, "-m", "pytest", *dispatch_args(broker, workspace, report), *args]


def dispatch_args(broker: str, workspace: Path, report: Path) -> list[str]:
    """The options every dispatched run of these tests has."""
    options = ["--celery-dispatch", f"--celery-broker={broker}", f"--rootdir={workspace}"]
    return [*options, f"--celery-json-report={report}", "-p", "no:cacheprovider"]


def dispatch(
    pytester: Any, workspace: Path, broker: str, name: str, *args: str, env: dict | None = None
) -> subprocess.Popen[bytes]:
    """``pytest --celery-dispatch ARGS`` in the background: its output in ``<name>.out``, its
    JSON report in ``<name>.json`` (under ``pytester.path``); ``env`` replaces the CI
    variables of this environment."""
    command = dispatch_command(broker, workspace, pytester.path / f"{name}.json", *args)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CI_", "GITHUB_"))}
    out = open(pytester.path / f"{name}.out", "wb")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        command,
        cwd=pytester.path,
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**environ, **(env or {})},
    )


def dispatch_examples(
    root: Path, broker: str, report: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """``pytest example_tests --celery-dispatch`` from ``root`` on ``broker`` (given as compose's
    ``BROKER_URL``): the finished process and the tests of its JSON report ([] without one)."""
    env = dict(os.environ, CELERY_BROKER_URL=broker, BROKER_URL=broker)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "example_tests",
            "--celery-dispatch",
            "-p",
            "no:cacheprovider",
            f"--celery-json-report={report}",
            *args,
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    tests = json.loads(report.read_text())["tests"] if report.exists() else []
    return proc, tests


def check_examples_passed(tests: list[dict[str, Any]]) -> None:
    """Every example passed: queue_a's on worker-a, queue_b's on worker-b, the rest here."""
    workers = {(t["dispatch"]["queue"], t["dispatch"]["worker"]) for t in tests}
    assert workers == {("queue_a", "worker-a"), ("queue_b", "worker-b"), (None, "local")}
    assert all(t["outcome"] == "passed" for t in tests), tests
