"""``python -m bench.split DIR [--tests N]``: the per-test CPU of a dispatched run, split into
its parts, from the profiles ``python -m bench --profile DIR`` left (see bench/profiling).

Each profile is one thread of one process, timed by cProfile's wall clock; the time spent
blocked (in ``select``, a pipe or socket read, a lock: :data:`BLOCKING`) is taken out, so what
is left is close to CPU time on a machine that is not overloaded. cProfile slows the profiled
code (roughly 1.5-2x for pytest's many small calls), so read the split as shares and compare
runs profiled the same way, not with the bench's unprofiled seconds.

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
PROTOCOL = ("_pytest/runner.py", "pytest_runtest_protocol")
RUNNER_TESTS = "runner tests"
SERIALIZE = (
    ("_pytest/reports.py", "pytest_report_to_serializable"),
    ("pytest_celery_dispatch/runner.py", "emit"),
    ("pytest_celery_dispatch/runner.py", "_send_test"),
)
DRIVER_LOOP = ("pytest_celery_dispatch/driver.py", "_loop")
DRIVER_PUMP = (
    ("pytest_celery_dispatch/driver.py", "_pump"),
    ("pytest_celery_dispatch/driver.py", "tick"),
)
PUBLISH = ("pytest_celery_dispatch/worker.py", "emit")
CONTROLLER = ("pytest_celery_dispatch/session.py", "pytest_runtestloop")
CONSUMER = ("pytest_celery_dispatch/transport.py", "_consume")
DECODE = (
    ("kombu/message.py", "decode"),
    ("pytest_celery_dispatch/transport.py", "_on_message"),
)
REPLAY = (("pytest_celery_dispatch/events.py", "on_results"),)
#: ``Replayer.rebuild`` where it exists, else pytest's hook (called by the replay's buffering).
REBUILD = (
    ("pytest_celery_dispatch/replay.py", "rebuild"),
    ("_pytest/reports.py", "pytest_report_from_serializable"),
)
HOOKS = (("pytest_celery_dispatch/replay.py", "replay"),)
#: Built-in calls that wait (their time is not CPU time).
BLOCKING = (
    "<built-in method select.select>",
    "<method 'poll' of 'select.poll' objects>",
    "<method 'poll' of 'select.epoll' objects>",
    "<method 'read' of '_io.FileIO' objects>",
    "<built-in method posix.read>",
    "<built-in method posix.waitpid>",
    "<method 'recv' of '_socket.socket' objects>",
    "<method 'recv_into' of '_socket.socket' objects>",
    "<method 'acquire' of '_thread.lock' objects>",
    "<method 'acquire' of '_thread.RLock' objects>",
    "<built-in method time.sleep>",
)


def waits(stats: pstats.Stats, caller_suffix: str = "") -> float:
    """Time blocked in :data:`BLOCKING` calls (only those made from files ending with
    ``caller_suffix``, when given)."""
    total = 0.0
    for (filename, _line, function), row in stats.stats.items():  # type: ignore[attr-defined]
        if filename != "~" or function not in BLOCKING:
            continue
        if not caller_suffix:
            total += row[2]
            continue
        for (caller_file, _l, _f), edge in row[4].items():
            if caller_file.endswith(caller_suffix):
                total += edge[2]
    return total


def cumulative(stats: pstats.Stats, wanted: tuple[str, str]) -> float:
    suffix, name = wanted
    total = 0.0
    for (filename, _line, function), row in stats.stats.items():  # type: ignore[attr-defined]
        if function == name and filename.endswith(suffix):
            total += row[3]
    return total


def cumulative_any(stats: pstats.Stats, wanted: tuple[tuple[str, str], ...]) -> float:
    return sum(cumulative(stats, w) for w in wanted)


def calls(stats: pstats.Stats, wanted: tuple[str, str]) -> int:
    suffix, name = wanted
    return sum(
        row[1]
        for (filename, _line, function), row in stats.stats.items()  # type: ignore[attr-defined]
        if function == name and filename.endswith(suffix)
    )


def own_total(stats: pstats.Stats) -> float:
    return float(stats.total_tt)  # type: ignore[attr-defined]


def split(folder: Path) -> dict[str, dict[str, float]]:
    parts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for path in sorted(folder.glob("*.prof")):
        try:
            stats = pstats.Stats(str(path))
        except (EOFError, ValueError, TypeError) as exc:  # a process killed while writing it
            print(f"skipped {path.name}: not a complete profile ({exc.__class__.__name__})")
            continue
        busy = own_total(stats) - waits(stats)
        loop = cumulative(stats, RUN_LOOP)
        if loop:
            # A runner killed as its run ends leaves no profile: its tests are counted here.
            parts[RUNNER_TESTS]["tests"] += calls(stats, PROTOCOL)
            serialize = cumulative_any(stats, SERIALIZE)
            run = loop - serialize - waits(stats, "pytest_celery_dispatch/jsonlines.py")
            parts["worker: runner"]["run"] += run
            parts["worker: runner"]["serialize"] += serialize
            parts["worker: runner"]["start-up, collection, end"] += busy - run - serialize
            continue
        driver = cumulative(stats, DRIVER_LOOP)
        if driver:
            publish = cumulative(stats, PUBLISH)
            pump = cumulative_any(stats, DRIVER_PUMP)
            relay = pump - publish - waits(stats, "pytest_celery_dispatch/launcher.py")
            parts["worker: slot driver"]["relay"] += relay
            parts["worker: slot driver"]["publish"] += publish
            parts["worker: slot driver"]["other (task, slot set-up, fetch, control)"] += (
                busy - relay - publish
            )
            continue
        consumer = cumulative(stats, CONSUMER)
        if consumer:
            decode = cumulative_any(stats, DECODE)
            parts["controller"]["receive (consumer thread)"] += busy - decode
            parts["controller"]["decode (consumer thread)"] += decode
            continue
        if cumulative(stats, CONTROLLER):
            replay = cumulative_any(stats, REPLAY)
            rebuild = cumulative(stats, REBUILD[0]) or cumulative(stats, REBUILD[1])
            hooks = cumulative_any(stats, HOOKS)
            parts["controller"]["replay: rebuild reports"] += rebuild
            parts["controller"]["replay: pytest's hooks"] += hooks
            parts["controller"]["replay: bookkeeping"] += replay - rebuild - hooks
            parts["controller"]["other (start, collection, scheduling, end)"] += busy - replay
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
    print(
        f"CPU per test (µs, under cProfile, waits left out), {args.tests} tests, "
        f"profiles in {args.folder}"
    )
    runner_tests = int(parts.pop(RUNNER_TESTS, {}).get("tests", 0))
    for role, rows in parts.items():
        tests = args.tests
        if role == "worker: runner" and runner_tests:
            tests = runner_tests
        total = sum(rows.values())
        print(f"  {role}: {1e6 * total / tests:8.1f} µs/test in all ({tests} tests profiled)")
        for name, seconds in rows.items():
            print(f"    {name:<45} {1e6 * seconds / tests:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
