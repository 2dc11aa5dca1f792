"""A killed controller (a cancelled CI job) frees its bench: issue #14, end to end.

A ``-c 1`` worker runs twenty one-second tests; the controller is SIGKILLed three tests in.
No test of that run may start later than ``BENCH_RELEASE_LIMIT`` after the kill (measured from
the start times the tests write on the worker side), and a new run on the same bench, started
right after the kill, finishes within ``NEW_RUN_LIMIT``. The interrupted test's session fixture
tears down, in a runner forked from the run's zygote (the test checks it was forked).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time

import pytest

from pytest_celery_dispatch.embedded import EMBEDDED
from pytest_celery_dispatch.liveness import BENCH_RELEASE_LIMIT
from tests.helpers import BROKER, dispatch

#: The issue's bar for the next run on a freed bench: the release, then its one test.
NEW_RUN_LIMIT = BENCH_RELEASE_LIMIT + 5.0

TESTS = """
import os
import time
import pytest

LOG = {log!r}

def note(*words):
    with open(LOG, "a") as fh:
        fh.write(" ".join(str(w) for w in words) + "\\n")

def forked():  # a runner forked from the run's zygote has the zygote for its parent,
    # not the worker's pool process (python -m celery ... worker)
    try:
        with open("/proc/%d/cmdline" % os.getppid(), "rb") as fh:
            argv = fh.read().split(b"\\0")
    except OSError:
        return None
    return argv[1:3] != [b"-m", b"celery"]

@pytest.fixture(scope="session")
def bench():
    note("forked", forked())
    yield
    note("teardown", time.time())

@pytest.mark.queue({queue!r})
@pytest.mark.parametrize("n", range(20))
def test_on_bench(bench, n):
    note("start", n, time.time())
    time.sleep(1.0)
    note("end", n, time.time())
"""

ONE_TEST = """
import pytest

@pytest.mark.queue({queue!r})
def test_next_run():
    pass
"""


def lines(path: str) -> list[list[str]]:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [line.split() for line in fh if line.strip()]


@pytest.mark.parametrize("broker", [BROKER, EMBEDDED], ids=["rabbitmq", "embedded"])
def test_a_killed_controller_frees_its_bench(pytester, worker_factory, workspace, broker):
    worker = worker_factory(worker_id="worker-bench", concurrency=1, broker=broker)
    log = str(pytester.path / "bench.log")
    source = TESTS.format(log=log, queue=worker.queue)
    pytester.makepyfile(test_bench=source)
    pytester.makepyfile(test_next=ONE_TEST.format(queue=worker.queue))
    first = dispatch(pytester, workspace, broker, "first", "test_bench.py")
    try:
        deadline = time.monotonic() + 60
        while sum(1 for line in lines(log) if line[0] == "end") < 3:
            assert first.poll() is None, (pytester.path / "first.out").read_text()
            assert time.monotonic() < deadline, "the first run never got going"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        killed_at = time.time()
        first.wait(10)

        second_started = time.monotonic()
        second = dispatch(pytester, workspace, broker, "second", "test_next.py")
        try:
            code = second.wait(NEW_RUN_LIMIT + 30)
        finally:
            if second.poll() is None:
                second.kill()
        second_took = time.monotonic() - second_started
        output = (pytester.path / "second.out").read_text()
        assert code == 0, output
        report = json.loads((pytester.path / "second.json").read_text())
        assert report["summary"]["passed"] == 1

        starts = [float(line[2]) for line in lines(log) if line[0] == "start"]
        late = max(starts) - killed_at
        teardown = [float(line[1]) for line in lines(log) if line[0] == "teardown"]
        print(
            f"\n[{broker}] last start {late:+.1f}s after the kill; fixtures torn down "
            f"{teardown[0] - killed_at if teardown else float('nan'):+.1f}s after; "
            f"the next run took {second_took:.1f}s; {len(starts)} of 20 tests started"
        )
        assert late < BENCH_RELEASE_LIMIT, f"a test started {late:.1f}s after the kill"
        assert len(starts) < 20
        assert [line[1] for line in lines(log) if line[0] == "forked"] == ["True"]
        assert teardown, "the dropped run's session fixture was not torn down"
        assert second_took < NEW_RUN_LIMIT, f"the next run took {second_took:.1f}s"
    finally:
        if first.poll() is None:
            first.kill()


OVERLAP_TESTS = """
import os
import time
import pytest

LOG = {log!r}

def note(*words):
    with open(LOG, "a") as fh:
        fh.write(" ".join(str(w) for w in words) + "\\n")

@pytest.mark.queue({queue!r})
@pytest.mark.parametrize("n", range(4))
def test_{name}(n):
    note("start", {name!r}, time.time())
    time.sleep(0.5)
    note("end", {name!r}, time.time())
"""


@pytest.mark.parametrize("broker", [BROKER, EMBEDDED], ids=["rabbitmq", "embedded"])
def test_two_runs_never_share_a_one_slot_bench_at_once(pytester, worker_factory, workspace, broker):
    # The worker's pool has a process beside its slot for plain tasks: the second run's
    # session must wait for the slot, not take that process.
    worker = worker_factory(worker_id="worker-one", concurrency=1, broker=broker)
    log = str(pytester.path / "bench.log")
    for name in ("first", "second"):
        source = OVERLAP_TESTS.format(log=log, queue=worker.queue, name=name)
        pytester.makepyfile(**{f"test_{name}": source})
    runs = [
        dispatch(pytester, workspace, broker, name, f"test_{name}.py")
        for name in ("first", "second")
    ]
    try:
        for name, run in zip(("first", "second"), runs, strict=True):
            assert run.wait(120) == 0, (pytester.path / f"{name}.out").read_text()
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
    spans: list[tuple[float, float]] = []
    began: dict[str, float] = {}
    for kind, name, at in lines(log):
        if kind == "start":
            assert name not in began, f"{name} started a test while its own was running"
            began[name] = float(at)
        else:
            spans.append((began.pop(name), float(at)))
    assert len(spans) == 8
    spans.sort()
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, f"two tests ran at once on a one-slot bench: {spans}"
