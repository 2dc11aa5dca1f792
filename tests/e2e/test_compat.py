"""The compatibility matrix: pytest's own options and popular plugins, in dispatched runs.

Each test is one row of the matrix: a pytester project run with ``--celery-dispatch`` against
real workers (the session's worker-a / worker-b, or a private one), checked on what the user
sees (terminal, JSON report, event log, the plugin's own report) and on what really ran where
(files the tests write on the worker, the worker's log). The last tests look at the Celery side:
task events in Flower and ``celery inspect``.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import BROKER, WorkerProcess, delete_queues

pytestmark = pytest.mark.usefixtures("workers")


# ---------------------------------------------------------------------------- helpers


def event_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sent_names(path: Path) -> list[str]:
    """Test names (the last nodeid part) the controller sent, in sending order."""
    return [e["nodeid"].split("::")[-1] for e in event_lines(path) if e["event"] == "sent"]


def ran_here(pytester: pytest.Pytester, name: str = "ran.txt") -> list[str]:
    """What the tests wrote when they ran (wherever they ran: the filesystem is shared)."""
    path = pytester.path / name
    return sorted(path.read_text().split()) if path.exists() else []


def run_id_of(result: pytest.RunResult) -> str:
    match = re.search(r"^celery-dispatch: broker .*, run ([0-9a-f]+)$", result.stdout.str(), re.M)
    assert match, result.stdout.str()
    return match.group(1)


def by_name(report: dict) -> dict[str, dict]:
    return {t["nodeid"].split("::")[-1]: t for t in report["tests"]}


def rel(pytester: pytest.Pytester, workspace: Path) -> str:
    """The project directory as it appears in nodeids (the rootdir is the workspace)."""
    return pytester.path.relative_to(workspace).as_posix()


# ---------------------------------------------------------------------------- selection

SELECT_SOURCE = """
import pathlib
import pytest

pytestmark = pytest.mark.queue("QUEUE_A")


def ran(name):
    with open(pathlib.Path(__file__).with_name("ran.txt"), "a") as fh:
        fh.write(name + "\\n")


def test_alpha():
    ran("alpha")


@pytest.mark.slow
def test_beta():
    ran("beta")


def test_gamma():
    ran("gamma")


def test_delta():
    ran("delta")


def test_epsilon():
    ran("epsilon")
"""


@pytest.fixture
def select_project(pytester, queues):
    pytester.makeini(
        """
        [pytest]
        markers =
            slow: a slow test
        """
    )
    pytester.makepyfile(test_select=queues.render(SELECT_SOURCE))
    return pytester


def test_k_m_and_deselect_dispatch_only_the_selected_tests(
    select_project, workspace, workers, run_dispatched
):
    events = select_project.path / "events.jsonl"
    run = run_dispatched(
        "-k",
        "not gamma",
        "-m",
        "not slow",
        "--deselect",
        f"{rel(select_project, workspace)}/test_select.py::test_delta",
        f"--celery-event-log={events}",
    )
    run.result.assert_outcomes(passed=2, deselected=3)
    assert sorted(sent_names(events)) == ["test_alpha", "test_epsilon"]
    tests = by_name(run.report)
    assert sorted(tests) == ["test_alpha", "test_epsilon"]
    assert {t["dispatch"]["worker"] for t in tests.values()} == {"worker-a"}
    assert ran_here(select_project) == ["alpha", "epsilon"]
    # The worker's log names the run (the control for the --co test below).
    assert run_id_of(run.result) in workers["a"].log_path.read_text()


def test_collect_only_dispatches_nothing(select_project, queues, workers, run_dispatched):
    events = select_project.path / "events.jsonl"
    run = run_dispatched("--co", f"--celery-event-log={events}")
    assert run.result.ret == 0
    run.result.stdout.fnmatch_lines(
        [
            "*<Function test_alpha>*",
            "*<Function test_epsilon>*",
            "celery-dispatch plan (--collect-only: nothing is sent)",
            f"  {queues.a}: 5 tests",
        ]
    )
    assert "5 tests collected" in run.result.stdout.str()
    assert event_lines(events) == []
    assert ran_here(select_project) == []
    time.sleep(1)  # a session task, had one been sent, would have reached the worker by now
    assert run_id_of(run.result) not in workers["a"].log_path.read_text()
    report = run.report
    assert report["tests"] == []
    assert report["summary"]["collected"] == 5
    assert report["dispatch"]["tests_dispatched"] == 0
    assert report["dispatch"]["sessions"] == 0


# ---------------------------------------------------------------------------- cacheprovider

CACHE_SOURCE = """
import pathlib
import pytest

pytestmark = pytest.mark.queue("QUEUE_A")
HERE = pathlib.Path(__file__).parent


def ran(name):
    with open(HERE / "ran.txt", "a") as fh:
        fh.write(name + "\\n")


def test_a():
    ran("a")


def test_b():
    ran("b")
    assert (HERE / "fixed").exists(), "the bench is not fixed yet"


def test_c():
    ran("c")
"""


@pytest.fixture
def cached_run(pytester, queues, workspace):
    """Like run_dispatched, with the cacheprovider on and an event log.

    The cache is the rootdir's (the session's workspace), shared with other tests of this
    session but keyed by nodeid, and only this project's nodeids are collected here.
    """
    pytester.makepyfile(test_cache=queues.render(CACHE_SOURCE))
    runs = []

    def run(*args: str) -> tuple[pytest.RunResult, list[str], list[str]]:
        (pytester.path / "ran.txt").unlink(missing_ok=True)
        events = pytester.path / f"events-{len(runs)}.jsonl"
        result = pytester.runpytest_subprocess(
            "--celery-dispatch",
            f"--celery-broker={BROKER}",
            f"--rootdir={workspace}",
            f"--celery-json-report={pytester.path / 'dispatch-report.json'}",
            f"--celery-event-log={events}",
            *args,
            timeout=120,
        )
        runs.append(result)
        return result, sent_names(events), ran_here(pytester)

    return run


def lastfailed(pytester: pytest.Pytester, workspace: Path) -> list[str]:
    """This project's tests in the cacheprovider's last-failed record."""
    path = workspace / ".pytest_cache" / "v" / "cache" / "lastfailed"
    data = json.loads(path.read_text()) if path.exists() else {}
    mine = f"{rel(pytester, workspace)}/"
    return sorted(n.split("::")[-1] for n, failed in data.items() if failed and n.startswith(mine))


def test_last_failed_and_failed_first_use_the_dispatched_outcomes(pytester, workspace, cached_run):
    result, sent, ran = cached_run()
    result.assert_outcomes(passed=2, failed=1)
    assert lastfailed(pytester, workspace) == ["test_b"]

    result, sent, ran = cached_run("--lf")
    # (pytest leaves the passed tests of the file out at collection: nothing "deselected")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["run-last-failure: rerun previous 1 failure*"])
    assert sent == ["test_b"]
    assert ran == ["b"]

    result, sent, ran = cached_run("--ff")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["run-last-failure: rerun previous 1 failure first*"])
    assert sent == ["test_b", "test_a", "test_c"]

    (pytester.path / "fixed").touch()
    result, sent, ran = cached_run("--lf")
    result.assert_outcomes(passed=1)
    assert sent == ["test_b"]
    assert lastfailed(pytester, workspace) == []


def test_stepwise_stops_at_a_dispatched_failure_and_resumes_there(pytester, cached_run):
    result, sent, ran = cached_run("--sw")
    assert result.ret == pytest.ExitCode.INTERRUPTED  # as a local --sw run that stops
    assert result.parseoutcomes()["failed"] == 1
    result.stdout.fnmatch_lines(["FAILED test_cache.py::test_b - AssertionError*"])
    result.stdout.fnmatch_lines(["*Interrupted: Test failed, continuing from this test next run*"])

    (pytester.path / "fixed").touch()
    result, sent, ran = cached_run("--sw")
    result.assert_outcomes(passed=2, deselected=1)
    result.stdout.fnmatch_lines(["stepwise: skipping 1 already passed items*"])
    assert sent == ["test_b", "test_c"]
    assert ran == ["b", "c"]


# ---------------------------------------------------------------------------- markers, -p no:

MARKED_SOURCE = """
import pytest


@pytest.mark.queue("QUEUE_A")
def test_on_a():
    pass


@pytest.mark.queue("QUEUE_B")
class TestOnB:
    def test_in_class(self):
        pass
"""


def test_strict_markers_know_the_queue_marker(pytester, queues, run_dispatched):
    # In the ini too, so the workers' runners (which read it) are strict as well.
    pytester.makeini(
        """
        [pytest]
        addopts = --strict-markers
        """
    )
    pytester.makepyfile(test_strict=queues.render(MARKED_SOURCE))
    run = run_dispatched("--strict-markers", "-rA")
    run.result.assert_outcomes(passed=2, warnings=0)
    assert run.result.ret == 0
    out = run.result.stdout.str()
    assert "warnings summary" not in out
    assert "PytestUnknownMarkWarning" not in out
    assert {t["dispatch"]["worker"] for t in run.report["tests"]} == {"worker-a", "worker-b"}
    assert not run.report.get("warnings")


def test_blocking_the_plugin_turns_it_off_entirely(pytester, queues):
    pytester.makepyfile(
        test_off=queues.render(
            MARKED_SOURCE
            + """

def test_uses_our_fixture(dispatch_context):
    pass
"""
        )
    )
    off = ("-p", "no:celery_dispatch", "-p", "no:cacheprovider")

    strict = pytester.runpytest_subprocess(*off, "--strict-markers")
    assert strict.ret == pytest.ExitCode.INTERRUPTED
    strict.stdout.fnmatch_lines(["*'queue' not found in `markers` configuration option*"])

    lax = pytester.runpytest_subprocess(*off, "-rA")
    lax.assert_outcomes(passed=2, errors=1, warnings=2)
    lax.stdout.fnmatch_lines(
        [
            "*fixture 'dispatch_context' not found*",
            "*PytestUnknownMarkWarning: Unknown pytest.mark.queue*",
        ]
    )
    plugins = [line for line in lax.outlines if line.startswith("plugins:")]
    assert plugins
    assert "celery-dispatch" not in plugins[0], plugins
    assert "celery dispatch" not in lax.stdout.str()  # no summary section

    option = pytester.runpytest_subprocess(*off, "--celery-dispatch")
    assert option.ret == pytest.ExitCode.USAGE_ERROR
    option.stderr.fnmatch_lines(["*unrecognized arguments: --celery-dispatch*"])

    helptext = pytester.runpytest_subprocess(*off, "--help")
    assert helptext.ret == 0
    assert "--strict-markers" in helptext.stdout.str()
    assert "celery-dispatch" not in helptext.stdout.str()
    assert "celery_dispatch_" not in helptext.stdout.str()  # no ini keys either


# ---------------------------------------------------------------------------- pytest-timeout


def test_timeout_option_is_honoured_on_the_worker(pytester, queues, run_dispatched):
    pytester.makepyfile(
        test_cli_timeout=queues.render(
            """
            import time
            import pytest

            pytestmark = pytest.mark.queue("QUEUE_B")

            def test_too_slow():
                time.sleep(30)

            def test_fine():
                pass
            """
        )
    )
    run = run_dispatched("--timeout=2", timeout=90)
    run.result.assert_outcomes(passed=1, failed=1)
    run.result.stdout.fnmatch_lines(["*Failed: Timeout (>2.0s) from pytest-timeout*"])
    slow = by_name(run.report)["test_too_slow"]
    assert slow["dispatch"]["worker"] == "worker-b"
    assert slow["outcome"] == "failed"
    assert 1.5 < slow["call"]["duration"] < 20  # stopped by the worker's pytest-timeout


# ---------------------------------------------------------------------------- rerunfailures


def test_reruns_happen_on_the_worker_and_show_as_rerun(pytester, queues, run_dispatched):
    pytester.makepyfile(
        test_flaky=queues.render(
            """
            import pathlib
            import pytest

            pytestmark = pytest.mark.queue("QUEUE_A")

            def attempt(name):
                path = pathlib.Path(__file__).with_name(f"{name}.count")
                n = int(path.read_text()) + 1 if path.exists() else 1
                path.write_text(str(n))
                return n

            def test_flaky_cli():
                assert attempt("cli") >= 2, "fails the first time"

            @pytest.mark.flaky(reruns=2)  # more than --reruns=1: the marker wins
            def test_flaky_marker():
                assert attempt("marker") >= 3, "fails twice"

            def test_broken():
                assert attempt("broken") > 99, "always fails"
            """
        )
    )
    run = run_dispatched("--reruns=1", "-rA")
    outcomes = run.result.parseoutcomes()
    assert outcomes == {"passed": 2, "failed": 1, "rerun": 4}, outcomes
    # Every attempt ran on the worker (the count files live in the shared workspace).
    counts = {p.stem: int(p.read_text()) for p in pytester.path.glob("*.count")}
    assert counts == {"cli": 2, "marker": 3, "broken": 2}
    progress = [line for line in run.result.outlines if line.startswith("test_flaky.py ")]
    assert progress
    assert progress[0].split()[1].count("R") == 4, progress
    run.result.stdout.fnmatch_lines(["*1 failed, 2 passed, 4 rerun*"])
    tests = by_name(run.report)
    assert {n: t["outcome"] for n, t in tests.items()} == {
        "test_flaky_cli": "passed",
        "test_flaky_marker": "passed",
        "test_broken": "failed",
    }
    assert {t["dispatch"]["worker"] for t in tests.values()} == {"worker-a"}


# ---------------------------------------------------------------------------- pytest-html


def html_data(path: Path) -> dict:
    """The test data pytest-html 4 embeds in its report (``data-jsonblob``)."""
    match = re.search(r'data-jsonblob="([^"]*)"', path.read_text())
    assert match, "no data-jsonblob in the pytest-html report"
    return json.loads(html.unescape(match.group(1)))


def test_pytest_html_lists_dispatched_tests_with_outcome_and_duration(
    pytester, queues, run_dispatched
):
    pytester.makepyfile(
        test_html=queues.render(
            """
            import time
            import pytest

            @pytest.mark.queue("QUEUE_A")
            def test_slow_pass():
                time.sleep(0.4)

            @pytest.mark.queue("QUEUE_B")
            def test_fail():
                assert 0, "the device said no"

            @pytest.mark.queue("QUEUE_A")
            def test_skip():
                pytest.skip("no device")

            def test_local():
                pass
            """
        )
    )
    report = pytester.path / "report.html"
    run = run_dispatched(f"--html={report}", "--self-contained-html")
    run.result.assert_outcomes(passed=2, failed=1, skipped=1)
    data = html_data(report)
    results = {}
    for nodeid, entries in data["tests"].items():
        results[nodeid.split("::")[-1]] = entries[-1]
    assert set(results) == {"test_slow_pass", "test_fail", "test_skip", "test_local"}
    assert results["test_slow_pass"]["result"] == "Passed"
    assert results["test_fail"]["result"] == "Failed"
    assert results["test_skip"]["result"] == "Skipped"
    assert results["test_local"]["result"] == "Passed"
    # The duration is the worker's: the test slept 0.4 s there.
    duration = results["test_slow_pass"]["duration"]
    match = re.fullmatch(r"(\d+) ms", duration)
    assert match, duration
    assert 400 <= int(match.group(1)) < 1000, duration
    assert "the device said no" in report.read_text()


# ---------------------------------------------------------------------------- pytest-celery


def test_pytest_celery_and_dispatch_work_in_the_same_run(pytester, queues, run_dispatched):
    pytester.makepyfile(
        test_both=queues.render(
            """
            import pytest

            @pytest.mark.queue("QUEUE_A")
            def test_dispatched_with_celery_app(celery_app, dispatch_context):
                @celery_app.task
                def add(x, y):
                    return x + y

                assert add.apply(args=(2, 3)).get() == 5
                assert dispatch_context.worker == "worker-a"

            @pytest.mark.queue("QUEUE_B")
            @pytest.mark.celery(result_expires=42)  # pytest-celery's own marker
            def test_both_markers(celery_app, dispatch_context):
                assert celery_app.conf.result_expires == 42
                assert dispatch_context.worker == "worker-b"

            def test_local_with_celery_app(celery_app, dispatch_context):
                assert dispatch_context.dispatched is False
                assert celery_app.main
            """
        )
    )
    run = run_dispatched("--strict-markers", "-rA")
    run.result.assert_outcomes(passed=3, warnings=0)
    plugins = next(line for line in run.result.outlines if line.startswith("plugins:"))
    assert re.search(r"\bcelery-\d", plugins), plugins  # pytest-celery, entry point "celery"
    assert "celery-dispatch-" in plugins, plugins  # ours, entry point "celery_dispatch"
    workers = {n: t["dispatch"]["worker"] for n, t in by_name(run.report).items()}
    assert workers == {
        "test_dispatched_with_celery_app": "worker-a",
        "test_both_markers": "worker-b",
        "test_local_with_celery_app": "local",
    }

    # pytest-celery >= 1.0's own (Docker based) fixtures: such a test is at least collected.
    pytester.makepyfile(test_docker_setup="def test_with_setup(celery_setup):\n    pass\n")
    collected = run_dispatched("--co", "-q", "test_docker_setup.py")
    assert collected.result.ret == 0
    collected.result.stdout.fnmatch_lines(
        ["*test_docker_setup.py::test_with_setup[[]celery_setup_worker-*]"]
    )


# ---------------------------------------------------------------------------- pytest-randomly


def test_randomly_seed_is_forwarded_so_worker_values_repeat(
    pytester, workspace, worker_factory, run_dispatched
):
    # A worker whose runners load pytest-randomly (this suite turns it off everywhere else).
    worker = worker_factory(worker_id="worker-rnd", concurrency=1, extra_env={"PYTEST_ADDOPTS": ""})
    pytester.makepyfile(
        test_rand=f"""
        import pathlib
        import random
        import pytest

        pytestmark = pytest.mark.queue({worker.queue!r})

        def record(name):
            with open(pathlib.Path(__file__).with_name("values.txt"), "a") as fh:
                fh.write(f"{{name}} {{random.random()!r}}\\n")

        def test_one():
            record("one")

        def test_two():
            record("two")

        def test_three():
            record("three")

        def test_four():
            record("four")
        """
    )
    values = pytester.path / "values.txt"

    def dispatched(seed: int) -> list[str]:
        values.unlink(missing_ok=True)
        run = run_dispatched("-p", "randomly", f"--randomly-seed={seed}")
        run.result.assert_outcomes(passed=4)
        run.result.stdout.fnmatch_lines([f"Using --randomly-seed={seed}"])
        assert {t["dispatch"]["worker"] for t in run.report["tests"]} == {"worker-rnd"}
        return values.read_text().splitlines()  # in the order they ran

    first = dispatched(1234)
    assert dispatched(1234) == first  # same order, same values
    assert sorted(dispatched(4321)) != sorted(first)  # the seed does reach the worker

    values.unlink()
    local = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "randomly", "--randomly-seed=1234", f"--rootdir={workspace}"
    )
    local.assert_outcomes(passed=4)
    assert values.read_text().splitlines() == first


# ---------------------------------------------------------------------------- warnings

WARNING_SOURCE = """
import warnings
import pytest

pytestmark = pytest.mark.queue("QUEUE_A")


def test_emits():
    warnings.warn("the bench is warm", UserWarning)


def test_warns_catches():
    with pytest.warns(UserWarning, match="expected"):
        warnings.warn("expected warning", UserWarning)


def test_warns_misses():
    with pytest.warns(UserWarning):
        pass
"""


def test_worker_warnings_reach_the_summary_and_w_error_fails_the_test(
    pytester, queues, run_dispatched
):
    pytester.makepyfile(test_warn=queues.render(WARNING_SOURCE))
    run = run_dispatched()
    run.result.assert_outcomes(passed=2, failed=1, warnings=1)
    run.result.stdout.fnmatch_lines(
        [
            "*= warnings summary =*",
            "*test_warn.py::test_emits",
            "*UserWarning: the bench is warm",
        ]
    )
    run.result.stdout.fnmatch_lines(["*Failed: DID NOT WARN*"])
    outcomes = {n: t["outcome"] for n, t in by_name(run.report).items()}
    assert outcomes == {
        "test_emits": "passed",
        "test_warns_catches": "passed",
        "test_warns_misses": "failed",
    }
    assert [w["message"] for w in run.report["warnings"]] == ["the bench is warm"]

    strict = run_dispatched("-W", "error::UserWarning")
    strict.result.assert_outcomes(passed=1, failed=2)
    strict.result.stdout.fnmatch_lines(["*UserWarning: the bench is warm*"])
    tests = by_name(strict.report)
    assert tests["test_emits"]["outcome"] == "failed"
    assert tests["test_emits"]["dispatch"]["worker"] == "worker-a"
    assert tests["test_warns_catches"]["outcome"] == "passed"  # pytest.warns still catches it


# ---------------------------------------------------------------------------- configuration

INI_FILES = {
    "pytest.ini": """
        [pytest]
        addopts = --strict-markers
        xfail_strict = true
        markers =
            bench: needs the bench
        """,
    "tox.ini": """
        [tox]
        envlist = py

        [pytest]
        addopts = --strict-markers
        xfail_strict = true
        markers =
            bench: needs the bench
        """,
    "pyproject.toml": """
        [project]
        name = "bench-tests"

        [tool.pytest.ini_options]
        addopts = "--strict-markers"
        xfail_strict = true
        markers = ["bench: needs the bench"]
        """,
}

CONFIG_TOP = """
import pytest


@pytest.mark.bench
@pytest.mark.queue("QUEUE_A")
def test_top(level, board, pytestconfig, record_property):
    assert (level, board) == ("top", "board-1")
    record_property("inipath", str(pytestconfig.inipath))
    record_property("rootpath", str(pytestconfig.rootpath))


@pytest.mark.queue("QUEUE_A")
@pytest.mark.xfail(reason="fixed meanwhile")
def test_xpass_is_strict():
    pass
"""

CONFIG_SUB = """
import pytest


@pytest.mark.bench
@pytest.mark.queue("QUEUE_B")
def test_sub(level, board):
    assert (level, board) == ("sub", "board-1")
"""


@pytest.mark.parametrize("ini_name", list(INI_FILES))
def test_ini_file_and_conftests_apply_on_the_worker_as_locally(
    pytester, queues, workspace, run_dispatched, ini_name
):
    ini = pytester.path / ini_name
    ini.write_text(textwrap.dedent(INI_FILES[ini_name]))
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture
        def level():
            return "top"

        @pytest.fixture
        def board():
            return "board-1"
        """
    )
    sub = pytester.mkdir("sub")
    (sub / "conftest.py").write_text(
        "import pytest\n\n\n@pytest.fixture\ndef level():\n    return 'sub'\n"
    )
    (sub / "test_sub.py").write_text(queues.render(CONFIG_SUB))
    pytester.makepyfile(test_top=queues.render(CONFIG_TOP))

    local = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--rootdir={workspace}")
    run = run_dispatched("-rA")
    expected = {"test_top": "passed", "test_xpass_is_strict": "failed", "test_sub": "passed"}
    local.assert_outcomes(passed=2, failed=1)
    run.result.assert_outcomes(passed=2, failed=1, warnings=0)
    run.result.stdout.fnmatch_lines(["*test_xpass_is_strict*XPASS(strict)*fixed meanwhile*"])
    tests = by_name(run.report)
    assert {n: t["outcome"] for n, t in tests.items()} == expected
    assert tests["test_sub"]["dispatch"]["worker"] == "worker-b"
    properties = dict(kv for p in tests["test_top"]["user_properties"] for kv in p.items())
    assert properties["dispatch.worker"] == "worker-a"
    assert properties["inipath"] == str(ini)  # the worker read the same config file
    assert properties["rootpath"] == str(workspace)


def test_override_ini_flips_an_xpass_on_the_worker(pytester, queues, run_dispatched):
    pytester.makepyfile(
        test_override=queues.render(
            """
            import pytest

            @pytest.mark.queue("QUEUE_B")
            @pytest.mark.xfail(reason="fixed meanwhile")
            def test_fixed():
                pass
            """
        )
    )
    run_dispatched().result.assert_outcomes(xpassed=1)
    run = run_dispatched("-o", "xfail_strict=true")
    run.result.assert_outcomes(failed=1)
    run.result.stdout.fnmatch_lines(["*XPASS(strict)*fixed meanwhile*"])
    assert run.report["tests"][0]["dispatch"]["worker"] == "worker-b"


def test_importlib_mode_runs_same_named_files_on_one_worker(pytester, queues, run_dispatched):
    for name in ("left", "right"):
        pytester.mkdir(name)
        (pytester.path / name / "test_same.py").write_text(
            queues.render(
                f"""
import pytest


@pytest.mark.queue("QUEUE_A")
def test_here():
    assert __file__.endswith("{name}/test_same.py")
"""
            )
        )
    # The control: without importlib the two modules clash (pytest's default import mode).
    local = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    local.stdout.fnmatch_lines(["*import file mismatch*"])
    # Both files go to queue A: the same worker's runner must import both, importlib style.
    run = run_dispatched("--import-mode=importlib")
    run.result.assert_outcomes(passed=2)
    assert {t["dispatch"]["worker"] for t in run.report["tests"]} == {"worker-a"}


def test_ini_cache_dir_gives_no_warning_on_the_worker(pytester, queues, workspace):
    pytester.makeini(
        """
        [pytest]
        cache_dir = .bench-cache
        """
    )
    pytester.makepyfile(test_cachedir=queues.render(MARKED_SOURCE))
    local = pytester.runpytest_subprocess(f"--rootdir={workspace}")
    local.assert_outcomes(passed=2, warnings=0)
    report = pytester.path / "dispatch-report.json"
    dispatched = pytester.runpytest_subprocess(  # the cacheprovider on, as in a local run
        "--celery-dispatch",
        f"--celery-broker={BROKER}",
        f"--rootdir={workspace}",
        f"--celery-json-report={report}",
        timeout=120,
    )
    dispatched.assert_outcomes(passed=2, warnings=0)
    assert not json.loads(report.read_text()).get("warnings")


# ---------------------------------------------------------------------------- Celery side


class EventsWorker(WorkerProcess):
    """A worker started with ``-E``, as docker-compose starts them (task events on)."""

    def command(self) -> list[str]:
        return [*super().command(), "-E"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_for(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            value = predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise AssertionError(f"{what} within {timeout}s\n{tail}")
        time.sleep(0.3)


@pytest.fixture
def events_worker(workspace):
    logs = workspace / "worker-logs"
    logs.mkdir(exist_ok=True)
    queue = f"cdtest-ev-{os.urandom(4).hex()}"
    worker = EventsWorker(queue, "worker-ev", workspace, logs, concurrency=1)
    try:
        yield worker.start()
    finally:
        worker.stop()
        delete_queues(queue)


@pytest.fixture
def flower(pytester):
    """Flower 2 on a free local port, on the test broker; killed after the test."""
    port = free_port()
    log = pytester.path / "flower.log"
    env = dict(os.environ, FLOWER_UNAUTHENTICATED_API="true")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                f"--broker={BROKER}",
                "flower",
                f"--port={port}",
                "--address=127.0.0.1",
            ],
            cwd=pytester.path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield f"http://127.0.0.1:{port}", log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_flower_lists_the_dispatched_sessions_with_worker_and_queue(
    pytester, events_worker, flower, run_dispatched
):
    url, log = flower
    node = f"{events_worker.worker_id}-{events_worker.queue}@{socket.gethostname()}"

    # Flower follows the event stream once our worker's heartbeats show up in it.
    def heard_of_worker():
        return any(w.get("hostname") == node for w in get_json(f"{url}/workers?json=1")["data"])

    wait_for(heard_of_worker, 60, f"Flower has no heartbeat of {node}", log)

    pytester.makepyfile(
        test_flower=f"""
        import pytest

        pytestmark = pytest.mark.queue({events_worker.queue!r})

        def test_one():
            pass

        def test_two():
            pass
        """
    )
    run = run_dispatched()
    run.result.assert_outcomes(passed=2)
    task_ids = {t["dispatch"]["task_id"] for t in run.report["tests"]}
    assert task_ids
    assert all(task_ids)

    def finished_in_flower():
        tasks = get_json(f"{url}/api/tasks?taskname=pytest_celery_dispatch.run_session")
        found = {i: t for i, t in tasks.items() if i in task_ids}
        done = all(t["state"] == "SUCCESS" for t in found.values())
        return found if set(found) == task_ids and done else None

    tasks = wait_for(finished_in_flower, 30, f"tasks {task_ids} not all SUCCESS in Flower", log)
    run_id = run.report["dispatch"]["run_id"]
    for task in tasks.values():
        assert task["name"] == "pytest_celery_dispatch.run_session"
        assert run_id in task["args"]
        assert task["worker"] == node  # from the worker's task events
        assert task["routing_key"] == events_worker.queue  # from the controller's task-sent
        assert task["exchange"] in ("", events_worker.queue)  # the default exchange today
        for when in ("sent", "received", "started", "succeeded"):
            assert task[when], (when, task)


def test_celery_inspect_active_queues_names_each_worker_and_its_queue(workers, queues):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "pytest_celery_dispatch.worker",
            "inspect",
            "active_queues",
            "--timeout=3",
        ],
        env=dict(os.environ, CELERY_BROKER_URL=BROKER),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # "->  worker-a-<queue>@host: OK" followed by that node's queues, one "* {...}" each.
    blocks: dict[str, str] = {}
    for block in re.split(r"^->\s+", result.stdout, flags=re.M)[1:]:
        head, _, body = block.partition("\n")
        blocks[head.split(":")[0].strip()] = body
    host = socket.gethostname()
    for key, queue, other in (("a", queues.a, queues.b), ("b", queues.b, queues.a)):
        node = f"worker-{key}-{queue}@{host}"
        assert node in blocks, result.stdout
        assert f"'name': '{queue}'" in blocks[node]
        assert f"'name': '{other}'" not in blocks[node]
