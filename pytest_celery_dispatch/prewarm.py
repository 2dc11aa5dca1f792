"""A run's zygote started on a worker while the controller still collects (``prewarm``).

A slot's first runner is forked from its run's zygote (see :mod:`.zygote`), which collects the
run's tests on the worker: on a big suite that collection comes after the controller's own, on
the critical path. A controller whose last run with the same selection dispatched to a queue
sends, as pytest's session starts, ``prewarm`` tasks to each queue with that run's tests (see
:mod:`.prewarmplan`): a worker that takes it starts the zygote those tests make, and the run's
slots, sent once the controller has collected, fork from it at once when the run's tests are
the same. When they are not, the first slot of the run starts a zygote of its own and the
prewarmed one is killed (:func:`.zygote.drop_prewarmed`); one nobody asks for ends by itself
(``ZYGOTE_FIRST_WAIT``); one still collecting when its run is gone from the lab board (a run
cancelled before its slots came) is killed by the worker's board thread (:mod:`.prewarmwatch`).

What a worker checks before it starts one, as ``run_session`` would (nothing it receives runs
before it is checked): the protocol; its own workspace in place (a prewarm never fetches a
shipped tree: a run that needs one gets its zygote from its slots); nodeids inside it, in test
files with the controller's bytes (:func:`.admission.checked_nodeids`: any refusal, and no
zygote); a free slot (a bench busy with another run is left alone); no quarantine.
``DISPATCH_PREWARM=0`` on a worker turns it off. The checks are the task's; the zygote is
started in a thread of the pool process, so the task ends at once and a plain task sent to the
worker meanwhile does not wait the zygote's start for the process.

Worker side only. PYTEST_DONT_REWRITE: imported by the worker app.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from celery import Task

from .admission import checked_nodeids
from .driver import fork_wait_limit
from .health import HealthBook
from .names import (
    ENV_PREWARM,
    ENV_WORKER_CONCURRENCY,
)
from .runnerspec import RunnerSpec, slot_spec
from .serialization import PROTOCOL
from .slotgate import gate_of
from .spares import SPARE_DELAY, SparePool
from .workerinfo import context_env, task_place, workspace
from .zygote import Zygotes

log = logging.getLogger("pytest_celery_dispatch.worker")


def in_thread(start: Callable[[], None]) -> None:
    threading.Thread(target=start, name="celery-dispatch-prewarm", daemon=True).start()


def prewarm_zygote(
    task: Task,
    payload: dict[str, Any],
    zygotes: Zygotes,
    spares: SparePool,
    background: Callable[[Callable[[], None]], None] = in_thread,
) -> str:
    """Start the zygote of the run and tests ``payload`` names, if this worker may (see the
    module); what it did, in a word or two (the task's result, and the log's).

    The checks are made here; the zygote is started in the ``background`` (a thread of the
    pool process), which logs what came of it: a zygote takes 0.1-0.9 s to listen, and a plain
    task (``task_b``) sent meanwhile to this worker waited that long for the process."""
    extra = {"run_id": payload.get("run_id"), "queue": payload.get("queue")}
    checked = _checked(task, payload)
    if isinstance(checked, str):
        log.info("prewarm: %s", checked, extra=extra)
        return checked
    spec, ws, env = checked

    def start() -> None:
        try:
            started = zygotes.prewarm(spec, fork_wait_limit(spec.timeout))
            spares.prepare(ws, env, SPARE_DELAY)  # if the zygote took this process's spare
        except Exception as exc:  # the task has ended: said here, as its failure was
            log.warning("prewarm: no zygote started: %s", exc, extra=extra, exc_info=True)
            return
        done = f"zygote started for {len(spec.nodeids)} tests" if started else "no zygote started"
        log.info("prewarm: %s", done, extra=extra)

    background(start)
    return f"starting a zygote for {len(spec.nodeids)} tests"


def _checked(task: Task, payload: dict[str, Any]) -> tuple[RunnerSpec, str, dict[str, str]] | str:
    """The slot's spec, workspace and environment of a prewarm this worker may start; else
    why not."""
    if os.environ.get(ENV_PREWARM, "1") == "0":
        return f"off ({ENV_PREWARM}=0)"
    if payload.get("protocol") != PROTOCOL or not isinstance(payload.get("nodeids"), list):
        return "not a prewarm of this worker's protocol"
    gate = gate_of(int(os.environ.get(ENV_WORKER_CONCURRENCY) or 1))
    if gate is not None and not gate.free():
        return "every slot busy"
    book = HealthBook.of_worker()
    if book is not None and book.quarantine() is not None:
        return "quarantined"
    ws = workspace()
    refused: list[dict[str, Any]] = []
    nodeids = checked_nodeids(refused.append, payload, ws, {})
    if refused or not nodeids:
        return "the run's tests are not this workspace's"
    try:
        place = task_place(task, payload)
        env = {**os.environ, **context_env(place, ws)}
        spec = slot_spec({**payload, "queue": place["queue"]}, ws, nodeids, env)
    except (KeyError, TypeError, ValueError):
        return "not a prewarm of this worker's protocol"
    return spec, ws, env
