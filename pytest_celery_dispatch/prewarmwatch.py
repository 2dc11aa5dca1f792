"""A prewarmed zygote whose run is gone is killed while it still collects.

A prewarm (:mod:`.prewarm`) starts a run's zygote on a worker while the controller is still
collecting. If the run stops while one of its slots waits for that zygote, the slot kills it
(:func:`.zygote.prewarmed_in`). A run cancelled before any of its slots reached the worker (a
CI job cancelled while it collects, a controller killed) has no slot here, and its zygote
collected on the bench until the prewarm's own limit (the run's ``--celery-timeout``: 300 s by
default).

The run's notice on the lab board (:mod:`.lab`) is its sign of life from the time it prewarms:
a run like its last joins the line as pytest's session starts, before it sends its prewarms;
any other joins once it has collected, before it prewarms. :class:`PrewarmWatch`, called by the
worker's board thread (:class:`.benchnotice.BenchNotices`) every ``LAB_INTERVAL``, kills each
zygote this worker prewarmed that still collects once its run is gone from the board: said
gone (the controller's end, Ctrl-C included) or seen and then not renewed for ``LAB_STALE``
(a controller killed). A run whose notice was never seen here (a board it could not reach, a
controller of an earlier version) keeps the prewarm's limit. A worker whose board does not
hear its own notice hears nothing: it decides nothing.

Worker side only (the worker's main process). PYTEST_DONT_REWRITE: imported by the worker app.
"""

from __future__ import annotations

import logging

from . import lab
from .zygote import kill_collecting, prewarmed_by, prewarmed_process

log = logging.getLogger("pytest_celery_dispatch.worker")


def runs_seen(notices: list[lab.Notice], seen: set[str]) -> tuple[set[str], set[str]]:
    """Pure: the runs on the board now (``live``), and the runs ``gone`` from it: said gone,
    or ``seen`` before and not there now."""
    live = {str(n["id"]) for n in lab.runs(notices)}
    said_gone = {str(n["id"]) for n in notices if n.get("kind") == "run" and n.get("gone")}
    return live, said_gone | (seen - live)


class PrewarmWatch:
    """The zygotes worker ``worker`` (its main process's pid) prewarmed under ``top``, each
    killed while it collects once its run is gone from the board (see the module)."""

    def __init__(self, node: str, top: str | None, worker: int) -> None:
        self.node = node
        self.top = top
        self.worker = worker
        self.seen: set[str] = set()  # runs whose notice this worker has seen

    def check(self, notices: list[lab.Notice]) -> list[str]:
        """Kill what is to be killed; the keys (run and queue) of the zygotes killed."""
        if self.top is None or not any(n["id"] == self.node for n in lab.workers(notices)):
            return []  # this worker's own notice is not heard: neither is anyone's
        live, gone = runs_seen(notices, self.seen)
        if not gone:
            self.seen |= live
            return []  # nothing to look for in the folders
        killed: list[str] = []
        waiting: set[str] = set()  # runs of zygotes still here
        for folder, record in prewarmed_by(self.top, self.worker):
            key = str(record.get("key") or "")
            run_id = key.rpartition("/")[0]
            zygote = prewarmed_process(record)
            if run_id in gone and zygote is not None and kill_collecting(zygote, folder):
                killed.append(key)
                log.info(
                    "prewarm: zygote killed while it collected: its run is gone",
                    extra={"run_id": run_id, "queue": key.rpartition("/")[2]},
                )
            else:
                waiting.add(run_id)
        self.seen = live | (self.seen & waiting)
        return killed
