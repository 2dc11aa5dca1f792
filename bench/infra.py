"""The bench's private RabbitMQ vhost and its two long-running Celery workers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from kombu import Connection

from pytest_celery_dispatch.names import PLAIN_TASK_PROCESSES

from . import procs

VHOST_PREFIX = "cdbench"


class BenchError(RuntimeError):
    """The bench cannot go on (no broker, a worker that does not start...)."""


# ---------------------------------------------------------------------------- vhost


def rabbitmqctl() -> str:
    found = shutil.which("rabbitmqctl")
    if found is None:
        raise BenchError(
            "rabbitmqctl is needed to create the bench's private vhost (apt-get install "
            "rabbitmq-server, or run the bench on the broker's machine)"
        )
    return found


def _ctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [rabbitmqctl(), *args], capture_output=True, text=True, timeout=60, check=False
    )
    if check and proc.returncode != 0:
        raise BenchError(f"rabbitmqctl {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    return proc


def new_vhost_name() -> str:
    """``cdbench-<pid>-<random>``: the pid lets a later run remove what a killed one left."""
    return f"{VHOST_PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def list_vhosts() -> list[str]:
    proc = _ctl("list_vhosts", "--quiet", "--no-table-headers", check=False)
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def remove_orphan_vhosts() -> list[str]:
    """Delete ``cdbench-<pid>-*`` vhosts whose bench process is gone (killed with -9)."""
    removed = []
    for name in list_vhosts():
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != VHOST_PREFIX or not parts[1].isdigit():
            continue
        if Path(f"/proc/{parts[1]}").exists():
            continue  # that bench still runs
        _ctl("delete_vhost", name, check=False)
        removed.append(name)
    return removed


class Vhost:
    """A private vhost for the run (guest gets full rights), deleted at the end."""

    def __init__(self, base_url: str, name: str | None = None) -> None:
        self.name = name or new_vhost_name()
        self.base_url = base_url.rstrip("/")
        self.created = False

    @property
    def url(self) -> str:
        return f"{self.base_url}/{self.name}"

    @property
    def masked_url(self) -> str:
        scheme, _, rest = self.url.partition("://")
        if "@" in rest:
            creds, _, host = rest.rpartition("@")
            user = creds.split(":", 1)[0]
            return f"{scheme}://{user}:**@{host}"
        return self.url

    def create(self) -> Vhost:
        _ctl("add_vhost", self.name)
        self.created = True
        _ctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        return self

    def delete(self) -> None:
        if self.created:
            _ctl("delete_vhost", self.name, check=False)
            self.created = False


def check_broker(url: str) -> None:
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=0)
    except Exception as exc:
        raise BenchError(
            f"RabbitMQ does not answer at {url.split('@')[-1]}: {exc} "
            "(start it: rabbitmq-server -detached)"
        ) from None


def consumer_count(url: str, queue: str) -> int:
    with Connection(url, connect_timeout=3) as conn:
        try:
            return int(conn.channel().queue_declare(queue=queue, passive=True).consumer_count)
        except Exception:
            return 0


# ---------------------------------------------------------------------------- workers


class Worker:
    """``celery -A pytest_celery_dispatch.worker worker -Q <queue> -n <name>@%h -c N``."""

    def __init__(
        self,
        name: str,
        queue: str,
        concurrency: int,
        workspace: Path,
        broker: str,
        log_dir: Path,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.extra_env = dict(extra_env or {})
        self.name = name
        self.queue = queue
        self.concurrency = concurrency
        self.workspace = workspace
        self.broker = broker
        self.log_path = log_dir / f"{name}-c{concurrency}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.node = f"{name}@{socket.gethostname()}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "pytest_celery_dispatch.worker",
            "worker",
            "-Q",
            self.queue,
            "-n",
            f"{self.name}@%h",
            "-c",
            str(self.concurrency),
            "-l",
            "INFO",
        ]

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        for key in ("BROKER_URL", "CELERY_RESULT_BACKEND", "PYTEST_ADDOPTS"):
            env.pop(key, None)
        env.update(
            {
                "CELERY_BROKER_URL": self.broker,
                "WORKER_ID": self.name,
                "DISPATCH_WORKSPACE": str(self.workspace),
                "DISPATCH_LOG_FORMAT": "json",
                "PYTHONUNBUFFERED": "1",
                **self.extra_env,
            }
        )
        return env

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.workspace,
                env=self.environ(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=procs.die_with_parent,
            )
        procs.track(self.proc.pid)

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(
                f"{self.name} exited ({self.proc.returncode}); log {self.log_path}:\n"
                + self.log_tail()
            )

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown (SIGTERM to its group), SIGKILL after ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            procs.kill_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                procs.kill_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        procs.kill_group(self.proc.pid, signal.SIGKILL)  # a pool process or runner left over
        procs.untrack(self.proc.pid)


def wait_ready(app: Any, workers: list[Worker], timeout: float = 60.0) -> dict[str, int]:
    """Until each worker consumes its queue and answers ``inspect stats`` with its ``-c`` slots.

    The controller counts a queue's slots from that same broadcast: a worker that does not
    answer it yet would be taken for a single slot.
    """
    deadline = time.monotonic() + timeout
    pending = {w.node: w for w in workers}
    seen: dict[str, int] = {}
    while pending:
        for worker in pending.values():
            worker.check_alive()
        if time.monotonic() > deadline:
            names = ", ".join(sorted(pending))
            raise BenchError(f"workers not ready after {timeout:g}s: {names}")
        ready = [w for w in pending.values() if consumer_count(w.broker, w.queue) > 0]
        if ready:
            stats = (
                app.control.inspect(destination=[w.node for w in ready], timeout=1.0).stats() or {}
            )
            for worker in ready:
                pool = (stats.get(worker.node) or {}).get("pool") or {}
                # Its pool keeps one process beside its slots for plain tasks (workerpool).
                concurrency = int(pool.get("max-concurrency") or 0) - PLAIN_TASK_PROCESSES
                if concurrency == worker.concurrency:
                    seen[worker.name] = concurrency
                    del pending[worker.node]
        if pending:
            time.sleep(0.3)
    return seen


def write_pid_file(path: Path, workers: list[Worker], vhost: Vhost | None) -> None:
    """What is running now, for whoever has to clean up after a bench that was killed."""
    data = {
        "bench_pid": os.getpid(),
        "workers": {w.name: w.pid for w in workers if w.pid is not None},
        "vhost": vhost.name if vhost is not None else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
