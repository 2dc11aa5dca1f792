"""The program of a spare runner: ``python .../spare_boot.py BOOT_FD DELAY READY_FD`` (see
:mod:`.spares`).

What a spare runner does before it is needed: start the interpreter and import pytest with its
own plugins and this plugin's modules, then wait on the boot pipe for one slot's command line,
environment and directory. It imports no test code, no conftest and no third-party plugin
(pytest refuses to rewrite the asserts of a plugin imported before it configures), so a run sees
nothing an earlier one left: each spare serves one runner and a new interpreter replaces it.

Run by path, not with ``-m``: ``-m`` would import this package (and ``importlib.metadata``)
before the delay, and a spare must stay idle until then. So this file imports only the standard
library at its top, and its settings come as arguments. Once it has imported pytest and waits
for an order, it writes one byte on ``READY_FD`` (the worker logs "spare runner ready").

PYTEST_DONT_REWRITE: nothing here is a test helper.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import select
import sys

#: This plugin's own modules, imported ahead (each marked PYTEST_DONT_REWRITE, which allows it).
OWN_MODULES = ("pytest_celery_dispatch.runner", "pytest_celery_dispatch.plugin")


def _import_pytest() -> str:
    """Import pytest, its own plugins and this plugin's modules; the path of pytest's package."""
    import importlib.metadata

    import pytest
    from _pytest.config import default_plugins, essential_plugins

    for name in (*essential_plugins, *default_plugins):
        with contextlib.suppress(ImportError):
            importlib.import_module("_pytest." + name)
    importlib.metadata.entry_points(group="pytest11")
    for name in OWN_MODULES:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    return os.path.dirname(pytest.__file__)


def _take_order(order: dict[str, object]) -> list[str]:
    """Become the slot's runner: its directory, environment and log; its ``pytest`` argv."""
    os.chdir(str(order["cwd"]))
    sys.path[0] = os.getcwd()  # as "python -m pytest" started there would have it
    os.environ.clear()
    env = order["env"]
    assert isinstance(env, dict)
    os.environ.update({str(k): str(v) for k, v in env.items()})
    if order.get("log"):
        log = os.open(str(order["log"]), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
    args = order["args"]
    assert isinstance(args, list)
    return [str(a) for a in args]


def _say_ready(ready_fd: int, waiting: bool) -> None:
    """Tell the worker this spare is warm and waits for an order (if it does); no runner it
    becomes keeps the pipe."""
    if ready_fd < 0:
        return
    with contextlib.suppress(OSError):
        if waiting:
            os.write(ready_fd, b"1")
    with contextlib.suppress(OSError):
        os.close(ready_fd)


def main(boot_fd: int, delay: float, ready_fd: int = -1) -> int:
    boot = os.fdopen(boot_fd, "rb")
    # Warm up only once the worker is quiet: a spare is started as a slot ends, when its tests'
    # processes exit and the controller writes its reports; the next run is seconds away.
    ready = select.select([boot], [], [], delay)
    line = boot.readline() if ready[0] else None
    if line == b"":
        return 0  # the worker process went away (or no longer needs a spare)
    pytest_dir = _import_pytest()
    _say_ready(ready_fd, waiting=line is None)
    if line is None:
        line = boot.readline()
    boot.close()
    if not line:
        return 0
    args = _take_order(json.loads(line))
    # What ``python -m pytest`` runs, whatever pytest calls its entry point (pytest 9.1
    # deprecated ``console_main()``, which warned into the runner's log). It ends in SystemExit.
    sys.argv = [os.path.join(pytest_dir, "__main__.py"), *args]
    runpy.run_module("pytest", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    # Python put this file's folder first on sys.path; the workspace (our cwd) belongs there,
    # as for the ``python -c`` program this replaces. Only the standard library is imported yet.
    sys.path[0] = os.getcwd()
    ready = int(sys.argv[3]) if len(sys.argv) > 3 else -1
    sys.exit(main(int(sys.argv[1]), float(sys.argv[2]), ready))
