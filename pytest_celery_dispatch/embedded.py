"""The embedded broker: a serverless, one-machine broker in a folder (``--celery-broker embedded``).

It is kombu's ``filesystem`` transport with the changes a test run needs:

* **Atomic messages.** kombu writes each message file in place, so a consumer can read a
  half-written file and die on a ``JSONDecodeError`` (kombu issue #1551). Here a message is
  written to a hidden temporary file in its queue's folder and renamed into place; a consumer
  takes a message by renaming it out of the queue, so each message is read whole and once.
* **Queues that exist or not.** A queue is a folder. Publishing to a queue nobody declared
  drops the message (as RabbitMQ's default exchange does), a passive declare of a missing queue
  fails with ``NOT_FOUND``, and deleting a queue removes its folder: the run's control signals
  (reply queue gone = kill, stop queue present = stop) mean the same as on RabbitMQ.
* **Consumer counts.** Each worker keeps a presence file (its node name, queues, pool size and
  pid) fresh every second; ``queue_declare`` reports the live workers that consume a queue, so
  "no worker on this queue" is detected the same way on both brokers.

Layout under the root folder (default ``<project>/.pytest_cache/celery-dispatch/broker``, or
``DISPATCH_EMBEDDED_DIR``)::

    queues/<queue>/<time_ns>-<uuid>.msg   messages, oldest first
    taken/                                messages being read (same file system: atomic rename)
    exchanges/<exchange>.exchange         bindings (kombu's own format)
    workers/<node name>.json              presence of each running worker
    results/                              the ``file://`` result backend of the dispatcher fixture

Limits: one machine (or one shared local folder), polling every 50 ms, and a message a worker
has taken is gone if that worker is killed: the controller's re-dispatch covers that.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem, virtual
from kombu.transport.virtual.base import queue_declare_ok_t
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

from .names import EMBEDDED as EMBEDDED
from .names import ENV_EMBEDDED_DIR
from .names import is_embedded as is_embedded

log = logging.getLogger(__name__)

ENV_DIR = ENV_EMBEDDED_DIR
DEFAULT_DIR = Path(".pytest_cache") / "celery-dispatch" / "broker"
#: How often an idle consumer looks for new messages (kombu's default is 1 s).
POLLING_INTERVAL = 0.05
#: A worker rewrites its presence file this often ...
PRESENCE_INTERVAL = 1.0
#: ... and counts as gone when the file is older than this (or its pid is dead, on this host).
PRESENCE_STALE = 3.5
#: Leftovers of runs whose controller died (RabbitMQ's x-expires does this there).
ABANDONED_AFTER = 30 * 60.0

_MSG = ".msg"


def root_dir(
    base: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """The broker folder: ``DISPATCH_EMBEDDED_DIR``, else ``<base or cwd>/.pytest_cache/...``."""
    env = os.environ if environ is None else environ
    explicit = env.get(ENV_DIR)
    if explicit:
        return Path(explicit).expanduser().resolve()
    return (Path(base or os.getcwd()) / DEFAULT_DIR).resolve()


def private_dir(path: Path) -> None:
    """Create ``path`` readable by this user only: whoever can drop a message into a queue's
    folder can make a worker run tests. A folder that exists keeps its mode (a group-shared
    ``DISPATCH_EMBEDDED_DIR`` is the owner's choice)."""
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)


def register() -> None:
    """Make ``embedded://`` a kombu transport name (in this process)."""
    TRANSPORT_ALIASES.setdefault(EMBEDDED, "pytest_celery_dispatch.embedded:Transport")


def celery_settings(root: Path, backend: str) -> dict[str, Any]:
    """The Celery settings that select the embedded broker in ``root``."""
    register()
    private_dir(root)
    for sub in ("queues", "taken", "exchanges", "workers", "results"):
        private_dir(root / sub)
    ignore = root / ".gitignore"  # as pytest does for its cache: never committed by accident
    if not ignore.exists():
        with contextlib.suppress(OSError):
            ignore.write_text("# created by pytest-celery-dispatch's embedded broker\n*\n")
    if backend in ("", EMBEDDED, "rpc://"):
        backend = (root / "results").as_uri()
    if backend.startswith("file://"):
        from .filebackend import URL_PREFIX  # state files written whole (see there)

        backend = URL_PREFIX + backend
    return {
        "broker_url": f"{EMBEDDED}://",
        "broker_transport_options": {"root": str(root), "polling_interval": POLLING_INTERVAL},
        "result_backend": backend,
        # Events would go to an exchange nobody reads here (no Flower on a folder).
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }


# ------------------------------------------------------------------------------- presence


def _host() -> str:
    return socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_presence(root: Path, now: float | None = None) -> list[dict[str, Any]]:
    """The workers that are alive now: fresh presence file and, on this host, a live pid."""
    now = time.time() if now is None else now
    found = []
    try:
        entries = list((root / "workers").glob("*.json"))
    except OSError:
        return []
    for path in entries:
        try:
            age = now - path.stat().st_mtime
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or age > PRESENCE_STALE:
            continue
        if data.get("host") == _host() and not _alive(int(data.get("pid") or 0)):
            continue
        found.append(data)
    return sorted(found, key=lambda d: str(d.get("node")))


def consumers_of(root: Path, queue: str) -> int:
    return sum(1 for w in read_presence(root) if queue in (w.get("queues") or []))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Presence(threading.Thread):
    """A worker's presence file, rewritten every second until :meth:`stop`."""

    def __init__(self, root: Path, node: str, queues: Iterable[str], concurrency: int) -> None:
        super().__init__(name="celery-dispatch-presence", daemon=True)
        self.path = root / "workers" / f"{node}.json"
        self.data = {
            "node": node,
            "queues": sorted(queues),
            "concurrency": concurrency,
            "pid": os.getpid(),
            "host": _host(),
        }
        self.stopping = threading.Event()

    def write(self) -> None:
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.path, json.dumps(self.data))

    def run(self) -> None:
        while not self.stopping.is_set():
            self.write()
            self.stopping.wait(PRESENCE_INTERVAL)

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            self.path.unlink()


def sweep(root: Path, max_age: float = ABANDONED_AFTER, now: float | None = None) -> int:
    """Remove what dead controllers left: this plugin's run queues, taken and result files,
    untouched for ``max_age`` seconds. Returns how many were removed."""
    now = time.time() if now is None else now
    removed = 0
    candidates = list((root / "queues").glob("celery-dispatch.*"))
    candidates += list((root / "taken").glob("*")) + list((root / "results").glob("*"))
    for path in candidates:
        try:
            if now - path.stat().st_mtime < max_age:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()
            removed += 1
        except OSError:
            continue
    return removed


# ------------------------------------------------------------------------------- transport


class Channel(filesystem.Channel):  # type: ignore[misc]
    """kombu's filesystem channel, one folder per queue, atomic writes and takes."""

    @property
    def root(self) -> Path:
        options = self.connection.client.transport_options
        return Path(options.get("root") or root_dir())

    @property
    def control_folder(self) -> Path:
        return self.root / "exchanges"

    def _queue_dir(self, queue: str) -> Path:
        name = str(queue)
        if not name or "/" in name or "\\" in name or "\0" in name or not name.strip("."):
            raise ChannelError(f"Invalid queue name for the embedded broker: {name!r}")
        return self.root / "queues" / name

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        private_dir(self._queue_dir(queue))

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return self._queue_dir(queue).is_dir()

    def queue_declare(self, queue: str | None = None, passive: bool = False, **kwargs: Any) -> Any:
        ok = super().queue_declare(queue=queue, passive=passive, **kwargs)
        return queue_declare_ok_t(ok.queue, ok.message_count, consumers_of(self.root, ok.queue))

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> Any:
        if if_empty and self._size(queue):
            return None
        super().queue_delete(queue, if_unused=if_unused, if_empty=if_empty, **kwargs)
        shutil.rmtree(self._queue_dir(queue), ignore_errors=True)
        return None

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        folder = self._queue_dir(queue)
        if not folder.is_dir():
            log.debug("embedded broker: no queue %s, message dropped", queue)
            return
        token = uuid.uuid4().hex
        tmp = folder / f".{token}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.rename(tmp, folder / f"{time.time_ns():020d}-{token}{_MSG}")
        except FileNotFoundError:
            # The queue was deleted meanwhile: dropped, as on a broker.
            with contextlib.suppress(OSError):
                tmp.unlink()
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ChannelError(f"Cannot add a message to {folder}: {exc}") from exc

    def _names(self, queue: str) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self._queue_dir(queue)) if n.endswith(_MSG))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _get(self, queue: str) -> Any:
        folder = self._queue_dir(queue)
        taken = self.root / "taken"
        names = self._names(queue)
        if names:
            private_dir(taken)
        for name in names:
            target = taken / f"{uuid.uuid4().hex}-{name}"
            try:
                os.rename(folder / name, target)  # atomic: one consumer wins
            except FileNotFoundError:
                continue  # another consumer took it
            try:
                payload = target.read_bytes()
            finally:
                with contextlib.suppress(OSError):
                    target.unlink()
            return loads(bytes_to_str(payload))
        raise virtual.Empty()

    def _size(self, queue: str) -> int:
        return len(self._names(queue))

    def _purge(self, queue: str) -> int:
        count = 0
        folder = self._queue_dir(queue)
        for name in self._names(queue):
            with contextlib.suppress(OSError):
                os.unlink(folder / name)
                count += 1
        return count


class Transport(filesystem.Transport):  # type: ignore[misc]
    """``embedded://``: see the module's documentation."""

    Channel = Channel
    driver_name = EMBEDDED
