"""Runs share a bench: a line with priorities, the waiting line, ``celery-dispatch status``
(issue #14), end to end on both brokers.

Run A holds a ``-c 1`` bench: its tests wait until the views are taken (an event, so a busy
machine cannot end A before the others are in line). Run B (default priority), then run D
(default priority), then run C (``--celery-priority 9``) start while A runs; each starts only
once the one before it is in line. C must start its first test before B, and B before D. While
they wait, B's terminal names A's identity and B's place; ``celery-dispatch status --json``
lists the worker busy with A and the three waiting in that order with their priorities.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pytest_celery_dispatch.embedded import EMBEDDED
from pytest_celery_dispatch.lab import LAB_STALE, LINE_EVERY
from tests.helpers import BROKER, dispatch

TESTS = """
import os
import time
import pytest

@pytest.mark.queue({queue!r})
@pytest.mark.parametrize("n", range({count}))
def test_{name}(n):
    with open({log!r}, "a") as fh:
        fh.write("{name} %d %f\\n" % (n, time.time()))
    deadline = time.monotonic() + {hold}  # a guard against a hang only
    while time.monotonic() < deadline and not os.path.exists({release!r}):
        time.sleep(0.05)
    time.sleep(0.1)
"""

#: How long A's tests wait for the views to be taken, at most: a guard against a hang (the
#: controllers are given as long to end).
HOLD = 120

#: A's identity (GitLab variables): B's waiting line must name it.
A_ENV = {"CI_PIPELINE_ID": "4242", "CI_JOB_URL": "https://gitlab.example/job/7"}


def output(pytester, name: str) -> str:
    return (pytester.path / f"{name}.out").read_text()


def wait_for(check, what: str, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"waited {limit:g}s for {what}"
        time.sleep(0.1)


def status(broker: str, workspace, *args: str) -> str:
    env = {**os.environ, "DISPATCH_WORKSPACE": str(workspace)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest_celery_dispatch.cli", "status", "--broker", broker, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def run_id(pytester, name: str) -> str:
    for line in output(pytester, name).splitlines():
        if ", run " in line and line.startswith("celery-dispatch: broker"):
            return line.rsplit(", run ", 1)[1].strip()
    raise AssertionError(f"no run id in {name}'s header:\n{output(pytester, name)}")


@pytest.mark.parametrize("broker", [BROKER, EMBEDDED], ids=["rabbitmq", "embedded"])
def test_runs_wait_in_line_by_priority_and_the_lab_shows_them(
    pytester, worker_factory, workspace, broker
):
    worker = worker_factory(worker_id="worker-bench", concurrency=1, broker=broker)
    log = str(pytester.path / "starts.log")
    release = pytester.path / "views-taken"  # A's tests wait for it
    for name, count, hold in (("a", 4, HOLD), ("b", 2, 0), ("d", 2, 0), ("c", 2, 0)):
        source = TESTS.format(
            queue=worker.queue, count=count, name=name, log=log, hold=hold, release=str(release)
        )
        pytester.makepyfile(**{f"test_{name}": source})

    def starts() -> list[list[str]]:
        if not os.path.exists(log):
            return []
        with open(log) as fh:
            return [line.split() for line in fh if line.strip()]

    runs: dict[str, subprocess.Popen] = {}
    try:
        runs["a"] = dispatch(pytester, workspace, broker, "a", "test_a.py", env=A_ENV)
        wait_for(lambda: any(s[0] == "a" for s in starts()), "A's first test", 60)
        for name, args in (("b", ()), ("d", ()), ("c", ("--celery-priority", "9"))):
            runs[name] = dispatch(pytester, workspace, broker, name, f"test_{name}.py", *args)
            wait_for(lambda n=name: "in line" in output(pytester, n), f"{name} in line", 30)
        # Seen by all: every notice is renewed well within LAB_STALE.
        time.sleep(LAB_STALE / 2)
        view = json.loads(status(broker, workspace, "--json"))
        table = status(broker, workspace)
        wait_for(
            lambda: "is 2nd in line" in output(pytester, "b"),
            "B's line after C came",
            LINE_EVERY + 5,
        )
        release.touch()
        codes = {name: proc.wait(HOLD) for name, proc in runs.items()}
    finally:
        release.touch()
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
    assert codes == {"a": 0, "b": 0, "c": 0, "d": 0}, {n: output(pytester, n) for n in runs}

    ids = {name: run_id(pytester, name) for name in runs}
    entry = view["queues"][worker.queue]
    [bench] = entry["workers"]
    assert bench["name"] == "worker-bench"
    assert bench["slots"] == 1
    assert bench["state"] == "busy"
    assert [slot["run_id"] for slot in bench["busy"]] == [ids["a"]]
    assert "GitLab pipeline 4242" in bench["busy"][0]["label"]
    waiting = [(w["run_id"], w["priority"], w["position"]) for w in entry["waiting"]]
    assert waiting == [(ids["c"], 9, 1), (ids["b"], 5, 2), (ids["d"], 5, 3)]
    assert "worker-bench" in table
    assert "waiting:" in table
    assert "priority 9" in table

    b_out = output(pytester, "b")
    assert f"worker-bench busy with run {ids['a'][:4]} (GitLab pipeline 4242" in b_out
    assert "this run is 1st in line" in b_out
    assert "this run is 2nd in line" in b_out

    first = {}
    for name, _n, at in starts():
        first.setdefault(name, float(at))
    assert first["a"] < first["c"] < first["b"] < first["d"], first

    for name in runs:
        report = json.loads((pytester.path / f"{name}.json").read_text())
        assert report["dispatch"]["identity"]["label"]
        assert report["dispatch"]["priority"] == (9 if name == "c" else 5)
    assert (
        json.loads((pytester.path / "a.json").read_text())["dispatch"]["identity"]["pipeline"]
        == "4242"
    )
