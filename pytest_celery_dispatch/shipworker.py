"""A slot's side of shipping: which tree the run's tests run in, on this worker.

:func:`prepare` decides, before anything of the run is written or run:

* no ``ship`` in the payload (``--celery-ship off``): the workspace, in place, as before;
* the manifest is checked entry by entry (:func:`.manifest.check_entries`) and against its
  digest; a bad one refuses the run;
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

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from .blobs import Assembler, BlobError
from .envdrift import shadowed, versions
from .manifest import Manifest, check_entries, human_bytes
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

#: No blob from the controller for this long: the transfer failed (seconds).
BLOB_SILENCE = 60.0
#: A slot fetching blobs tells the controller it is alive this often (seconds).
PROGRESS_INTERVAL = 2.0
#: The blob queue of a slot that died is deleted by the broker after this (ms).
BLOB_QUEUE_EXPIRES_MS = 10 * 60 * 1000

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
    """What one worker process keeps for shipping: its cache and its versions, made when a
    run first needs them."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = os.environ if env is None else env
        self._cache: ShipCache | None = None
        self._versions: dict[str, str] | None = None

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


@dataclasses.dataclass
class Prepared:
    workspace: str
    info: dict[str, Any]
    refused: str | None = None
    hold: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)


def prepare(
    payload: Mapping[str, Any],
    workspace: str,
    state: ShipState,
    fetcher: Callable[[dict[str, int], ShipCache], dict[str, Any]],
    worker: str,
    broker_url: str | None,
) -> Prepared:
    """Where this slot runs the run's tests (see the module's docstring)."""
    ship = payload.get("ship") or {}
    versions_info = {"versions": state.versions}
    if not ship or ship.get("mode") == "off":
        return Prepared(workspace, {"state": "in place", **versions_info})
    try:
        manifest = check_entries(ship.get("manifest"), sys.maxsize, sys.maxsize)
        if manifest.digest != ship.get("digest"):
            raise ValueError("the manifest does not match its digest")
    except ValueError as exc:
        return Prepared(workspace, versions_info, f"{worker} refused the run's manifest: {exc}")
    info: dict[str, Any] = {
        "files": len(manifest.entries),
        "tree_bytes": manifest.total_size,
        "digest": manifest.digest,
        **versions_info,
    }
    cache = state.cache
    if ship.get("mode") == "auto":
        differ = cache.matches(workspace, manifest, worker)
        if not differ:
            return Prepared(workspace, {**info, "state": "in place"})
        info["differ"] = len(differ)
        info["differ_examples"] = differ[:3]
    if ship.get("signature"):
        why = verify(payload, state.env)
        if why:
            refused = f"{worker} does not run this shipped tree: {why}"
            return Prepared(workspace, {**info, "state": "refused"}, refused)
    elif not unsigned_allowed(state.env, broker_url):
        if ship.get("mode") == "auto":
            info["note"] = refusal_unsigned(worker)
            return Prepared(workspace, {**info, "state": "in place, differs"})
        return Prepared(workspace, {**info, "state": "refused"}, refusal_unsigned(worker))
    if manifest.total_size > cache.limit:
        refused = (
            f"{worker} cannot hold the run's tree ({human_bytes(manifest.total_size)}) in its "
            f"cache of {human_bytes(cache.limit)}: raise its {ENV_CACHE_LIMIT}"
        )
        return Prepared(workspace, {**info, "state": "refused"}, refused)
    prepared = Prepared(workspace, info)
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
        return Prepared(workspace, {**info, "state": "failed"}, f"{worker}: shipping failed: {exc}")
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


def _fill(
    cache: ShipCache,
    manifest: Manifest,
    fetcher: Callable[[dict[str, int], ShipCache], dict[str, Any]],
) -> dict[str, Any]:
    """Fetch the blobs the cache lacks, one slot of this worker at a time (a second slot
    waits, then finds them there)."""
    lock_path = cache.tree_path(manifest) + ".fetch"
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            missing = cache.missing(manifest)
            if not missing:
                return {"blobs_received": 0, "bytes_received": 0}
            return fetcher(missing, cache)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.unlink(lock_path)


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

    def __call__(self, missing: dict[str, int], cache: ShipCache) -> dict[str, Any]:
        tmp = cache.tmp_dir()
        assembler = Assembler(missing, tmp)
        conn = self.app.connection_for_write()
        try:
            channel = conn.channel()
            blob_queue(self.queue)(channel).declare()
            self.emit({"type": "ship_wanted", "blobs": sorted(missing), "blob_queue": self.queue})
            self._receive(channel, assembler, cache)
            with contextlib.suppress(Exception):
                channel.queue_delete(queue=self.queue)
        finally:
            with contextlib.suppress(Exception):
                conn.release()
            remove_tree(tmp)
        return {"blobs_received": len(missing), "bytes_received": assembler.bytes_received}

    def _receive(self, channel: Any, assembler: Assembler, cache: ShipCache) -> None:
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
                    cache.add_blob(*done)
