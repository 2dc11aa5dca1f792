"""Pure: the line for a shared bench, from what runs and workers publish on the lab board.

Every controller with work for a queue publishes a *run notice* every ``LAB_INTERVAL``
seconds: its identity, priority, when it arrived, and per queue whether it is ``waiting`` for
a slot or ``holding`` slots (how many, its progress). Every worker publishes a *worker notice*:
its queues, slots, the runs its slots are busy with, its last run's result and its quarantine
(see :mod:`.health`); ``celery-dispatch release`` publishes a *release notice* (:data:`RELEASE`).
A notice not renewed for ``LAB_STALE`` seconds is gone (a killed controller's with it); one
that says ``"gone": true`` is gone at once. :mod:`.labboard` carries them (a fanout exchange on
RabbitMQ, a folder on the embedded broker); this module only decides.

The rule (:func:`grant`): a queue's free slots are its slots minus those held by other runs;
slots the workers say are busy with a run that has no notice count as held too (a killed
controller's run until the worker has dropped it, a run of an earlier version); the waiting
runs are ranked by priority (higher first), then by arrival (earlier first); a run
gets a slot when its place in that line is within the free slots. A run that holds slots keeps
them until its work for that queue is done: a running test (and a running run) is never
pre-empted.

Light: imported by both sides, no third-party import.
"""

from __future__ import annotations

import time
from typing import Any

#: How often runs and workers renew their notices.
LAB_INTERVAL = 0.25
#: A notice not renewed for this long is gone (its controller or worker is).
LAB_STALE = 4.0
#: A run waits this long at most for the board at its start; a board it cannot reach by then
#: (no right to declare ``celery-dispatch.lab`` on this vhost?) leaves the run out of the line.
BOARD_WAIT = 3.0
#: A new listener's hello is answered at once by every listening sender: heard all after this.
HELLO_WAIT = 0.15
#: The board's thread looks for a notice to send this often until it has sent its first one
#: (a run's notice as it joins the line, after collection: the run decides ``HELLO_WAIT``
#: after it went out, so the wait for it is on the run's way to its first test).
FIRST_SEND_EVERY = 0.005
#: The waiting line is printed at most this often (and when it changes).
LINE_EVERY = 5.0

WAITING, HOLDING = "waiting", "holding"
#: ``celery-dispatch release WORKER``'s notice: ``worker`` (a name or node) and the ``since``
#: of the quarantine it ends (see :mod:`.health`).
RELEASE = "release"

Notice = dict[str, Any]


def settled(now: float, hello_at: float | None, sent_at: float | None, pending: bool) -> bool:
    """Whether a board has heard every live sender (its hello answered, ``HELLO_WAIT`` ago) and
    every run that joined up to its own notice (``pending``: not sent yet; ``sent_at``: when it
    went out), so that runs joining together see each other before either decides: a board
    opened before its run's notice (during collection) waits ``HELLO_WAIT`` after both."""
    if hello_at is None or pending or now - hello_at < HELLO_WAIT:
        return False
    return sent_at is None or now - sent_at >= HELLO_WAIT


def rank(notice: Notice) -> tuple[int, float, str]:
    """A run's place in a line: higher priority first, then earlier arrival, then its id."""
    return (-int(notice.get("priority", 5)), float(notice.get("arrived", 0.0)), str(notice["id"]))


def runs(notices: list[Notice]) -> list[Notice]:
    return [n for n in notices if n.get("kind") == "run" and not n.get("gone")]


def workers(notices: list[Notice]) -> list[Notice]:
    return [n for n in notices if n.get("kind") == "worker" and not n.get("gone")]


def _on(notice: Notice, queue: str) -> dict[str, Any]:
    return dict((notice.get("queues") or {}).get(queue) or {})


def line(notices: list[Notice], queue: str) -> list[Notice]:
    """The runs waiting for ``queue``, first in line first."""
    return sorted((n for n in runs(notices) if _on(n, queue).get("state") == WAITING), key=rank)


def holders(notices: list[Notice], queue: str) -> list[Notice]:
    """The runs holding slots of ``queue``, the earliest first."""
    held = [n for n in runs(notices) if _on(n, queue).get("state") == HOLDING]
    return sorted(held, key=lambda n: float(_on(n, queue).get("since") or 0.0))


def grant(me: Notice, notices: list[Notice], queue: str, capacity: int) -> int:
    """How many slots of ``queue`` the run ``me`` (waiting) may start now: 0 while it waits.

    ``notices`` are the fresh notices of the others (``me``'s own, if there, is ignored).
    """
    others = [n for n in notices if n.get("id") != me["id"]]
    held_by = {str(n["id"]) for n in holders(others, queue)}
    held = sum(max(1, int(_on(n, queue).get("slots") or 1)) for n in holders(others, queue))
    # Slots busy with a run that has no notice: a controller just killed (its run is being
    # dropped) or of an earlier version. They count as held too.
    held += sum(
        1
        for worker in workers(others)
        for slot in worker.get("busy") or []
        if slot.get("queue") in (None, queue)
        and str(slot.get("run_id")) not in held_by
        and slot.get("run_id") != me["id"]
    )
    free = capacity - held
    if free <= 0:
        return 0
    waiting = line([*others, {**me, "queues": {queue: {"state": WAITING}}}], queue)
    place = next(i for i, n in enumerate(waiting) if n["id"] == me["id"])
    return max(0, free - place)


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def ago(seconds: float) -> str:
    if seconds < 90:
        return f"{max(0, round(seconds))} s ago"
    if seconds < 5400:
        return f"{round(seconds / 60)} min ago"
    return f"{seconds / 3600:.1f} h ago"


def short_id(run_id: str) -> str:
    return run_id[:4]


def describe_holder(run: Notice, queue: str, now: float) -> str:
    """``run 3f2a (GitLab pipeline 1234 by alice on ci-runner-7, 37/120 tests, started 4 min
    ago)``."""
    on = _on(run, queue)
    label = str((run.get("identity") or {}).get("label") or "")
    parts = [label] if label else []
    if on.get("total"):
        parts.append(f"{on.get('done', 0)}/{on['total']} tests")
    if on.get("since"):
        parts.append(f"started {ago(now - float(on['since']))}")
    detail = f" ({', '.join(parts)})" if parts else ""
    return f"run {short_id(str(run['id']))}{detail}"


def waiting_line(me: Notice, notices: list[Notice], queue: str, now: float | None = None) -> str:
    """One line for a waiting run's terminal: who holds ``queue`` and where this run stands."""
    now = time.time() if now is None else now
    others = [n for n in notices if n.get("id") != me["id"]]
    by_run = {str(n["id"]): n for n in runs(others)}
    busy: list[str] = []
    seen: set[str] = set()
    for worker in workers(others):
        for slot in worker.get("busy") or []:
            if slot.get("queue") not in (None, queue):
                continue
            run_id = str(slot.get("run_id") or "")
            holder = by_run.get(run_id)
            what = (
                describe_holder(holder, queue, now)
                if holder is not None
                else f"run {short_id(run_id)} ({slot.get('identity') or 'unknown'})"
            )
            busy.append(f"{worker.get('worker') or worker['id']} busy with {what}")
            seen.add(run_id)
    for holder in holders(others, queue):
        if str(holder["id"]) not in seen:
            busy.append(f"held by {describe_holder(holder, queue, now)}")
    waiting = line([*others, {**me, "queues": {queue: {"state": WAITING}}}], queue)
    place = next(i for i, n in enumerate(waiting) if n["id"] == me["id"]) + 1
    who = "; ".join(busy) if busy else "every slot busy"
    return f"{queue}: {who}; this run is {ordinal(place)} in line (priority {me.get('priority')})"


def lab_view(notices: list[Notice], now: float | None = None) -> dict[str, Any]:
    """What ``celery-dispatch status`` shows: per queue its workers, the runs holding it and
    the runs waiting for it (in line order)."""
    now = time.time() if now is None else now
    by_run = {str(n["id"]): n for n in runs(notices)}
    queues: set[str] = set()
    for worker in workers(notices):
        queues.update(str(q) for q in worker.get("queues") or [])
    for run in runs(notices):
        queues.update(str(q) for q in run.get("queues") or {})
    view: dict[str, Any] = {"time": now, "queues": {}}
    for queue in sorted(queues):
        entry: dict[str, Any] = {"workers": [], "holding": [], "waiting": []}
        for worker in workers(notices):
            if queue not in (worker.get("queues") or []):
                continue
            busy = [
                _slot_view(slot, by_run.get(str(slot.get("run_id"))), queue, now)
                for slot in worker.get("busy") or []
                if slot.get("queue") in (None, queue)
            ]
            entry["workers"].append(
                {
                    "name": worker.get("worker") or worker["id"],
                    "node": worker.get("node"),
                    "host": worker.get("host"),
                    "slots": int(worker.get("slots") or 0),
                    "state": "busy" if busy else "idle",
                    "busy": busy,
                    "last_run": worker.get("last"),
                    "quarantine": worker.get("quarantine"),
                }
            )
        for run in holders(notices, queue):
            entry["holding"].append(_run_view(run, queue, now))
        for position, run in enumerate(line(notices, queue), 1):
            entry["waiting"].append({**_run_view(run, queue, now), "position": position})
        view["queues"][queue] = entry
    return view


def _run_view(run: Notice, queue: str, now: float) -> dict[str, Any]:
    on = _on(run, queue)
    identity = run.get("identity") or {}
    since = on.get("since")
    return {
        "run_id": run["id"],
        "identity": identity,
        "label": identity.get("label"),
        "priority": run.get("priority"),
        "arrived": run.get("arrived"),
        "slots": on.get("slots"),
        "done": on.get("done"),
        "total": on.get("total"),
        "elapsed": None if not since else round(now - float(since), 1),
    }


def _slot_view(slot: dict[str, Any], run: Notice | None, queue: str, now: float) -> dict[str, Any]:
    found: dict[str, Any] = {
        "run_id": slot.get("run_id"),
        "label": slot.get("identity"),
        "elapsed": None if not slot.get("since") else round(now - float(slot["since"]), 1),
    }
    if run is not None:
        on = _on(run, queue)
        found.update(label=(run.get("identity") or {}).get("label"), done=on.get("done"))
        found.update(total=on.get("total"), priority=run.get("priority"))
    return found
