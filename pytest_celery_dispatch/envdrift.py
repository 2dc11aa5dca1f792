"""Environment drift: the Python, pytest, plugin and pytest-plugin versions of a process, the
differences between a worker's and the controller's, named for the header, and the packages of
a shipped tree that the worker also has installed.

PYTEST_DONT_REWRITE: the worker side imports it.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from collections.abc import Iterable, Mapping
from importlib import metadata

#: Always compared, even when not a pytest plugin.
CORE = ("pytest", "pytest-celery-dispatch", "celery", "kombu")


def versions() -> dict[str, str]:
    """``python``, the core distributions and every installed pytest plugin (``pytest11``
    entry point): name -> version."""
    found = {"python": platform.python_version()}
    for dist in metadata.distributions():
        name = str(dist.metadata["Name"] or "").lower().replace("_", "-")
        if not name:
            continue
        if name in CORE or any(ep.group == "pytest11" for ep in dist.entry_points):
            found.setdefault(name, str(dist.version))
    return found


def differences(worker: Mapping[str, str], controller: Mapping[str, str]) -> list[str]:
    """What the worker has different from the controller (``here`` is the controller):
    ``pytest 8.3.2 (here 9.2.0)``, ``pytest-timeout missing``."""
    found: list[str] = []
    for name in sorted(controller, key=lambda n: (n != "python", n)):
        mine, theirs = controller[name], worker.get(name)
        if theirs is None:
            found.append(f"{name} missing")
        elif theirs != mine:
            found.append(f"{name} {theirs} (here {mine})")
    return found


def tree_packages(paths: Iterable[str]) -> dict[str, str]:
    """Top-level packages a tree ships (``pkg/__init__.py`` or ``src/pkg/__init__.py``):
    name -> its folder in the tree."""
    found: dict[str, str] = {}
    for path in paths:
        parts = path.split("/")
        if parts[-1] != "__init__.py":
            continue
        if len(parts) == 2 or (len(parts) == 3 and parts[0] == "src"):
            name = parts[-2]
            if name.isidentifier():
                found.setdefault(name, "/".join(parts[:-1]))
    return found


def shadowed(paths: Iterable[str]) -> list[str]:
    """The tree's packages that this interpreter also finds installed (``pkg/ of the tree is
    installed here too: mylib 1.2 in /usr/lib/...``): a test may import either."""
    notes: list[str] = []
    owners: Mapping[str, list[str]] | None = None
    for name, folder in sorted(tree_packages(paths).items()):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin:
            continue
        if owners is None:
            owners = metadata.packages_distributions()
        dists = ", ".join(
            f"{dist} {_version_of(dist)}" for dist in sorted(set(owners.get(name, [])))
        )
        where = os.path.dirname(os.path.dirname(spec.origin))
        notes.append(f"{folder}/ of the tree is installed here too ({dists or name} in {where})")
    return notes


def _version_of(dist: str) -> str:
    try:
        return str(metadata.version(dist))
    except metadata.PackageNotFoundError:
        return "?"
