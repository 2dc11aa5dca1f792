"""The ``--celery-timeline`` picture: a self-contained HTML Gantt chart of a run (pure).

``render_timeline(report)`` takes the JSON report (``jsonreport.build_report``'s layout) and
returns one HTML document: inline CSS and SVG, one small hover script, nothing fetched from the
network.

* One lane per worker slot (the test's ``dispatch.session``), labelled ``worker / queue / slot n``;
  a dispatched test without a session goes to a lane of its worker; a test the controller ran
  goes to a ``local (controller)`` lane when it has times, otherwise to the table under the chart.
* One bar per test, from ``started`` to ``finished`` relative to the earliest ``sent`` /
  ``started`` time of the run (the sum of the phase durations when ``finished`` is missing),
  filled by outcome; infrastructure failures (crash, lost worker...) are hatched and outlined.
  Each bar carries ``data-nodeid`` and an SVG ``<title>`` (the hover text, shown in a box by
  :mod:`.timeline_links`); a test with artifacts has its bar linked to its files.
* The lane background is idle time; the lane that finishes last is the critical path.
* The queue and worker tables show configured slots (the report's ``slots``) and the lanes used
  (drawn) apart; utilisation is busy / (wall x configured slots).

Every string that comes from the report is escaped. The output is linear in the number of tests
(no per-bar script), so a run of thousands of tests stays a file of a few megabytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from .timeline_links import anchors, artifact_rows, artifacts_table, hover_box
from .timeline_model import (
    AXIS_H,
    BAR_H,
    COLORS,
    EXIT_CODES,
    LABEL_CHARS,
    LABEL_W,
    LANE_H,
    MIN_BAR_W,
    MIN_INFRA_W,
    OUTCOME_ORDER,
    PLOT_W,
    RIGHT_W,
    SEPARATOR,
    TABLE_LIMIT,
    THIN_BAR_W,
    TITLE_ERROR_CHARS,
    _build_lanes,
    _e,
    _Lane,
    _map,
    _n,
    _nice_step,
    _num,
    _outcome_class,
    _percent,
    _read_test,
    _seconds,
    _short,
    _Test,
    _text,
    _tick_label,
)

__all__ = ["render_timeline"]


def render_timeline(report: Mapping[str, Any], link_base: str = ".") -> str:
    """The whole HTML document for one JSON report; ``link_base`` is the report's folder as
    seen from the page's (artifact paths in the report are relative to the report)."""
    raw_tests = report.get("tests")
    tests = [
        _read_test(t)
        for t in (raw_tests if isinstance(raw_tests, list) else [])
        if isinstance(t, Mapping)
    ]
    dispatch = _map(report.get("dispatch"))
    rows = artifact_rows(t for t in (raw_tests or []) if isinstance(t, Mapping))

    drawn = [t for t in tests if t.start is not None]
    moments = [t.sent for t in tests if t.sent is not None]
    moments += [t.start for t in drawn if t.start is not None]
    origin = min(moments) if moments else 0.0
    lanes = _build_lanes(drawn)
    critical = max(lanes, key=lambda ln: ln.last) if lanes else None

    wall = _num(dispatch.get("wall_time"))
    if wall is None:
        wall = _num(report.get("duration"))

    parts = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        "<title>Timeline of the test run</title>\n",
        _css(),
        "</head>\n<body>\n",
        _header(report, dispatch, tests, lanes, wall),
        f"<h2>Timeline: {len(drawn)} tests on {len(lanes)} lanes "
        "(one per slot that ran tests)</h2>\n",
        _critical_note(critical, origin),
        _legend(),
        _chart(lanes, critical, origin, anchors(rows)),
        _worker_table(dispatch, lanes, wall),
        _untimed_table([t for t in tests if t.start is None]),
        artifacts_table(rows, link_base),
        hover_box(),
        "</body>\n</html>\n",
    ]
    return "".join(parts)


def _css() -> str:
    fills = "".join(f".o-{name}{{fill:{color}}}\n" for name, color in COLORS.items())
    chips = "".join(f".c-{name}{{background:{color}}}\n" for name, color in COLORS.items())
    hatched = "".join(f".b.infra.o-{name}{{fill:url(#h-{name})}}\n" for name in COLORS)
    return (
        "<style>\n"
        ":root{color-scheme:light}\n"
        "body{margin:16px 24px;font:14px/1.4 system-ui,-apple-system,'Segoe UI',Roboto,"
        "'DejaVu Sans',sans-serif;color:#1d232a;background:#fff}\n"
        "h1{font-size:20px;margin:0 0 2px}\n"
        "h2{font-size:15px;margin:18px 0 6px}\n"
        ".sub{color:#5c6670;font-size:12px;margin-bottom:10px;word-break:break-all}\n"
        ".cards{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}\n"
        ".card{border:1px solid #d9dee3;border-radius:6px;padding:6px 12px;min-width:96px}\n"
        ".card .k{font-size:11px;color:#5c6670;text-transform:uppercase;letter-spacing:.04em}\n"
        ".card .v{font-size:20px;font-weight:600}\n"
        ".card .d{font-size:11px;color:#5c6670}\n"
        ".card.bad{border-color:#e03131;background:#fff5f5}\n"
        ".card.good{border-color:#2f9e44;background:#f4fbf5}\n"
        ".chip{display:inline-block;padding:1px 7px;border-radius:9px;margin:2px 4px 2px 0;"
        "font-size:12px;color:#111}\n"
        ".c-failed,.c-error{color:#fff}\n"
        ".banner{border:1px solid #e03131;background:#fff5f5;padding:6px 10px;"
        "border-radius:6px;margin:8px 0}\n"
        "table{border-collapse:collapse;font-size:12px}\n"
        "th,td{text-align:left;padding:3px 10px 3px 0;border-bottom:1px solid #edf0f2;"
        "vertical-align:top}\n"
        "th{color:#5c6670;font-weight:600}\n"
        "td.num,th.num{text-align:right}\n"
        ".meter{display:inline-block;width:80px;height:8px;background:#e9ecef;"
        "border-radius:4px;vertical-align:middle;margin-right:6px;overflow:hidden}\n"
        ".meter span{display:block;height:100%;background:#4c6ef5}\n"
        ".note{margin:4px 0;font-size:13px}\n"
        ".note b{color:#1d232a}\n"
        ".legend{display:flex;flex-wrap:wrap;gap:14px;font-size:12px;color:#39424b;"
        "margin:6px 0}\n"
        ".sw{display:inline-block;width:18px;height:11px;border-radius:2px;"
        "vertical-align:-1px;margin-right:5px}\n"
        ".sw.idle{background:#e8ecf1;border:1px solid #d0d6dd}\n"
        ".sw.infra{background:repeating-linear-gradient(45deg,#e03131 0 3px,#5a1010 3px 5px);"
        "outline:1.5px dashed #111;outline-offset:0}\n"
        ".sw.crit{background:#fff;outline:2px solid #111;outline-offset:-2px}\n"
        ".chart{display:inline-block;max-width:100%;overflow-x:auto;"
        "border:1px solid #e3e7eb;border-radius:6px;padding:4px 0}\n"
        "svg text{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',"
        "sans-serif;font-size:12px;fill:#1d232a}\n"
        "svg .lane{fill:#e8ecf1}\n"
        "svg .lane.alt{fill:#eef1f5}\n"
        "svg .grid{stroke:#ffffff;stroke-width:1}\n"
        "svg .axis{stroke:#8a949e;stroke-width:1}\n"
        "svg .tick{font-size:11px;fill:#5c6670}\n"
        "svg .sep{stroke:#6c757d;stroke-width:1.5}\n"
        "svg .lbl{font-size:12px}\n"
        "svg .qname{font-size:11px;fill:#5c6670}\n"
        "svg .busy{font-size:11px;fill:#5c6670}\n"
        "svg .b{stroke:#ffffff;stroke-width:.5}\n"
        "svg .b.infra{stroke:#111;stroke-width:1.5;stroke-dasharray:3 2}\n"
        "svg .b.crit{stroke:#111;stroke-width:1.2}\n"
        "svg .critlane{fill:none;stroke:#111;stroke-width:2.5}\n"
        "svg .critlbl{font-weight:700}\n"
        "svg .critend{stroke:#111;stroke-width:1.2;stroke-dasharray:5 3}\n"
        "svg .b.thin{stroke:none}\n"
        "svg .b:hover{stroke:#000;stroke-width:2}\n"
        f"{fills}{chips}{hatched}"
        "</style>\n"
    )


def _header(
    report: Mapping[str, Any],
    dispatch: Mapping[str, Any],
    tests: list[_Test],
    lanes: list[_Lane],
    wall: float | None,
) -> str:
    out: list[str] = ["<header>\n<h1>Timeline of the test run</h1>\n"]
    sub: list[str] = []
    created = _num(report.get("created"))
    if created is not None:
        try:
            when = datetime.fromtimestamp(created, tz=timezone.utc)
            sub.append(when.strftime("%Y-%m-%d %H:%M:%S UTC"))
        except (OverflowError, OSError, ValueError):
            pass
    for label, key in (("run", "run_id"), ("broker", "broker")):
        value = _text(dispatch.get(key))
        if value:
            sub.append(f"{label} {_e(value)}")
    root = _text(report.get("root"))
    if root:
        sub.append(f"root {_e(root)}")
    if sub:
        out.append(f'<div class="sub">{SEPARATOR.join(sub)}</div>\n')

    summary = _map(report.get("summary"))
    counts = _outcome_counts(summary, tests)
    total = summary.get("total")
    n_tests = total if isinstance(total, int) and not isinstance(total, bool) else len(tests)
    exitcode = report.get("exitcode")
    speedup = _num(dispatch.get("speedup"))
    dispatched = sum(1 for t in tests if not t.local)
    bad = counts.get("failed", 0) + counts.get("error", 0)

    out.append('<div class="cards">\n')
    code_class = "good" if exitcode == 0 else "bad"
    meaning = EXIT_CODES.get(exitcode, "") if isinstance(exitcode, int) else ""
    out.append(_card("exit code", _e(exitcode), _e(meaning), code_class))
    out.append(_card("wall time", _e(_wall(wall)), ""))
    out.append(
        _card("tests", str(n_tests), f"{dispatched} dispatched, {len(tests) - dispatched} local")
    )
    out.append(
        _card(
            "speed-up",
            "-" if speedup is None else f"{speedup:.2f}\u00d7",
            "sum of test durations \u00f7 wall time",
        )
    )
    chips = "".join(
        f'<span class="chip c-{_outcome_class(name)}">{count} {_e(name)}</span>'
        for name, count in counts.items()
    )
    out.append(
        f'<div class="card{" bad" if bad else ""}"><div class="k">outcomes</div>'
        f'<div class="v" style="font-size:13px;padding-top:4px">{chips or "none"}</div></div>\n'
    )
    out.append("</div>\n")

    problems = []
    if dispatch.get("interrupted"):
        problems.append("The run was interrupted: this report is partial.")
    if dispatch.get("stopped_early"):
        problems.append("The run stopped early (-x / --maxfail).")
    broker_error = _text(dispatch.get("broker_error"))
    if broker_error:
        problems.append(f"Broker error: {_e(broker_error)}")
    for text in problems:
        out.append(f'<div class="banner">{text}</div>\n')

    out.append(_queue_table(dispatch, tests, lanes, wall))
    out.append("</header>\n")
    return "".join(out)


def _wall(wall: float | None) -> str:
    return "-" if wall is None else f"{wall:.2f} s"


def _card(key: str, value: str, detail: str, extra: str = "") -> str:
    cls = f"card {extra}".strip()
    return (
        f'<div class="{cls}"><div class="k">{key}</div><div class="v">{value}</div>'
        f'<div class="d">{detail}</div></div>\n'
    )


def _outcome_counts(summary: Mapping[str, Any], tests: list[_Test]) -> dict[str, int]:
    counts: dict[str, int] = {}
    if summary:
        for name, value in summary.items():
            if name in ("total", "collected", "deselected"):
                continue
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                counts[str(name)] = value
    else:
        for test in tests:
            counts[test.outcome] = counts.get(test.outcome, 0) + 1
    order = {name: i for i, name in enumerate(OUTCOME_ORDER)}
    return dict(sorted(counts.items(), key=lambda kv: (order.get(kv[0], 99), kv[0])))


def _meter(value: float | None) -> str:
    if value is None:
        return "-"
    width = max(0.0, min(1.0, value)) * 100
    return f'<span class="meter"><span style="width:{width:.0f}%"></span></span>{_percent(value)}'


def _counts_text(outcomes: object) -> str:
    mapping = _map(outcomes)
    order = {name: i for i, name in enumerate(OUTCOME_ORDER)}
    parts = [
        f'<span class="chip c-{_outcome_class(str(k))}">{_e(v)} {_e(k)}</span>'
        for k, v in sorted(mapping.items(), key=lambda kv: (order.get(kv[0], 99), str(kv[0])))
    ]
    return "".join(parts) or "-"


def _queue_table(
    dispatch: Mapping[str, Any], tests: list[_Test], lanes: list[_Lane], wall: float | None
) -> str:
    """Per queue: busy time / (wall time x slots). Slots are the configured ones (the report's
    ``dispatch.slots``); lanes used are the lanes drawn; the utilisation falls back to those when
    the slots are unknown."""
    queues = dict(_map(dispatch.get("queues")))
    busy_from_tests: dict[str, float] = {}
    for test in tests:
        if test.queue is not None:
            busy_from_tests[test.queue] = busy_from_tests.get(test.queue, 0.0) + test.duration
    for name in busy_from_tests:
        queues.setdefault(name, {})
    if not queues:
        return ""
    slots_reported = _map(dispatch.get("slots"))
    lanes_per_queue: dict[str, int] = {}
    for lane in lanes:
        if lane.queue is not None:
            lanes_per_queue[lane.queue] = lanes_per_queue.get(lane.queue, 0) + 1
    rows = [
        '<h2>Queues</h2><table>\n<tr><th>queue</th><th class="num">consumers</th>'
        '<th class="num">slots</th><th class="num">lanes used</th><th class="num">tests</th>'
        '<th>outcomes</th><th class="num">busy</th>'
        "<th>utilisation (busy \u00f7 wall \u00d7 slots)</th></tr>\n"
    ]
    for name in sorted(queues, key=str):
        q = _map(queues[name])
        busy = _num(q.get("total_duration"))
        if busy is None:
            busy = busy_from_tests.get(name, 0.0)
        drawn_lanes = lanes_per_queue.get(name, 0)
        n_slots = _count(slots_reported.get(name))
        if n_slots is None:
            n_slots = _count(q.get("slots"))
        util = _utilisation(busy, wall, n_slots or drawn_lanes)
        n = q.get("tests")
        if not isinstance(n, int):
            n = sum(1 for t in tests if t.queue == name)
        consumers = q.get("consumers")
        consumers_text = _e(consumers if consumers is not None else "-")
        rows.append(
            f'<tr><td>{_e(name)}</td><td class="num">{consumers_text}'
            f'</td><td class="num">{_e(n_slots if n_slots is not None else "-")}</td>'
            f'<td class="num">{drawn_lanes}</td><td class="num">{_e(n)}</td>'
            f'<td>{_counts_text(q.get("outcomes"))}</td><td class="num">{_seconds(busy)}</td>'
            f"<td>{_meter(util)}</td></tr>\n"
        )
    rows.append("</table>\n")
    return "".join(rows)


def _count(value: object) -> int | None:
    """A non-negative integer from the report, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _utilisation(busy: float | None, wall: float | None, slots: int) -> float | None:
    if busy is None or not wall or wall <= 0 or slots <= 0:
        return None
    return busy / (wall * slots)


def _worker_table(dispatch: Mapping[str, Any], lanes: list[_Lane], wall: float | None) -> str:
    """Per worker: busy time / (wall time x its configured slots); lanes used (drawn) when the
    report does not know its slots, one slot when none is drawn either."""
    workers = _map(dispatch.get("workers"))
    if not workers:
        return ""
    lanes_per_worker: dict[str, int] = {}
    for lane in lanes:
        if lane.queue is not None and lane.worker is not None:
            lanes_per_worker[lane.worker] = lanes_per_worker.get(lane.worker, 0) + 1
    rows = [
        "<h2>Workers</h2><table>\n<tr><th>worker</th><th>queues</th>"
        '<th class="num">slots</th><th class="num">lanes used</th><th class="num">tests</th>'
        '<th>outcomes</th><th class="num">busy</th>'
        "<th>utilisation (busy \u00f7 wall \u00d7 slots)</th></tr>\n"
    ]
    for name in sorted(workers, key=str):
        w = _map(workers[name])
        queues = w.get("queues")
        queue_text = ", ".join(str(q) for q in queues) if isinstance(queues, list) else ""
        busy = _num(w.get("busy_time"))
        drawn_lanes = lanes_per_worker.get(str(name), 0)
        n_slots = _count(w.get("slots"))
        util = _utilisation(busy, wall, max(1, n_slots or drawn_lanes))
        if util is None:
            util = _num(w.get("utilisation"))
        rows.append(
            f"<tr><td>{_e(name)}</td><td>{_e(queue_text)}</td>"
            f'<td class="num">{_e(n_slots if n_slots is not None else "-")}</td>'
            f'<td class="num">{drawn_lanes or "-"}</td>'
            f'<td class="num">{_e(w.get("tests", "-"))}</td>'
            f"<td>{_counts_text(w.get('outcomes'))}</td>"
            f'<td class="num">{_seconds(busy)}</td>'
            f"<td>{_meter(util)}</td></tr>\n"
        )
    rows.append("</table>\n")
    return "".join(rows)


def _critical_note(critical: _Lane | None, origin: float) -> str:
    if critical is None:
        return '<p class="note">No test has start and finish times: nothing to draw.</p>\n'
    span = critical.last - origin
    idle = max(0.0, span - critical.busy)
    return (
        f'<p class="note"><b>critical path: {_e(critical.label)}, ends at '
        f"{span:.2f} s</b> ({len(critical.tests)} tests, busy {_seconds(critical.busy)}, "
        f"idle {_seconds(idle)} before its last test ended)</p>\n"
    )


def _legend() -> str:
    items = [
        f'<span><span class="sw c-{name}"></span>{name}</span>'
        for name in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
    ]
    items.append('<span><span class="sw infra"></span>crashed / infrastructure error</span>')
    items.append('<span><span class="sw idle"></span>idle (lane background)</span>')
    items.append('<span><span class="sw crit"></span>critical path (lane ending last)</span>')
    items.append("<span>time: seconds since the first test was sent \u00b7 hover a bar</span>")
    return f'<div class="legend">{"".join(items)}</div>\n'


def _chart(
    lanes: list[_Lane], critical: _Lane | None, origin: float, links: Mapping[str, str]
) -> str:
    if not lanes:
        return ""
    t_max = max(lane.last for lane in lanes) - origin
    if t_max <= 0:
        t_max = 1.0
    step = _nice_step(t_max)
    axis_end = math.ceil(t_max / step - 1e-9) * step
    scale = PLOT_W / axis_end
    x0 = LABEL_W
    top = AXIS_H
    height = top + len(lanes) * LANE_H + AXIS_H
    width = LABEL_W + PLOT_W + RIGHT_W
    bottom = top + len(lanes) * LANE_H

    out: list[str] = [
        '<div class="chart">\n',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="Gantt chart: {len(lanes)} lanes, {_n(t_max)} s">\n',
        "<defs>\n",
    ]
    for name, color in COLORS.items():
        out.append(
            f'<pattern id="h-{name}" width="6" height="6" patternUnits="userSpaceOnUse" '
            f'patternTransform="rotate(45)"><rect width="6" height="6" fill="{color}"/>'
            '<rect width="2.5" height="6" fill="#111" fill-opacity="0.6"/></pattern>\n'
        )
    out.append("</defs>\n")

    # Lane backgrounds (the idle time) and labels.
    previous_queue: object = object()
    separators: list[int] = []  # between the lanes of two queues
    for i, lane in enumerate(lanes):
        y = top + i * LANE_H
        alt = " alt" if i % 2 else ""
        out.append(
            f'<rect class="lane{alt}" x="{x0}" y="{y}" width="{PLOT_W}" height="{LANE_H}"/>\n'
        )
        if lane.queue != previous_queue and i:
            separators.append(y)
        previous_queue = lane.queue
        label_class = "lbl critlbl" if lane is critical else "lbl"
        title = lane.label
        if lane.session:
            title += f" (session {lane.session})"
        title += f": {len(lane.tests)} tests, busy {_seconds(lane.busy)}"
        out.append(
            f'<text class="{label_class}" x="6" y="{y + LANE_H - 8}"><title>{_e(title)}</title>'
            f"{_e(_short(lane.label, LABEL_CHARS))}</text>\n"
        )

    # Grid and time axis (top and bottom).
    out.append(f'<line class="axis" x1="{x0}" x2="{x0 + PLOT_W}" y1="{top}" y2="{top}"/>\n')
    out.append(f'<line class="axis" x1="{x0}" x2="{x0 + PLOT_W}" y1="{bottom}" y2="{bottom}"/>\n')
    ticks = round(axis_end / step)
    for k in range(ticks + 1):
        t = k * step
        x = _n(x0 + t * scale)
        label = _tick_label(t, step)
        anchor = "end" if k == ticks else ("start" if k == 0 else "middle")
        out.append(
            f'<line class="grid" x1="{x}" x2="{x}" y1="{top}" y2="{bottom}"/>'
            f'<line class="axis" x1="{x}" x2="{x}" y1="{top - 4}" y2="{top}"/>'
            f'<line class="axis" x1="{x}" x2="{x}" y1="{bottom}" y2="{bottom + 4}"/>'
            f'<text class="tick" x="{x}" y="{top - 8}" text-anchor="{anchor}">{label}</text>'
            f'<text class="tick" x="{x}" y="{bottom + 16}" text-anchor="{anchor}">{label}'
            "</text>\n"
        )

    for y in separators:
        out.append(f'<line class="sep" x1="4" x2="{x0 + PLOT_W}" y1="{y}" y2="{y}"/>\n')

    out.extend(_bars(lanes, critical, origin, scale, links))  # one per test, in lane order

    # Right column: busy share per lane; the critical lane outlined, its end marked.
    for i, lane in enumerate(lanes):
        y = top + i * LANE_H
        span = lane.last - origin
        share = lane.busy / span if span > 0 else None
        text = f"{_percent(share)} busy"
        if lane is critical:
            out.append(
                f'<rect class="critlane" x="{x0}" y="{y + 1}" width="{PLOT_W}" '
                f'height="{LANE_H - 2}"/>\n'
            )
            text = f"\u25c0 critical \u00b7 {text}"
        cls = "busy critlbl" if lane is critical else "busy"
        out.append(
            f'<text class="{cls}" x="{x0 + PLOT_W + 8}" y="{y + LANE_H - 8}">{_e(text)}</text>\n'
        )
    if critical is not None:
        end_x = _n(x0 + (critical.last - origin) * scale)
        out.append(f'<line class="critend" x1="{end_x}" x2="{end_x}" y1="{top}" y2="{bottom}"/>\n')
    out.append("</svg>\n</div>\n")
    return "".join(out)


def _bars(
    lanes: list[_Lane],
    critical: _Lane | None,
    origin: float,
    scale: float,
    links: Mapping[str, str],
) -> list[str]:
    """One SVG bar per test, lane by lane, filled by outcome (hover: the bar's title); a bar
    with artifacts links to them (``links``: nodeid -> the id of its artifacts row)."""
    out: list[str] = []
    top, x0 = AXIS_H, LABEL_W
    for i, lane in enumerate(lanes):
        bar_y = _n(top + i * LANE_H + (LANE_H - BAR_H) / 2)
        is_critical = lane is critical
        out.append(f'<g data-lane="{_e(lane.label)}">\n')
        for test in lane.tests:
            start = (test.start or 0.0) - origin
            end = (test.end or 0.0) - origin
            min_w = MIN_INFRA_W if test.infra else MIN_BAR_W
            w = max(min_w, (end - start) * scale)
            bar_x = x0 + start * scale
            classes = f"b o-{_outcome_class(test.outcome)}"
            if test.infra:
                classes += " infra"
            if is_critical:
                classes += " crit"
            if w < THIN_BAR_W:
                classes += " thin"
            bar = (
                f'<rect class="{classes}" x="{_n(bar_x)}" y="{bar_y}" width="{_n(w)}" '
                f'height="{BAR_H}" data-nodeid="{_e(test.nodeid)}">'
                f"<title>{_e(_bar_title(test, lane, origin))}</title></rect>"
            )
            if test.nodeid in links:
                bar = f'<a href="#{links[test.nodeid]}" class="artlink">{bar}</a>'
            out.append(bar + "\n")
        out.append("</g>\n")
    return out


def _bar_title(test: _Test, lane: _Lane, origin: float) -> str:
    start = (test.start or 0.0) - origin
    end = (test.end or 0.0) - origin
    lines = [
        test.nodeid,
        f"{test.outcome} \u00b7 duration {_seconds(test.duration)} (setup + call + teardown)",
        f"worker {test.worker or '-'} \u00b7 queue {test.queue or 'local'} \u00b7 attempt "
        f"{test.attempts if test.attempts is not None else '-'}",
    ]
    if test.finished is not None and test.started is not None:
        lines.append(f"started {start:.3f} s, finished {end:.3f} s")
    elif test.started is not None:
        lines.append(f"started {start:.3f} s, no finish time (bar = phase durations)")
    else:
        lines.append(f"finished {end:.3f} s, no start time (bar = phase durations)")
    lines.append(f"lane {lane.label}")
    if test.hostname:
        lines.append(f"host {test.hostname}")
    if test.task_id:
        lines.append(f"task {test.task_id}")
    if test.infra:
        lines.append("infrastructure error: " + _short(test.infra, TITLE_ERROR_CHARS))
    return "\n".join(lines)


def _untimed_table(untimed: list[_Test]) -> str:
    if not untimed:
        return ""
    # Dispatched tests that never started (lost work, no worker) first; then local ones.
    untimed = sorted(untimed, key=lambda t: (t.local, t.nodeid))
    local = sum(1 for t in untimed if t.local)
    out = [
        f"<h2>Tests without a bar ({len(untimed)}: {len(untimed) - local} dispatched without "
        f"start time, {local} run in the controller)</h2>\n",
        '<table>\n<tr><th>test</th><th>outcome</th><th>where</th><th class="num">duration'
        "</th><th>why no bar</th></tr>\n",
    ]
    for test in untimed[:TABLE_LIMIT]:
        if test.local:
            where = "local (controller)"
            why = "ran in the controller, no start time recorded"
        else:
            where = f"{test.worker or '-'} / {test.queue}"
            why = test.infra or "never started on a worker"
        out.append(
            f'<tr><td>{_e(test.nodeid)}</td><td><span class="chip c-'
            f'{_outcome_class(test.outcome)}">{_e(test.outcome)}</span></td>'
            f'<td>{_e(where)}</td><td class="num">{_seconds(test.duration)}</td>'
            f"<td>{_e(_short(why, TITLE_ERROR_CHARS))}</td></tr>\n"
        )
    if len(untimed) > TABLE_LIMIT:
        out.append(
            f'<tr><td colspan="5">\u2026 and {len(untimed) - TABLE_LIMIT} more '
            "(see the JSON report)</td></tr>\n"
        )
    out.append("</table>\n")
    return "".join(out)
