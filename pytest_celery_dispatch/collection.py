"""What the controller reads from collected items, as plain data for the pure modules: each
test's route (:mod:`.routing`) and its group under ``--celery-dist`` (:mod:`.planning`)."""

from __future__ import annotations

import pytest

from . import planning, routing
from .settings import Settings


def route_item(item: pytest.Item, settings: Settings) -> routing.Route:
    """Where the item runs: its closest ``queue`` marker, else the routing hook, the ini routes,
    the default queue, or here."""
    marker = item.get_closest_marker("queue")
    callspec = getattr(item, "callspec", None)
    fanout = callspec.params.get(routing.FANOUT_PARAM) if callspec is not None else None
    hook = None
    if marker is None:
        hook = item.config.hook.pytest_celery_dispatch_route(item=item)
    return routing.route(
        (marker.args, marker.kwargs) if marker is not None else None,
        settings.default_queue,
        settings.allowed_queues,
        nodeid=item.nodeid,
        fanout=fanout,
        hook=hook,
        rules=settings.routes,
    )


def group_key(item: pytest.Item, mode: str) -> str | None:
    """The item's group under ``--celery-dist`` (see :mod:`.planning`), or None.

    Taken from the item, not parsed from its nodeid: a fan-out item's ``[queue]`` id, or a
    parameter id holding ``::`` or ``@``, never ends up in a group's name.
    """
    if mode == "loadgroup":
        markers = item.iter_markers("xdist_group")
        return planning.group_name((m.args, m.kwargs) for m in markers)
    if mode == "loadfile":
        return planning.file_key(item.nodeid)
    if mode == "loadscope":  # the class, else the module (xdist: the nodeid up to its last ::)
        parent = item.parent
        return parent.nodeid if parent is not None and parent.nodeid else item.nodeid
    return None
