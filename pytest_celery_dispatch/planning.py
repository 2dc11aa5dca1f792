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

The controller computes each test's group key from the collected item (file, class or
``xdist_group`` marker) and hands in plain data: no pytest, no Celery here.

PYTEST_DONT_REWRITE: spare runners import it before pytest configures (runner.SPARE_BOOT).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

LOAD = "load"
DIST_MODES = (LOAD, "loadfile", "loadscope", "loadgroup")


def plan_chunks(
    nodeids: Sequence[str], slots: int, divisor: int = 4, cap: int = 200
) -> list[list[str]]:
    """Cut a queue's tests into contiguous chunks that shrink as the work drains.

    Each chunk is ``remaining / (divisor * slots)`` tests (at least 1, at most ``cap``): early
    chunks are big enough to amortize a broker round trip, the last ones are single tests, so
    no slot idles while another holds a long tail (the idea of xdist's ``load`` scheduling).
    Contiguous chunks keep a module's tests together for its fixtures.
    """
    remaining = list(nodeids)
    chunks: list[list[str]] = []
    per_round = max(1, divisor * max(1, slots))
    while remaining:
        size = max(1, min(cap, len(remaining) // per_round))
        chunks.append(remaining[:size])
        remaining = remaining[size:]
    return chunks


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
    nodeids: Sequence[str], slots: int, mode: str, group_of: Mapping[str, str | None]
) -> list[list[str]]:
    """The chunks of one queue, in publishing order: one per group, and the free tests cut
    as ``load`` (:func:`plan_chunks`), all biggest first. With ``load`` this is exactly
    :func:`plan_chunks`."""
    groups, free = plan_groups(nodeids, mode, group_of)
    units = [ids for _, ids in groups]
    free_chunks = plan_chunks(free, slots)
    if not units:
        return free_chunks
    # Both lists are already biggest first; a stable sort puts a group before a free chunk of
    # the same size.
    return sorted(units + free_chunks, key=len, reverse=True)


def group_name(markers: Iterable[tuple[Sequence[Any], Mapping[str, Any]]]) -> str | None:
    """The ``loadgroup`` key from an item's ``xdist_group`` markers, as pytest-xdist names it:
    ``xdist_group("name")`` or ``xdist_group(name="name")`` (no name: ``"default"``); a test with
    several groups gets their sorted names joined by ``_``. ``None``: no marker."""
    names = {str(args[0] if args else kwargs.get("name", "default")) for args, kwargs in markers}
    return "_".join(sorted(names)) if names else None


def file_key(nodeid: str) -> str:
    """The ``loadfile`` key: the test file part of a nodeid (xdist's ``LoadFileScheduling``)."""
    return nodeid.split("::", 1)[0]
