"""Environment drift: the Python, pytest, plugin and pytest-plugin versions of a process, and
the differences between a worker's and the controller's, named for the header.

PYTEST_DONT_REWRITE: the worker side imports it.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
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
