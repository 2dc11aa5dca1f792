"""The check that the run's manifest holds every file its dispatched tests need."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pytest_celery_dispatch.manifest import Entry, ShipError, build_manifest, list_files
from pytest_celery_dispatch.shipcheck import (
    EXCLUDED,
    IGNORED,
    JUNK,
    OUTSIDE,
    SETTING_EXCLUDE,
    SETTING_INCLUDE,
    Missing,
    find_missing,
    missing_files,
    missing_message,
    needed_files,
    why_missing,
)
from pytest_celery_dispatch.shipcontrol import MissingFiles, Shipper, ShipSettings


def files(*paths: str) -> list[Entry]:
    return [{"path": p, "sha256": "0" * 64, "size": 1, "exec": False} for p in paths]


def test_a_test_needs_its_file_the_conftests_above_it_and_the_ini_file(tmp_path: Path) -> None:
    root = str(tmp_path)
    conftests = [
        str(tmp_path / "conftest.py"),
        str(tmp_path / "w1" / "conftest.py"),
        str(tmp_path / "w2" / "conftest.py"),  # no dispatched test below it
        str(tmp_path / "w1" / "deep" / "conftest.py"),  # below the test, not above it
        str(tmp_path.parent / "conftest.py"),  # above the rootdir
    ]
    needed = needed_files(
        root,
        ["w1/test_w1_m00.py::test_a[x::y]", "w1/test_w1_m00.py::test_b"],
        conftests,
        str(tmp_path / "pytest.ini"),
    )
    assert needed == {
        "w1/test_w1_m00.py": "test file",
        "conftest.py": "conftest.py",
        "w1/conftest.py": "conftest.py",
        "pytest.ini": "ini file",
    }
    assert needed_files(root, ["t.py::t"], [], str(tmp_path.parent / "tox.ini")) == {
        "t.py": "test file"
    }, "an ini file above the rootdir is not the tree's"
    assert needed_files(root, ["../other/test_o.py::t"]) == {"../other/test_o.py": "test file"}


def test_missing_files_are_those_the_manifest_lacks_links_followed() -> None:
    needed = {
        "w1/test_a.py": "test file",
        "w1/conftest.py": "conftest.py",
        "linked/test_b.py": "test file",
        "pkg": "test file",  # a folder collected as a test (a package-level item)
        "../out/test_c.py": "test file",
        "loop/test_d.py": "test file",
    }
    entries = files("w1/test_a.py", "real/test_b.py", "pkg/x.py")
    entries += [{"path": "linked", "link": "real"}, {"path": "loop", "link": "loop"}]
    assert missing_files(needed, entries) == {
        "w1/conftest.py": "conftest.py",
        "../out/test_c.py": "test file",
        "loop/test_d.py": "test file",
    }
    assert missing_files({"linked/test_b.py": "test file"}, files("linked/test_b.py")) == {}


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_why_a_file_is_missing(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("w1/test_gen*.py\nbuild/\n")
    for name in ("w1/test_gen_1.py", "slow/test_s.py", "build/test_b.py", "out/x.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    root = str(tmp_path)
    kind, why = why_missing(root, "w1/test_gen_1.py")
    assert (kind, why) == (IGNORED, "git ignores it (.gitignore:1:w1/test_gen*.py)")
    kind, why = why_missing(root, "slow/test_s.py", exclude=["  ", "slow/"])
    assert (kind, why) == (EXCLUDED, f"excluded by ini {SETTING_EXCLUDE} (slow/)")
    kind, why = why_missing(root, "build/test_b.py")
    assert kind == JUNK
    assert why.startswith("git ignores it (.gitignore:2:build/) and build/")
    assert why_missing(root, "out/x.json", skip=[str(tmp_path / "out")])[0] == EXCLUDED
    assert why_missing(root, "../t.py") == (OUTSIDE, f"outside the rootdir {root}")


def test_the_message_names_the_files_explained_counts_the_rest_and_says_how_to_fix() -> None:
    missing = [
        Missing("w1/test_0.py", "test file", IGNORED, "git ignores it"),
        Missing("w1/test_1.py", "test file", IGNORED, "git ignores it"),
        Missing("a/conftest.py", "conftest.py", EXCLUDED, f"excluded by {SETTING_EXCLUDE} (a/)"),
    ]
    text = missing_message(missing, 8)
    assert text.startswith("8 file(s) the dispatched tests need are not in it: ")
    assert "w1/test_0.py (test file: git ignores it); w1/test_1.py (" in text
    assert f"a/conftest.py (conftest.py: excluded by {SETTING_EXCLUDE} (a/)); and 5 more;" in text
    fixes = text.split("To fix: ", 1)[1]
    assert fixes.count(SETTING_INCLUDE) == 1, "each fix once"
    assert SETTING_EXCLUDE in fixes
    assert text.endswith("(--celery-ship off)")
    assert "more" not in missing_message(missing, 3)


def test_the_shipper_refuses_a_manifest_without_a_dispatched_tests_file(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("test_gen.py\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_gen.py").write_text("def test(): pass\n")
    (tmp_path / "test_kept.py").write_text("def test(): pass\n")
    ini = str(tmp_path / "pytest.ini")
    shipper = Shipper(str(tmp_path), ShipSettings(mode="auto"), [], ini)
    shipper.prepare()
    shipper.check_needed(["test_kept.py::test"], [])
    with pytest.raises(MissingFiles, match=r"test_gen.py \(test file: git ignores it") as exc:
        shipper.check_needed(["test_kept.py::test", "test_gen.py::test"], [])
    assert isinstance(exc.value, ShipError)
    assert SETTING_INCLUDE in str(exc.value)

    included = ShipSettings(mode="always", include=("test_gen.py",))
    shipper = Shipper(str(tmp_path), included, [], ini)
    shipper.prepare()
    shipper.check_needed(["test_gen.py::test"], [])

    off = Shipper(str(tmp_path), ShipSettings(mode="off"), [], ini)
    off.prepare()
    off.check_needed(["test_gen.py::test", "../elsewhere.py::t"], [])  # nothing is shipped


def test_find_missing_lists_test_files_first(tmp_path: Path) -> None:
    for name in ("conftest.py", "test_x.py", "pytest.ini"):
        (tmp_path / name).write_text("")
    root = str(tmp_path)
    paths = list_files(root, exclude=["conftest.py", "test_x.py", "pytest.ini"])
    manifest = build_manifest(root, paths)
    needed = needed_files(
        root, ["test_x.py::t"], [str(tmp_path / "conftest.py")], str(tmp_path / "pytest.ini")
    )
    excluded = ["conftest.py", "test_x.py", "pytest.ini"]
    found, total = find_missing(root, needed, manifest.entries, excluded)
    assert [(m.path, m.needed_as, m.kind) for m in found] == [
        ("test_x.py", "test file", EXCLUDED),
        ("conftest.py", "conftest.py", EXCLUDED),
        ("pytest.ini", "ini file", EXCLUDED),
    ]
    assert total == 3
    found, total = find_missing(root, needed, manifest.entries, excluded, named=1)
    assert [m.path for m in found] == ["test_x.py"]
    assert total == 3
