"""``--celery-local-workers``: start one worker per queue for this run, stop them after.

Each is the contract's worker command, ``celery -A pytest_celery_dispatch.worker worker -Q q
-n <id>@%h``, in its own process group, with ``WORKER_ID`` and ``DISPATCH_WORKSPACE`` (the
controller's rootdir). They are stopped at the end of the run, on Ctrl-C and on failure; an
``atexit`` hook and the process groups make sure none is left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from .names import (
    EMBEDDED,
    ENV_BROKER_URL,
    ENV_BROKER_URL_FALLBACK,
    ENV_EMBEDDED_DIR,
    ENV_RUNNER,
    ENV_WORKER_ID,
    ENV_WORKSPACE,
)

#: How long a local worker may take to consume its queue.
READY_TIMEOUT = 60.0
#: How long a warm shutdown may take before the worker's process group is killed. The run is
#: over when workers are stopped, so nothing is lost; a prefork worker on the embedded broker
#: (a polling loop) needs 3-7 s for a warm shutdown, which would double a short run.
STOP_GRACE = 3.0


def worker_id_for(queue: str) -> str:
    """``queue_a`` -> ``worker-a`` (the demo's names); any other queue -> ``worker-<queue>``."""
    match = re.fullmatch(r"queue_(.+)", queue)
    return f"worker-{match.group(1) if match else queue}"


def _die_with_controller() -> None:
    """Linux: the worker is killed when the controller dies, even by SIGKILL (no atexit then)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class LocalWorker:
    def __init__(
        self,
        queue: str,
        broker: str,
        workspace: str,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.queue = queue
        self.worker_id = worker_id_for(queue)
        self.log_path = log_dir / f"{self.worker_id}.log"
        self.env = dict(os.environ if env is None else env)
        self.env.update(
            {
                # The celery command makes BROKER_URL (its --broker) beat CELERY_BROKER_URL.
                ENV_BROKER_URL: broker,
                ENV_BROKER_URL_FALLBACK: broker,
                ENV_WORKER_ID: self.worker_id,
                ENV_WORKSPACE: workspace,
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.env.pop(ENV_RUNNER, None)
        self.workspace = workspace
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        # Task events (-E) are for Flower on RabbitMQ; the embedded broker has no reader for them.
        events = [] if self.env[ENV_BROKER_URL] == EMBEDDED else ["-E"]
        return [
            sys.executable, "-m", "celery", "-A", "pytest_celery_dispatch.worker", "worker",
            "-Q", self.queue, "-n", f"{self.worker_id}@%h", *events, "-l", "INFO",
            "--without-gossip", "--without-mingle",
        ]  # fmt: skip

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                cwd=self.workspace,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_controller,
            )

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def terminate(self) -> None:
        """Ask for a warm shutdown (SIGTERM to the whole process group)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, grace: float = STOP_GRACE) -> None:
        proc = self.proc
        if proc is None:
            return
        self.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
        # Whatever is left of the group (pool processes, test processes): gone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def log_tail(self, size: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""


class LocalWorkers:
    """The run's local workers; ``start`` waits until every one consumes its queue."""

    def __init__(self, broker: str, workspace: str, env: Mapping[str, str] | None = None) -> None:
        self.broker = broker
        self.workspace = workspace
        self.env = env
        self.log_dir = Path(tempfile.mkdtemp(prefix="celery-dispatch-workers-"))
        self.workers: list[LocalWorker] = []
        atexit.register(self.stop)

    def start(
        self,
        queues: Iterable[str],
        consumers: Callable[[str], int | None],
        timeout: float = READY_TIMEOUT,
    ) -> None:
        new = [
            LocalWorker(q, self.broker, self.workspace, self.log_dir, self.env)
            for q in queues
            if q not in {w.queue for w in self.workers}
        ]
        for worker in new:
            worker.start()
            self.workers.append(worker)
        deadline = time.monotonic() + timeout
        waiting = list(new)
        while waiting:
            for worker in list(waiting):
                code = worker.exited()
                if code is not None:
                    raise RuntimeError(
                        f"local worker {worker.worker_id} for {worker.queue} exited with {code}; "
                        f"its log ({worker.log_path}) ends with:\n{worker.log_tail()}"
                    )
                if (consumers(worker.queue) or 0) > 0:
                    waiting.remove(worker)
            if waiting and time.monotonic() > deadline:
                names = ", ".join(w.worker_id for w in waiting)
                raise RuntimeError(
                    f"local worker(s) {names} did not consume their queue within {timeout:g}s; "
                    f"logs in {self.log_dir}"
                )
            if waiting:
                time.sleep(0.1)

    def stop(self) -> None:
        deadline = time.monotonic() + STOP_GRACE
        for worker in self.workers:
            worker.terminate()  # all at once: they shut down in parallel
        for worker in self.workers:
            worker.stop(grace=max(0.0, deadline - time.monotonic()))
        self.workers.clear()
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)


def start_for_run(
    broker: str,
    rootpath: Path,
    embedded_root: Path | None,
    queues: list[str],
    consumers: Callable[[str], int | None],
    write_line: Callable[..., None],
) -> LocalWorkers:
    """Start and await one worker per queue for this run, and say so (or why not). The
    returned workers are stopped at the end of the run, also when starting failed halfway."""
    env = dict(os.environ)
    if embedded_root is not None:
        env[ENV_EMBEDDED_DIR] = str(embedded_root)
    workers = LocalWorkers(broker, str(rootpath), env)
    try:
        workers.start(queues, consumers)
    except RuntimeError as exc:
        write_line(f"celery-dispatch: {exc}", red=True, bold=True)
        return workers
    names = ", ".join(f"{w.worker_id} ({w.queue})" for w in workers.workers)
    write_line(
        f"celery-dispatch: started local workers {names}; logs in {workers.log_dir}", cyan=True
    )
    return workers
