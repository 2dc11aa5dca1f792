"""Environment drift: versions, their differences, and shipped packages installed here too."""

from __future__ import annotations

import platform

import pytest

from pytest_celery_dispatch.envdrift import differences, shadowed, tree_packages, versions


def test_versions_name_python_pytest_the_plugin_and_pytest_plugins() -> None:
    found = versions()
    assert found["python"] == platform.python_version()
    assert found["pytest"] == pytest.__version__
    assert "pytest-celery-dispatch" in found
    assert "pytest-timeout" in found  # a pytest11 plugin


def test_differences_are_named_from_the_workers_side() -> None:
    here = {"python": "3.12.1", "pytest": "9.2.0", "pytest-timeout": "2.4.0", "kombu": "5.7.0"}
    worker = {"python": "3.12.1", "pytest": "8.3.2", "kombu": "5.7.0", "pytest-extra": "1.0"}
    assert differences(worker, here) == ["pytest 8.3.2 (here 9.2.0)", "pytest-timeout missing"]
    assert differences(here, here) == []
    assert differences({**here, "python": "3.11.7"}, here) == ["python 3.11.7 (here 3.12.1)"]


def test_tree_packages_are_top_level_or_under_src() -> None:
    paths = ["mylib/__init__.py", "src/other/__init__.py", "tests/sub/__init__.py", "x.py"]
    assert tree_packages(paths) == {"mylib": "mylib", "other": "src/other"}


def test_a_shipped_package_installed_here_too_is_named() -> None:
    notes = shadowed(["pytest_celery_dispatch/__init__.py", "not_installed_xyz/__init__.py"])
    assert len(notes) == 1
    assert notes[0].startswith("pytest_celery_dispatch/ of the tree is installed here too")
    assert "pytest-celery-dispatch" in notes[0]
