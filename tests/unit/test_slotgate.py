"""The slot gate: at most N sessions at once on a worker with N slots, whatever its pool size."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

from pytest_celery_dispatch.names import ENV_SLOT_GATE
from pytest_celery_dispatch.slotgate import (
    SlotGate,
    gate_of,
    make_gate_folder,
    remove_gate_folder,
)


def test_n_slots_are_taken_once_each_and_come_back_when_released(tmp_path):
    gate = SlotGate(str(tmp_path), 2)
    first, second = gate.acquire(), gate.acquire()
    assert first is not None
    assert second is not None
    assert {first.number, second.number} == {0, 1}
    assert gate.acquire() is None, "a third session on a 2-slot worker"
    first.release()
    again = gate.acquire()
    assert again is not None
    assert again.number == first.number
    assert gate.acquire() is None
    second.release()
    again.release()
    again.release()  # twice is harmless


def test_a_slot_held_by_a_process_that_dies_is_free_again(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pytest_celery_dispatch.slotgate import SlotGate\n"
            f"lease = SlotGate({str(tmp_path)!r}, 1).acquire()\n"
            "print('held' if lease else 'busy', flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        gate = SlotGate(str(tmp_path), 1)
        assert gate.acquire() is None
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        lease = gate.acquire()
        assert lease is not None, "the kernel frees the lock of a killed slot"
        lease.release()
    finally:
        holder.kill()
        holder.wait(30)


def test_a_runner_started_by_the_slot_does_not_inherit_the_lock(tmp_path):
    gate = SlotGate(str(tmp_path), 1)
    lease = gate.acquire()
    assert lease is not None
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], close_fds=False
    )
    try:
        lease.release()
        again = gate.acquire()
        assert again is not None, "the runner process kept the slot's lock"
        again.release()
    finally:
        child.kill()
        child.wait(30)


def test_the_worker_makes_one_folder_its_pool_processes_find():
    env: dict[str, str] = {}
    assert gate_of(1, env) is None, "no gate outside a started worker"
    folder = make_gate_folder("worker-a@host/../x", env)
    assert env[ENV_SLOT_GATE] == folder
    assert os.path.isdir(folder)
    assert os.path.dirname(folder) == tempfile.gettempdir(), "a hostname cannot move it"
    gate = gate_of(3, env)
    assert gate is not None
    assert gate.slots == 3
    assert gate.directory == folder
    remove_gate_folder(env)
    assert not os.path.exists(folder)
    assert gate_of(3, env) is None
