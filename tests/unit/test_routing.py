"""routing.py: which queue a test goes to, in which order the rules apply, what errors say."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_celery_dispatch import routing
from pytest_celery_dispatch.routing import Route, RouteRule, parse_routes, route, validate_marker


def test_marker_wins_over_default_queue() -> None:
    assert route((("queue_a",), {}), "queue_default") == Route(queue="queue_a", source="marker")


def test_default_queue_for_unmarked_tests() -> None:
    assert route(None, "queue_default") == Route(queue="queue_default", source="default")


def test_local_when_nothing_applies() -> None:
    assert route(None, None) == Route(queue=None, source="local", error=None)


def test_precedence_marker_hook_routes_default_local() -> None:
    rules = [RouteRule("tests/hw_a/*", "queue_a")]
    nodeid = "tests/hw_a/test_x.py::test_y"
    everything: dict[str, Any] = {"nodeid": nodeid, "hook": "queue_hook", "rules": rules}
    assert route((("queue_m",), {}), "queue_d", **everything).source == "marker"
    assert route(None, "queue_d", **everything) == Route("queue_hook", "hook")
    assert route(None, "queue_d", nodeid=nodeid, rules=rules) == Route(
        "queue_a", "route tests/hw_a/*"
    )
    assert route(None, "queue_d", nodeid="tests/other.py::t", rules=rules).source == "default"
    assert route(None, None, nodeid="tests/other.py::t", rules=rules).source == "local"


def test_first_matching_route_wins() -> None:
    rules, errors = parse_routes(
        ["# comment", "", "tests/hw_a/test_special.py = queue_special", "tests/hw_a = queue_a"]
    )
    assert errors == []
    assert route(None, None, nodeid="tests/hw_a/test_special.py::t", rules=rules).queue == (
        "queue_special"
    )
    assert route(None, None, nodeid="tests/hw_a/test_other.py::t", rules=rules).queue == "queue_a"
    # A prefix ends at a path or :: boundary.
    assert route(None, None, nodeid="tests/hw_ab/test_x.py::t", rules=rules).queue is None


@pytest.mark.parametrize(
    ("pattern", "nodeid", "matches"),
    [
        ("tests/hw_a/*", "tests/hw_a/sub/test_x.py::t", True),
        ("*::test_flash*", "a/test_x.py::test_flash_fw", True),
        ("tests/hw_a", "tests/hw_a/test_x.py::t", True),
        ("tests/hw_a", "tests/hw_ab/test_x.py::t", False),
        ("tests/test_x.py::TestA", "tests/test_x.py::TestA::test_1", True),
        ("tests/test_x.py::TestA", "tests/test_x.py::TestAB::test_1", False),
        ("tests/test_x.py::", "tests/test_x.py::t", True),
    ],
)
def test_route_patterns(pattern: str, nodeid: str, matches: bool) -> None:
    assert RouteRule(pattern, "q").matches(nodeid) is matches


def test_malformed_route_lines_are_named() -> None:
    rules, errors = parse_routes(["no equals sign", "= queue_a", "tests/x = bad queue"])
    assert rules == []
    assert len(errors) == 3
    assert "expected '<glob or nodeid prefix> = <queue>'" in errors[0]
    assert "'bad queue' is not a queue name" in errors[2]


def test_several_names_fan_out_and_each_item_keeps_its_queue() -> None:
    marker = (("queue_a", "queue_b"), {})
    assert validate_marker(*marker, None) == (("queue_a", "queue_b"), None)
    assert route(marker, None, fanout="queue_b") == Route("queue_b", "marker")
    assert route(marker, None, fanout="queue_a") == Route("queue_a", "marker")


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
        pytest.param(("queue_a", "queue_a"), {}, None, ["names a queue twice"], id="twice"),
        pytest.param(("bad name",), {}, None, ["'bad name' is not a queue name"], id="characters"),
        pytest.param(
            ("queue_c",),
            {},
            ["queue_a", "queue_b"],
            ["'queue_c' is an unknown queue", "allows queue_a, queue_b"],
            id="unknown",
        ),
        pytest.param(
            ("queue_bb",),
            {},
            ["queue_a", "queue_b"],
            ["'queue_bb' is an unknown queue (did you mean queue_b?); ini celery_dispatch_queues"],
            id="unknown-close",
        ),
        pytest.param(("queue_a\n",), {}, None, ["is not a queue name"], id="trailing-newline"),
    ],
)
def test_invalid_markers_give_an_actionable_error(
    args: tuple[Any, ...], kwargs: dict[str, Any], allowed: list[str] | None, fragments: list[str]
) -> None:
    queues, error = validate_marker(args, kwargs, allowed)
    assert queues == ()
    assert error is not None
    for fragment in fragments:
        assert fragment in error
    result = route((args, kwargs), "queue_default", allowed)
    assert result.queue is None
    assert result.error == error


def test_a_hook_or_route_naming_an_unknown_queue_is_an_error() -> None:
    assert route(None, None, ["queue_a"], hook="queue_x").error is not None
    rules = [RouteRule("*", "queue_x")]
    assert route(None, None, ["queue_a"], nodeid="t.py::t", rules=rules).error is not None
    assert route(None, None, ["queue_a"], hook="queue_a") == Route("queue_a", "hook")


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("queue_c", "queue_a", True),  # replaced
        ("queue_aa", "queue_a", True),  # inserted
        ("queu_a", "queue_a", True),  # deleted
        ("qeuue_a", "queue_a", True),  # neighbours swapped
        ("queue_a", "queue_a", False),  # the same name is no typo
        ("queue_ab", "queue_cd", False),  # two replacements
        ("queue", "queue_a", False),  # two deleted
        ("", "a", True),
    ],
)
def test_one_edit_apart(a: str, b: str, expected: bool) -> None:
    assert routing.one_edit_apart(a, b) is expected
    assert routing.one_edit_apart(b, a) is expected


def test_did_you_mean_names_every_close_queue() -> None:
    assert routing.did_you_mean("queue_c", ["queue_a", "bench_x"]) == "queue_a"
    assert routing.did_you_mean("queue_c", ["queue_b", "queue_a"]) == "queue_a or queue_b"
    assert (
        routing.did_you_mean("queue_x", ["queue_b", "queue_a", "queue_c"])
        == "queue_a, queue_b or queue_c"
    )
    assert routing.did_you_mean("bench_7", ["queue_a", "bench_7"]) is None
