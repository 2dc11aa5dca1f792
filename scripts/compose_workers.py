"""Run the worker services of docker-compose.yml as local processes.

The command and environment are the compose file's own. Only what points into a container is
rewritten: ``host.docker.internal`` becomes 127.0.0.1 (or the host of ``BROKER_URL``) and the
``/workspace`` mount becomes this checkout. ``${VAR:-default}`` is interpolated as compose does.
Used by ``make demo`` and by the tests, so a wrong compose command fails there.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import yaml
from kombu import Connection

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    def sub(match: re.Match[str]) -> str:
        value = environ.get(match.group("name"))
        return value if value else (match.group("default") or "")

    return _VAR.sub(sub, text).replace("$$", "$")


def load(path: Path = COMPOSE_FILE) -> dict:
    return yaml.safe_load(path.read_text())


class LocalService:
    """One compose worker service as a local process."""

    def __init__(
        self,
        name: str,
        spec: Mapping,
        workspace: Path = ROOT,
        environ: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        env_in = dict(os.environ if environ is None else environ)
        self.name = name
        command = spec["command"]
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        argv = [interpolate(a, env_in) for a in argv]
        if argv[0] == "celery":  # the venv's celery, whatever is on PATH
            argv = [sys.executable, "-m", "celery", *argv[1:]]
        self.argv = argv
        env = dict(env_in)
        for key, value in (spec.get("environment") or {}).items():
            text = interpolate(str(value), env_in)
            text = text.replace("host.docker.internal", "127.0.0.1")
            if text == "/workspace" or text.startswith("/workspace/"):
                text = str(workspace) + text[len("/workspace") :]
            env[key] = text
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.env = env
        self.workspace = workspace
        self.queues = self._queues()
        self.log_path = (log_dir or workspace) / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def display_command(self) -> str:
        """The command as the compose file writes it (``celery ...``)."""
        argv = self.argv
        if argv[1:3] == ["-m", "celery"]:
            argv = ["celery", *argv[3:]]
        return shlex.join(argv)

    def _queues(self) -> list[str]:
        argv = self.argv
        for flag in ("-Q", "--queues"):
            if flag in argv:
                return argv[argv.index(flag) + 1].split(",")
        return ["celery"]

    @property
    def broker(self) -> str:
        return self.env.get("CELERY_BROKER_URL") or self.env.get("BROKER_URL") or ""

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=str(self.workspace),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def consumers(self) -> int:
        total = 0
        with Connection(self.broker, connect_timeout=3) as conn:
            for queue in self.queues:
                with contextlib.suppress(Exception):
                    total += conn.channel().queue_declare(queue=queue, passive=True).consumer_count
        return total

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.consumers() < len(self.queues):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}; see {self.log_path}:\n"
                    + self.log_path.read_text()[-2000:]
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not consume {self.queues} within {timeout}s")
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def worker_services(compose: Mapping) -> dict[str, Mapping]:
    """Services that run our worker and are on by default (no profile)."""
    return {
        name: spec
        for name, spec in compose["services"].items()
        if not spec.get("profiles") and "pytest_celery_dispatch.worker" in str(spec.get("command"))
    }


@contextlib.contextmanager
def running(
    names: list[str] | None = None,
    workspace: Path = ROOT,
    environ: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    timeout: float = 30.0,
) -> Iterator[list[LocalService]]:
    services = worker_services(load())
    chosen = names or sorted(services)
    started = [LocalService(n, services[n], workspace, environ, log_dir) for n in chosen]
    try:
        for service in started:
            service.start()
        for service in started:
            service.wait_ready(timeout)
        yield started
    finally:
        for service in started:
            service.stop()
