"""Warm runners across runs: each run sees the code as it is now, and tears its fixtures down."""

from __future__ import annotations

import json
import time


def session_summaries(worker) -> list[dict]:
    lines = []
    for line in worker.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"session finished"' in line:
            lines.append(json.loads(line)["summary"])
    return lines


def test_a_new_run_sees_the_current_code_and_session_fixtures_end_with_the_run(
    pytester, worker_factory, run_dispatched
):
    worker = worker_factory(worker_id="worker-warm", concurrency=1)
    log = pytester.path / "fixture.log"
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
