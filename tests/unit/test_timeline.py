"""timeline.py: the --celery-timeline HTML picture, from hand-made JSON reports."""

from __future__ import annotations

import html
import json
import re
import time
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from pytest_celery_dispatch.timeline import render_timeline

SCHEMA_PATH = Path(__file__).parents[2] / "pytest_celery_dispatch" / "report.schema.json"

T0 = 1_700_000_000.0
WEIRD = "tests/test_b.py::test_odd[<script>&\"'ü]"
CRASHED = "tests/test_a.py::test_crash"
LOST = "tests/test_b.py::test_lost"
LOCAL_PLAIN = "tests/test_local.py::test_plain"
LOCAL_TIMED = "tests/test_local.py::test_timed"

VOID = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "param",
    "source",
    "track",
    "wbr",
}


def record(
    nodeid: str,
    outcome: str,
    *,
    queue: str | None,
    worker: str | None,
    session: str | None,
    started: float | None,
    finished: float | None,
    call: float | None = None,
    setup: float = 0.0,
    attempts: int = 1,
    infra: str | None = None,
) -> dict[str, Any]:
    """A JSON-report test record; times are seconds after T0 (None stays null)."""
    if call is None:
        call = (finished - started) if started is not None and finished is not None else 0.0
    return {
        "nodeid": nodeid,
        "lineno": 1,
        "keywords": [],
        "outcome": outcome,
        "setup": {"duration": setup, "outcome": "failed" if outcome == "error" else "passed"},
        "call": {"duration": call, "outcome": "failed" if outcome == "failed" else "passed"},
        "teardown": {"duration": 0.0, "outcome": "passed"},
        "dispatch": {
            "queue": queue,
            "worker": worker,
            "hostname": f"{worker}-host" if worker else None,
            "task_id": f"task-{nodeid}" if queue else None,
            "attempts": attempts if queue else 0,
            "sent": T0 if queue else None,
            "started": None if started is None else T0 + started,
            "finished": None if finished is None else T0 + finished,
            "infrastructure_error": infra,
            "session": session,
        },
    }


def sample_tests() -> list[dict[str, Any]]:
    a, b = "queue_a", "queue_b"
    return [
        # worker-a, two slots on queue_a
        record("tests/test_a.py::test_pass", "passed", queue=a, worker="worker-a",
               session="r.s1", started=0.5, finished=2.5),
        record("tests/test_a.py::test_fail", "failed", queue=a, worker="worker-a",
               session="r.s1", started=3.0, finished=4.0),
        record("tests/test_a.py::test_skip", "skipped", queue=a, worker="worker-a",
               session="r.s1", started=4.0, finished=4.1),
        record("tests/test_a.py::test_error", "error", queue=a, worker="worker-a",
               session="r.s2", started=0.6, finished=1.6),
        record("tests/test_a.py::test_xfail", "xfailed", queue=a, worker="worker-a",
               session="r.s2", started=5.0, finished=6.0),
        # crashed: started, never finished; the bar is the phase durations (0.5 s)
        record(CRASHED, "failed", queue=a, worker="worker-a", session="r.s2",
               started=7.0, finished=None, setup=0.2, call=0.3,
               infra=f"{CRASHED} crashed on worker-a (queue queue_a, attempt 1): "
               "killed by SIGSEGV"),
        # a worker without a session
        record("tests/test_a.py::test_no_session", "passed", queue=a, worker="worker-c",
               session=None, started=1.0, finished=2.0),
        # worker-b, one slot on queue_b: the last to finish (critical path)
        record("tests/test_b.py::test_xpass", "xpassed", queue=b, worker="worker-b",
               session="r.s3", started=0.5, finished=3.5, attempts=2),
        record(WEIRD, "failed", queue=b, worker="worker-b", session="r.s3",
               started=4.0, finished=10.0),
        # never started anywhere: no bar
        record(LOST, "failed", queue=b, worker=None, session=None, started=None,
               finished=None, attempts=3,
               infra=f"no worker of queue queue_b started {LOST} after 3 attempts"),
        # local tests: one without times (table), one with times (local lane)
        record(LOCAL_PLAIN, "passed", queue=None, worker="local", session=None,
               started=None, finished=None, call=0.01),
        record(LOCAL_TIMED, "passed", queue=None, worker="local", session=None,
               started=0.2, finished=0.3),
    ]  # fmt: skip


def sample_report(tests: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    tests = sample_tests() if tests is None else tests
    summary: dict[str, int] = {}
    for test in tests:
        summary[test["outcome"]] = summary.get(test["outcome"], 0) + 1
    summary["total"] = summary["collected"] = len(tests)
    return {
        "created": T0 - 0.5,
        "duration": 13.0,
        "exitcode": 1,
        "root": "/src/<bench>",
        "environment": {},
        "summary": summary,
        "tests": tests,
        "dispatch": {
            "report_version": 1,
            "run_id": "r",
            "broker": "amqp://guest:**@localhost:5672//",
            "backend": "rpc://",
            "consumers": {"queue_a": 2, "queue_b": 1},
            "slots": {"queue_a": 3, "queue_b": 1},
            "queues": {
                "queue_a": {
                    "consumers": 2,
                    "tests": 7,
                    "outcomes": {"passed": 2, "failed": 2, "error": 1, "skipped": 1, "xfailed": 1},
                    "total_duration": 7.5,
                    "avg_duration": 1.07,
                    "min_duration": 0.1,
                    "max_duration": 2.0,
                },
                "queue_b": {
                    "consumers": 1,
                    "tests": 3,
                    "outcomes": {"xpassed": 1, "failed": 2},
                    "total_duration": 10.0,
                    "avg_duration": 3.3,
                    "min_duration": 0.0,
                    "max_duration": 6.0,
                },
            },
            "workers": {
                "worker-a": {
                    "queues": ["queue_a"],
                    "tests": 6,
                    "outcomes": {"passed": 1},
                    "busy_time": 6.0,
                    "utilisation": 0.48,
                },
                "worker-b": {
                    "queues": ["queue_b"],
                    "tests": 2,
                    "outcomes": {"failed": 1},
                    "busy_time": 9.0,
                    "utilisation": 0.72,
                },
            },
            "wall_time": 12.5,
            "sum_of_test_durations": 15.4,
            "speedup": 1.2345,
        },
    }


class Doc(HTMLParser):
    """Parses the document: tag balance, bars (data-nodeid) per lane, texts by class."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.bars: list[dict[str, str]] = []
        self.lane: str | None = None
        self.texts: dict[str, list[str]] = {}
        self._text_class: str | None = None
        self._in_title = False
        self._buffer: list[str] = []
        self.data: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self._element(tag, attributes)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._element(tag, {k: v or "" for k, v in attrs})

    def _element(self, tag: str, attributes: dict[str, str]) -> None:
        if tag == "g" and "data-lane" in attributes:
            self.lane = attributes["data-lane"]
        if "data-nodeid" in attributes:
            self.bars.append({**attributes, "lane": self.lane or "", "tag": tag})
        if tag == "text":
            self._text_class = attributes.get("class", "")
            self._buffer = []
        if tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag == "g":
            self.lane = None
        if tag == "title":
            self._in_title = False
        if tag == "text" and self._text_class is not None:
            self.texts.setdefault(self._text_class, []).append("".join(self._buffer))
            self._text_class = None

    def handle_data(self, data: str) -> None:
        self.data.append(data)
        if self._text_class is not None and not self._in_title:
            self._buffer.append(data)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.data).split())


@pytest.fixture(scope="module")
def page() -> str:
    return render_timeline(sample_report())


@pytest.fixture(scope="module")
def doc(page: str) -> Doc:
    return Doc(page)


def has_times(test: dict[str, Any]) -> bool:
    info = test["dispatch"]
    return info["started"] is not None or info["finished"] is not None


def test_the_hand_made_report_has_the_json_report_layout() -> None:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.validate(sample_report(), schema)


def test_the_document_parses_with_balanced_tags(page: str, doc: Doc) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert doc.problems == []
    assert doc.stack == []
    assert page.rstrip().endswith("</html>")
    page.encode("utf-8")


def test_nothing_is_fetched_from_the_network(page: str) -> None:
    lowered = page.lower()
    for needle in ("src=", "@import", "url(http", "<link", "<img", "<iframe"):
        assert needle not in lowered, needle
    # one inline script (the hover box); links only to places in the page or beside it
    assert lowered.count("<script") == 1
    assert all(not re.match(r"[a-z]+:|//", h) for h in re.findall(r'href="([^"]*)"', lowered))
    # the only url() references are the in-document hatch patterns
    assert set(re.findall(r"url\((.)", lowered)) <= {"#"}


def test_every_test_with_times_is_drawn_exactly_once(page: str, doc: Doc) -> None:
    tests = sample_tests()
    drawn = Counter(bar["data-nodeid"] for bar in doc.bars)
    raw = Counter(html.unescape(m) for m in re.findall(r'data-nodeid="([^"]*)"', page))
    assert drawn == raw
    for test in tests:
        expected = 1 if has_times(test) else 0
        assert drawn[test["nodeid"]] == expected, test["nodeid"]
    assert sum(drawn.values()) == sum(1 for t in tests if has_times(t)) == 10
    assert all(bar["tag"] == "rect" for bar in doc.bars)


def test_lanes_are_worker_slots_in_queue_order(doc: Doc) -> None:
    assert doc.texts["lbl critlbl"] == ["worker-b / queue_b / slot 1"]
    labels = doc.texts["lbl"] + doc.texts["lbl critlbl"]
    assert sorted(labels) == sorted(
        [
            "worker-a / queue_a / slot 1",
            "worker-a / queue_a / slot 2",
            "worker-c / queue_a / no slot",
            "worker-b / queue_b / slot 1",
            "local (controller)",
        ]
    )
    lane_of = {bar["data-nodeid"]: bar["lane"] for bar in doc.bars}
    assert lane_of["tests/test_a.py::test_pass"] == "worker-a / queue_a / slot 1"
    assert lane_of["tests/test_a.py::test_error"] == "worker-a / queue_a / slot 2"
    assert lane_of[CRASHED] == "worker-a / queue_a / slot 2"
    assert lane_of["tests/test_a.py::test_no_session"] == "worker-c / queue_a / no slot"
    assert lane_of[WEIRD] == "worker-b / queue_b / slot 1"
    assert lane_of[LOCAL_TIMED] == "local (controller)"


def test_bars_are_coloured_by_outcome_and_crashes_stand_out(doc: Doc) -> None:
    classes = {bar["data-nodeid"]: bar["class"].split() for bar in doc.bars}
    for test in sample_tests():
        if has_times(test):
            assert f"o-{test['outcome']}" in classes[test["nodeid"]]
    assert "infra" in classes[CRASHED]
    assert [n for n, c in classes.items() if "infra" in c] == [CRASHED]


def test_hover_titles_say_what_where_and_which_attempt(page: str) -> None:
    titles = dict(
        re.findall(r'data-nodeid="([^"]*)"><title>([^<]*)</title>', page),
    )
    weird = html.unescape(titles[html.escape(WEIRD, quote=True)])
    assert weird.startswith(WEIRD + "\n")
    assert "failed" in weird
    assert "duration 6.00 s" in weird
    assert "worker worker-b" in weird
    assert "queue queue_b" in weird
    xpass = html.unescape(titles["tests/test_b.py::test_xpass"])
    assert "attempt 2" in xpass
    crashed = html.unescape(titles[CRASHED])
    assert "killed by SIGSEGV" in crashed
    assert "no finish time" in crashed


def test_bar_geometry_follows_the_times() -> None:
    tests = [
        # the bar is started..finished, not the (shorter) phase durations
        record("t::first", "passed", queue="q", worker="w", session="s", started=0, finished=2,
               call=1.0),
        record("t::second", "passed", queue="q", worker="w", session="s", started=2, finished=4),
        # no finish time: 1.5 s of phase durations
        record("t::open", "failed", queue="q", worker="w", session="s", started=4,
               finished=None, setup=0.5, call=1.0),
    ]  # fmt: skip
    doc = Doc(render_timeline(sample_report(tests)))
    bars = {bar["data-nodeid"]: bar for bar in doc.bars}
    x = {n: float(b["x"]) for n, b in bars.items()}
    w = {n: float(b["width"]) for n, b in bars.items()}
    assert w["t::first"] == pytest.approx(w["t::second"], abs=0.02)
    assert x["t::second"] - x["t::first"] == pytest.approx(w["t::first"], abs=0.02)
    assert w["t::open"] == pytest.approx(0.75 * w["t::first"], abs=0.02)
    assert x["t::open"] - x["t::second"] == pytest.approx(w["t::first"], abs=0.02)
    # earliest sent time (T0) is 0 s, so the first bar starts where the axis does
    ticks = doc.texts["tick"]
    assert ticks[:2] == ["0 s", "0 s"]  # top and bottom axis
    assert "6 s" in ticks


def test_time_axis_has_second_ticks(doc: Doc) -> None:
    ticks = set(doc.texts["tick"])
    assert {"0 s", "2 s", "4 s", "6 s", "8 s", "10 s"} <= ticks


def test_header_numbers(doc: Doc) -> None:
    text = doc.text
    assert "exit code 1 some tests failed" in text
    assert "wall time 12.50 s" in text
    assert "tests 12 10 dispatched, 2 local" in text
    assert "speed-up 1.23\u00d7" in text
    for count in ("4 passed", "4 failed", "1 error", "1 skipped", "1 xfailed", "1 xpassed"):
        assert count in text, count
    # queue: consumers, configured slots, lanes used, tests; utilisation busy / (wall x slots):
    # 7.5 / (12.5 x 3) and 10 / (12.5 x 1)
    assert re.search(r"queue_a 2 3 3 7 .*? 7\.50 s 20%", text)
    assert re.search(r"queue_b 1 1 1 3 .*? 10\.00 s 80%", text)
    # workers whose slots the report does not know: "-", utilisation per lane used:
    # worker-a 6 / (12.5 x 2 lanes)
    assert re.search(r"worker-a queue_a - 2 6 .*? 6\.00 s 24%", text)
    assert re.search(r"worker-b queue_b - 1 2 .*? 9\.00 s 72%", text)


def test_critical_path_is_the_lane_that_ends_last(doc: Doc) -> None:
    assert "critical path: worker-b / queue_b / slot 1, ends at 10.00 s" in doc.text
    critical = {bar["data-nodeid"] for bar in doc.bars if "crit" in bar["class"].split()}
    assert critical == {"tests/test_b.py::test_xpass", WEIRD}


def test_idle_time_is_the_lane_background(page: str, doc: Doc) -> None:
    assert page.count('<rect class="lane') == 5
    assert "idle (lane background)" in doc.text
    # worker-a slot 2: busy 0.6-1.6, 5.0-6.0, 7.0-7.5 of 7.5 s
    assert "33% busy" in doc.texts["busy"]


def test_tests_without_times_are_listed_not_drawn(doc: Doc) -> None:
    assert "Tests without a bar (2: 1 dispatched without start time, 1 run in the controller)" in (
        doc.text
    )
    assert LOST in doc.text
    assert f"no worker of queue queue_b started {LOST} after 3 attempts" in doc.text
    assert LOCAL_PLAIN in doc.text
    assert LOST not in {bar["data-nodeid"] for bar in doc.bars}


def test_report_strings_are_escaped(page: str, doc: Doc) -> None:
    assert page.count("<script") == 1  # the page's own hover script, none from the report
    assert "<bench>" not in page
    assert "&lt;script&gt;&amp;&quot;&#x27;ü" in page
    assert WEIRD in doc.text or WEIRD in {bar["data-nodeid"] for bar in doc.bars}
    assert "root /src/<bench>" in doc.text


def test_control_characters_and_lone_surrogates_do_not_break_the_file() -> None:
    odd = "t.py::test[\x00\x1b\ud800]"
    tests = [record(odd, "passed", queue="q", worker="w", session="s", started=0, finished=1)]
    page = render_timeline(sample_report(tests))
    page.encode("utf-8")
    doc = Doc(page)
    assert doc.problems == []
    assert doc.stack == []
    assert [bar["data-nodeid"] for bar in doc.bars] == ["t.py::test[\ufffd\ufffd\ufffd]"]


@pytest.mark.parametrize(
    "report",
    [
        {},
        {"tests": [], "summary": {"total": 0, "collected": 0}, "exitcode": 5},
        sample_report([sample_tests()[-2]]),  # one local test, no times
    ],
)
def test_nothing_to_draw_is_still_a_document(report: dict[str, Any]) -> None:
    page = render_timeline(report)
    doc = Doc(page)
    assert doc.problems == []
    assert doc.stack == []
    assert doc.bars == []
    assert "nothing to draw" in doc.text


def test_five_thousand_tests() -> None:
    tests = []
    lanes = 40
    clock = [0.0] * lanes
    for i in range(5000):
        lane = i % lanes
        queue = "queue_a" if lane < 25 else "queue_b"
        duration = 0.05 + (i * 7919 % 100) / 200
        tests.append(
            record(
                f"tests/test_mod{i % 50}.py::test_case[{i}-<&>]",
                ("passed", "failed", "error", "skipped", "xfailed", "xpassed")[i % 6],
                queue=queue,
                worker=f"bench-{lane // 4}",
                session=f"r.s{lane}",
                started=clock[lane],
                finished=clock[lane] + duration,
            )
        )
        clock[lane] += duration + (1.0 if i % 97 == 0 else 0.01)
    started = time.perf_counter()
    page = render_timeline(sample_report(tests))
    elapsed = time.perf_counter() - started
    size = len(page.encode("utf-8"))
    assert size < 5_000_000, size
    doc = Doc(page)
    assert doc.problems == []
    assert doc.stack == []
    drawn = Counter(bar["data-nodeid"] for bar in doc.bars)
    assert len(drawn) == 5000
    assert set(drawn.values()) == {1}
    assert page.count('<rect class="lane') == lanes
    print(f"5000 tests: {elapsed:.2f}s, {size / 1e6:.2f} MB")


def test_slots_mean_configured_slots_in_both_tables_and_lanes_used_apart() -> None:
    # `make demo`: worker-a alone on queue_a with -c 2 ran its 3 tests on one slot.
    tests = [
        record(f"t.py::test_{i}", "passed", queue="queue_a", worker="worker-a",
               session="r.s1", started=float(i), finished=i + 1.0)
        for i in range(3)
    ]  # fmt: skip
    report = sample_report(tests)
    report["dispatch"]["consumers"] = {"queue_a": 1}
    report["dispatch"]["slots"] = {"queue_a": 2}
    report["dispatch"]["queues"] = {
        "queue_a": {"consumers": 1, "tests": 3, "outcomes": {"passed": 3},
                    "total_duration": 3.0, "slots": 2, "lanes_used": 1},
    }  # fmt: skip
    report["dispatch"]["workers"] = {
        "worker-a": {"queues": ["queue_a"], "tests": 3, "outcomes": {"passed": 3},
                     "busy_time": 3.0, "slots": 2, "lanes_used": 1},
    }  # fmt: skip
    report["dispatch"]["wall_time"] = 4.0
    text = Doc(render_timeline(report)).text
    assert "consumers slots lanes used tests" in text
    # busy / (wall x configured slots) = 3 / (4 x 2), in both tables
    assert re.search(r"queue_a 1 2 1 3 .*? 3\.00 s 38%", text), text
    assert re.search(r"worker-a queue_a 2 1 3 .*? 3\.00 s 38%", text), text
