"""The controller's side of prewarming: each queue's tests of the last run, sent ahead.

A slot's first runner forks from its run's zygote, which collects the run's tests on the
worker (see :mod:`.zygote`); on a big suite that collection comes after the controller's, on
the critical path. So a run remembers, in pytest's cache, the tests it sent each queue (and
how many workers served it), and the next run with the same selection (its paths, ``-k``,
``-m``, ``--lf``...: :func:`selection`) sends one ``prewarm`` task per worker of each such
queue as pytest's session starts, from a thread beside pytest's collection: a worker that
takes it starts the zygote of those tests (see :mod:`.prewarm` for what it checks first).
When the run's tests turn out the same, its slots fork from a zygote that has collected, or
is collecting, already. A run without a plan, or whose tests differ from its plan's, sends
its prewarms once it has collected (:func:`prewarm_collected`), before the line's wait and its
chunks: the zygote collects meanwhile (a different plan's is killed for it), instead of after
the first slot arrives. Nothing else depends on it: a prewarm lost, refused or late costs
only the time it would have saved.

Not sent under ``-s`` (streamed runners start fresh, no zygote) nor ``--celery-ship always``
(the run's tree is shipped, never the worker's own in place): a worker would never use it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from .forwarding import SlotPayloads
from .names import PREWARM_TASK

#: Where a run leaves its plan for the next (pytest's cache).
PLAN_KEY = "celery-dispatch/plan"
#: A prewarm not taken within this long is dropped by the worker, and by RabbitMQ (seconds):
#: its run has collected by then, and its slots start their own zygote.
PREWARM_EXPIRES = 60.0
#: The most prewarms sent to one queue (one per worker that served it last time).
MAX_PER_QUEUE = 8


#: pytest's options that pick a run's tests (besides its paths).
SELECTION_OPTIONS = (
    "keyword",
    "markexpr",
    "lf",
    "failedfirst",
    "newfirst",
    "last_failed_no_failures",
    "deselect",
    "ignore",
    "ignore_glob",
    "stepwise",
)


def selection(config: Any) -> list[str]:
    """What picks a run's tests: the paths it collects and pytest's selection options; not its
    other options (a JSON report or a JUnit file named after the CI job must not make a run
    unlike the last). A run whose tests differ all the same only wastes its prewarm."""
    picked = [str(a) for a in getattr(config, "args", [])]
    option = getattr(config, "option", None)
    for name in SELECTION_OPTIONS:
        value = getattr(option, name, None)
        if value:
            picked.append(f"{name}={value}")
    return picked


def remembered_plan(cached: Any, args: list[str]) -> dict[str, tuple[list[str], int]]:
    """Each queue's tests and workers of the last run with the same selection ``args`` (see
    :func:`selection`; from pytest's cache: nothing if there is none, or if anything about it
    looks wrong)."""
    if not isinstance(cached, dict) or cached.get("args") != list(args):
        return {}
    queues, workers = cached.get("queues"), cached.get("workers")
    if not isinstance(queues, dict) or not isinstance(workers, dict):
        return {}
    plan: dict[str, tuple[list[str], int]] = {}
    for queue, nodeids in queues.items():
        count = workers.get(queue)
        if (
            isinstance(queue, str)
            and queue
            and isinstance(nodeids, list)
            and nodeids
            and all(isinstance(n, str) for n in nodeids)
            and isinstance(count, int)
            and count > 0
        ):
            plan[queue] = (nodeids, min(count, MAX_PER_QUEUE))
    return plan


def plan_to_remember(
    args: list[str], queue_nodeids: Mapping[str, list[str]], workers: Mapping[str, list[str]]
) -> dict[str, Any] | None:
    """What a run leaves for the next: the tests of each queue some worker served."""
    served = {q: list(n) for q, n in queue_nodeids.items() if n and workers.get(q)}
    if not served:
        return None
    return {
        "args": list(args),
        "queues": served,
        "workers": {q: len(workers[q]) for q in served},
    }


def remember_plan(
    cache: Any,
    args: list[str],
    queue_nodeids: Mapping[str, list[str]],
    workers: Mapping[str, list[str]],
) -> None:
    """Leave this run's plan in pytest's cache (None: ``-p no:cacheprovider``) for the next."""
    plan = plan_to_remember(args, queue_nodeids, workers)
    if cache is not None and plan is not None:
        cache.set(PLAN_KEY, plan)


def prewarm_payload(payloads: SlotPayloads, queue: str, nodeids: list[str]) -> dict[str, Any]:
    """A slot's payload for these tests, without the tree (a prewarm runs in place only)."""
    payload: dict[str, Any] = dict(payloads.for_slot(f"prewarm-{queue}", queue, nodeids))
    payload.pop("ship", None)
    return payload


def start_prewarm(
    app: Any,
    cache: Any,
    args: list[str],
    payloads: SlotPayloads,
    ship_mode: str,
    sent: dict[str, list[str]] | None = None,
) -> threading.Thread | None:
    """Send the remembered plan's prewarms from a thread (see the module); None if not sent.
    Each queue's tests go into ``sent`` as its prewarms go out, and out of it if they fail
    (:func:`prewarm_collected`)."""
    if cache is None or not usable(payloads, ship_mode):
        return None
    from .transport import load_sending

    load_sending(app)  # here, 0.02 s: the thread must import nothing while pytest collects
    thread = threading.Thread(
        target=_send_prewarms,
        args=(app, cache, list(args), payloads, {} if sent is None else sent),
        name="celery-dispatch-prewarm",
        daemon=True,
    )
    thread.start()
    return thread


def prewarm_collected(
    app: Any,
    payloads: SlotPayloads,
    ship_mode: str,
    queue_nodeids: Mapping[str, list[str]],
    workers: Mapping[str, int],
    sent: Mapping[str, list[str]],
) -> list[str]:
    """Once the run has collected, the prewarms of each queue with ``workers`` (consumers)
    whose tests no prewarm named (``sent``): a run with no plan, or tests unlike its plan's.
    Sent before the line's wait and the chunks, its zygotes collect meanwhile, so its slots
    fork at once instead of starting one each. The queues prewarmed."""
    if not usable(payloads, ship_mode):
        return []
    plan = {
        queue: (nodeids, min(workers[queue], MAX_PER_QUEUE))
        for queue, nodeids in queue_nodeids.items()
        if workers.get(queue, 0) > 0 and sent.get(queue) != nodeids
    }
    return _send(app, payloads, plan, {})


def usable(payloads: SlotPayloads, ship_mode: str) -> bool:
    """Whether a worker could use a prewarm of this run: not under ``-s`` (streamed runners
    start fresh) nor ``--celery-ship always`` (never the worker's own tree in place)."""
    return not payloads.stream and ship_mode != "always"


def _send_prewarms(
    app: Any, cache: Any, args: list[str], payloads: SlotPayloads, sent: dict[str, list[str]]
) -> None:
    _send(app, payloads, remembered_plan(cache.get(PLAN_KEY, None), args), sent)


def _send(
    app: Any,
    payloads: SlotPayloads,
    plan: Mapping[str, tuple[list[str], int]],
    sent: dict[str, list[str]],
) -> list[str]:
    queue: str | None = None
    try:
        for queue, (nodeids, workers) in plan.items():
            # Said before it goes: a controller that has collected meanwhile does not send the
            # same prewarm again (prewarm_collected); a send that fails takes it back.
            sent[queue] = nodeids
            payload = prewarm_payload(payloads, queue, nodeids)
            for _ in range(workers):
                app.send_task(
                    PREWARM_TASK,
                    args=[payload],
                    queue=queue,
                    routing_key=queue,
                    ignore_result=True,
                    serializer="json",
                    expires=PREWARM_EXPIRES,
                    expiration=PREWARM_EXPIRES,  # RabbitMQ's message TTL: none piles up unused
                    retry=False,
                )
    except Exception:  # a prewarm is an optimisation: the run goes on without it
        if queue is not None:
            sent.pop(queue, None)
    return list(sent)
