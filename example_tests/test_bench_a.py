"""Tests for bench A: they run on a worker consuming queue_a (worker-a in the demo)."""

import hashlib
import os
import time

import pytest

pytestmark = pytest.mark.queue("queue_a")


def test_runs_where_bench_a_is(dispatch_context):
    if dispatch_context.dispatched:
        assert dispatch_context.queue == "queue_a"
        assert os.environ["WORKER_ID"] == dispatch_context.worker
    else:
        assert dispatch_context.worker == "local"


def test_firmware_image_checksum():
    image = bytes(range(256)) * 64
    assert hashlib.sha256(image).hexdigest().startswith("a1f259d4")


def test_boot_sequence_timing():
    started = time.perf_counter()
    time.sleep(0.2)  # waiting on the device
    print("bench A: boot sequence acknowledged")
    assert time.perf_counter() - started >= 0.2


def test_serial_console_log(dispatch_artifacts):
    """What the bench saw comes home: the device's serial console, saved as an artifact
    (into --celery-artifacts DIR/<this test's nodeid>/console.log, whatever the outcome)."""
    console = dispatch_artifacts / "console.log"
    with console.open("w") as log:
        for line in ("U-Boot 2024.01", "Starting kernel ...", "login: "):
            log.write(f"[bench A] {line}\n")  # a real bench reads these from its UART
    assert "login:" in console.read_text()
