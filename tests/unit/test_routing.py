"""routing.py: which queue a test goes to, and what an invalid marker says."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_celery_dispatch.routing import Route, route, validate_marker


def test_marker_wins_over_default_queue() -> None:
    assert route((("queue_a",), {}), "queue_default") == Route(queue="queue_a", source="marker")


def test_default_queue_for_unmarked_tests() -> None:
    assert route(None, "queue_default") == Route(queue="queue_default", source="default")


def test_local_when_neither_marker_nor_default() -> None:
    assert route(None, None) == Route(queue=None, source="local", error=None)


@pytest.mark.parametrize(
    ("args", "kwargs", "allowed", "fragments"),
    [
        pytest.param(
            (), {}, None, ["needs a queue name", "@pytest.mark.queue('queue_a')"], id="no"
        ),
        pytest.param(
            (3,), {}, None, ["as a string, got int 3", "@pytest.mark.queue('queue_a')"], id="int"
        ),
        pytest.param(
            (),
            {"name": "queue_a"},
            None,
            ["keyword argument(s) name", "@pytest.mark.queue('queue_a')"],
            id="kwargs",
        ),
        pytest.param(
            ("queue_a", "queue_b"),
            {},
            None,
            ["takes one queue name, got 2", "'queue_a', 'queue_b'"],
            id="several",
        ),
        pytest.param(
            ("queue a!",),
            {},
            None,
            ["@pytest.mark.queue('queue a!')", "letters, digits and _ . : -"],
            id="characters",
        ),
        pytest.param(
            ("queue_z",),
            {},
            ["queue_b", "queue_a"],
            ["'queue_z'", "unknown queue", "allows queue_a, queue_b", "celery_dispatch_queues"],
            id="unknown",
        ),
    ],
)
def test_invalid_markers_give_an_actionable_error(
    args: tuple[Any, ...], kwargs: dict[str, Any], allowed: list[str] | None, fragments: list[str]
) -> None:
    queue, error = validate_marker(args, kwargs, allowed)
    assert queue is None
    assert error is not None
    for fragment in fragments:
        assert fragment in error
    # route() turns it into an error route: the test runs nowhere, even with a default queue.
    assert route((args, kwargs), "queue_default", allowed) == Route(
        queue=None, source="marker", error=error
    )


def test_allowed_names_pass_and_any_name_passes_without_a_list() -> None:
    assert validate_marker(("queue_a",), {}, ["queue_a", "queue_b"]) == ("queue_a", None)
    assert validate_marker(("bench-1.x:y",), {}, None) == ("bench-1.x:y", None)
    assert route((("queue_b",), {}), None, frozenset({"queue_b"})) == Route("queue_b", "marker")


def test_a_trailing_newline_is_not_a_valid_queue_name() -> None:
    queue, error = validate_marker(("queue_a\n",), {}, None)
    assert queue is None
    assert error is not None
