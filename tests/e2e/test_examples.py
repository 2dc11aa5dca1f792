"""The bundled examples, as a user runs them: example_tests, dispatched to the compose workers.

The workers are docker-compose.yml's own services started as local processes (its command and
environment; host.docker.internal read as 127.0.0.1) in a private RabbitMQ vhost, so the real
queue names queue_a / queue_b never meet anything else on the broker.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jsonschema

from tests.conftest import SCHEMA
from tests.helpers import orphaned_spare_runners

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import compose_workers  # noqa: E402


def run_examples(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "example_tests", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def check_documented_run(out: str) -> None:
    """The dispatcher's live lines and the original's sections, in the terminal without -s."""
    for text in (
        "SENT     task_a -> queue_a (task ",
        "SENT     task_b -> queue_b (task ",
        "STARTED  task_a on worker-a@",
        "STARTED  task_b on worker-b@",
        "SUCCESS  task_a from worker-a via queue_a: Completed in 0.5",
        "SUCCESS  task_b from worker-b via queue_b: Completed in 0.7",
        ": 2 succeeded, 0 failed",
        "Detailed results",
        "  task_a  Hello from Task A  worker-a  queue_a  ",
        ", slowest 0.7",
        "s = slowest task + ",
        "Results saved to: ",
    ):
        assert text in out, text


def test_examples_dispatched_to_the_compose_workers(vhost_broker, tmp_path):
    env = dict(os.environ, BROKER_URL=vhost_broker)
    env.pop("CELERY_BROKER_URL", None)
    report = tmp_path / "report.json"
    with compose_workers.running(environ=env, log_dir=tmp_path) as services:
        assert sorted(s.name for s in services) == ["worker-a", "worker-b"]
        proc = run_examples(
            "--celery-dispatch", "-v", "-rP", f"--celery-json-report={report}", env=env
        )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "guest:guest" not in out
    assert "celery-dispatch workers: queue_a: 1 worker (worker-a@" in out
    assert "[worker-a/queue_a]" in out
    assert "[worker-b/queue_b]" in out
    check_documented_run(out)
    data = json.loads(report.read_text())
    jsonschema.validate(data, SCHEMA)
    by_queue: dict[str, set[str]] = {}
    for test in data["tests"]:
        by_queue.setdefault(str(test["dispatch"]["queue"]), set()).add(test["dispatch"]["worker"])
        assert test["outcome"] == "passed", test["nodeid"]
    assert by_queue == {"queue_a": {"worker-a"}, "queue_b": {"worker-b"}, "None": {"local"}}
    assert data["dispatch"]["broker"].endswith(vhost_broker.rsplit("/", 1)[-1])
    assert ":guest@" not in json.dumps(data)


def test_examples_run_locally_without_the_flag(tmp_path):
    # No broker at all: every example still runs here, and the dispatch demo skips with a reason.
    env = dict(os.environ, CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:1//")
    before = set(ROOT.glob("dispatch_results_*.json"))
    proc = run_examples("-rs", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "10 passed, 1 skipped" in proc.stdout
    assert "dispatcher needs a broker: cannot reach the broker amqp://guest:**@127.0.0.1:1//" in (
        proc.stdout
    )
    assert set(ROOT.glob("dispatch_results_*.json")) == before  # no report without the flag


def demo_processes() -> list[str]:
    """Worker or runner processes of a demo run (queue_a / queue_b under this checkout)."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,stat,args"], capture_output=True, text=True)
    return [
        line
        for line in ps.stdout.splitlines()
        if ("-Q queue_a" in line or "-Q queue_b" in line)
        and " Z" not in line
        and of_this_checkout(line)
    ]


def of_this_checkout(ps_line: str) -> bool:
    """Whether a process runs this checkout's Python or works in it (another checkout's
    workers on the same queue names are not this demo's)."""
    if str(ROOT) in ps_line:
        return True
    try:
        return Path(os.readlink(f"/proc/{ps_line.split()[0]}/cwd")).is_relative_to(ROOT)
    except (OSError, ValueError, IndexError):
        return False


def make_demo(broker_url: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, BROKER_URL=broker_url)
    env.pop("CELERY_BROKER_URL", None)
    return subprocess.run(
        ["make", "--no-print-directory", "demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def check_demo_run(proc: subprocess.CompletedProcess) -> None:
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "started local workers worker-a (queue_a), worker-b (queue_b)" in out
    check_documented_run(out)
    assert "[demo] documented run (test_task_a_and_task_b_run_concurrently): total " in out
    assert "4 tests on worker-a via queue_a, 5 on worker-b via queue_b, exit code 0" in out
    assert "11 passed" in out
    landed = re.search(r"\[demo\] artifact of test_serial_console_log: (\S+) \(", out)
    assert landed, out
    assert "Starting kernel" in (ROOT / landed.group(1)).read_text()
    assert landed.group(1).startswith("demo-output/dispatch_results_")
    assert demo_processes() == []  # the local workers and their runners are gone
    deadline = time.monotonic() + 5  # a spare runner leaves when its worker's pipe closes
    while orphaned_spare_runners() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert orphaned_spare_runners() == []


def test_make_demo_falls_back_to_the_embedded_broker(tmp_path):
    # A closed port stands for "no RabbitMQ on this machine" without stopping the shared one.
    proc = make_demo("amqp://guest:guest@127.0.0.1:1//")
    out = proc.stdout
    fallback = "[demo] broker: embedded (.pytest_cache/celery-dispatch/broker, this machine only): "
    assert fallback in out
    assert "no RabbitMQ at amqp://guest:**@127.0.0.1:1//" in out
    assert "celery-dispatch: broker embedded, backend embedded" in out
    assert "celery-dispatch: embedded broker in " in out
    assert "guest:guest" not in out
    check_demo_run(proc)


def test_make_demo_uses_rabbitmq_when_it_answers(vhost_broker):
    proc = make_demo(vhost_broker)
    out = proc.stdout
    vhost = vhost_broker.rsplit("/", 1)[-1]
    assert f"[demo] broker: RabbitMQ at amqp://guest:**@127.0.0.1:5672/{vhost}" in out
    assert "embedded" not in out
    assert "guest:guest" not in out
    check_demo_run(proc)
