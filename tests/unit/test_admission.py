"""What a worker accepts of a session: nodeids inside its workspace (admission.checked_nodeids)."""

from __future__ import annotations

import os

from pytest_celery_dispatch import admission


def test_each_test_file_is_resolved_once_however_many_of_its_tests_come(tmp_path, monkeypatch):
    """W6 sends 15,000 nodeids per queue: resolving the workspace and the file's symlinks for
    each of them held every slot's first test back (two realpath calls per nodeid)."""
    for name in ("test_a.py", "test_b.py"):
        (tmp_path / name).write_text("def test_x(): pass\n")
    nodeids = [f"test_{f}.py::test_{i}" for f in "ab" for i in range(100)]
    calls = []
    realpath = os.path.realpath

    def counting(path, *args, **kwargs):
        calls.append(path)
        return realpath(path, *args, **kwargs)

    monkeypatch.setattr(os.path, "realpath", counting)
    events = []
    assert admission.checked_nodeids(events.append, {"nodeids": nodeids}, str(tmp_path), {}) == (
        nodeids
    )
    assert events == []
    assert len(calls) <= 4  # the workspace and the file, once per file


def test_a_nodeid_outside_the_workspace_is_refused_by_name_beside_accepted_ones(tmp_path):
    (tmp_path / "test_a.py").write_text("def test_x(): pass\n")
    (tmp_path / "out.py").symlink_to("/etc/hostname")
    nodeids = ["test_a.py::test_x", "out.py::test_1", "out.py::test_2", "test_a.py::test_y"]
    events = []
    kept = admission.checked_nodeids(events.append, {"nodeids": nodeids}, str(tmp_path), {})
    assert kept == ["test_a.py::test_x", "test_a.py::test_y"]
    assert [e["nodeids"] for e in events] == [["out.py::test_1"], ["out.py::test_2"]]
    assert all(e["type"] == "refused" and "outside" in e["reason"] for e in events)
