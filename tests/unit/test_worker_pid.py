"""What names a worker on its machine: its main process, noted at start-up, from whichever
process its tasks run in (a prefork pool process, or the worker itself under solo/threads)."""

from __future__ import annotations

import os
import sys

import pytest

from pytest_celery_dispatch.names import ENV_WORKER_PID
from pytest_celery_dispatch.procutil import worker_pid
from pytest_celery_dispatch.runnerspec import RunnerSpec
from pytest_celery_dispatch.zygote import zygote_path


def test_the_noted_worker_is_the_worker_whichever_process_asks():
    assert worker_pid({ENV_WORKER_PID: "4242"}) == 4242
    assert worker_pid({ENV_WORKER_PID: str(os.getpid())}) == os.getpid()  # solo: itself


def test_without_a_note_the_parent_is_the_worker():
    assert worker_pid({}) == os.getppid()
    assert worker_pid({ENV_WORKER_PID: "not a pid"}) == os.getppid()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="zygotes are Linux-only")
def test_two_solo_workers_started_from_one_shell_have_zygotes_of_their_own(monkeypatch, tmp_path):
    """Two solo workers of one queue, children of the same shell: the same run's slots on each
    fork from their own worker's zygote, not from one zygote named by the shell's pid."""
    spec = RunnerSpec(
        workspace=str(tmp_path),
        nodeids=["t.py::a"],
        timeout=10,
        pytest_args=[],
        env={},
        key="run/queue",
    )
    paths = set()
    for pid in ("1001", "1002"):
        monkeypatch.setenv(ENV_WORKER_PID, pid)
        paths.add(zygote_path(spec))
    assert None not in paths
    assert len(paths) == 2
