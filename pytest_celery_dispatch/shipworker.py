"""A slot's side of shipping: which tree the run's tests run in, on this worker.

:func:`prepare` decides, before anything of the run is written or run:

* no ``ship`` in the payload (``--celery-ship off``): the workspace, in place, as before;
* ``always``: whether this worker takes the run's tree (below) is decided first, before
  anything is fetched;
* the session names the manifest by its digest (:func:`load_manifest`): parsed already, in the
  cache, else asked of the controller like a blob; its bytes are checked against the digest
  before they are parsed, then entry by entry (:func:`.manifest.check_entries`); a bad one
  refuses the run;
* ``auto`` and the workspace holds every file of the manifest as it is: in place (zero copy);
* otherwise the run's tree is needed, and only a run this worker may take code from gets it:
  a signed run whose signature verifies with a key of ``DISPATCH_SHIP_TRUST`` (a bad or
  untrusted signature refuses the run), or an unsigned run where ``DISPATCH_SHIP_UNSIGNED=allow``
  (the embedded broker, a private folder on one machine, allows them by default). Under
  ``auto`` an unsigned run not allowed falls back to the workspace in place, where differing
  test files are refused by name as before;
* the tree of the same manifest is already built: used as it is (``up to date``);
* else the missing blobs are asked of the controller (:class:`BlobFetcher`), verified, and the
  tree is built from the cache.

PYTEST_DONT_REWRITE: the worker side imports it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from .blobs import Assembler, BlobError
from .envdrift import shadowed, versions
from .manifest import MAX_MANIFEST_BYTES, Manifest, human_bytes, parse_manifest
from .names import (
    ENV_CACHE_LIMIT,
    ENV_SHIP_TRUST,
    ENV_SHIP_UNSIGNED,
    blob_queue_name,
    is_embedded,
    run_queue,
)
from .shipcache import ShipCache, remove_tree
from .shipsign import verify

log = logging.getLogger("pytest_celery_dispatch.worker")

#: Takes a received, verified blob (its sha256, its temporary file) into the cache.
Keep = Callable[[str, str], None]

#: No blob from the controller for this long: the transfer failed (seconds).
BLOB_SILENCE = 60.0
#: A slot fetching blobs tells the controller it is alive this often (seconds).
PROGRESS_INTERVAL = 2.0
#: The blob queue of a slot that died is deleted by the broker after this (ms).
BLOB_QUEUE_EXPIRES_MS = 10 * 60 * 1000

#: Manifests a worker process keeps parsed (a run's slots, and a second run's, share them).
MANIFESTS_KEPT = 4
#: What :func:`_refusal` answers for an unsigned run the worker does not take.
UNSIGNED = "unsigned"
_SHA256 = re.compile(r"[0-9a-f]{64}")

ALLOW = ("allow", "1", "yes", "true", "on")
REFUSE = ("refuse", "0", "no", "false", "off")


def unsigned_allowed(env: Mapping[str, str], broker_url: str | None) -> bool:
    value = env.get(ENV_SHIP_UNSIGNED, "").strip().lower()
    if value in ALLOW:
        return True
    if value in REFUSE:
        return False
    return is_embedded(broker_url)


def refusal_unsigned(worker: str) -> str:
    return (
        f"{worker} does not run shipped trees of unsigned runs (whoever can publish to its "
        "broker could run any code on it). Sign the run (--celery-ship-key, trusted by the "
        f"worker's {ENV_SHIP_TRUST}); or, on a bench whose broker (vhost) only trusted people "
        f"can publish to, set {ENV_SHIP_UNSIGNED}=allow in the worker's environment; or give "
        "the worker a checkout and run in place (--celery-ship off)"
    )


class ShipState:
    """What one worker process keeps for shipping: its cache, its versions (made when a run
    first needs them) and the last manifests it used, parsed."""

    def __init__(
        self, env: Mapping[str, str] | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.env = os.environ if env is None else env
        self.clock = clock  # wall time, for the signatures' age
        self._cache: ShipCache | None = None
        self._versions: dict[str, str] | None = None
        self.manifests: collections.OrderedDict[str, Manifest] = collections.OrderedDict()

    @property
    def cache(self) -> ShipCache:
        if self._cache is None:
            self._cache = ShipCache.from_env(self.env)
        return self._cache

    @property
    def versions(self) -> dict[str, str]:
        if self._versions is None:
            self._versions = versions()
        return self._versions


class Fetcher(Protocol):
    """Brings the blobs a slot lacks (:class:`BlobFetcher`; a fake in the unit tests) and
    hands each, verified, to ``keep`` (default: the cache's blobs)."""

    def __call__(
        self, missing: dict[str, int], cache: ShipCache, keep: Keep | None = None
    ) -> dict[str, Any]: ...


@dataclasses.dataclass
class Prepared:
    workspace: str
    info: dict[str, Any]
    refused: str | None = None
    hold: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)


def load_manifest(ship: Mapping[str, Any], state: ShipState, fetcher: Fetcher) -> Manifest:
    """The manifest a session names by its digest: parsed already, in the cache, else asked of
    the controller once (like a blob) and kept. Its bytes are checked against the digest before
    they are parsed (:func:`.manifest.parse_manifest`). ValueError: a bad manifest; BlobError
    or OSError: it did not arrive."""
    digest = ship.get("digest")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise ValueError(f"the session names no manifest digest ({digest!r})")
    if digest in state.manifests:
        state.manifests.move_to_end(digest)
        return state.manifests[digest]
    cache = state.cache
    data = cache.read_manifest(digest)
    if data is None:
        size = ship.get("manifest_size")
        if type(size) is not int or not 0 < size <= MAX_MANIFEST_BYTES:
            raise ValueError(
                f"its size {size!r} is not between 1 byte and {human_bytes(MAX_MANIFEST_BYTES)}"
            )
        fetcher({digest: size}, cache, cache.add_manifest)
        data = cache.read_manifest(digest)
        if data is None:
            raise BlobError("the manifest was received but is not in the cache")
    try:
        manifest = parse_manifest(data, digest)
    except ValueError:
        cache.drop_manifest(digest)
        raise
    state.manifests[digest] = manifest
    while len(state.manifests) > MANIFESTS_KEPT:
        state.manifests.popitem(last=False)
    return manifest


def _refusal(
    payload: Mapping[str, Any], state: ShipState, worker: str, broker_url: str | None
) -> str | None:
    """None when this worker may take the run's tree; else why not: a signature it does not
    take, or :data:`UNSIGNED` for an unsigned run it does not take."""
    if (payload.get("ship") or {}).get("signature"):
        why = verify(payload, state.env, state.clock())
        return f"{worker} does not run this shipped tree: {why}" if why else None
    return None if unsigned_allowed(state.env, broker_url) else UNSIGNED


def prepare(
    payload: Mapping[str, Any],
    workspace: str,
    state: ShipState,
    fetcher: Fetcher,
    worker: str,
    broker_url: str | None,
) -> Prepared:
    """Where this slot runs the run's tests (see the module's docstring)."""
    ship = payload.get("ship") or {}
    versions_info = {"versions": state.versions}
    if not ship or ship.get("mode") == "off":
        return Prepared(workspace, {"state": "in place", **versions_info})
    auto = ship.get("mode") == "auto"
    refused = None if auto else _refusal(payload, state, worker, broker_url)
    if refused:  # the tree is needed: who sent it is checked before anything is fetched
        why = refusal_unsigned(worker) if refused == UNSIGNED else refused
        return Prepared(workspace, {**versions_info, "state": "refused"}, why)
    try:
        manifest = load_manifest(ship, state, fetcher)
    except (BlobError, OSError) as exc:  # before ValueError: a BlobError is one
        why = f"{worker}: fetching the run's manifest failed: {exc}"
        return Prepared(workspace, {**versions_info, "state": "failed"}, why)
    except ValueError as exc:
        return Prepared(workspace, versions_info, f"{worker} refused the run's manifest: {exc}")
    info: dict[str, Any] = {
        "files": len(manifest.entries),
        "tree_bytes": manifest.total_size,
        "digest": manifest.digest,
        **versions_info,
    }
    cache = state.cache
    if auto:
        differ = cache.matches(workspace, manifest, worker)
        if not differ:
            return Prepared(workspace, {**info, "state": "in place"})
        info["differ"] = len(differ)
        info["differ_examples"] = differ[:3]
        refused = _refusal(payload, state, worker, broker_url)
        if refused == UNSIGNED:
            info["note"] = refusal_unsigned(worker)
            return Prepared(workspace, {**info, "state": "in place, differs"})
        if refused:
            return Prepared(workspace, {**info, "state": "refused"}, refused)
    if manifest.total_size > cache.limit:
        refused = (
            f"{worker} cannot hold the run's tree ({human_bytes(manifest.total_size)}) in its "
            f"cache of {human_bytes(cache.limit)}: raise its {ENV_CACHE_LIMIT}"
        )
        return Prepared(workspace, {**info, "state": "refused"}, refused)
    return _build(cache, manifest, fetcher, Prepared(workspace, info), worker)


def _build(
    cache: ShipCache, manifest: Manifest, fetcher: Fetcher, prepared: Prepared, worker: str
) -> Prepared:
    """The manifest's tree, built from the cache (missing blobs fetched) unless it is there,
    held while the slot runs."""
    info = prepared.info
    prepared.hold.callback(_evict, cache)  # after the run lets its tree go
    started = time.monotonic()
    try:
        _repair(cache, manifest, info)
        info["state"] = "up to date" if cache.built(manifest) else "shipped"
        for _ in range(2):  # again if the eviction took the tree before it was held
            if not cache.built(manifest):
                info.update(_fill(cache, manifest, fetcher))
                cache.materialize(manifest)
            prepared.hold.enter_context(cache.hold(manifest))
            if cache.built(manifest):
                break
        else:
            raise OSError("the tree was evicted twice while it was built")
    except (BlobError, OSError) as exc:
        prepared.hold.close()
        why = f"{worker}: shipping failed: {exc}"
        return Prepared(prepared.workspace, {**info, "state": "failed"}, why)
    info["seconds"] = round(time.monotonic() - started, 3)
    info["shadowed"] = shadowed(e["path"] for e in manifest.entries)
    prepared.workspace = cache.tree_path(manifest)
    return prepared


def _repair(cache: ShipCache, manifest: Manifest, info: dict[str, Any]) -> None:
    """A built tree whose files changed since (a test wrote into it) is built again."""
    if not cache.built(manifest):
        return
    changed = cache.changed(manifest)
    if not changed:
        return
    if not cache.drop(manifest, changed):
        raise OSError(
            f"files of the run's tree changed after it was built ({', '.join(changed[:3])}) and "
            "another run uses it now; run again when it ends"
        )
    log.warning("the run's tree had changed files, built again: %s", ", ".join(changed[:10]))
    info["rebuilt"] = changed[:10]


def _evict(cache: ShipCache) -> None:
    try:
        gone = cache.evict()
    except OSError as exc:
        log.warning("cache eviction failed: %s", exc)
        return
    if gone:
        log.info("cache over its limit: evicted %d trees and blobs", len(gone))


def _fill(cache: ShipCache, manifest: Manifest, fetcher: Fetcher) -> dict[str, Any]:
    """Fetch the blobs the cache lacks, one slot of this worker at a time (a second slot
    waits, then finds them there). The lock file stays (it goes with its tree's eviction):
    removed after each fetch, a slot still waiting on it would fetch beside a newcomer that
    locked a new file."""
    with open(cache.tree_path(manifest) + ".fetch", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            missing = cache.missing(manifest)
            if not missing:
                return {"blobs_received": 0, "bytes_received": 0}
            return fetcher(missing, cache)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def blob_queue(name: str) -> Any:
    """A slot's blob queue, as both sides declare it."""
    return run_queue(name, BLOB_QUEUE_EXPIRES_MS)


class BlobFetcher:
    """Asks the controller for blobs on the run's reply queue and takes them from this slot's
    blob queue (declared here, deleted after)."""

    def __init__(self, app: Any, emit: Callable[[dict[str, Any]], None], base: Mapping[str, Any]):
        self.app = app
        self.emit = emit
        self.queue = blob_queue_name(str(base["run_id"]), str(base["session_id"]))
        self.clock = time.monotonic

    def __call__(
        self, missing: dict[str, int], cache: ShipCache, keep: Keep | None = None
    ) -> dict[str, Any]:
        tmp = cache.tmp_dir()
        assembler = Assembler(missing, tmp)
        conn = self.app.connection_for_write()
        try:
            channel = conn.channel()
            blob_queue(self.queue)(channel).declare()
            self.emit({"type": "ship_wanted", "blobs": sorted(missing), "blob_queue": self.queue})
            self._receive(channel, assembler, keep or cache.add_blob)
            with contextlib.suppress(Exception):
                channel.queue_delete(queue=self.queue)
        finally:
            with contextlib.suppress(Exception):
                conn.release()
            remove_tree(tmp)
        return {"blobs_received": len(missing), "bytes_received": assembler.bytes_received}

    def _receive(self, channel: Any, assembler: Assembler, keep: Keep) -> None:
        heard = told = self.clock()
        while not assembler.done:
            now = self.clock()
            if now - told >= PROGRESS_INTERVAL:
                self.emit({"type": "ship_progress", "blobs_left": len(assembler.wanted)})
                told = now
            message = channel.basic_get(queue=self.queue, no_ack=True)
            if message is None:
                if now - heard > BLOB_SILENCE:
                    raise BlobError(
                        f"no blob from the controller for {BLOB_SILENCE:g}s "
                        f"({len(assembler.wanted)} still missing)"
                    )
                time.sleep(0.02)
                continue
            heard = now
            items = json.loads(message.body)
            if not isinstance(items, list):
                raise BlobError("a blob message is not a list")
            for item in items:
                done = assembler.add(item)
                if done is not None:
                    keep(*done)
