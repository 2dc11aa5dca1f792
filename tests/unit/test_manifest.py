"""The run's tree: listing, manifest, limits, and the worker's check of what it receives."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from pytest_celery_dispatch.manifest import (
    SETTING_MAX_FILE,
    SETTING_MAX_TOTAL,
    ShipError,
    build_manifest,
    check_entries,
    link_target_inside,
    list_files,
    matches,
    parse_size,
    walk_files,
)


def make_tree(root: Path) -> None:
    (root / "pkg").mkdir()
    (root / "pkg" / "__init__.py").write_text("")
    (root / "test_a.py").write_text("def test_a(): pass\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    for junk in (".git", ".tox", "__pycache__", "node_modules", ".pytest_cache", "build"):
        (root / junk).mkdir(exist_ok=True)
        (root / junk / "x").write_text("junk")
    (root / "myenv").mkdir()
    (root / "myenv" / "pyvenv.cfg").write_text("home = /usr\n")
    (root / "pkg" / "mod.pyc").write_bytes(b"\0")


def test_the_walk_leaves_out_the_usual_junk(tmp_path: Path) -> None:
    make_tree(tmp_path)
    assert walk_files(str(tmp_path)) == ["pkg/__init__.py", "run.sh", "test_a.py"]


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_in_git_tracked_and_untracked_not_ignored_files_ship(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("*.log\nsecret/\n")
    (tmp_path / "tracked.py").write_text("a = 1\n")
    git(tmp_path, "add", ".gitignore", "tracked.py")
    (tmp_path / "new_test.py").write_text("def test(): pass\n")  # never added: ships too
    (tmp_path / "out.log").write_text("ignored")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key").write_text("ignored")
    assert list_files(str(tmp_path)) == [".gitignore", "new_test.py", "tracked.py"]


def test_a_rootdir_git_ignores_whole_is_walked(tmp_path: Path) -> None:
    """A rootdir inside a checkout that ignores it (a generated project, a benchmark's work
    folder): git lists nothing there, so its files are found as outside git."""
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("work/\n")
    work = tmp_path / "work"
    (work / "w1").mkdir(parents=True)
    (work / "pytest.ini").write_text("[pytest]\n")
    (work / "w1" / "test_a.py").write_text("def test(): pass\n")
    assert list_files(str(work)) == ["pytest.ini", "w1/test_a.py"]


def test_ini_globs_add_ignored_files_and_exclude_others(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("data/\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.bin").write_text("x")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("x")
    (tmp_path / "t.py").write_text("x")
    files = list_files(str(tmp_path), include=["data/*"], exclude=["docs"])
    assert files == [".gitignore", "data/big.bin", "t.py"]


def test_the_runs_own_outputs_are_not_shipped(tmp_path: Path) -> None:
    (tmp_path / "t.py").write_text("x")
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "dispatch_results_20260101_120000.json").write_text("{}")  # an earlier run's
    (tmp_path / "run_artifacts").mkdir()
    (tmp_path / "run_artifacts" / "log.txt").write_text("a test's file")
    (tmp_path / "dispatch_results_20260101_120000_artifacts").mkdir()
    (tmp_path / "dispatch_results_20260101_120000_artifacts" / "x").write_text("")
    skip = [str(tmp_path / "report.json"), str(tmp_path / "run_artifacts")]
    assert list_files(str(tmp_path), skip=skip) == ["t.py"]


def test_a_glob_matches_a_file_or_any_of_its_folders() -> None:
    assert matches("docs/a/b.md", "docs")
    assert matches("docs/a/b.md", "*.md")
    assert not matches("src/docs.py", "docs")


def test_manifest_entries_hold_path_sha_size_exec_and_links_inside(tmp_path: Path) -> None:
    make_tree(tmp_path)
    (tmp_path / "pkg" / "alias.py").symlink_to("__init__.py")
    (tmp_path / "abs_link").symlink_to(tmp_path / "test_a.py")  # absolute, but inside
    manifest = build_manifest(str(tmp_path), walk_files(str(tmp_path)))
    by_path = {e["path"]: e for e in manifest.entries}
    assert by_path["pkg/alias.py"] == {"path": "pkg/alias.py", "link": "__init__.py"}
    assert by_path["abs_link"] == {"path": "abs_link", "link": "test_a.py"}
    assert by_path["run.sh"]["exec"] is True
    assert by_path["test_a.py"]["exec"] is False
    assert by_path["test_a.py"]["size"] == len("def test_a(): pass\n")
    assert len(by_path["test_a.py"]["sha256"]) == 64
    assert manifest.digest == build_manifest(str(tmp_path), walk_files(str(tmp_path))).digest
    (tmp_path / "test_a.py").write_text("def test_a(): assert 0\n")
    assert manifest.digest != build_manifest(str(tmp_path), walk_files(str(tmp_path))).digest


def test_a_symlink_escaping_the_tree_is_refused_by_name(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.py").write_text("")
    (root / "escape").symlink_to("../outside.txt")
    (root / "etc").symlink_to("/etc")
    with pytest.raises(ShipError) as info:
        build_manifest(str(root), walk_files(str(root)))
    assert "escape -> ../outside.txt" in str(info.value)
    assert "etc -> /etc" in str(info.value)


def test_a_file_over_the_limit_names_the_biggest_files_and_the_setting(tmp_path: Path) -> None:
    (tmp_path / "huge.bin").write_bytes(b"x" * 5000)
    (tmp_path / "small.py").write_text("x")
    with pytest.raises(ShipError) as info:
        build_manifest(str(tmp_path), ["huge.bin", "small.py"], max_file=1000)
    assert "huge.bin (4.9 kB)" in str(info.value)
    assert SETTING_MAX_FILE in str(info.value)
    assert "small.py" not in str(info.value)
    with pytest.raises(ShipError) as info:
        build_manifest(str(tmp_path), ["huge.bin", "small.py"], max_total=4000)
    assert "huge.bin (4.9 kB), small.py (1 B)" in str(info.value)
    assert SETTING_MAX_TOTAL in str(info.value)


SHA = "a" * 64


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"path": "../x", "sha256": SHA, "size": 1}, "outside the tree"),
        ({"path": "/etc/passwd", "sha256": SHA, "size": 1}, "not a plain relative path"),
        ({"path": "a/../../x", "sha256": SHA, "size": 1}, "not a plain relative path"),
        ({"path": "a\\b", "sha256": SHA, "size": 1}, "invalid path"),
        ({"path": "x", "sha256": "zz", "size": 1}, "no valid sha256"),
        ({"path": "x", "sha256": SHA, "size": 10**12}, "over this worker's limit"),
        ({"path": "x", "link": "../../etc"}, "points outside the tree"),
        ({"path": "x", "link": "/etc"}, "points outside the tree"),
    ],
)
def test_the_worker_refuses_a_bad_entry(entry: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_entries([entry], max_file=10**9, max_total=10**10)


@pytest.mark.parametrize(
    ("path", "target", "inside"),
    [
        ("a/link", "../x", True),
        ("a/b/link", "../../x/y", True),
        ("link", ".", True),
        ("a/link", "..", True),
        ("link", "..", False),
        ("a/link", "../../x", False),
        ("link", "b/../x", False),  # b -> . would make it climb out: no ".." after a name
        ("link", "/etc", False),
    ],
)
def test_link_targets_only_climb_within_their_depth(path: str, target: str, inside: bool) -> None:
    assert link_target_inside(path, target) is inside


def test_the_worker_refuses_a_file_beneath_a_link() -> None:
    entries = [{"path": "d", "link": "."}, {"path": "d/x", "sha256": SHA, "size": 1}]
    with pytest.raises(ValueError, match="beneath another entry"):
        check_entries(entries, max_file=10**9, max_total=10**10)


def test_a_good_manifest_passes_the_workers_check(tmp_path: Path) -> None:
    make_tree(tmp_path)
    (tmp_path / "pkg" / "alias.py").symlink_to("__init__.py")
    manifest = build_manifest(str(tmp_path), walk_files(str(tmp_path)))
    checked = check_entries(json.loads(manifest.canonical), max_file=10**9, max_total=10**10)
    assert checked.digest == manifest.digest


def test_sizes_parse_with_units() -> None:
    assert parse_size("500M", "x") == 500 * 1024 * 1024
    assert parse_size("2g", "x") == 2 * 1024**3
    assert parse_size("1000", "x") == 1000
    with pytest.raises(ValueError, match="DISPATCH_CACHE_LIMIT"):
        parse_size("lots", "DISPATCH_CACHE_LIMIT")
    assert os.sep == "/"
