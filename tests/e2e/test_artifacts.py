"""Files from the bench come home: ``dispatch_artifacts`` on real workers, on each broker, into
every report (JSON, JUnit, the terminal's failure section, the timeline)."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_celery_dispatch.artifactpaths import CHUNK_BYTES, TMP_PATH_PREFIX, nodeid_folder
from pytest_celery_dispatch.artifactreport import SECTION
from pytest_celery_dispatch.embedded import EMBEDDED
from tests.helpers import BROKER

BIG = 50 << 20  # a 50 MB capture: 50 chunks on the wire
SEED = 7

SUITE = """
import random
import pytest

pytestmark = pytest.mark.queue("QUEUE_A")

def test_bench(dispatch_artifacts):
    (dispatch_artifacts / "console.log").write_text("boot ok\\n" * 128)  # 1 KB
    (dispatch_artifacts / "capture.bin").write_bytes(random.Random(SEED).randbytes(BIG))
    assert False, "the device did not answer"
"""

LIMITS = """
import pytest

pytestmark = pytest.mark.queue("QUEUE_A")

def test_big_log_passes(dispatch_artifacts):
    (dispatch_artifacts / "huge.log").write_bytes(b"x" * 3000)

def test_fails_with_tmp_path(tmp_path):
    (tmp_path / "state.txt").write_text("failed state")
    assert False

def test_passes_with_tmp_path(tmp_path):
    (tmp_path / "state.txt").write_text("passing state")
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_files_of_a_failed_test_come_home_into_every_report(
    pytester, queues, run_dispatched, transport
):
    pytester.makepyfile(
        test_suite=queues.render(SUITE).replace("SEED", str(SEED)).replace("BIG", str(BIG))
    )
    junit = pytester.path / "junit.xml"
    timeline = pytester.path / "timeline.html"
    run = run_dispatched(f"--junitxml={junit}", f"--celery-timeline={timeline}", timeout=300)
    assert run.result.ret == 1, run.result.stdout.str()
    report = run.report  # valid against the schema
    (test,) = report["tests"]
    assert test["outcome"] == "failed"

    # On the controller, beside the report by default, with the worker's sha256.
    folder = pytester.path / "dispatch-report_artifacts" / nodeid_folder(test["nodeid"])
    log, capture = folder / "console.log", folder / "capture.bin"
    expected = {
        "console.log": sha(b"boot ok\n" * 128),
        "capture.bin": sha(random.Random(SEED).randbytes(BIG)),
    }
    assert sha(log.read_bytes()) == expected["console.log"]
    assert capture.stat().st_size == BIG > CHUNK_BYTES
    assert sha(capture.read_bytes()) == expected["capture.bin"]

    # The JSON report: paths relative to it, bytes, sha256, not cut.
    entries = {e["name"]: e for e in test["artifacts"]}
    assert set(entries) == set(expected)
    for name, entry in entries.items():
        assert entry["sha256"] == expected[name]
        assert not entry["cut"]
        assert "error" not in entry
        assert (run.report_path.parent / entry["path"]).resolve() == (folder / name).resolve()
    assert entries["capture.bin"]["bytes"] == entries["capture.bin"]["size"] == BIG
    assert report["dispatch"]["artifacts"]["files"] == 2

    # JUnit: one property per file and [[ATTACHMENT|path]] lines in the test case's system-out.
    case = ET.parse(junit).getroot().find(".//testcase")
    assert case is not None
    props = [p.get("value") for p in case.iter("property") if p.get("name") == "artifact"]
    attached = "".join(e.text or "" for e in case.iter("system-out"))
    for path in (log, capture):
        shown = [p for p in props if p and Path(pytester.path, p).resolve() == path.resolve()]
        assert shown, (path, props)
        assert f"[[ATTACHMENT|{shown[0]}]]" in attached

    # The terminal's failure section names both.
    out = run.result.stdout.str()
    section = out[out.index(SECTION) :]
    assert "console.log" in section
    assert "capture.bin" in section
    assert expected["capture.bin"][:16] in section
    assert "artifacts: 2 files of 1 test in " in out

    # The timeline links the bar to both files.
    page = timeline.read_text()
    assert 'class="artlink"' in page
    for name, entry in entries.items():
        assert f'href="{entry["path"]}"' in page, name


def test_a_file_over_the_test_limit_is_cut_and_said_and_tmp_path_of_failed_tests_comes_home(
    pytester, queues, run_dispatched, transport
):
    pytester.makepyfile(test_limits=queues.render(LIMITS))
    arts = pytester.path / "arts"
    run = run_dispatched(
        f"--celery-artifacts={arts}",
        "--celery-artifacts-limit=1K",
        "--celery-artifacts-tmp-path=failed",
    )
    report = run.report
    by_name = {t["nodeid"].split("::")[-1]: t for t in report["tests"]}

    # Cut, said how much, and the test's outcome is its own.
    big = by_name["test_big_log_passes"]
    assert big["outcome"] == "passed"
    (entry,) = big["artifacts"]
    assert entry["cut"]
    assert entry["size"] == 3000
    assert entry["bytes"] == 1024
    assert entry["cut_reason"] == "per-test limit"
    assert "artifacts: 2 files of 2 tests in arts (1 cut, 0 with errors)" in run.result.stdout.str()
    kept = arts / nodeid_folder(big["nodeid"]) / "huge.log"
    assert kept.read_bytes() == b"x" * 1024
    assert entry["sha256"] == sha(b"x" * 1024)

    # --celery-artifacts-tmp-path=failed: the failed test's tmp_path, not the passing one's.
    failed = by_name["test_fails_with_tmp_path"]
    assert failed["outcome"] == "failed"
    (state,) = failed["artifacts"]
    assert state["name"] == f"{TMP_PATH_PREFIX}/state.txt"
    landed = arts / nodeid_folder(failed["nodeid"]) / TMP_PATH_PREFIX / "state.txt"
    assert landed.read_text() == "failed state"
    passing = by_name["test_passes_with_tmp_path"]
    assert passing["outcome"] == "passed"
    assert "artifacts" not in passing
    assert not (arts / nodeid_folder(passing["nodeid"])).exists()


LOCAL = """
def test_local_failure(dispatch_artifacts):
    print("own output")
    (dispatch_artifacts / "scope.csv").write_text("t,v\\n0,1\\n")
    assert False

def test_local_pass(dispatch_artifacts):
    (dispatch_artifacts / "ok.txt").write_text("fine")
"""


@pytest.mark.parametrize("logging", ["no", "system-out", "all"])
def test_a_local_run_lands_in_the_folder_and_junit_has_one_system_out(pytester, logging):
    """Without --celery-dispatch the fixture is DIR/<nodeid as a path> itself; the ATTACHMENT
    lines join the system-out pytest writes (junit_logging) or make the only one."""
    pytester.makepyfile(test_local=LOCAL)
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess(
        f"--junitxml={junit}", "-o", f"junit_logging={logging}", "-p", "no:cacheprovider"
    )
    assert result.ret == 1
    folder = pytester.path / "dispatch_artifacts" / "test_local.py"
    assert (folder / "test_local_failure" / "scope.csv").read_text() == "t,v\n0,1\n"
    assert (folder / "test_local_pass" / "ok.txt").read_text() == "fine"
    result.stdout.fnmatch_lines(
        [f"*{SECTION}*", "dispatch_artifacts/test_local.py/*scope.csv (8 bytes*"]
    )
    for case in ET.parse(junit).getroot().iter("testcase"):
        outs = list(case.iter("system-out"))
        assert len(outs) == 1, (logging, [o.text for o in outs])
        name = "scope.csv" if case.get("name") == "test_local_failure" else "ok.txt"
        assert f"[[ATTACHMENT|dispatch_artifacts/test_local.py/{case.get('name')}/{name}]]" in (
            outs[0].text or ""
        )
        if logging != "no" and name == "scope.csv":
            assert "own output" in (outs[0].text or "")


CRASH = """
import os
import pytest

pytestmark = pytest.mark.queue("QUEUE_A")

def test_takes_its_process_down(dispatch_artifacts):
    (dispatch_artifacts / "last-words.log").write_text("watchdog reset")
    os._exit(3)
"""


def test_the_files_of_a_test_that_takes_its_process_down_come_home(
    pytester, queues, run_dispatched, transport
):
    pytester.makepyfile(test_crash=queues.render(CRASH))
    run = run_dispatched()
    (test,) = run.report["tests"]
    assert test["outcome"] == "failed"
    assert "crashed" in test["dispatch"]["infrastructure_error"]
    (entry,) = test["artifacts"]
    assert entry["name"] == "last-words.log"
    assert (run.report_path.parent / entry["path"]).read_text() == "watchdog reset"


KILLED = """
import os
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.queue("QUEUE")
SHARED = Path(SHARED_DIR)

def test_survives_its_worker(dispatch_artifacts, dispatch_context):
    (dispatch_artifacts / "attempt.txt").write_text(dispatch_context.worker)
    first = SHARED / "first-attempt"
    if not first.exists():
        (dispatch_artifacts / "only-in-the-first-attempt.txt").write_text("lost")
        (SHARED / "tmp").write_text(dispatch_context.worker)
        (SHARED / "tmp").rename(first)  # whole, never seen half-written
        time.sleep(120)  # its worker is killed here
"""


@pytest.mark.parametrize("broker", [BROKER, EMBEDDED], ids=["rabbitmq", "embedded"])
def test_a_worker_killed_mid_test_loses_that_attempts_files_only(
    pytester, worker_factory, controller, broker
):
    first = worker_factory(worker_id="worker-k1", broker=broker)
    second = worker_factory(queue=first.queue, worker_id="worker-k2", broker=broker)
    shared = pytester.path / "shared"
    shared.mkdir()
    source = KILLED.replace("QUEUE", first.queue).replace("SHARED_DIR", repr(str(shared)))
    pytester.makepyfile(test_killed=source)
    ctl = controller("--celery-timeout=60", broker=broker)
    ctl.wait_for(lambda lines: (shared / "first-attempt").exists())
    victim_id = (shared / "first-attempt").read_text()
    victim, survivor = (first, second) if victim_id == "worker-k1" else (second, first)
    victim.signal(signal.SIGKILL)
    assert ctl.wait(120) == 0, ctl.text()
    report = json.loads(ctl.report.read_text())
    (test,) = report["tests"]
    said = f"{test['dispatch']}\n{ctl.text()[-3000:]}"
    assert test["outcome"] == "passed", said
    assert test["dispatch"]["attempts"] >= 2, said
    assert test["dispatch"]["worker"] == survivor.worker_id, said
    (entry,) = test["artifacts"]  # the retry's file, nothing of the killed attempt
    assert entry["name"] == "attempt.txt"
    assert (ctl.report.parent / entry["path"]).read_text() == survivor.worker_id
    folder = ctl.report.parent / report["dispatch"]["artifacts"]["dir"]
    files = sorted(p.name for p in folder.rglob("*") if p.is_file())
    assert files == ["attempt.txt"]  # nothing of the killed attempt, not even in .incoming
