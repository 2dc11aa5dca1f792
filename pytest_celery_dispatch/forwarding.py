"""What the controller sends a slot: the ``run_session`` payload and the pytest options that
shape a test's run on the worker (pure helpers over ``pytest.Config``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from .serialization import PROTOCOL, SessionPayload, file_digest, nodeid_path, work_queue_name

#: Options of other plugins that shape a test's run, applied on the worker when that plugin is
#: installed there too (a plain argument would make its pytest refuse to start otherwise):
#: pytest-timeout's --timeout, pytest-randomly's seed (so a worker's random values repeat), and
#: pytest-rerunfailures' --reruns / --reruns-delay (reruns happen on the worker).
PLUGIN_OPTIONS = ("timeout", "randomly_seed", "reruns", "reruns_delay")


def forwarded_plugin_options(config: pytest.Config) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in PLUGIN_OPTIONS:
        value = getattr(config.option, name, None)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and value != "":
            found[name] = value
    return found


def forwarded_pytest_args(config: pytest.Config) -> list[str]:
    """Options that shape how a test runs or reports, replayed on the worker's runner."""
    opt = config.option
    args: list[str] = []
    tbstyle = getattr(opt, "tbstyle", "auto")
    if tbstyle and tbstyle != "auto":
        args.append(f"--tb={tbstyle}")
    if getattr(opt, "showlocals", False):
        args.append("--showlocals")
    for item in getattr(opt, "override_ini", None) or []:
        args.extend(["-o", item])
    for warning in getattr(opt, "pythonwarnings", None) or []:
        args.extend(["-W", warning])
    importmode = getattr(opt, "importmode", None)
    if importmode and importmode != "prepend":
        args.append(f"--import-mode={importmode}")
    if getattr(opt, "fulltrace", False):
        args.append("--full-trace")
    verbose = int(getattr(opt, "verbose", 0) or 0)
    if verbose > 0:  # an assertion's explanation: "Use -v to get more diff" under -v was wrong
        args.append("-" + "v" * verbose)
    maxfail = int(getattr(opt, "maxfail", 0) or 0)
    if maxfail > 0:
        # A runner stops after its own failures too, without waiting for the controller's word.
        args.append(f"--maxfail={maxfail}")
    return args


class SlotPayloads:
    """Builds each slot's ``run_session`` payload; the options and file digests once per run."""

    def __init__(
        self,
        config: pytest.Config,
        run_id: str,
        reply_to: str,
        timeout: float,
        identity: Mapping[str, Any] | None = None,
        health: tuple[tuple[str, ...], float | None] = ((), None),
    ) -> None:
        self.health, self.health_every = list(health[0]), health[1]
        self.rootpath = Path(config.rootpath)
        self.identity = dict(identity or {})
        self.run_id = run_id
        self.reply_to = reply_to
        self.timeout = timeout
        self.pytest_args = forwarded_pytest_args(config)
        self.plugin_options = forwarded_plugin_options(config)
        self.stream = config.getoption("capture", "fd") == "no"
        self._digests: dict[str, str] = {}
        self.ship: dict[str, Any] = {"mode": "off"}  # the run's manifest (see shipcontrol)
        #: Signs a payload: its ``ship`` with the signature (see shipsign); None: unsigned.
        self.signer: Callable[[SessionPayload], dict[str, Any]] | None = None
        self.artifacts: dict[str, Any] = {}  # artifactpaths.Limits, as a dict

    def file_digests(self, nodeids: list[str]) -> dict[str, str]:
        """sha256 of each test file of these nodeids, computed once per run and file."""
        digests: dict[str, str] = {}
        for nodeid in nodeids:
            path = nodeid_path(nodeid)
            if path not in self._digests:
                try:
                    self._digests[path] = file_digest(str(self.rootpath / path))
                except OSError:
                    self._digests[path] = ""
            if self._digests[path]:
                digests[path] = self._digests[path]
        return digests

    def for_slot(self, slot_id: str, queue: str, nodeids: list[str]) -> SessionPayload:
        payload: SessionPayload = {
            "protocol": PROTOCOL,
            "run_id": self.run_id,
            "reply_to": self.reply_to,
            "work_queue": work_queue_name(self.run_id, queue),
            "session_id": slot_id,
            "queue": queue,
            "nodeids": list(nodeids),
            "timeout": self.timeout,
            "pytest_args": self.pytest_args,
            "files": self.file_digests(nodeids),
            "stream": self.stream,
            "plugin_options": self.plugin_options,
            "identity": self.identity,
            "ship": self.ship,
            "health": self.health,
            "health_every": self.health_every,
            "artifacts": self.artifacts,
        }
        if self.signer is not None and self.ship.get("digest"):
            payload["ship"] = self.signer(payload)
        return payload
