"""The timeline's model (pure): tests read from the JSON report, lanes, and the small
formatting helpers the page uses. :mod:`.timeline` draws the page from it."""

from __future__ import annotations

import dataclasses
import html
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

#: Fill colours by outcome (pytest-json-report's outcome names, plus rerun).
COLORS: dict[str, str] = {
    "passed": "#2f9e44",
    "failed": "#e03131",
    "error": "#8b1a1a",
    "skipped": "#f2c230",
    "xfailed": "#e59f2b",
    "xpassed": "#c2c23a",
    "rerun": "#868e96",
    "other": "#adb5bd",
}
OUTCOME_ORDER = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "rerun")

EXIT_CODES = {
    0: "all tests passed",
    1: "some tests failed",
    2: "interrupted",
    3: "internal error",
    4: "usage error",
    5: "no tests collected",
}

# Geometry of the chart, in pixels.
LABEL_W = 270  # lane labels
PLOT_W = 880  # the time axis
RIGHT_W = 150  # per-lane busy share / critical-path tag
LANE_H = 24
BAR_H = 16
AXIS_H = 26
MIN_BAR_W = 1.0
MIN_INFRA_W = 6.0
THIN_BAR_W = 3.0  # narrower bars have no outline: it would hide their colour
LABEL_CHARS = 40
TITLE_ERROR_CHARS = 400
#: At most this many rows in the table of tests without a bar.
TABLE_LIMIT = 500
SEPARATOR = " \u00b7 "

_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


# ---------------------------------------------------------------------------------- helpers


def _clean(text: str) -> str:
    """No control characters, no lone surrogates (they would not even encode as UTF-8)."""
    return _BAD_CHARS.sub("\ufffd", text)


def _e(value: object) -> str:
    """Escape any value for HTML text and attribute values (quotes included)."""
    return html.escape(_clean(str(value)), quote=True)


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text or None


def _map(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _seconds(value: float | None) -> str:
    """A duration for people: ``850 ms``, ``12.35 s``, ``-``."""
    if value is None:
        return "-"
    if abs(value) < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.2f} s"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _outcome_class(outcome: str) -> str:
    return outcome if outcome in COLORS else "other"


def _phase_duration(test: Mapping[str, Any]) -> float:
    total = 0.0
    for when in ("setup", "call", "teardown"):
        duration = _num(_map(test.get(when)).get("duration"))
        if duration is not None and duration > 0:
            total += duration
    return total


def _nice_step(span: float, target: int = 10) -> float:
    """A tick step of 1, 2, 2.5 or 5 times a power of ten giving about ``target`` ticks."""
    raw = span / target
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for factor in (1.0, 2.0, 2.5, 5.0, 10.0):
        if factor * magnitude >= raw * 0.999:
            return factor * magnitude
    return 10.0 * magnitude  # pragma: no cover - the loop always returns


def _tick_label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if round(step / 10.0 ** math.floor(math.log10(step) + 1e-9), 6) == 2.5:
        decimals += 1
    return f"{value:.{decimals}f} s"


def _n(value: float) -> str:
    """A coordinate: two decimals at most, no trailing zeros."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


# ---------------------------------------------------------------------------------- model


@dataclasses.dataclass
class _Test:
    nodeid: str
    outcome: str
    duration: float
    queue: str | None
    worker: str | None
    session: str | None
    attempts: int | None
    task_id: str | None
    hostname: str | None
    infra: str | None
    sent: float | None
    started: float | None
    finished: float | None

    @property
    def start(self) -> float | None:
        """When the bar starts: ``started``, or ``finished`` minus the duration."""
        if self.started is not None:
            return self.started
        if self.finished is not None:
            return self.finished - self.duration
        return None

    @property
    def end(self) -> float | None:
        start = self.start
        if start is None:
            return None
        if self.finished is not None and self.finished >= start:
            return self.finished
        return start + self.duration

    @property
    def local(self) -> bool:
        return self.queue is None


@dataclasses.dataclass
class _Lane:
    key: tuple[str, ...]
    queue: str | None
    worker: str | None
    session: str | None
    tests: list[_Test] = dataclasses.field(default_factory=list)
    label: str = ""
    slot: int = 0
    first: float = math.inf
    last: float = -math.inf
    busy: float = 0.0

    def sort_key(self) -> tuple[bool, str, str, bool, int, str]:
        """Queue by queue, worker by worker, slot by slot; the controller's lane last."""
        return (
            self.key[0] == "local",
            self.queue or "",
            self.worker or "",
            self.key[0] != "session",
            self.slot,
            self.session or "",
        )


def _read_test(raw: Mapping[str, Any]) -> _Test:
    info = _map(raw.get("dispatch"))
    attempts = info.get("attempts")
    worker = _text(info.get("worker"))
    return _Test(
        nodeid=str(raw.get("nodeid", "")),
        outcome=str(raw.get("outcome") or "error"),
        duration=_phase_duration(raw),
        queue=_text(info.get("queue")),
        worker=worker,
        session=_text(info.get("session")),
        attempts=attempts if isinstance(attempts, int) and not isinstance(attempts, bool) else None,
        task_id=_text(info.get("task_id")),
        hostname=_text(info.get("hostname")),
        infra=_text(info.get("infrastructure_error")),
        sent=_num(info.get("sent")),
        started=_num(info.get("started")),
        finished=_num(info.get("finished")),
    )


def _lane_key(test: _Test) -> tuple[str, ...]:
    if test.local:
        return ("local",)
    if test.session is not None:
        return ("session", test.session)
    if test.worker is not None:
        return ("worker", test.worker, test.queue or "")
    return ("queue", test.queue or "")


def _build_lanes(drawn: list[_Test]) -> list[_Lane]:
    lanes: dict[tuple[str, ...], _Lane] = {}
    for test in drawn:
        key = _lane_key(test)
        lane = lanes.get(key)
        if lane is None:
            lane = lanes[key] = _Lane(key, test.queue, test.worker, test.session)
        lane.tests.append(test)
    for lane in lanes.values():
        lane.tests.sort(key=lambda t: (t.start or 0.0, t.nodeid))
        lane.first = min(t.start or 0.0 for t in lane.tests)
        lane.last = max(t.end or 0.0 for t in lane.tests)
        # The worker of a slot is the one most of its tests name (a slot runs on one worker).
        if lane.key[0] == "session":
            counts: dict[str, int] = {}
            for test in lane.tests:
                if test.worker:
                    counts[test.worker] = counts.get(test.worker, 0) + 1
            lane.worker = max(counts, key=lambda w: (counts[w], w)) if counts else None
        lane.busy = _union_length((t.start or 0.0, t.end or 0.0) for t in lane.tests)
    # Slot numbers: 1..n per worker and queue, in the order the slots started.
    slots: dict[tuple[str, str], int] = {}
    for lane in sorted(lanes.values(), key=lambda ln: (ln.first, ln.session or "")):
        if lane.key[0] != "session":
            continue
        group = (lane.worker or "", lane.queue or "")
        slots[group] = lane.slot = slots.get(group, 0) + 1
    for lane in lanes.values():
        worker = lane.worker or "(no worker)"
        if lane.key[0] == "local":
            lane.label = "local (controller)"
        elif lane.key[0] == "session":
            lane.label = f"{worker} / {lane.queue} / slot {lane.slot}"
        elif lane.key[0] == "worker":
            lane.label = f"{worker} / {lane.queue} / no slot"
        else:
            lane.label = f"(no worker) / {lane.queue}"
    return sorted(lanes.values(), key=_Lane.sort_key)


def _union_length(intervals: Iterable[tuple[float, float]]) -> float:
    total = 0.0
    current: tuple[float, float] | None = None
    for start, end in sorted(intervals):
        if current is None or start > current[1]:
            if current is not None:
                total += current[1] - current[0]
            current = (start, end)
        elif end > current[1]:
            current = (current[0], end)
    if current is not None:
        total += current[1] - current[0]
    return total


# ---------------------------------------------------------------------------------- render
