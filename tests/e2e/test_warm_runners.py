"""Warm runners across runs: each run sees the code as it is now, and tears its fixtures down."""

from __future__ import annotations

import json
import time

import pytest

from pytest_celery_dispatch.gcpace import FULL_EVERY, YOUNG_EVERY
from pytest_celery_dispatch.zygote import ZYGOTE_FIRST_WAIT


def log_records(worker) -> list[dict]:
    records = []
    for line in worker.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and line.endswith("}"):  # not a line being written
            records.append(json.loads(line))
    return records


def session_summaries(worker) -> list[dict]:
    return [r["summary"] for r in log_records(worker) if r["message"] == "session finished"]


def spares_ready(worker) -> bool:
    """Whether the latest spare runner of each pool process has said it is ready (pytest
    imported, waiting for an order): the worker logs each spare it starts and its readiness."""
    latest: dict[int, int] = {}  # pool process -> its latest spare
    ready: set[int] = set()
    for record in log_records(worker):
        if record["message"] == "spare runner started":
            latest[record["pid"]] = record["spare_pid"]
        elif record["message"] == "spare runner ready":
            ready.add(record["spare_pid"])
    return bool(latest) and set(latest.values()) <= ready


def wait_for(condition, what: str) -> None:
    # A guard against a hang only: each condition is an event the worker logs when it happens.
    # The bound is the plugin's own patience with a process that starts pytest (a zygote waits
    # this long for its first slot).
    deadline = time.monotonic() + ZYGOTE_FIRST_WAIT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def log_session_fixture(pytester, log) -> None:
    """A conftest whose session fixture ``bench_session`` logs its setup and teardown with the
    pid of the process that ran it."""
    pytester.makeconftest(
        f"""
        import os
        import pytest

        @pytest.fixture(scope="session")
        def bench_session():
            with open({str(log)!r}, "a") as fh:
                fh.write(f"setup {{os.getpid()}}\\n")
            yield
            with open({str(log)!r}, "a") as fh:
                fh.write(f"teardown {{os.getpid()}}\\n")
        """
    )


def runner_gate(pytester, runs) -> None:
    """A module ``runner_gate`` for the test programs: ``record_and_wait()`` appends the pid of
    the runner it runs in to ``runs`` and holds the test until a second runner has run one: on
    a busy machine one slot could run them all before the others start (a guard against a
    hang, not a measure)."""
    pytester.makepyfile(
        runner_gate=f"""
        import os
        import time

        def record_and_wait():
            with open({str(runs)!r}, "a") as fh:
                fh.write(f"{{os.getpid()}}\\n")
            deadline = time.monotonic() + {ZYGOTE_FIRST_WAIT}
            while time.monotonic() < deadline:
                with open({str(runs)!r}) as fh:
                    if len(set(fh.read().split())) >= 2:
                        break
                time.sleep(0.05)
        """
    )


def test_a_new_run_sees_the_current_code_and_session_fixtures_end_with_the_run(
    pytester, worker_factory, run_dispatched
):
    worker = worker_factory(worker_id="worker-warm", concurrency=1)
    log = pytester.path / "fixture.log"
    log_session_fixture(pytester, log)
    source = """
        import pytest
        import helper_mod

        @pytest.mark.queue({queue!r})
        def test_value(bench_session):
            assert helper_mod.VALUE == {value}
        """
    for run_no, value in enumerate((1, 22, 333), start=1):
        # A different length each time: Python's and pytest's caches key on size and mtime.
        pytester.makepyfile(helper_mod=f"VALUE = {value}\n")
        pytester.makepyfile(test_value=source.format(queue=worker.queue, value=value))
        run = run_dispatched()
        run.result.assert_outcomes(passed=1)
        lines = log.read_text().split()
        # This run's session fixture was set up and torn down before the run ended.
        assert lines[-4::2] == ["setup", "teardown"], lines
        assert lines.count("setup") == lines.count("teardown") == run_no
        # The worker logs the session right after its results; the spare runner it started as
        # the session ended (SPARE_DELAY) gets ready later. The next run starts once it is.
        wait_for(lambda n=run_no: len(session_summaries(worker)) == n, "the session's log line")
        wait_for(lambda: spares_ready(worker), "every pool process's spare runner ready")
    summaries = session_summaries(worker)
    assert len(summaries) == 3
    # The first run may start cold (the spare could still be starting); the next ones use the
    # spare runner started when the previous session ended (or, if their session landed on the
    # other pool process, that one's spare).
    assert [s["warm_start"] for s in summaries[1:]] == [True, True], summaries


@pytest.mark.parametrize("fork", ["1", "0"], ids=["forked", "DISPATCH_FORK_RUNNERS=0"])
def test_the_slots_of_a_worker_share_one_collection_per_run(
    pytester, worker_factory, run_dispatched, fork
):
    worker = worker_factory(
        worker_id="worker-fork", concurrency=3, extra_env={"DISPATCH_FORK_RUNNERS": fork}
    )
    imports = pytester.path / "imports.log"
    runs = pytester.path / "runs.log"
    fixtures = pytester.path / "fixtures.log"
    log_session_fixture(pytester, fixtures)
    pytester.makepyfile(
        test_shared=f"""
        import gc
        import os
        import time
        import pytest
        import runner_gate

        if "DISPATCH_WORKER_ID" in os.environ:  # on the worker, not in the controller
            with open({str(imports)!r}, "a") as fh:  # importing the module is the costly part
                fh.write(f"{{os.getpid()}}\\n")

        pytestmark = pytest.mark.queue({worker.queue!r})

        @pytest.mark.parametrize("n", range(9))
        def test_slot(n, bench_session):
            time.sleep(0.3)
            runner_gate.record_and_wait()
            # Forked or not, a runner spaces the garbage collector's passes out (gcpace).
            assert gc.get_threshold() == ({YOUNG_EVERY}, 10, {FULL_EVERY}), gc.get_threshold()
        """
    )
    runner_gate(pytester, runs)
    run = run_dispatched("--celery-ship=off")  # in place: the basetemp is big by now
    run.result.assert_outcomes(passed=9)
    importers = imports.read_text().split()
    runners = set(runs.read_text().split())
    assert len(runners) >= 2, runners  # the worker's slots ran the tests side by side
    setups = [line.split()[1] for line in fixtures.read_text().splitlines() if "setup" in line]
    teardowns = [
        line.split()[1] for line in fixtures.read_text().splitlines() if "teardown" in line
    ]
    # Each runner set its own session fixture up and tore it down by the end of the run.
    assert sorted(setups) == sorted(teardowns) == sorted(runners)
    if fork == "1":
        # One process imported the module and collected; the runners were forked from it, and
        # it ran no test itself.
        assert len(importers) == 1, importers
        assert importers[0] not in runners
    else:
        assert sorted(importers) == sorted(runners)
