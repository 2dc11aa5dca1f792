"""serialization.py: nodeids must stay inside the worker's workspace."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_celery_dispatch.serialization import (
    UnsafeNodeId,
    check_nodeid,
    confine,
    dumps,
    loads,
    nodeid_path,
)


def test_nodeid_path_is_the_part_before_the_first_double_colon() -> None:
    assert nodeid_path("a/test_x.py::T::t[p::q]") == "a/test_x.py"
    assert nodeid_path("a/test_x.py") == "a/test_x.py"


@pytest.mark.parametrize(
    ("nodeid", "path"),
    [
        ("tests/test_a.py::test_x", "tests/test_a.py"),
        ("test_a.py::TestK::test_m[a::b-c]", "test_a.py"),
        ("test_a.py::test_p[with space]", "test_a.py"),
        ("pkg/tést_ü.py::test_ünï[√-ß]", "pkg/tést_ü.py"),
        ("test_a.py::test_p[../../etc/passwd]", "test_a.py"),  # ids are not paths
        ("sub/../test_a.py::t", "sub/../test_a.py"),  # stays inside once normalized
    ],
)
def test_normal_nodeids_are_accepted(nodeid: str, path: str) -> None:
    assert check_nodeid(nodeid) == path


def test_absolute_nodeids_are_refused() -> None:
    for nodeid in ("/etc/passwd::x", "\\\\server\\share\\t.py::t", "C:/t.py::t", "a\\t.py::t"):
        with pytest.raises(UnsafeNodeId, match="absolute path"):
            check_nodeid(nodeid)


def test_climbing_nodeids_are_refused() -> None:
    for nodeid in ("..", "../t.py::t", "a/../../t.py::t", "./../t.py"):
        with pytest.raises(UnsafeNodeId, match="outside the worker's workspace"):
            check_nodeid(nodeid)


def test_nul_bytes_empty_and_non_text_are_refused() -> None:
    for nodeid in ("test_a.py\x00::t", "test_a.py::t[\x00]", "", None, 3):
        with pytest.raises(UnsafeNodeId, match="invalid nodeid"):
            check_nodeid(nodeid)  # type: ignore[arg-type]


def test_confine_returns_the_real_path_inside_the_workspace(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    (workspace / "pkg").mkdir(parents=True)
    (workspace / "pkg" / "test_a.py").write_text("")
    full = confine(str(workspace), "pkg/test_a.py::test_x[a::b]")
    assert full == os.path.join(os.path.realpath(workspace), "pkg", "test_a.py")
    with pytest.raises(UnsafeNodeId):
        confine(str(workspace), "../ws2/test_a.py::t")


def test_confine_refuses_a_symlink_that_leads_outside(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    outside = tmp_path / "ws-outside"  # shares the workspace's name as a prefix
    outside.mkdir()
    (outside / "test_evil.py").write_text("")
    (workspace / "link").symlink_to(outside, target_is_directory=True)
    (workspace / "inner").mkdir()
    (workspace / "inner_link").symlink_to(workspace / "inner", target_is_directory=True)

    with pytest.raises(UnsafeNodeId, match="resolves outside"):
        confine(str(workspace), "link/test_evil.py::test_x")
    assert confine(str(workspace), "inner_link/test_ok.py::t") == os.path.join(
        os.path.realpath(workspace), "inner", "test_ok.py"
    )


def test_dumps_replaces_unserializable_values_with_their_text() -> None:
    text = dumps({"nodeid": "t.py::test_ü", "path": Path("x/y")})
    assert "test_ü" in text  # not \u-escaped
    assert loads(text) == {"nodeid": "t.py::test_ü", "path": "x/y"}
