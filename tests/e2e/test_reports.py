"""The JSON report as CI tools read it: pytest-json-report's layout, the schema, round trips."""

from __future__ import annotations

import json
import os
import socket

import jsonschema
import pytest

from tests.conftest import SCHEMA

pytestmark = pytest.mark.usefixtures("workers")

SUITE = """
import logging
import pytest

pytestmark = pytest.mark.queue("QUEUE_A")

@pytest.fixture
def broken():
    raise RuntimeError("setup exploded")

def test_pass():
    print("hello out")
    logging.getLogger("bench").warning("a log line")

def test_fail():
    assert 1 == 2

def test_skip():
    pytest.skip("no device")

@pytest.mark.xfail(reason="known")
def test_xfail():
    assert 0

@pytest.mark.xfail(reason="fixed")
def test_xpass():
    pass

def test_error(broken):
    pass
"""


def by_name(tests):
    return {t["nodeid"].split("::")[-1]: t for t in tests}


def test_a_tool_written_for_pytest_json_report_reads_ours(pytester, queues, run_dispatched):
    pytester.makepyfile(test_suite=queues.render(SUITE))
    theirs_path = pytester.path / "theirs.json"
    local = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--json-report", f"--json-report-file={theirs_path}"
    )
    assert local.ret == 1
    ours = run_dispatched().report  # validated against the schema
    theirs = json.loads(theirs_path.read_text())

    assert set(theirs) - {"warnings"} <= set(ours), set(theirs) - set(ours)
    assert set(theirs["summary"]) <= set(ours["summary"])
    assert {k: theirs["summary"][k] for k in theirs["summary"]} == {
        k: ours["summary"][k] for k in theirs["summary"]
    }
    ours_tests, theirs_tests = by_name(ours["tests"]), by_name(theirs["tests"])
    assert set(ours_tests) == set(theirs_tests)
    for name, their_test in theirs_tests.items():
        our_test = ours_tests[name]
        assert our_test["outcome"] == their_test["outcome"], name
        assert set(their_test) <= set(our_test), (name, set(their_test) - set(our_test))
        for when in ("setup", "call", "teardown"):
            if when not in their_test:
                assert when not in our_test, (name, when)
                continue
            mine, theirs_phase = our_test[when], their_test[when]
            assert set(theirs_phase) <= set(mine), (name, when, set(theirs_phase) - set(mine))
            for key in theirs_phase:
                assert type(mine[key]) is type(theirs_phase[key]), (name, when, key)
            assert mine["outcome"] == theirs_phase["outcome"]
            if "crash" in theirs_phase:
                assert mine["crash"]["message"] == theirs_phase["crash"]["message"]
    assert ours_tests["test_pass"]["call"]["stdout"] == theirs_tests["test_pass"]["call"]["stdout"]


def test_every_report_gives_each_test_the_same_outcome_as_a_local_run(
    pytester, queues, run_dispatched
):
    """Terminal (-rA), JSON report, JUnit XML and event log agree per test, with
    pytest-json-report on a local run of the same suite."""
    import xml.etree.ElementTree as ET

    pytester.makepyfile(test_suite=queues.render(SUITE))
    theirs_path = pytester.path / "theirs.json"
    local = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--json-report", f"--json-report-file={theirs_path}"
    )
    assert local.ret == 1
    expected = {
        n: t["outcome"] for n, t in by_name(json.loads(theirs_path.read_text())["tests"]).items()
    }
    assert expected == {
        "test_pass": "passed", "test_fail": "failed", "test_skip": "skipped",
        "test_xfail": "xfailed", "test_xpass": "xpassed", "test_error": "error",
    }  # fmt: skip

    junit, events = pytester.path / "junit.xml", pytester.path / "events.jsonl"
    run = run_dispatched("-rA", f"--junitxml={junit}", f"--celery-event-log={events}")
    assert {n: t["outcome"] for n, t in by_name(run.report["tests"]).items()} == expected

    finished = [json.loads(line) for line in events.read_text().splitlines()]
    finished = [e for e in finished if e["event"] == "finished"]
    assert {e["nodeid"].split("::")[-1]: e["outcome"] for e in finished} == expected

    # -rA short summary: PASSED / FAILED / SKIPPED / XFAIL / XPASS / ERROR per test.
    words = {"passed": "PASSED", "failed": "FAILED", "skipped": "SKIPPED", "xfailed": "XFAIL",
             "xpassed": "XPASS", "error": "ERROR"}  # fmt: skip
    summary = run.result.stdout.str().split("short test summary info")[1]
    for name, outcome in expected.items():
        if outcome == "skipped":
            assert "SKIPPED [1] test_suite.py" in summary  # skips are listed by location
        else:
            assert f"{words[outcome]} test_suite.py::{name}" in summary, (name, summary)

    junit_outcome = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        junit_outcome[case.get("name")] = (
            "error" if "error" in tags else "failed" if "failure" in tags
            else "skipped" if "skipped" in tags else "passed"
        )  # fmt: skip
    # JUnit has no xfail / xpass: pytest writes an xfail as skipped and an xpass as passed.
    junit_words = {**expected, "test_xfail": "skipped", "test_xpass": "passed"}
    assert junit_outcome == junit_words


def test_both_reports_together_are_written_and_agree(pytester, queues, run_dispatched):
    pytester.makepyfile(test_suite=queues.render(SUITE))
    theirs_path = pytester.path / "theirs.json"
    run = run_dispatched("--json-report", f"--json-report-file={theirs_path}")
    ours = run.report
    theirs = json.loads(theirs_path.read_text())
    assert {n: t["outcome"] for n, t in by_name(ours["tests"]).items()} == {
        n: t["outcome"] for n, t in by_name(theirs["tests"]).items()
    }
    assert ours["summary"]["total"] == theirs["summary"]["total"] == 6


def test_each_phase_round_trips_through_pytest_report_serialization(
    pytester, queues, run_dispatched
):
    pytester.makepyfile(test_suite=queues.render(SUITE))
    report = run_dispatched().report
    config = pytester.parseconfig()
    checked = 0
    for test in report["tests"]:
        path, _, _ = test["nodeid"].partition("::")
        for when in ("setup", "call", "teardown"):
            if when not in test:
                continue
            phase = test[when]
            sections = [
                (f"Captured {key} {when}", phase[key])
                for key in ("stdout", "stderr")
                if key in phase
            ]
            data = {
                "$report_type": "TestReport",
                "nodeid": test["nodeid"],
                "location": [path, test["lineno"], test["nodeid"].split("::")[-1]],
                "keywords": dict.fromkeys(test["keywords"], 1),
                "outcome": phase["outcome"],
                "longrepr": phase.get("longrepr"),
                "when": when,
                "user_properties": [],
                "sections": sections,
                "duration": phase["duration"],
                "start": 0.0,
                "stop": phase["duration"],
            }
            rebuilt = config.hook.pytest_report_from_serializable(config=config, data=data)
            assert isinstance(rebuilt, pytest.TestReport)
            assert (rebuilt.nodeid, rebuilt.when, rebuilt.outcome) == (
                test["nodeid"],
                when,
                phase["outcome"],
            )
            assert rebuilt.duration == phase["duration"]
            assert rebuilt.capstdout == phase.get("stdout", "")
            if "longrepr" in phase:
                assert rebuilt.longreprtext == phase["longrepr"]
            checked += 1
    assert checked >= 15


def test_the_schema_rejects_what_breaks_the_contract():
    good = {
        "created": 0.0,
        "duration": 1.0,
        "exitcode": 0,
        "root": "/x",
        "environment": {},
        "summary": {"collected": 0, "total": 0},
        "tests": [],
        "dispatch": {
            "report_version": 1,
            "broker": "amqp://guest:**@localhost//",
            "backend": "rpc://",
            "queues": {},
            "workers": {},
            "wall_time": 1.0,
            "speedup": None,
        },
    }
    jsonschema.validate(good, SCHEMA)
    for broken in (
        {**good, "dispatch": {**good["dispatch"], "broker": "amqp://guest:secret@localhost//"}},
        {**good, "dispatch": {**good["dispatch"], "report_version": 2}},
        {k: v for k, v in good.items() if k != "summary"},
        {**good, "tests": [{"nodeid": "x", "outcome": "exploded", "dispatch": {}}]},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, SCHEMA)


def test_timeline_draws_every_dispatched_test_once(pytester, queues, run_dispatched):
    import html
    import re
    from html.parser import HTMLParser

    pytester.makepyfile(test_suite=queues.render(SUITE))
    timeline = pytester.path / "timeline.html"
    run = run_dispatched(f"--celery-timeline={timeline}")
    run.result.stdout.fnmatch_lines([f"timeline: {timeline}"])
    page = timeline.read_text()

    class Tags(HTMLParser):
        VOID = {"meta", "br", "hr", "img", "input", "link", "col", "wbr", "area", "base"}

        def __init__(self) -> None:
            super().__init__()
            self.stack: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag not in self.VOID:
                self.stack.append(tag)

        def handle_startendtag(self, tag, attrs):
            pass

        def handle_endtag(self, tag):
            assert self.stack, tag
            assert self.stack[-1] == tag, (tag, self.stack[-3:])
            self.stack.pop()

    parser = Tags()
    parser.feed(page)
    parser.close()
    assert parser.stack == []
    assert "src=" not in page
    assert 'href="http' not in page
    drawn = [html.unescape(n) for n in re.findall(r'data-nodeid="([^"]*)"', page)]
    nodeids = [t["nodeid"] for t in run.report["tests"]]
    assert sorted(drawn) == sorted(nodeids)


def test_workers_log_one_json_object_per_chunk(pytester, queues, workers, run_dispatched):
    pytester.makepyfile(test_suite=queues.render(SUITE))
    run = run_dispatched()
    run_id = run.report["dispatch"]["run_id"]
    records = []
    for line in workers["a"].log_path.read_text().splitlines():
        if line.startswith("{") and run_id in line:
            records.append(json.loads(line))  # every line of this run is one JSON object
    finished = [r for r in records if r["message"] == "chunk finished"]
    assert finished, records
    for record in finished:
        assert {"time", "level", "task_id", "worker", "queue", "nodeids", "attempt", "duration",
                "outcomes"} <= set(record)  # fmt: skip
        assert record["worker"] == "worker-a"
        assert record["queue"] == queues.a
    outcomes: dict[str, int] = {}
    for record in finished:
        for outcome, count in record["outcomes"].items():
            outcomes[outcome] = outcomes.get(outcome, 0) + count
    # The one outcome rule (outcome.py), as in the JSON report and the terminal.
    assert outcomes == {
        "passed": 1, "failed": 1, "skipped": 1, "xfailed": 1, "xpassed": 1, "error": 1
    }  # fmt: skip
    assert any(r["message"] == "chunk received" for r in records)


GITHUB_ENV = {
    "GITHUB_ACTIONS": "true",
    "GITHUB_SERVER_URL": "https://github.example",
    "GITHUB_REPOSITORY": "lab/firmware",
    "GITHUB_RUN_ID": "4242",
    "GITHUB_ACTOR": "octo",
    "GITHUB_REF_NAME": "main",
}


def test_the_run_s_identity_from_ci_variables_is_in_header_report_and_worker_log(
    pytester, queues, run_dispatched, workers, monkeypatch
):
    for name in [n for n in os.environ if n.startswith(("CI_", "GITLAB_", "BUILDKITE", "BUILD_"))]:
        monkeypatch.delenv(name)  # only GitHub's variables: this job may run in another CI
    for name, value in GITHUB_ENV.items():
        monkeypatch.setenv(name, value)
    pytester.makepyfile(test_who=queues.render(WHO))
    run = run_dispatched()
    run.result.assert_outcomes(passed=1)
    identity = run.report["dispatch"]["identity"]  # validated against the schema
    assert identity["ci"] == "github"
    assert identity["url"] == "https://github.example/lab/firmware/actions/runs/4242"
    assert identity["pipeline"] == "4242"
    assert identity["user"] == "octo"
    assert identity["ref"] == "main"
    label = f"GitHub Actions run 4242 (main) by octo on {socket.gethostname()}"
    assert identity["label"] == label
    run.result.stdout.fnmatch_lines([f"celery-dispatch: this run is {label}, https://*4242"])
    log = workers["a"].log_path.read_text()
    started = [json.loads(line) for line in log.splitlines() if '"session started"' in line]
    assert any(entry.get("identity") == label for entry in started), started[-3:]


WHO = """
import pytest

@pytest.mark.queue("QUEUE_A")
def test_who():
    pass
"""


DIFF_SUITE = """
import pytest

pytestmark = pytest.mark.queue("QUEUE_A")

def helper(got, expected):
    assert got == expected

def test_lists():
    expected = list(range(30))
    got = expected[:-1] + [99]
    helper(got, expected)
"""


def failure_section(result: pytest.RunResult, folder: str) -> list[str]:
    """The lines of test_lists's failure section, from its header to the next section, with
    paths as a local run in ``folder`` shows them (the shared workers' root is its parent)."""
    lines = [line.replace(f"{folder}/", "") for line in result.outlines]
    start = next(i for i, line in enumerate(lines) if line.strip("_ ") == "test_lists")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(("___", "===")))
    return lines[start:end]


@pytest.mark.parametrize("stream", [[], ["-s"]], ids=["captured", "streamed"])
def test_tb_showlocals_and_verbosity_shape_a_dispatched_failure_as_a_local_one(
    pytester, queues, run_dispatched, stream
):
    # Under -s these options once made each runner refuse its command line (exit code 4), and
    # -v reached no runner: its assertion said "Use -v to get more diff".
    pytester.makepyfile(test_diff=queues.render(DIFF_SUITE))
    options = [*stream, "--tb=short", "--showlocals", "-v"]
    local = pytester.runpytest_subprocess("-p", "no:cacheprovider", *options)
    dispatched = run_dispatched(*options, "--celery-ship=off")
    dispatched.result.assert_outcomes(failed=1)
    section = failure_section(dispatched.result, pytester.path.name)
    assert section == failure_section(local, pytester.path.name)
    assert any(line.split()[:2] == ["got", "="] for line in section), section  # --showlocals
    assert "Full diff:" in "\n".join(section), section  # -v
    assert not any(line.startswith("    def test_lists") for line in section), section  # short
