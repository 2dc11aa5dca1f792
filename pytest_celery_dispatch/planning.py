"""Pure planning: how one queue's tests are cut into chunks, with or without groups.

``--celery-dist`` picks the mode, with pytest-xdist's meanings, inside each queue:

* ``load`` (default): contiguous chunks that shrink as the queue drains (:func:`plan_chunks`).
* ``loadfile``: the tests of one test file are one group.
* ``loadscope``: the tests of one class are one group; a module's functions are one group.
* ``loadgroup``: the tests with the same ``xdist_group`` name are one group; the others are
  shared out as ``load``.

A *group* is one chunk, so it runs on one slot, in collection order, and is never split
across chunks (a lost chunk's follow-up keeps its remaining tests together too, see
:meth:`.scheduling.QueueScheduler._lost`). Groups go out biggest first; slots still pull them.

With recorded durations (``estimates``: seconds per nodeid, see :mod:`.durations`) the work
goes out *longest first*: free tests sorted by their estimate, in classes of a factor of 2 (one
class keeps collection order, and every test under ``ORDER_FLOOR`` is in the lowest) and
cut by time as well as by count, so a long test is a chunk of its own early and short tests
fill the end; groups and chunks ordered by their summed estimate. Without ``estimates`` nothing
changes. :func:`predict_time` simulates the slots pulling the planned chunks (the ETA).

The controller computes each test's group key from the collected item (file, class or
``xdist_group`` marker) and hands in plain data: no pytest, no Celery here.

PYTEST_DONT_REWRITE: spare runners import it before pytest configures (runner.SPARE_BOOT).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

LOAD = "load"
DIST_MODES = (LOAD, "loadfile", "loadscope", "loadgroup")


def plan_chunks(
    nodeids: Sequence[str],
    slots: int,
    divisor: int = 4,
    cap: int = 200,
    estimates: Mapping[str, float] | None = None,
) -> list[list[str]]:
    """Cut a queue's tests into contiguous chunks that shrink as the work drains.

    Each chunk is ``remaining / (divisor * slots)`` tests (at least 1, at most ``cap``): early
    chunks are big enough to amortize a broker round trip, the last ones are single tests, so
    no slot idles while another holds a long tail (the idea of xdist's ``load`` scheduling).
    Contiguous chunks keep a module's tests together for its fixtures.

    With ``estimates`` (seconds per nodeid, every nodeid present; order the tests longest first
    before) a chunk also holds at most ``remaining time / (divisor * slots)`` seconds of work
    (at least one test): a long test goes out alone, and the slots share the rest. A slot takes
    its next chunk while its last test runs, so the chunk it takes during a long test waits for
    it: each test sent alone for its length is followed by a chunk of a single test.
    """
    remaining = list(nodeids)
    chunks: list[list[str]] = []
    per_round = max(1, divisor * max(1, slots))
    left = sum(estimates[n] for n in remaining) if estimates is not None else 0.0
    owed = 0  # single-test chunks still owed to the slots that hold a long test
    while remaining:
        size = max(1, min(cap, len(remaining) // per_round))
        if estimates is not None:
            budget, used, fits = left / per_round, 0.0, 0
            while fits < size and (fits == 0 or used + estimates[remaining[fits]] <= budget):
                used += estimates[remaining[fits]]
                fits += 1
            if used > budget:  # one test, longer than a chunk's share: sent alone
                owed += 1
            elif owed and fits > 1:
                owed, fits, used = owed - 1, 1, estimates[remaining[0]]
            size, left = fits, max(0.0, left - used)
        chunks.append(remaining[:size])
        remaining = remaining[size:]
    return chunks


#: Longest first orders tests by classes of duration (a factor of 2 each), and every test
#: shorter than this is in the lowest one: the order of such tests makes no tail, and their
#: collection order keeps a module's tests together in a chunk. (W6's 30,000 tests of ~50 µs,
#: sorted by the noise of their recorded durations, made each slot's runner switch modules
#: 13,000 times instead of 150: 1.7 s more per slot.)
ORDER_FLOOR = 0.01


def duration_class(seconds: float) -> int:
    """0 below :data:`ORDER_FLOOR`, then one more for each doubling."""
    if seconds < ORDER_FLOOR:
        return 0
    return 1 + int(math.log2(seconds / ORDER_FLOOR))


def longest_first(nodeids: Sequence[str], estimates: Mapping[str, float]) -> list[str]:
    """The tests by estimate, longest first in classes of a factor of 2 (see
    :data:`ORDER_FLOOR`); tests of one class keep their order (stable)."""
    return sorted(nodeids, key=lambda n: -duration_class(estimates[n]))


def plan_groups(
    nodeids: Sequence[str], mode: str, group_of: Mapping[str, str | None]
) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """``(groups, free)``: the groups biggest first, each ``(key, its nodeids in order)``, and
    the tests that belong to no group, in order.

    ``group_of`` maps a nodeid to its key for ``mode`` (``None`` or absent: no group). With
    ``load`` nothing is grouped. Equal sizes keep the order of their first test.
    """
    if mode == LOAD:
        return [], list(nodeids)
    groups: dict[str, list[str]] = {}
    free: list[str] = []
    for nodeid in nodeids:
        key = group_of.get(nodeid)
        if key is None:
            free.append(nodeid)
        else:
            groups.setdefault(key, []).append(nodeid)
    ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))  # stable: ties keep order
    return ordered, free


def plan_work(
    nodeids: Sequence[str],
    slots: int,
    mode: str,
    group_of: Mapping[str, str | None],
    estimates: Mapping[str, float] | None = None,
) -> list[list[str]]:
    """The chunks of one queue, in publishing order: one per group, and the free tests cut
    as ``load`` (:func:`plan_chunks`), all biggest first. With ``load`` and no ``estimates``
    this is exactly :func:`plan_chunks`.

    With ``estimates`` (seconds per nodeid of this queue), "biggest" is the summed estimate:
    free tests go longest first, a group keeps its tests in collection order.
    """
    groups, free = plan_groups(nodeids, mode, group_of)
    units = [ids for _, ids in groups]
    if estimates is None:
        free_chunks = plan_chunks(free, slots)
        if not units:
            return free_chunks
        # Both lists are already biggest first; a stable sort puts a group before a free
        # chunk of the same size.
        return sorted(units + free_chunks, key=len, reverse=True)

    def weight(chunk: Sequence[str]) -> float:
        return sum(estimates[n] for n in chunk)

    free_chunks = plan_chunks(longest_first(free, estimates), slots, estimates=estimates)
    units.sort(key=lambda c: -weight(c))  # stable: ties keep the order of their first test
    # Merge, keeping the free chunks' own order: a group goes before the first free chunk
    # that is lighter.
    merged: list[list[str]] = []
    for chunk in free_chunks:
        while units and weight(units[0]) >= weight(chunk):
            merged.append(units.pop(0))
        merged.append(chunk)
    return merged + units


def predict_time(
    chunks: Sequence[Sequence[str]], estimates: Mapping[str, float], slots: int
) -> float:
    """Seconds from the first test's start to the last test's end when ``slots`` slots pull
    ``chunks`` in order, each taking the next chunk as it frees up (list scheduling)."""
    ends = [0.0] * max(1, slots)
    for chunk in chunks:
        soonest = ends.index(min(ends))
        ends[soonest] += sum(estimates.get(n, 0.0) for n in chunk)
    return max(ends)


def remaining_time(left: Sequence[float], slots: int) -> float:
    """A quick estimate of the time left for tests with these remaining seconds on ``slots``
    slots: the work spread evenly, but never less than the longest test left."""
    if not left:
        return 0.0
    return max(sum(left) / max(1, slots), max(left))


def group_name(markers: Iterable[tuple[Sequence[Any], Mapping[str, Any]]]) -> str | None:
    """The ``loadgroup`` key from an item's ``xdist_group`` markers, as pytest-xdist names it:
    ``xdist_group("name")`` or ``xdist_group(name="name")`` (no name: ``"default"``); a test with
    several groups gets their sorted names joined by ``_``. ``None``: no marker."""
    names = {str(args[0] if args else kwargs.get("name", "default")) for args, kwargs in markers}
    return "_".join(sorted(names)) if names else None


def file_key(nodeid: str) -> str:
    """The ``loadfile`` key: the test file part of a nodeid (xdist's ``LoadFileScheduling``)."""
    return nodeid.split("::", 1)[0]


class Forecast:
    """Per queue: each test's recorded duration and the plan's predicted test time on its slots
    (the ETA), revised when more slots turn up than the plan was made for."""

    def __init__(self) -> None:
        self.estimates: dict[str, dict[str, float]] = {}  # queue -> nodeid -> seconds
        self.predicted: dict[str, float] = {}  # queue -> predicted test time
        self._planned: dict[str, tuple[list[list[str]], int]] = {}  # queue -> chunks, slots

    def planned(self, queue: str, chunks: list[list[str]], slots: int) -> None:
        estimates = self.estimates.get(queue)
        if estimates is not None:
            self.predicted[queue] = predict_time(chunks, estimates, slots)
            self._planned[queue] = (chunks, slots)

    def revise(self, queue: str, slots: int) -> float | None:
        """The new ETA on ``slots`` slots, or None when it does not change."""
        chunks, planned_for = self._planned.get(queue, ([], 0))
        estimates = self.estimates.get(queue)
        if estimates is None or slots <= planned_for:
            return None
        self._planned[queue] = (chunks, slots)
        self.predicted[queue] = eta = predict_time(chunks, estimates, slots)
        return eta
