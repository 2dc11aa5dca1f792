"""``python -m bench.split DIR [--tests N]``: the per-test CPU of a dispatched run, split into
its parts, from the profiles ``python -m bench --profile DIR`` left (see bench/profiling).

Each profile is one thread of one process and counts CPU time (``time.thread_time``); cProfile
slows the profiled code (roughly 1.5-2x for pytest's many small calls), so read the split as
shares and compare runs profiled the same way, not with the bench's unprofiled seconds.

The parts, by the functions whose cumulative CPU they are:

* worker, runner process: **run** (the test loop, ``RunnerPlugin._run_commands``, less what
  it serializes) and **serialize** (``pytest_report_to_serializable`` and the runner's event
  encoding);
* worker, slot driver in the pool process: **relay** (the driver's loop less the publish and the
  chunk fetch: reading the runner's lines, grouping them) and **publish** (``_Reply.emit``:
  the message built and handed to the broker);
* controller: **receive** (the reply consumer's thread: AMQP frames) and **decode** (the
  message body to Python objects, in that thread), **replay** (``on_results``: reports rebuilt,
  fed to pytest's hooks: terminal, JUnit, the JSON report...), of which **rebuild**
  (``pytest_report_from_serializable``) and **hooks** (``Replayer.replay``), and **other**
  (the rest of the controller: start-up, collection, scheduling, the reports at the end).
"""

from __future__ import annotations

import argparse
import pstats
from collections import defaultdict
from pathlib import Path

#: (file suffix, function name) of the functions each part is read from.
RUN_LOOP = ("pytest_celery_dispatch/runner.py", "_run_commands")
SERIALIZE = (
    ("_pytest/reports.py", "pytest_report_to_serializable"),
    ("pytest_celery_dispatch/runner.py", "emit"),
    ("pytest_celery_dispatch/runner.py", "_send_test"),
)
DRIVER_LOOP = ("pytest_celery_dispatch/driver.py", "_loop")
PUBLISH = ("pytest_celery_dispatch/worker.py", "emit")
FETCH = ("pytest_celery_dispatch/worker.py", "fetch")
CONTROLLER = ("pytest_celery_dispatch/session.py", "pytest_runtestloop")
CONSUMER = ("pytest_celery_dispatch/transport.py", "_consume")
DECODE = (
    ("kombu/message.py", "decode"),
    ("pytest_celery_dispatch/transport.py", "_on_message"),
)
REPLAY = (("pytest_celery_dispatch/events.py", "on_results"),)
REBUILD = (
    ("_pytest/reports.py", "pytest_report_from_serializable"),
    ("pytest_celery_dispatch/replay.py", "rebuild"),
)
HOOKS = (("pytest_celery_dispatch/replay.py", "replay"),)


def cumulative(stats: pstats.Stats, wanted: tuple[str, str]) -> float:
    suffix, name = wanted
    total = 0.0
    for (filename, _line, function), row in stats.stats.items():  # type: ignore[attr-defined]
        if function == name and filename.endswith(suffix):
            total += row[3]
    return total


def cumulative_any(stats: pstats.Stats, wanted: tuple[tuple[str, str], ...]) -> float:
    return sum(cumulative(stats, w) for w in wanted)


def own_total(stats: pstats.Stats) -> float:
    return float(stats.total_tt)  # type: ignore[attr-defined]


def split(folder: Path) -> dict[str, dict[str, float]]:
    parts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for path in sorted(folder.glob("*.prof")):
        stats = pstats.Stats(str(path))
        total = own_total(stats)
        loop = cumulative(stats, RUN_LOOP)
        if loop:
            serialize = cumulative_any(stats, SERIALIZE)
            parts["worker: runner"]["run"] += loop - serialize
            parts["worker: runner"]["serialize"] += serialize
            parts["worker: runner"]["start-up, collection"] += total - loop
            continue
        driver = cumulative(stats, DRIVER_LOOP)
        if driver:
            publish, fetch = cumulative(stats, PUBLISH), cumulative(stats, FETCH)
            parts["worker: slot driver"]["relay"] += driver - publish - fetch
            parts["worker: slot driver"]["publish"] += publish
            parts["worker: slot driver"]["fetch chunks"] += fetch
            parts["worker: slot driver"]["other (task start, slot set-up)"] += total - driver
            continue
        consumer = cumulative(stats, CONSUMER)
        if consumer:
            decode = cumulative_any(stats, DECODE)
            parts["controller"]["receive"] += consumer - decode
            parts["controller"]["decode"] += decode
            continue
        if cumulative(stats, CONTROLLER):
            replay = cumulative_any(stats, REPLAY)
            rebuild, hooks = cumulative_any(stats, REBUILD), cumulative_any(stats, HOOKS)
            parts["controller"]["replay: rebuild reports"] += rebuild
            parts["controller"]["replay: pytest's hooks"] += hooks
            parts["controller"]["replay: bookkeeping"] += replay - rebuild - hooks
            parts["controller"]["other (start, collection, scheduling, end)"] += total - replay
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.split", description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--tests", type=int, default=30000, help="tests run in all (30,000)")
    args = parser.parse_args(argv)
    parts = split(args.folder)
    if not parts:
        print(f"no profiles in {args.folder}")
        return 1
    print(f"CPU per test (µs, under cProfile), {args.tests} tests, profiles in {args.folder}")
    for role, rows in parts.items():
        total = sum(rows.values())
        print(f"  {role}: {1e6 * total / args.tests:8.1f} µs/test in all")
        for name, seconds in rows.items():
            print(f"    {name:<45} {1e6 * seconds / args.tests:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
