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
#: Options of pytest's terminal plugin that shape a test's report: its failure's traceback
#: (``--tb``, ``--showlocals``, ``--full-trace``) and its assertion's explanation (``-v``). A
#: runner has no terminal plugin (what it would print is nobody's), so a forwarded one reaches
#: it as an option value, which pytest reads with a default, not as an argument its command
#: line would refuse.
REPORT_OPTIONS = ("tbstyle", "showlocals", "fulltrace", "verbose")


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


def slot_spec(
    payload: Mapping[str, Any], workspace: str, nodeids: list[str], env: dict[str, str]
) -> RunnerSpec:
    """The runner spec of a slot of the run ``payload`` describes (``run_session``), or of its
    zygote started ahead (``prewarm``): both make the same zygote identity from it."""
    return RunnerSpec(
        workspace=workspace,
        nodeids=nodeids,
        timeout=float(payload.get("timeout") or 300.0),
        pytest_args=[str(a) for a in payload.get("pytest_args", [])],
        env=env,
        stream=bool(payload.get("stream")),
        plugin_options=dict(payload.get("plugin_options") or {}),
        key=f"{payload.get('run_id')}/{payload.get('queue')}",
    )


def split_report_options(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The forwarded arguments a runner's command line takes, and the values of those that are
    :data:`REPORT_OPTIONS` (``--tb=short`` is ``{"tbstyle": "short"}``)."""
    rest: list[str] = []
    values: dict[str, Any] = {}
    args = list(args)
    while args:
        arg = args.pop(0)
        if arg in ("-o", "-W", "-p") and args:  # their value is never an option of its own
            rest += [arg, args.pop(0)]
        elif arg.startswith("--tb="):
            values["tbstyle"] = arg[len("--tb=") :]
        elif arg in ("-l", "--showlocals"):
            values["showlocals"] = True
        elif arg == "--full-trace":
            values["fulltrace"] = True
        elif len(arg) > 1 and arg.strip("v") == "-":
            values["verbose"] = len(arg) - 1
        else:
            rest.append(arg)
    return rest, values


def runner_options(spec: RunnerSpec) -> dict[str, Any]:
    """The option values a runner sets as it configures (``ENV_OPTIONS``): the forwarded
    :data:`REPORT_OPTIONS`, and other plugins' options, applied where the plugin is installed."""
    return {**split_report_options(spec.pytest_args)[1], **spec.plugin_options}


def runner_command(spec: RunnerSpec, nodeids: list[str], cache_dir: str) -> list[str]:
    paths = list(dict.fromkeys(nodeid_path(n) for n in nodeids))
    forwarded = split_report_options(spec.pytest_args)[0]
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
        # No terminal: its output would be nobody's, and it costs each test ~0.15 ms. Under -s
        # only the tests' own output reaches stdout, which is streamed home.
        "-p",
        "no:terminal",
        *(["-s"] if spec.stream else []),
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
            ENV_OPTIONS: json.dumps(runner_options(spec)),
        }
    )
    return env
