"""Bench health (issue #15), end to end with real workers.

* Two workers on a queue, one whose health test fails (the board file it checks is missing):
  it quarantines itself before it runs any test of the run, every test runs on the other and
  passes, ``celery-dispatch status`` shows the quarantine and its reason; after
  ``celery-dispatch release`` (and the file restored) it takes work again.
* A worker whose runner crashes outside a test three sessions in a row quarantines itself; its
  work is re-sent to the queue at once (within the first retry's backoff and a poll, far
  within the silence limit) and runs on the healthy worker.
* Both workers quarantined: the queue's tests fail at once naming each worker's reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from pytest_celery_dispatch.embedded import EMBEDDED
from pytest_celery_dispatch.healthrules import DEFAULT_QUARANTINE_AFTER
from pytest_celery_dispatch.retry import SILENCE_LIMIT, backoff
from pytest_celery_dispatch.session import POLL_INTERVAL
from tests.helpers import BROKER, WorkerProcess, dispatch

WORK = """
import os
import time
import pytest

GATE = {gate!r}

@pytest.mark.queue({queue!r})
@pytest.mark.parametrize("n", range({count}))
def test_work(n):
    deadline = time.monotonic() + 120
    while GATE and not os.path.exists(GATE) and time.monotonic() < deadline:
        time.sleep(0.05)  # held until the e2e test opens the gate
    time.sleep({sleep})
"""

HEALTH = """
import os

def test_uart():
    path = os.environ["BOARD_FILE"]
    assert os.path.exists(path), "board file " + path + " is missing"
"""

#: A runner of a worker with CRASHY set dies before each test starts: outside any test.
CRASHY_CONFTEST = """
import os
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if os.environ.get("CRASHY"):
        os._exit(3)
"""


def finish(pytester, proc, name: str, limit: float = 120) -> tuple[int, str, dict]:
    try:
        code = proc.wait(limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{name} still running after {limit}s") from None
    out = (pytester.path / f"{name}.out").read_text()
    return code, out, json.loads((pytester.path / f"{name}.json").read_text())


def cli(broker: str, workspace: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_celery_dispatch.cli", *args, "--broker", broker],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DISPATCH_WORKSPACE": str(workspace)},
        check=False,
    )


def worker_entry(view: dict, queue: str, name: str) -> dict:
    found = [w for w in view["queues"][queue]["workers"] if w["name"] == name]
    assert found, f"{name} not in celery-dispatch status: {view}"
    return found[0]


def health_project(
    pytester, workspace: Path, queue: str, count: int, sleep: float, gate: str | None = None
) -> str:
    """The run's tests (each held until the file ``gate`` exists, when given) and its health
    test; the health test's nodeid (rootdir: workspace)."""
    source = WORK.format(queue=queue, count=count, sleep=sleep, gate=gate)
    pytester.makepyfile(test_work=source)
    (pytester.path / "health").mkdir()
    (pytester.path / "health" / "test_board.py").write_text(HEALTH)
    return f"{pytester.path.relative_to(workspace)}/health/test_board.py::test_uart"


@pytest.mark.parametrize("broker", [BROKER, EMBEDDED], ids=["rabbitmq", "embedded"])
def test_a_worker_whose_health_test_fails_quarantines_itself_and_is_released(
    pytester, worker_factory, workspace, broker
):
    board_a, board_b = pytester.path / "a.board", pytester.path / "b.board"
    board_b.write_text("ok")
    a = worker_factory(worker_id="worker-a", broker=broker, extra_env={"BOARD_FILE": str(board_a)})
    b = worker_factory(
        queue=a.queue, worker_id="worker-b", broker=broker, extra_env={"BOARD_FILE": str(board_b)}
    )
    # The run's tests wait until worker-a has quarantined itself: on a busy machine worker-b
    # could otherwise run them all before worker-a is given a session of the run.
    gate = pytester.path / "gate"
    health = health_project(pytester, workspace, a.queue, count=10, sleep=0.3, gate=str(gate))
    args = ("-o", f"celery_dispatch_health={health}", "test_work.py")

    one = dispatch(pytester, workspace, broker, "one", *args)
    deadline = time.monotonic() + 120  # a guard against a hang, not a measure
    while quarantined_at(a.log_path) is None:
        assert one.poll() is None, (pytester.path / "one.out").read_text()
        assert time.monotonic() < deadline, "worker-a never quarantined itself"
        time.sleep(0.1)
    gate.write_text("open")
    code, out, report = finish(pytester, one, "one")
    assert code == 0, out
    assert "10 passed" in out
    assert {t["dispatch"]["worker"] for t in report["tests"]} == {"worker-b"}, out
    reason = f"health test {health} failed: AssertionError: board file {board_a} is missing"
    assert f"worker-a quarantined itself: {reason}" in out

    view = json.loads(cli(broker, workspace, "status", "--json").stdout)
    assert reason in worker_entry(view, a.queue, "worker-a")["quarantine"]["reason"]
    assert worker_entry(view, a.queue, "worker-b")["quarantine"] is None
    table = cli(broker, workspace, "status").stdout
    assert "QUARANTINED" in table, table
    assert reason in table, table

    board_a.write_text("ok")  # the board is plugged in again
    released = cli(broker, workspace, "release", "worker-a")
    assert released.returncode == 0, released.stderr
    assert "worker-a released" in released.stdout
    view = json.loads(cli(broker, workspace, "status", "--json").stdout)
    assert worker_entry(view, a.queue, "worker-a")["quarantine"] is None

    b.stop()  # only worker-a left: the run's tests must all run there
    code, out, report = finish(pytester, dispatch(pytester, workspace, broker, "two", *args), "two")
    assert code == 0, out
    assert {t["dispatch"]["worker"] for t in report["tests"]} == {"worker-a"}, out


def quarantined_at(log: Path) -> float | None:
    """When the worker's JSON log says it quarantined itself (wall time)."""
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if str(entry.get("message", "")).startswith("quarantined: "):
            return datetime.fromisoformat(entry["time"]).timestamp()
    return None


@pytest.mark.parametrize("broker", [BROKER, EMBEDDED], ids=["rabbitmq", "embedded"])
def test_a_worker_crashing_outside_tests_three_sessions_in_a_row_quarantines_itself(
    pytester, worker_factory, workspace, broker
):
    pytester.makeconftest(CRASHY_CONFTEST)
    crashy = worker_factory(worker_id="worker-c", extra_env={"CRASHY": "1"}, broker=broker)
    # 16 s of work in the third run: long enough for worker-c to get its session after
    # worker-d, busy with the other one, has sent it back a few times (on the embedded broker
    # the worker that sends a session back may take it again, and again, 1 s apart).
    pytester.makepyfile(test_work=WORK.format(queue=crashy.queue, count=16, sleep=1.0, gate=None))
    # Alone on the queue, worker-c takes each run's only session: it crashes, its tests fail.
    for run in range(DEFAULT_QUARANTINE_AFTER - 1):
        proc = dispatch(pytester, workspace, broker, f"prime{run}", "test_work.py")
        code, out, _ = finish(pytester, proc, f"prime{run}")
        assert code == 1, out
        assert "crashed outside a test" in out or "before running any test" in out, out
        assert quarantined_at(crashy.log_path) is None, "quarantined before its third session"

    worker_factory(queue=crashy.queue, worker_id="worker-d", broker=broker)
    events = pytester.path / "events.jsonl"
    proc = dispatch(
        pytester, workspace, broker, "third", f"--celery-event-log={events}", "test_work.py"
    )
    code, out, report = finish(pytester, proc, "third")
    at = quarantined_at(crashy.log_path)
    assert at is not None, f"worker-c did not quarantine itself:\n{out}"
    assert code == 0, out
    assert "16 passed" in out
    assert f"{DEFAULT_QUARANTINE_AFTER} sessions in a row ended in an infrastructure failure" in out
    moved = [t for t in report["tests"] if t["dispatch"]["attempts"] == 2]
    assert moved, "worker-c's chunk was sent again"
    assert {t["dispatch"]["worker"] for t in moved} == {"worker-d"}
    # Re-sent at once, not after the silence limit: the event comes at the next turn of the
    # controller's loop, the chunk goes out after the first retry's backoff, at a poll. The
    # healthy worker takes it from the work queue behind the work queued before it.
    deadline = backoff(2) + 2 * POLL_INTERVAL
    assert deadline <= 5.0 < SILENCE_LIMIT
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    resent = [e["ts"] for e in lines if e["event"] == "sent" and e.get("attempt") == 2]
    assert resent, lines
    assert min(resent) - at <= deadline, (min(resent) - at, out)


@pytest.mark.parametrize("broker", [BROKER, EMBEDDED], ids=["rabbitmq", "embedded"])
def test_a_queue_whose_workers_are_all_quarantined_fails_at_once_naming_each_reason(
    pytester, worker_factory, workspace, broker
):
    missing = pytester.path / "missing.board"
    env = {"BOARD_FILE": str(missing)}
    health = f"{pytester.path.relative_to(workspace)}/health/test_board.py::test_uart"
    env["DISPATCH_HEALTH"] = health  # the worker's own health tests (no ini in this run)
    a = worker_factory(worker_id="worker-a", extra_env=env, broker=broker)
    worker_factory(queue=a.queue, worker_id="worker-b", extra_env=env, broker=broker)
    health_project(pytester, workspace, a.queue, count=6, sleep=0.1)

    proc = dispatch(pytester, workspace, broker, "all", "test_work.py")
    code, out, report = finish(pytester, proc, "all", limit=60)
    assert code == 1, out
    reason = f"health test {health} failed: AssertionError: board file {missing} is missing"
    message = f"{a.queue}: every worker is quarantined (worker-a: {reason}; worker-b: {reason})"
    assert "6 failed" in out, out
    assert message in out
    for test in report["tests"]:
        assert test["outcome"] == "failed"
        assert message in json.dumps(test), test


def test_a_bad_health_setting_stops_the_worker_at_start_naming_it(workspace, tmp_path):
    worker = WorkerProcess(
        "cdtest-bad-health",
        "worker-bad",
        workspace,
        tmp_path,
        broker=EMBEDDED,
        extra_env={"DISPATCH_HEALTH_EVERY": "soon"},
    )
    with pytest.raises(RuntimeError) as info:
        worker.start()
    assert (
        "celery-dispatch worker: invalid value 'soon' for env DISPATCH_HEALTH_EVERY: give "
        "minutes (a number >= 0, e.g. 10)"
    ) in str(info.value)
