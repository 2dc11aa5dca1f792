"""The controller's side of shipping: the ``--celery-ship`` settings, the run's manifest, the
blobs a worker asks for, and what each worker says it did (header lines, the JSON report).

Workers ask for the blobs they lack with a ``ship_wanted`` event on the run's reply queue; the
controller answers on that slot's blob queue (``celery-dispatch.blobs.<run>.<slot>``), named by
the controller from the slot's id (never by the event), with only blobs of its own manifest.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import pytest

from .blobs import messages
from .envdrift import differences, versions
from .hashcache import HashCache
from .manifest import (
    DEFAULT_MAX_FILE,
    DEFAULT_MAX_TOTAL,
    SETTING_MAX_FILE,
    SETTING_MAX_TOTAL,
    Manifest,
    ShipError,
    build_manifest,
    human_bytes,
    list_files,
    parse_size,
)
from .names import ENV_SHIP_KEY, blob_queue_name
from .serialization import Event, dumps
from .shipcheck import find_missing, missing_message, needed_files
from .shipsign import SignatureError, Signer, signer_from

MODES = ("auto", "always", "off")
HELP_SHIP = (
    "ship the run's test tree to the workers: auto (default: a worker whose workspace already "
    "holds the same files runs in place, the others get the tree), always, or off (run in "
    "each worker's workspace; a differing test file fails by name)"
)
HELP_KEY = (
    f"PEM private key (Ed25519, EC or RSA) that signs the run's shipped tree; also env "
    f"{ENV_SHIP_KEY} (a path or the PEM text); workers trust its public key in DISPATCH_SHIP_TRUST"
)
HELP_INCLUDE = "globs (root-relative) of files to ship that git ignores, one per line"
HELP_EXCLUDE = "globs (root-relative) of files or folders never to ship, one per line"
HELP_MAX_FILE = f"largest file a run ships (bytes, or with k/M/G); default {DEFAULT_MAX_FILE:,}"
HELP_MAX_TOTAL = f"largest tree a run ships (bytes, or k/M/G); default {DEFAULT_MAX_TOTAL:,}"


@dataclasses.dataclass(frozen=True)
class ShipSettings:
    mode: str = "auto"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_file: int = DEFAULT_MAX_FILE
    max_total: int = DEFAULT_MAX_TOTAL
    signer: Signer | None = None
    #: Where the controller remembers its files' sha256 (pytest's cache; None without it).
    hash_file: str | None = None


def add_options(group: Any, parser: pytest.Parser) -> None:
    group.addoption("--celery-ship", dest="celery_ship", metavar="MODE", help=HELP_SHIP)
    group.addoption("--celery-ship-key", dest="celery_ship_key", metavar="PATH", help=HELP_KEY)
    parser.addini("celery_dispatch_ship", HELP_SHIP, default=None)
    parser.addini("celery_dispatch_ship_include", HELP_INCLUDE, type="linelist", default=[])
    parser.addini("celery_dispatch_ship_exclude", HELP_EXCLUDE, type="linelist", default=[])
    parser.addini(SETTING_MAX_FILE, HELP_MAX_FILE, default=None)
    parser.addini(SETTING_MAX_TOTAL, HELP_MAX_TOTAL, default=None)


def resolve_ship(config: pytest.Config) -> ShipSettings:
    """Command line > ini > default; a bad value is a UsageError naming where it came from."""
    mode, source = config.getoption("celery_ship", None), "--celery-ship"
    if not mode:
        mode, source = config.getini("celery_dispatch_ship"), "ini celery_dispatch_ship"
    mode = str(mode or "auto").strip()
    if mode not in MODES:
        raise pytest.UsageError(
            f"celery-dispatch: invalid value {mode!r} for {source}: expected one of "
            + ", ".join(MODES)
        )
    sizes = {}
    for key, default in (
        (SETTING_MAX_FILE, DEFAULT_MAX_FILE),
        (SETTING_MAX_TOTAL, DEFAULT_MAX_TOTAL),
    ):
        raw = config.getini(key)
        try:
            sizes[key] = parse_size(raw, f"ini {key}") if raw else default
        except ValueError as exc:
            raise pytest.UsageError(f"celery-dispatch: {exc}") from None
    try:
        signer = signer_from(config.getoption("celery_ship_key", None), os.environ)
    except SignatureError as exc:
        raise pytest.UsageError(f"celery-dispatch: {exc}") from None
    return ShipSettings(
        signer=signer,
        hash_file=hash_file(config) if mode != "off" else None,
        mode=mode,
        include=tuple(config.getini("celery_dispatch_ship_include")),
        exclude=tuple(config.getini("celery_dispatch_ship_exclude")),
        max_file=sizes[SETTING_MAX_FILE],
        max_total=sizes[SETTING_MAX_TOTAL],
    )


def hash_file(config: pytest.Config) -> str | None:
    """The controller's hash cache (see hashcache), in pytest's cache folder: none when the
    cache plugin is off (``-p no:cacheprovider``) or its folder cannot be made."""
    cache = getattr(config, "cache", None)
    if cache is None:
        return None
    try:
        return str(cache.mkdir("celery-dispatch") / "hashes.json")
    except OSError:
        return None


def run_outputs(config: pytest.Config, *paths: str | None) -> list[str]:
    """Files this run writes under its rootdir: never part of its tree."""
    found = [p for p in paths if p]
    xml = getattr(config.option, "xmlpath", None)
    if xml:
        found.append(xml)
    return [os.path.abspath(p) for p in found]


class MissingFiles(ShipError):
    """The manifest lacks files the dispatched tests need."""


class Shipper:
    """The run's manifest, and the blobs it serves."""

    def __init__(
        self,
        rootpath: str,
        settings: ShipSettings,
        outputs: list[str],
        inifile: str | None = None,
    ) -> None:
        self.root = rootpath
        self.inifile = inifile  # the run's ini file: needed in the tree when under the rootdir
        self.settings = settings
        self.outputs = outputs
        self.manifest: Manifest | None = None
        self._versions: dict[str, str] | None = None
        self.workers: dict[str, dict[str, Any]] = {}
        self.seconds = 0.0
        self.error: str | None = None  # why the tree could not be shipped
        self.hashes: HashCache | None = None  # the files' sha256 from earlier runs

    def prepare(self) -> str | None:
        """Build the manifest (``off``: none); raises :class:`.manifest.ShipError`. Returns the
        header line."""
        if self.settings.mode == "off":
            return None
        began = time.monotonic()
        st = self.settings
        own = [st.hash_file] if st.hash_file else []  # a cache_dir inside the tree
        files = list_files(self.root, st.include, st.exclude, [*self.outputs, *own])
        self.hashes = HashCache(st.hash_file)  # in memory only without pytest's cache
        self.manifest = build_manifest(self.root, files, st.max_file, st.max_total, self.hashes)
        self.seconds = time.monotonic() - began
        return (
            f"the run's tree: {len(self.manifest.entries):,} files, "
            f"{human_bytes(self.manifest.total_size)} (--celery-ship {st.mode}, manifest "
            f"{self.manifest.digest[:12]}, {self.hashes.hashed:,} hashed, {self.seconds:.2f} s)"
        )

    @property
    def versions(self) -> dict[str, str]:
        """This interpreter's versions, read when a worker's first need comparing (not on the
        way to the first test)."""
        if self._versions is None:
            self._versions = versions()
        return self._versions

    def payload(self) -> dict[str, Any]:
        """The ``ship`` part of every slot's payload: the manifest by its digest (a worker that
        lacks it asks for it as for a blob)."""
        if self.manifest is None:
            return {"mode": "off"}
        return {
            "mode": self.settings.mode,
            "digest": self.manifest.digest,
            "manifest_size": len(self.manifest.canonical),
        }

    def _worker(self, name: str) -> dict[str, Any]:
        return self.workers.setdefault(
            name,
            {
                "state": None,
                "blobs_sent": 0,
                "bytes_sent": 0,
                "manifests_sent": 0,
                "seconds": None,
                "drift": [],
            },
        )

    def serve(self, run_id: str, event: Event, publish: Any) -> None:
        """Send the blobs a slot asked for (only this run's own files, and its manifest) to
        that slot's blob queue."""
        manifest = self.manifest
        if manifest is None:
            return
        known = manifest.blobs()
        asked = dict.fromkeys(event.get("blobs") or [])
        wanted = [s for s in asked if s in known and s != manifest.digest]
        queue = blob_queue_name(run_id, str(event.get("session_id", "")))
        stats = self._worker(str(event.get("worker")))
        snapshot = manifest.snapshot
        files: list[tuple[str | bytes, str, str]] = []
        if manifest.digest in asked:
            files.append((manifest.canonical, manifest.digest, "the run's manifest"))
            stats["manifests_sent"] += 1
        files += (
            (snapshot.get(s) or os.path.join(self.root, known[s]["path"]), s, known[s]["path"])
            for s in wanted
        )
        for batch in messages(iter(files)):
            body = dumps(batch)
            publish(queue, body)
            stats["bytes_sent"] += len(body)
        stats["blobs_sent"] += len(wanted)

    def shipped(self, event: Event) -> list[str]:
        """A slot said where it runs: the header lines for its worker (once per worker)."""
        info = dict(event.get("ship") or {})
        name = str(event.get("worker"))
        stats = self._worker(name)
        first = stats["state"] is None
        state = str(info.get("state") or "")
        if first or state in ("shipped", "refused", "failed"):
            stats["state"] = state
        for key in ("files", "tree_bytes", "differ"):
            if key in info:
                stats[key] = info[key]
        if info.get("seconds") is not None and state == "shipped":
            stats["seconds"] = max(stats["seconds"] or 0.0, float(info["seconds"]))
        if not first:
            return []
        stats["drift"] = differences(info.get("versions") or {}, self.versions)
        stats["drift"] += [str(note) for note in info.get("shadowed") or []]
        lines = [f"{name}: {self._describe(stats, info)}"]
        if stats["drift"]:
            lines.append(f"{name} differs from here: {'; '.join(stats['drift'])}")
        return lines

    def _describe(self, stats: dict[str, Any], info: dict[str, Any]) -> str:
        state = stats["state"]
        if state == "shipped":
            return (
                f"{int(info.get('files') or 0):,} files, {human_bytes(stats['bytes_sent'])} "
                f"sent in {float(info.get('seconds') or 0):.1f} s"
            )
        if state == "in place, differs":
            examples = ", ".join(info.get("differ_examples") or [])
            return (
                f"runs in its own workspace, which differs in {info.get('differ')} file(s) "
                f"({examples}); the tree was not shipped: {info.get('note')}"
            )
        return str(state or "unknown")

    def check_needed(self, nodeids: list[str], conftests: list[str]) -> None:
        """Raise :class:`MissingFiles` when the manifest lacks a file the dispatched tests need
        (their files, their loaded conftest.py files, the ini file): a worker without a
        checkout would not find it. ``auto`` too: a worker whose workspace matches the
        manifest may still lack it."""
        if self.manifest is None:
            return
        needed = needed_files(self.root, nodeids, conftests, self.inifile)
        st = self.settings
        own = [st.hash_file] if st.hash_file else []
        missing, total = find_missing(
            self.root, needed, self.manifest.entries, st.exclude, [*self.outputs, *own]
        )
        if total:
            raise MissingFiles(missing_message(missing, total))

    def report(self) -> dict[str, Any]:
        """The JSON report's ``dispatch.ship``."""
        manifest = self.manifest
        return {
            "mode": self.settings.mode,
            "digest": manifest.digest if manifest else None,
            "files": len(manifest.entries) if manifest else None,
            "tree_bytes": manifest.total_size if manifest else None,
            "manifest_seconds": round(self.seconds, 3),
            "files_hashed": self.hashes.hashed if self.hashes else None,
            "error": self.error,
            "blobs_sent": sum(w["blobs_sent"] for w in self.workers.values()),
            "manifests_sent": sum(w["manifests_sent"] for w in self.workers.values()),
            "bytes_sent": sum(w["bytes_sent"] for w in self.workers.values()),
            "workers": {k: dict(v) for k, v in sorted(self.workers.items())},
        }


class ShipHandlers:
    """Mixed into :class:`~.session.DispatchSession`: the shipping events of its workers."""

    shipper: Shipper
    run_id: str
    config: pytest.Config
    _broker: Any

    def on_ship_wanted(self, event: Event, chunk: Any) -> None:
        if str(event.get("session_id", "")) in self.scheduler.slots:  # type: ignore[attr-defined]
            self.shipper.serve(self.run_id, event, self._publish_blobs)

    def on_ship_progress(self, event: Event, chunk: Any) -> None:
        """A slot receiving blobs is alive (the session has noted it)."""

    def on_shipped(self, event: Event, chunk: Any) -> None:
        for line in self.shipper.shipped(event):
            self.terminal.write_line(f"celery-dispatch: {line}")  # type: ignore[attr-defined]

    def _publish_blobs(self, queue: str, body: str) -> None:
        from .shipworker import blob_queue

        channel = self._broker.channel
        blob_queue(queue)(channel).declare()
        producer = self._broker.app.amqp.Producer(channel)
        producer.publish(
            body,
            exchange="",
            routing_key=queue,
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=1,  # a lost blob is asked again by the run's next attempt
        )

    def prepare_ship(self, nodeids: list[str]) -> bool:
        """Build the run's manifest before anything is sent. An escaping symlink or a file
        over a limit fails every dispatched test by name before any runs under ``always``;
        under ``auto`` the run goes on in the workers' own workspaces, as before, and says so.
        A manifest without a file the tests need (:mod:`.shipcheck`) fails them under both:
        no tree the run could ship describes it."""
        try:
            line = self.shipper.prepare()
            self.shipper.check_needed(nodeids, loaded_conftests(self.config))
        except MissingFiles as exc:
            self.shipper.error = str(exc)
            return self._refuse_ship(nodeids, exc)
        except ShipError as exc:
            self.shipper.error = str(exc)
            if self.shipper.settings.mode == "auto":
                self.terminal.notice(  # type: ignore[attr-defined]
                    f"not shipping the run's tree: {exc}; the workers run in their own "
                    "workspace (--celery-ship always would fail the run instead)"
                )
                return True
            return self._refuse_ship(nodeids, exc)
        if line:
            self.terminal.write_line(f"celery-dispatch: {line}")  # type: ignore[attr-defined]
        self.payloads.ship = self.shipper.payload()  # type: ignore[attr-defined]
        self.payloads.signer = self.shipper.settings.signer  # type: ignore[attr-defined]
        return True

    def _refuse_ship(self, nodeids: list[str], exc: Exception) -> bool:
        """Fail every dispatched test by name, before anything is sent."""
        message = f"celery-dispatch: cannot ship the run's tree: {exc}"
        self.terminal.write_line(message, red=True, bold=True)  # type: ignore[attr-defined]
        for nodeid in nodeids:
            self.replayer.fail_test(nodeid, message)  # type: ignore[attr-defined]
        return False


def loaded_conftests(config: pytest.Config) -> list[str]:
    """The ``conftest.py`` files pytest loaded for this run (plugins by their file name)."""
    found = []
    for plugin in config.pluginmanager.get_plugins():
        path = getattr(plugin, "__file__", None)
        if isinstance(path, str) and os.path.basename(path) == "conftest.py":
            found.append(path)
    return found
