"""--celery-local-workers: pytest starts one worker per queue and leaves nothing behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid

import pytest

from pytest_celery_dispatch.embedded import EMBEDDED
from tests.helpers import BROKER, delete_queues, orphaned_spare_runners


def processes_mentioning(text: str) -> list[str]:
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,stat,args"], capture_output=True, text=True)
    return [
        line
        for line in ps.stdout.splitlines()
        if text in line and " Z" not in line and "ps -eo" not in line
    ]


def no_spare_left() -> None:
    deadline = time.monotonic() + 5  # a spare runner leaves when its worker's pipe closes
    while orphaned_spare_runners() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert orphaned_spare_runners() == []


@pytest.fixture
def private_queues():
    tag = uuid.uuid4().hex[:8]
    names = (f"cdlocal_{tag}_a", f"cdlocal_{tag}_b")
    yield names
    delete_queues(*names)


TRANSPORTS = pytest.mark.parametrize("broker", [BROKER, EMBEDDED], ids=["rabbitmq", "embedded"])


@TRANSPORTS
def test_auto_starts_a_worker_per_needed_queue_and_stops_it(
    pytester, workspace, private_queues, broker
):
    qa, qb = private_queues
    pytester.makepyfile(
        test_local=f"""
        import os
        import pytest

        @pytest.mark.queue({qa!r})
        def test_a():
            assert os.environ["WORKER_ID"] == "worker-{qa}"

        @pytest.mark.queue({qb!r})
        def test_b():
            assert os.environ["WORKER_ID"] == "worker-{qb}"
        """
    )
    result = pytester.runpytest_subprocess(
        "--celery-dispatch",
        f"--celery-broker={broker}",
        f"--rootdir={workspace}",
        "--celery-local-workers=auto",
        f"--celery-json-report={pytester.path / 'r.json'}",
        timeout=120,
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([f"*started local workers worker-{qa} ({qa}), worker-{qb} ({qb})*"])
    assert processes_mentioning(qa) == []
    assert processes_mentioning(qb) == []
    no_spare_left()


@TRANSPORTS
def test_listed_queues_and_ctrl_c_leave_no_process_behind(
    pytester, workspace, private_queues, broker
):
    qa, _ = private_queues
    pytester.makepyfile(
        test_slow=f"""
        import time
        import pytest

        @pytest.mark.queue({qa!r})
        @pytest.mark.parametrize("n", range(3))
        def test_slow(n):
            time.sleep(30)
        """
    )
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "pytest", "--celery-dispatch", f"--celery-broker={broker}",
            f"--rootdir={workspace}", f"--celery-local-workers={qa}",
            f"--celery-json-report={pytester.path / 'r.json'}", "-p", "no:cacheprovider",
        ],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not processes_mentioning(f"-Q {qa}"):
            time.sleep(0.2)
        if not processes_mentioning(f"-Q {qa}"):
            proc.kill()
            pytest.fail(f"no local worker runs; controller said:\n{proc.communicate()[0]}")
        time.sleep(4)  # its sessions start their tests
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, out
    time.sleep(1)
    assert processes_mentioning(f"-Q {qa}") == []
    no_spare_left()
