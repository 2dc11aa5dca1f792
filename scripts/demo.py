"""`make demo`: the documented run, end to end, on this machine.

1. picks the broker: RabbitMQ when it answers (``BROKER_URL``, default localhost:5672), else
   the embedded broker (a folder, nothing to install), and says which in one line;
2. runs ``pytest --celery-dispatch --celery-local-workers auto example_tests -v``: pytest starts
   worker-a (queue_a) and worker-b (queue_b) with the contract's worker command, runs the
   examples on them (summary, JSON report, JUnit XML, HTML timeline, event log) and stops them;
3. checks the JSON report: every queue_a test ran on worker-a, every queue_b test on worker-b;
   prints where each test artifact landed (the bench's console log, beside the report);
4. exits with pytest's exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kombu import Connection
from kombu.utils.url import maybe_sanitize_url

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo-output"
EXPECTED = {"queue_a": "worker-a", "queue_b": "worker-b"}


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def rabbitmq_answers(broker: str) -> str | None:
    """None when the broker answers, else why not (one line)."""
    try:
        with Connection(broker, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=0, timeout=2)
    except Exception as exc:
        return (str(exc) or type(exc).__name__).splitlines()[0]
    return None


def main() -> int:
    rabbitmq = os.environ.get("BROKER_URL") or "amqp://guest:guest@127.0.0.1:5672//"
    why = rabbitmq_answers(rabbitmq)
    if why is None:
        broker = rabbitmq
        say(f"broker: RabbitMQ at {maybe_sanitize_url(rabbitmq)}")
    else:
        broker = "embedded"
        say(
            f"broker: embedded (.pytest_cache/celery-dispatch/broker, this machine only): "
            f"no RabbitMQ at {maybe_sanitize_url(rabbitmq)} ({why}); start one "
            "(rabbitmq-server -detached) or set BROKER_URL to use it"
        )

    OUT.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    report = OUT / f"dispatch_results_{stamp}.json"
    junit = OUT / "junit.xml"
    timeline = OUT / "timeline.html"
    events = OUT / "events.jsonl"
    events.unlink(missing_ok=True)  # the event log appends; one run per file here
    env = dict(os.environ)
    env.pop("CELERY_BROKER_URL", None)  # --celery-broker below says it all
    command = [
        sys.executable,
        "-m",
        "pytest",
        "--celery-dispatch",
        "--celery-local-workers=auto",
        "example_tests",
        "-v",
        f"--celery-broker={broker}",
        f"--celery-json-report={report}",
        f"--junitxml={junit}",
        f"--celery-timeline={timeline}",
        f"--celery-event-log={events}",
    ]
    say("running: pytest " + " ".join(command[3:]).replace(broker, maybe_sanitize_url(broker)))
    started = time.perf_counter()
    code = subprocess.call(command, cwd=ROOT, env=env)
    wall = time.perf_counter() - started
    say(f"pytest exited {code} after {wall:.2f}s; its local workers are stopped")

    data = json.loads(report.read_text())
    wrong = [
        f"{t['nodeid']} ran on {t['dispatch']['worker']} via {t['dispatch']['queue']}"
        for t in data["tests"]
        if t["dispatch"]["queue"] in EXPECTED
        and t["dispatch"]["worker"] != EXPECTED[t["dispatch"]["queue"]]
    ]
    per_queue = {q: sum(1 for t in data["tests"] if t["dispatch"]["queue"] == q) for q in EXPECTED}
    if wrong or not all(per_queue.values()):
        say("JSON report check FAILED: " + ("; ".join(wrong) or f"tests per queue {per_queue}"))
        return code or 1
    say(
        f"JSON report {report.relative_to(ROOT)}: {per_queue['queue_a']} tests on worker-a via "
        f"queue_a, {per_queue['queue_b']} on worker-b via queue_b, exit code {data['exitcode']}"
    )
    for test in data["tests"]:
        for run in test.get("dispatcher", []):
            say(
                f"documented run ({test['nodeid'].rsplit('::', 1)[-1]}): total "
                f"{run['total_time']:.3f}s, slower task {run['metrics']['slowest']:.3f}s, "
                f"over it by {run['overhead'] * 1000:.0f}ms; "
                f"{run['successes']} succeeded, {run['failures']} failed"
            )
    for test in data["tests"]:
        for artifact in test.get("artifacts", []):
            landed = (report.parent / artifact["path"]).resolve().relative_to(ROOT)
            say(
                f"artifact of {test['nodeid'].rsplit('::', 1)[-1]}: {landed} "
                f"({artifact['bytes']} bytes, sha256 {artifact['sha256'][:12]})"
            )
    say(f"JUnit XML {junit.relative_to(ROOT)}")
    say(f"timeline {timeline.relative_to(ROOT)} (open it in a browser)")
    say(f"event log {events.relative_to(ROOT)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
