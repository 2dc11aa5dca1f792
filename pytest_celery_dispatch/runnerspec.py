"""What a slot's runner process is: its spec, its ``pytest`` command line and its environment.

Shared by the slot driver, the zygote and the spare pool, which all start runner processes.

PYTEST_DONT_REWRITE: spare runners import it before pytest configures (see spare_boot.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from .names import ENV_OPTIONS, ENV_PARENT, ENV_PYCACHE, ENV_RUNNER
from .procutil import private_dir, private_top
from .serialization import nodeid_path

#: The ``-p`` plugin every runner process loads.
RUNNER_PLUGIN = "pytest_celery_dispatch.runner"


@dataclasses.dataclass
class RunnerSpec:
    workspace: str
    nodeids: list[str]  # every test this slot may be asked to run: what the runner collects
    timeout: float
    pytest_args: list[str]
    env: dict[str, str]
    stream: bool = False  # -s on the controller: forward the tests' output as it comes
    plugin_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: The run and queue: the slots of one run on one worker share a zygote (see
    #: :mod:`.zygote`); empty: every slot starts its own runner.
    key: str = ""


def runner_command(spec: RunnerSpec, nodeids: list[str], cache_dir: str) -> list[str]:
    paths = list(dict.fromkeys(nodeid_path(n) for n in nodeids))
    forwarded = list(spec.pytest_args)
    for index in range(len(forwarded) - 1, 0, -1):  # the worker keeps its own cache
        if forwarded[index - 1] == "-o" and forwarded[index].startswith("cache_dir="):
            del forwarded[index - 1 : index + 1]
    return [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        RUNNER_PLUGIN,
        "--rootdir",
        spec.workspace,
        "--continue-on-collection-errors",
        # -s: only the tests' own output may reach stdout, which is streamed home.
        *(["-s", "-p", "no:terminal"] if spec.stream else ["-q", "--no-header"]),
        *forwarded,
        # Never write into the (maybe read-only) workspace; --lf & co stay the controller's.
        "-o",
        f"cache_dir={cache_dir}",
        "--",
        *paths,
    ]


def runner_pycache(env: Mapping[str, str]) -> str | None:
    """The bytecode cache of this worker's runners, or None to leave Python's settings alone.

    Without it every runner parses, assert-rewrites and compiles each test module and conftest
    again: the workspace is often read-only (a container's mounted checkout) and images set
    ``PYTHONDONTWRITEBYTECODE``. The cache lives outside the workspace and is only used when it
    is this user's alone: whoever can write a cached module there can run code in the runners.
    A ``PYTHONPYCACHEPREFIX`` of the worker's own wins.
    """
    setting = env.get(ENV_PYCACHE, "").strip()
    if setting.lower() in ("0", "off", "no", "false") or env.get("PYTHONPYCACHEPREFIX"):
        return None
    if setting:
        # Absolute: a runner starts in the workspace, where a relative folder would land.
        return private_dir(os.path.abspath(setting))
    top = private_top()
    return os.path.join(top, "pycache") if top else None


def runner_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the runners' bytecode cache switched on (see :func:`runner_pycache`)."""
    result = dict(env)
    prefix = runner_pycache(env)
    if prefix is not None:
        result["PYTHONPYCACHEPREFIX"] = prefix
        result.pop("PYTHONDONTWRITEBYTECODE", None)  # it writes there, never in the workspace
    return result


def startup_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables that shape an interpreter when it starts (PYTHONPATH, PYTHONHASHSEED...)."""
    return {k: v for k, v in env.items() if k.startswith("PYTHON")}


def runner_process_env(spec: RunnerSpec, extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of a runner process started by this (pool) process: ``spec``'s, the
    bytecode cache, the runner markers and ``extra`` (its pipes, nodeids file...)."""
    env = runner_env(spec.env)
    env.update(
        {
            ENV_RUNNER: "1",
            **extra,
            ENV_PARENT: str(os.getpid()),
            ENV_OPTIONS: json.dumps(spec.plugin_options),
        }
    )
    return env
