"""The timeline of a real run, in a real browser: headless Chromium (Debian's ``chromium``).

Driven over the DevTools protocol on a pipe (tests/browser.py), so nothing beyond the browser
is installed. Without Chromium the tests skip and say how to install it, unless
``CELERY_DISPATCH_REQUIRE_BROWSER=1`` (set by .ci/run) makes that a failure.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from pytest_celery_dispatch.timeline import render_timeline
from pytest_celery_dispatch.timeline_model import COLORS
from tests.browser import Chromium, find_chromium

pytestmark = pytest.mark.usefixtures("workers")

REQUIRE_ENV = "CELERY_DISPATCH_REQUIRE_BROWSER"
INSTALL_HINT = "apt-get install -y chromium (make test and .ci/run install it when they can)"
LARGE_RUN = 5_000

SUITE = """
import pytest

def test_local_here():
    pass

@pytest.mark.queue("QUEUE_A")
class TestA:
    def test_pass(self):
        pass

    def test_fail(self):
        assert 1 == 2

    def test_skip(self):
        pytest.skip("no device")

    @pytest.mark.xfail(reason="known")
    def test_xfail(self):
        assert 0

    def test_console(self, dispatch_artifacts):
        (dispatch_artifacts / "console.log").write_text("uart: boot ok\\n")
        assert False, "the device did not answer"

@pytest.mark.queue("QUEUE_B")
def test_b():
    pass

@pytest.mark.queue("QUEUE_B")
@pytest.mark.parametrize("n", range(6))
def test_b_many(n):
    pass
"""


@pytest.fixture
def chromium():
    binary = find_chromium()
    if binary is None:
        message = f"no Chromium on this machine: {INSTALL_HINT}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 and {message}")
        pytest.skip(message)
    browser = Chromium(binary)
    yield browser
    browser.close()


def rgb(hex_color: str) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


BARS_JS = """
Array.from(document.querySelectorAll('rect.b')).map(function(r){
  var box = r.getBoundingClientRect();
  return {nodeid: r.getAttribute('data-nodeid'), fill: getComputedStyle(r).fill,
          w: box.width, h: box.height, linked: !!r.closest('a.artlink')};
})
"""

CENTER_JS = """
(function(sel){
  var el = document.querySelector(sel); el.scrollIntoView({block: 'center'});
  var b = el.getBoundingClientRect(); return [b.left + b.width / 2, b.top + b.height / 2];
})(%s)
"""


def center(browser: Chromium, selector: str) -> tuple[float, float]:
    x, y = browser.evaluate(CENTER_JS % json.dumps(selector))
    return float(x), float(y)


def test_the_timeline_of_a_real_run_in_chromium(
    pytester, queues, run_dispatched, chromium, dispatch_artifacts
):
    pytester.makepyfile(test_bench=queues.render(SUITE))
    timeline = pytester.path / "timeline.html"
    run = run_dispatched(f"--celery-timeline={timeline}")
    assert run.result.ret == 1, run.result.stdout.str()
    tests = {t["nodeid"]: t for t in run.report["tests"]}
    assert len(tests) == 13

    chromium.open(timeline.as_uri())
    assert chromium.errors == []

    # Every test's bar is drawn, in its outcome's colour.
    bars = chromium.evaluate(BARS_JS)
    assert sorted(b["nodeid"] for b in bars) == sorted(tests)
    for bar in bars:
        outcome = tests[bar["nodeid"]]["outcome"]
        assert bar["fill"] == rgb(COLORS[outcome]), bar
        assert bar["w"] > 0
        assert bar["h"] > 0

    # Hovering a bar shows its nodeid.
    failed = next(n for n, t in tests.items() if n.endswith("test_fail"))
    x, y = center(chromium, f'rect.b[data-nodeid="{failed}"]')
    chromium.mouse("mouseMoved", x, y)
    tip = chromium.evaluate(
        "(function(){var t=document.getElementById('tip');"
        "return [getComputedStyle(t).display, t.textContent];})()"
    )
    assert tip[0] == "block"
    assert tip[1].splitlines()[0] == failed
    chromium.screenshot(dispatch_artifacts / "timeline.png")  # kept with the suite's results

    # The bar of the test with an artifact links to it, and the link opens the file.
    console = next(n for n, t in tests.items() if n.endswith("test_console"))
    assert [b["nodeid"] for b in bars if b["linked"]] == [console]
    chromium.click(*center(chromium, f'rect.b[data-nodeid="{console}"]'))
    assert chromium.evaluate("location.hash") == "#art-0"
    (entry,) = tests[console]["artifacts"]
    mark = len(chromium.events)
    chromium.click(*center(chromium, "#art-0 a.art"))
    chromium.wait_event("Page.loadEventFired", since=mark)
    opened = chromium.evaluate("location.href")
    assert opened == (run.report_path.parent / entry["path"]).resolve().as_uri()
    assert chromium.evaluate("document.body.innerText").strip() == "uart: boot ok"
    assert chromium.errors == []


def test_the_slots_are_said_one_way_in_the_header_and_both_tables(
    pytester, queues, run_dispatched, chromium
):
    """Configured slots (each worker's Celery concurrency) and lanes that ran work, apart."""
    one = 'import pytest\n\n@pytest.mark.queue("QUEUE_A")\ndef test_one():\n    pass\n'
    pytester.makepyfile(test_one=queues.render(one))
    timeline = pytester.path / "timeline.html"
    run = run_dispatched(f"--celery-timeline={timeline}")
    assert run.result.ret == 0, run.result.stdout.str()
    chromium.open(timeline.as_uri())
    rows = chromium.evaluate(
        "Array.from(document.querySelectorAll('table')).map(function(t){"
        "return Array.from(t.rows).map(function(r){return Array.from(r.cells).map("
        "function(c){return c.textContent.trim();});});})"
    )
    tables = {t[0][0]: [dict(zip(t[0], row, strict=False)) for row in t[1:]] for t in rows if t}
    (queue_row,) = [r for r in tables["queue"] if r["queue"] == queues.a]
    (worker_row,) = [r for r in tables["worker"] if r["worker"] == "worker-a"]
    # worker-a alone serves queue A: the same configured slots, the same lanes that ran work.
    assert queue_row["slots"] == worker_row["slots"] == "2"
    assert queue_row["lanes used"] == worker_row["lanes used"] == "1"
    assert chromium.errors == []


def big_report(count: int) -> dict:
    """A JSON report of ``count`` tests on 4 workers x 4 slots, one in 20 failed."""
    tests = []
    for i in range(count):
        lane = i % 16
        start = 1000.0 + (i // 16) * 0.05
        outcome = "failed" if i % 20 == 0 else "passed"
        tests.append(
            {
                "nodeid": f"tests/test_gen_{i // 100}.py::test_case[{i}]",
                "outcome": outcome,
                "call": {"duration": 0.04, "outcome": outcome},
                "dispatch": {
                    "queue": f"queue_{lane // 4}",
                    "worker": f"worker-{lane // 4}",
                    "session": f"s{lane}",
                    "attempts": 1,
                    "sent": 999.0,
                    "started": start,
                    "finished": start + 0.04,
                },
            }
        )
    return {"created": 999.0, "duration": 20.0, "exitcode": 1, "tests": tests,
            "summary": {"total": count}, "dispatch": {"wall_time": 20.0}}  # fmt: skip


def test_a_5000_test_timeline_renders_whole(tmp_path, chromium, capsys):
    """Its size and render time are printed (docs/report.md says what was measured)."""
    started = time.perf_counter()
    page = render_timeline(big_report(LARGE_RUN))
    build = time.perf_counter() - started
    path = tmp_path / "big.html"
    path.write_text(page, encoding="utf-8")
    load_ms = chromium.open(path.as_uri())
    drawn = chromium.evaluate("document.querySelectorAll('rect.b').length")
    assert drawn == LARGE_RUN
    assert chromium.errors == []
    with capsys.disabled():
        print(
            f"\n[timeline] {LARGE_RUN} tests: {path.stat().st_size / 1e6:.2f} MB, built in "
            f"{build:.2f} s, painted by headless Chromium {load_ms:.0f} ms after navigating"
        )
