"""Warm runners across runs: each run sees the code as it is now, and tears its fixtures down."""

from __future__ import annotations

import json
import time

import pytest


def session_summaries(worker) -> list[dict]:
    lines = []
    for line in worker.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"session finished"' in line:
            lines.append(json.loads(line)["summary"])
    return lines


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
        time.sleep(0.5)  # the worker's log line for the session comes right after its results
    summaries = session_summaries(worker)
    assert len(summaries) == 3
    # The first run may start cold (the spare could still be starting); the next ones use the
    # spare runner started when the previous session ended.
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
        import os
        import time
        import pytest

        if "DISPATCH_WORKER_ID" in os.environ:  # on the worker, not in the controller
            with open({str(imports)!r}, "a") as fh:  # importing the module is the costly part
                fh.write(f"{{os.getpid()}}\\n")

        pytestmark = pytest.mark.queue({worker.queue!r})

        @pytest.mark.parametrize("n", range(9))
        def test_slot(n, bench_session):
            time.sleep(0.3)
            with open({str(runs)!r}, "a") as fh:
                fh.write(f"{{os.getpid()}}\\n")
        """
    )
    run = run_dispatched()
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
