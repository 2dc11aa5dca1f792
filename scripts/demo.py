"""`make demo`: the documented run, end to end, on this machine.

1. checks that RabbitMQ answers (and says plainly how to start it when it does not);
2. starts worker-a (queue_a) and worker-b (queue_b) as local processes, with the command and
   environment that docker-compose.yml gives the containers;
3. runs ``pytest --celery-dispatch example_tests -v`` (summary, JSON report, JUnit XML, HTML
   timeline, event log);
4. checks the JSON report: every queue_a test ran on worker-a, every queue_b test on worker-b;
5. stops the workers and exits with pytest's exit code.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compose_workers

ROOT = compose_workers.ROOT
OUT = ROOT / "demo-output"
EXPECTED = {"queue_a": "worker-a", "queue_b": "worker-b"}


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def main() -> int:
    broker = os.environ.get("BROKER_URL") or "amqp://guest:guest@127.0.0.1:5672//"
    try:
        with Connection(broker, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=0)
    except Exception as exc:
        say(f"RabbitMQ is not reachable at {maybe_sanitize_url(broker)}: {exc}")
        say("start it:  rabbitmq-server -detached   (or: docker compose --profile broker up -d)")
        say("or point BROKER_URL at yours, e.g.  BROKER_URL=amqp://user:pw@host:5672// make demo")
        return 2

    OUT.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    report = OUT / f"dispatch_results_{stamp}.json"
    junit = OUT / "junit.xml"
    timeline = OUT / "timeline.html"
    events = OUT / "events.jsonl"
    events.unlink(missing_ok=True)  # the event log appends; one run per file here
    env = dict(os.environ, BROKER_URL=broker)
    say(f"broker {maybe_sanitize_url(broker)}; starting worker-a, worker-b (docker-compose.yml)")
    with compose_workers.running(environ=env, log_dir=OUT) as services:
        for service in services:
            log = service.log_path.relative_to(ROOT)
            say(f"{service.name}: {service.display_command}  (log {log})")
        command = [
            sys.executable,
            "-m",
            "pytest",
            "--celery-dispatch",
            "example_tests",
            "-v",
            "-rP",  # show what passing tests printed: the task_a / task_b report
            f"--celery-broker={broker}",
            f"--celery-json-report={report}",
            f"--junitxml={junit}",
            f"--celery-timeline={timeline}",
            f"--celery-event-log={events}",
            "-p",
            "no:cacheprovider",
        ]
        say("running: pytest " + " ".join(command[3:]).replace(broker, maybe_sanitize_url(broker)))
        started = time.perf_counter()
        code = subprocess.call(command, cwd=ROOT, env=env)
        wall = time.perf_counter() - started
    say(f"pytest exited {code} after {wall:.2f}s; workers stopped")

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
    say(f"JUnit XML {junit.relative_to(ROOT)}")
    say(f"timeline {timeline.relative_to(ROOT)} (open it in a browser)")
    say(f"event log {events.relative_to(ROOT)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
