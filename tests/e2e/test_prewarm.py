"""A run like the last one starts its zygote on the worker while the controller collects."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pytest_celery_dispatch import transport
from pytest_celery_dispatch.embedded import EMBEDDED
from pytest_celery_dispatch.lab import LAB_INTERVAL, LAB_STALE
from pytest_celery_dispatch.names import ENV_ZYGOTE, PREWARM_TASK
from pytest_celery_dispatch.prewarmplan import PREWARM_EXPIRES
from pytest_celery_dispatch.serialization import PROTOCOL
from pytest_celery_dispatch.zygote import ZYGOTE_START_WAIT
from tests.helpers import BROKER, delete_queues, dispatch_command

NO_CACHE = ("-p", "no:cacheprovider")


def conftest_source(imports: Path, seen: Path) -> str:
    """On a worker, importing the conftest appends the importing process's pid to ``imports``
    (a zygote imports it once and collects; its runners are forked from it). In the
    controller, the end of collection waits until ``imports`` has ``WAIT_FOR_IMPORTS`` lines,
    and writes how many it had to ``seen``: whether a worker had imported the run's conftest
    before the controller finished collecting. The wait is a guard against a hang only: a
    prewarm not taken within PREWARM_EXPIRES is dropped."""
    return f"""
        import os
        import time

        if "DISPATCH_WORKER_ID" in os.environ:
            with open({str(imports)!r}, "a") as fh:
                fh.write(f"{{os.getpid()}}\\n")

        def _imports():
            try:
                with open({str(imports)!r}) as fh:
                    return fh.read().split()
            except OSError:
                return []

        def pytest_collection_finish(session):
            if "DISPATCH_WORKER_ID" in os.environ:
                return
            wanted = int(os.environ.get("WAIT_FOR_IMPORTS", "0"))
            deadline = time.monotonic() + {PREWARM_EXPIRES}
            while len(_imports()) < wanted and time.monotonic() < deadline:
                time.sleep(0.05)
            with open({str(seen)!r}, "a") as fh:
                fh.write(f"{{len(_imports())}}\\n")
        """


def module_source(queue: str, runs: Path, count: int) -> str:
    return f"""
        import os
        import pytest

        pytestmark = pytest.mark.queue({queue!r})

        @pytest.mark.parametrize("n", range({count}))
        def test_n(n):
            with open({str(runs)!r}, "a") as fh:
                fh.write(f"{{os.getppid()}}\\n")
        """


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a killed child its parent has not reaped yet does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.parametrize("broker", [BROKER, EMBEDDED], ids=["rabbitmq", "embedded"])
def test_a_run_like_the_last_forks_from_a_zygote_started_while_it_collected(
    pytester, worker_factory, workspace, broker
):
    worker = worker_factory(worker_id="worker-prewarm", broker=broker)
    imports, seen, runs = (pytester.path / n for n in ("imports.log", "seen.log", "runs.log"))
    pytester.makeconftest(conftest_source(imports, seen))
    pytester.makepyfile(test_one=module_source(worker.queue, runs, 5))
    # pytest's cache is where a run leaves its plan for the next: this test's own. Each run
    # names its own JSON report, as a CI job would: the same selection all the same.
    options = ["-o", f"cache_dir={pytester.path / 'cache'}", "--celery-ship=off"]
    numbers = iter(range(1, 10))

    def run(wait_for: int, expect: int) -> list[str]:
        report = pytester.path / f"report-{next(numbers)}.json"
        command = [c for c in dispatch_command(broker, workspace, report) if c not in NO_CACHE]
        env = {**os.environ, "WAIT_FOR_IMPORTS": str(wait_for)}
        done = subprocess.run(
            [*command, *options],
            cwd=pytester.path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        outcomes = [t["outcome"] for t in json.loads(report.read_text())["tests"]]
        assert outcomes == ["passed"] * expect, done.stdout
        ppids = runs.read_text().split()
        runs.unlink()
        assert len(ppids) == expect, ppids
        return ppids

    # The first run has no plan to go by: its prewarm goes once it has collected.
    first = run(wait_for=0, expect=5)
    assert seen.read_text().split() == ["0"]
    assert set(first) == {imports.read_text().split()[0]}
    # The plan, and the queues of the lab's line, are kept under the run's selection (its
    # paths and selection options), not its report's name: the next run is like this one.
    stored = pytester.path / "cache" / "v" / "celery-dispatch"
    plan, line = (json.loads((stored / name).read_text()) for name in ("plan", "line"))
    assert plan["args"] == line["args"]
    assert not any("report" in arg for arg in plan["args"]), plan["args"]
    assert line["queues"] == [worker.queue]

    # The second, with the same selection and tests: the worker imported the conftest (its
    # zygote) before the controller finished collecting, and every test ran in a runner forked
    # from that zygote; nothing else on the worker collected.
    second = run(wait_for=2, expect=5)
    assert seen.read_text().split() == ["0", "2"]
    importers = imports.read_text().split()
    assert len(importers) == 2, importers
    assert set(second) == {importers[1]}

    # The third, with one test more: the zygote started ahead collected the last run's tests,
    # so the slot starts one of its own, and the one started ahead is killed.
    pytester.makepyfile(test_one=module_source(worker.queue, runs, 6))
    third = run(wait_for=3, expect=6)
    assert seen.read_text().split() == ["0", "2", "3"]
    importers = imports.read_text().split()
    assert len(importers) == 4, importers
    prewarmed, own = importers[2], importers[3]
    assert set(third) == {own}
    assert not alive(int(prewarmed))


CANCEL = """
        import signal

        _wait_for_imports = pytest_collection_finish

        def pytest_collection_finish(session):
            _wait_for_imports(session)
            if "DISPATCH_WORKER_ID" not in os.environ and os.environ.get("CANCEL"):
                os.kill(os.getpid(), getattr(signal, os.environ["CANCEL"]))
        """

SLOW_ON_WORKER = """
        import time

        if "DISPATCH_WORKER_ID" in os.environ and os.path.exists({flag!r}):
            time.sleep(600)  # a long collection, on the worker only
        """


@pytest.mark.parametrize(
    ("broker", "cancel", "pool"),
    [
        (BROKER, "SIGINT", None),
        (BROKER, "SIGKILL", None),
        (EMBEDDED, "SIGKILL", None),
        (BROKER, "SIGKILL", "solo"),
    ],
    ids=["rabbitmq-ctrl-c", "rabbitmq-killed", "embedded-killed", "rabbitmq-killed-solo"],
)
def test_a_run_cancelled_while_it_collects_leaves_no_prewarmed_zygote_collecting(
    pytester, worker_factory, workspace, broker, cancel, pool
):
    """A run like the last is cancelled (Ctrl-C, or killed: a CI job cancelled) while it
    collects, after its prewarm started the zygote on the worker and before any slot of it
    reached the worker. The zygote, still collecting, is killed once the run is gone from the
    lab board (said gone, or not renewed for LAB_STALE), not at the prewarm's limit (the run's
    ``--celery-timeout``, here 300 s): the bench is the next run's. A solo worker runs the
    prewarm in its own process (not a pool process whose parent is the worker): the same."""
    worker = worker_factory(worker_id="worker-prewarm-cancel", broker=broker, pool=pool)
    imports, seen, runs = (pytester.path / n for n in ("imports.log", "seen.log", "runs.log"))
    flag = pytester.path / "slow-on-worker"
    pytester.makeconftest(conftest_source(imports, seen) + CANCEL)
    module = module_source(worker.queue, runs, 3) + SLOW_ON_WORKER.format(flag=str(flag))
    pytester.makepyfile(test_one=module)
    options = ["-o", f"cache_dir={pytester.path / 'cache'}", "--celery-ship=off"]
    options.append("--celery-timeout=300")
    report = pytester.path / "report.json"
    command = [c for c in dispatch_command(broker, workspace, report) if c not in NO_CACHE]
    first = subprocess.run(
        [*command, *options], cwd=pytester.path, capture_output=True, text=True, timeout=180
    )
    assert first.returncode == 0, first.stdout + first.stderr
    flag.write_text("")
    env = {**os.environ, "WAIT_FOR_IMPORTS": "2", "CANCEL": cancel}
    second = subprocess.run(
        [*command, *options], cwd=pytester.path, env=env, capture_output=True, timeout=180
    )
    importers = imports.read_text().split()
    zygote = int(importers[-1])
    try:
        assert second.returncode != 0
        assert seen.read_text().split() == ["0", "2"]  # the zygote had started: cancelled
        assert len(importers) == 2, importers
        deadline = time.monotonic() + 5 * (LAB_STALE + LAB_INTERVAL)
        while alive(zygote) and time.monotonic() < deadline:
            time.sleep(LAB_INTERVAL)
        assert not alive(zygote), worker.log_path.read_text()[-3000:]
        said = worker.log_path.read_text()
        assert said.count("prewarm: zygote killed while it collected: its run is gone") == 1
    finally:
        with contextlib.suppress(OSError):
            os.killpg(zygote, signal.SIGKILL)


def test_a_run_without_a_plan_prewarms_its_workers_once_it_has_collected(
    pytester, worker_factory, workspace
):
    """No cache (a CI job): the zygote is asked for as soon as the controller has collected
    and found the queue's workers, before its line's wait, its chunks and its slots; every
    test runs in a runner forked from that one zygote."""
    worker = worker_factory(worker_id="worker-prewarm-nocache")
    imports, seen, runs = (pytester.path / n for n in ("imports.log", "seen.log", "runs.log"))
    pytester.makeconftest(conftest_source(imports, seen))
    pytester.makepyfile(test_one=module_source(worker.queue, runs, 5))
    report = pytester.path / "report.json"
    command = dispatch_command(BROKER, workspace, report, "--celery-ship=off")
    assert "no:cacheprovider" in command
    done = subprocess.run(command, cwd=pytester.path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = json.loads(report.read_text())["dispatch"]["run_id"]
    said = [
        json.loads(line)
        for line in worker.log_path.read_text().splitlines()
        if line.startswith("{") and "prewarm: " in line
    ]
    assert [(r["message"], r.get("run_id")) for r in said] == [
        ("prewarm: zygote started for 5 tests", run_id)
    ]
    importers = imports.read_text().split()
    assert len(importers) == 1, importers
    assert set(runs.read_text().split()) == {importers[0]}


SLOW_ZYGOTE = """
import os
import time

if os.environ.get({env!r}):
    time.sleep({seconds!r})  # a zygote slow to listen, as on a busy machine
"""


def test_a_plain_task_does_not_wait_for_a_prewarmed_zygote_to_start(
    pytester, worker_factory, workspace
):
    """A worker with one process: a prewarm, then a plain task (the ``dispatcher`` fixture's
    task_a). The prewarm's zygote takes ZYGOTE_START_WAIT / 2 to listen; the plain task is done
    before it listens (the worker log's order), not after the prewarm held the process that
    long (the demo's task_b waited 0.5 s behind a prewarm on a busy machine)."""
    site = pytester.mkdir("site")
    (site / "sitecustomize.py").write_text(
        SLOW_ZYGOTE.format(env=ENV_ZYGOTE, seconds=ZYGOTE_START_WAIT / 2)
    )
    env = {
        "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p),
        "DISPATCH_SPARE_RUNNER": "0",  # the zygote is a new process, not an activated spare
        "DISPATCH_PLAIN_TASK_PROCESS": "0",  # one process: the prewarm's and the task's
    }
    worker = worker_factory(worker_id="worker-prewarm-plain", concurrency=1, extra_env=env)
    test_file = pytester.makepyfile(test_one="def test_one():\n    pass\n")
    relative = test_file.relative_to(workspace).as_posix()
    payload = {
        "protocol": PROTOCOL,
        "run_id": uuid.uuid4().hex,
        "queue": worker.queue,
        "nodeids": [f"{relative}::test_one"],
        "files": {relative: hashlib.sha256(test_file.read_bytes()).hexdigest()},
        "timeout": 30,
        "pytest_args": [],
    }
    app = transport.make_app(BROKER, "disabled")
    route = {"queue": worker.queue, "routing_key": worker.queue, "serializer": "json"}
    app.send_task(PREWARM_TASK, args=[payload], **route)
    app.send_task("pytest_celery_dispatch.task_a", kwargs={"duration": 0.0}, **route)
    done = "pytest_celery_dispatch.task_a done"
    started = "prewarm: zygote started for 1 tests"
    deadline = time.monotonic() + 30 * ZYGOTE_START_WAIT  # a guard against a hang only
    while time.monotonic() < deadline:
        said = [json.loads(line)["message"] for line in worker_log(worker)]
        if done in said and started in said:
            break
        time.sleep(0.1)
    assert done in said, said
    assert started in said, said
    assert said.index(done) < said.index(started), said


def worker_log(worker) -> list[str]:
    return [ln for ln in worker.log_path.read_text().splitlines() if ln.startswith("{")]


SENDER = """
import logging, sys, uuid
from pytest_celery_dispatch import transport
from pytest_celery_dispatch.prewarmplan import PLAN_KEY, start_prewarm

class Payloads:
    stream = False
    def for_slot(self, slot_id, queue, nodeids):
        return {"session_id": slot_id, "queue": queue, "nodeids": nodeids}

class Cache:
    def get(self, key, default):
        return {"args": [], "queues": {QUEUE: ["t.py::a"]}, "workers": {QUEUE: 1}}

app = transport.make_app(BROKER, "disabled")
transport.load_sending(app)
modules, loggers = set(sys.modules), set(logging.Logger.manager.loggerDict)
thread = start_prewarm(app, Cache(), [], Payloads(), "auto")
thread.join(30)
assert not thread.is_alive()
print(sorted(set(sys.modules) - modules), sorted(set(logging.Logger.manager.loggerDict) - loggers))
"""


def test_the_thread_that_sends_prewarms_imports_nothing_while_pytest_collects(queues):
    """pytest's logging plugin iterates the loggers as collection starts: a logger an import
    registers in the sending thread then was an INTERNALERROR ("dictionary changed size
    during iteration"), seen in the bench. So the sending thread must import nothing."""
    queue = f"{queues.a}-prewarm-imports"
    program = SENDER.replace("BROKER", repr(BROKER)).replace("QUEUE", repr(queue))
    try:
        done = subprocess.run(
            [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
        )
    finally:
        delete_queues(queue)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] []"
