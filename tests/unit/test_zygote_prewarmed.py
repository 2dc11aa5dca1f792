"""A zygote started ahead of its run's slots (a prewarm): which one a slot may kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pytest_celery_dispatch.zygote import PREWARMED, Prewarmed, drop_prewarmed, prewarmed_in


def test_the_prewarmed_zygote_of_the_slot_s_run_and_queue_is_known_by_its_folder(tmp_path):
    (tmp_path / PREWARMED).write_text(json.dumps({"key": "run.q", "pid": 4242}))
    found = prewarmed_in(str(tmp_path), "run.q")
    assert isinstance(found, Prewarmed)
    assert found.pid == 4242


@pytest.mark.parametrize(
    "content",
    [None, "not json", json.dumps([1]), json.dumps({"key": "other.q", "pid": 4242})]
    + [json.dumps({"key": "run.q", "pid": p}) for p in (0, -1, "4242", None)],
    ids=["none", "garbage", "a list", "another run", "pid 0", "pid -1", "a string", "no pid"],
)
def test_no_prewarmed_zygote_without_a_valid_record_of_this_run_and_queue(tmp_path, content):
    """A slot's own zygote has no record; a wrong pid is never signalled (0 and -1 would be
    our own process group, or every process)."""
    if content is not None:
        (tmp_path / PREWARMED).write_text(content)
    assert prewarmed_in(str(tmp_path), "run.q") is None


def test_a_prewarmed_zygote_runs_until_killed_and_counts_as_ended_once_a_zombie():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        zygote = Prewarmed(proc.pid)
        assert zygote.poll() is None
        zygote.kill()
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped: a zombie
        assert zygote.poll() == 0
    finally:
        proc.kill()
        proc.wait()
    assert Prewarmed(proc.pid).poll() == 0  # reaped: gone


LISTENER = """
import socket, sys, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(sys.argv[1])
sock.listen(8)
print("listening", flush=True)
time.sleep(60)
"""


def _prewarmed_zygote(top, name: str, worker: int) -> subprocess.Popen:
    """A stand-in zygote: a process in its own session listening on ``<top>/<name>/sock``, its
    folder's record saying which worker prewarmed it for run and queue ``run.q``."""
    folder = top / name
    folder.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", LISTENER, str(folder / "sock")],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"listening\n"
    record = {"key": "run.q", "pid": proc.pid, "worker": worker}
    (folder / PREWARMED).write_text(json.dumps(record))
    return proc


def test_a_worker_drops_only_the_zygotes_it_prewarmed_not_another_worker_s(tmp_path):
    """Two workers of one queue on one machine share the zygotes' top folder: a slot of one
    that starts its own zygote for the run must not kill the other's (its slots fork from it,
    and its runners would die with it: seen as every test of that worker crashing)."""
    mine = _prewarmed_zygote(tmp_path, "z-mine", os.getppid())
    other = _prewarmed_zygote(tmp_path, "z-other", os.getppid() + 1)
    try:
        drop_prewarmed(str(tmp_path), "run.q")
        assert mine.wait(10) != 0
        assert not (tmp_path / "z-mine").exists()
        assert other.poll() is None
        assert (tmp_path / "z-other" / PREWARMED).exists()
    finally:
        for proc in (mine, other):
            proc.kill()
            proc.wait()
