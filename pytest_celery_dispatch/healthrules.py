"""Pure: the rules of bench health, for the worker (:mod:`.health`) and the controller
(:mod:`.quarantine`).

* A worker runs its health tests before it takes a run's work when they are *due*: never run
  yet, last run ``every`` minutes ago or more, or a test crashed or timed out since (the board
  may be the reason): :func:`health_due`.
* A worker quarantines itself when a health test fails, or when its last ``K`` sessions (the
  one running included) each ended in an infrastructure failure: the runner crashed outside a
  test, a test outlived the timeout, or the session was cut off from the broker
  (:func:`streak_reached`). A test's own failure (or its own crash) is never counted.
* A queue whose every consumer is a quarantined worker fails its tests at once, naming each
  worker's reason (:func:`every_worker_quarantined`).

Light: imported by both sides, no third-party import.

PYTEST_DONT_REWRITE: imported by the worker app.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: Health tests run at most this often (minutes), unless a test crashed or timed out since.
DEFAULT_HEALTH_EVERY = 10.0
#: A worker whose last this many sessions ended in infrastructure failures quarantines itself.
DEFAULT_QUARANTINE_AFTER = 3
#: How many session endings a worker keeps.
ENDINGS_KEPT = 20
#: The event a quarantined worker sends to the controller of the session it gives up.
QUARANTINED = "quarantined"


def parse_tests(text: str | None) -> list[str]:
    """Health tests from ``DISPATCH_HEALTH`` or the ini: nodeids or folders, separated by
    commas, spaces or new lines."""
    return [part for part in re.split(r"[\s,]+", text or "") if part]


def parse_minutes(raw: str, source: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ValueError(
            f"invalid value {raw!r} for {source}: give minutes (a number >= 0, e.g. 10)"
        )
    return value


def parse_count(raw: str, source: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(
            f"invalid value {raw!r} for {source}: give a whole number >= 0 (0 turns it off)"
        )
    return value


def health_due(last_check: float | None, now: float, every: float, suspect: bool) -> bool:
    """Run the health tests now? ``every`` is in minutes, times in seconds."""
    return suspect or last_check is None or now - last_check >= every * 60.0


def streak_reached(endings: list[bool], after: int, current: bool = True) -> bool:
    """``endings`` are the past sessions (True: an infrastructure failure), oldest first;
    ``current`` is the running session's. True when the last ``after`` of them all failed;
    ``after`` 0 turns the rule off."""
    if after <= 0:
        return False
    recent = [*endings, current][-after:]
    return len(recent) == after and all(recent)


def health_failure(nodeid: str, message: str) -> str:
    """``health test tests/health/test_board.py::test_uart failed: AssertionError: ...``"""
    return f"health test {nodeid} failed: {message}".rstrip(": ")


def streak_failure(after: int, why: str) -> str:
    sessions = f"{after} sessions in a row" if after != 1 else "a session"
    return f"{sessions} ended in an infrastructure failure (the last: {why})"


def every_worker_quarantined(
    queue: str, quarantined: Mapping[str, str], consumers: int | None
) -> str | None:
    """The failure of a queue whose workers are all quarantined, or None while one is not.

    ``quarantined`` maps each quarantined worker of ``queue`` to its reason; ``consumers`` is
    the queue's consumer count (one per worker; a quarantined worker still consumes, and sends
    each session back). Unknown (None): not decided now.
    """
    if not quarantined or consumers is None or len(quarantined) < max(1, consumers):
        return None
    reasons = "; ".join(f"{worker}: {why}" for worker, why in sorted(quarantined.items()))
    return f"{queue}: every worker is quarantined ({reasons})"
