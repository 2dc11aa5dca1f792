"""A slot's tree: in place, refused, shipped, up to date (a fake fetcher instead of a broker)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pytest_celery_dispatch.manifest import build_manifest, walk_files
from pytest_celery_dispatch.shipcache import ShipCache
from pytest_celery_dispatch.shipworker import ShipState, prepare


def project(root: Path, version: int = 1) -> Path:
    (root / "pkg").mkdir(parents=True, exist_ok=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "test_a.py").write_text(f"VERSION = {version}\n")
    return root


def payload(root: Path, mode: str = "auto") -> dict:
    manifest = build_manifest(str(root), walk_files(str(root)))
    ship = {"mode": mode, "digest": manifest.digest, "manifest_size": len(manifest.canonical)}
    return {"run_id": "r", "queue": "q", "nodeids": ["test_a.py::t"], "ship": ship}


class FakeFetcher:
    """Copies the wanted blobs (and the manifest) from the controller's folder, as the broker
    would bring them; ``manifest`` replaces the manifest's bytes (a forged one)."""

    def __init__(self, root: Path, manifest: bytes | None = None) -> None:
        self.root = root
        self.manifest = manifest
        self.asked: list[set[str]] = []

    def __call__(self, missing: dict[str, int], cache: ShipCache, keep=None) -> dict:
        self.asked.append(set(missing))
        keep = keep or cache.add_blob
        manifest = build_manifest(str(self.root), walk_files(str(self.root)))
        tmp = Path(cache.tmp_dir())
        blobs = manifest.blobs()
        for sha in missing:
            if sha in blobs:
                shutil.copyfile(self.root / blobs[sha]["path"], tmp / sha)
            else:  # the manifest
                (tmp / sha).write_bytes(self.manifest or manifest.canonical)
            keep(sha, str(tmp / sha))
        return {"blobs_received": len(missing), "bytes_received": 0}


@pytest.fixture
def state(tmp_path: Path) -> ShipState:
    return ShipState({"DISPATCH_CACHE_DIR": str(tmp_path / "cache")})


def test_without_ship_or_with_off_the_workspace_is_used(tmp_path: Path, state) -> None:
    fetch = FakeFetcher(tmp_path)
    for data in ({}, {"ship": {"mode": "off"}}):
        found = prepare(data, str(tmp_path), state, fetch, "w", "amqp://x//")
        assert (found.workspace, found.info["state"], found.refused) == (
            str(tmp_path),
            "in place",
            None,
        )


def test_auto_with_a_matching_workspace_runs_in_place_unsigned(tmp_path: Path, state) -> None:
    root = project(tmp_path / "ctl")
    found = prepare(payload(root), str(root), state, FakeFetcher(root), "w", "amqp://x//")
    assert (found.workspace, found.info["state"], found.refused) == (str(root), "in place", None)


def test_unsigned_runs_are_not_shipped_unless_the_worker_allows_them(tmp_path: Path, state) -> None:
    root, empty = project(tmp_path / "ctl"), tmp_path / "empty"
    empty.mkdir()
    fetch = FakeFetcher(root)
    auto = prepare(payload(root), str(empty), state, fetch, "w", "amqp://x//")
    assert auto.info["state"] == "in place, differs"
    assert auto.refused is None
    always = prepare(payload(root, "always"), str(empty), state, fetch, "w", "amqp://x//")
    assert "DISPATCH_SHIP_UNSIGNED=allow" in str(always.refused)
    assert fetch.asked == [{payload(root)["ship"]["digest"]}]  # auto's manifest, no blob
    assert not list((tmp_path / "cache" / "blobs").rglob("*"))


def test_always_checks_who_sent_the_run_before_it_fetches_anything(tmp_path: Path, state) -> None:
    root, empty = project(tmp_path / "ctl"), tmp_path / "empty"
    empty.mkdir()
    fetch = FakeFetcher(root)
    always = prepare(payload(root, "always"), str(empty), state, fetch, "w", "amqp://x//")
    assert "DISPATCH_SHIP_UNSIGNED=allow" in str(always.refused)
    assert fetch.asked == []
    assert not list((tmp_path / "cache").rglob("*.json"))


def test_an_allowed_run_is_shipped_then_up_to_date_then_one_blob(tmp_path: Path) -> None:
    state = ShipState(
        {"DISPATCH_CACHE_DIR": str(tmp_path / "c"), "DISPATCH_SHIP_UNSIGNED": "allow"}
    )
    root, empty = project(tmp_path / "ctl"), tmp_path / "empty"
    empty.mkdir()
    fetch = FakeFetcher(root)
    first = prepare(payload(root), str(empty), state, fetch, "w", "amqp://x//")
    first.hold.close()
    assert first.info["state"] == "shipped"
    assert (Path(first.workspace) / "test_a.py").read_text() == "VERSION = 1\n"
    again = prepare(payload(root), str(empty), state, fetch, "w", "amqp://x//")
    again.hold.close()
    assert (again.info["state"], again.workspace) == ("up to date", first.workspace)
    project(root, version=2)
    edited = prepare(payload(root), str(empty), state, fetch, "w", "amqp://x//")
    edited.hold.close()
    # the manifest, its two blobs; nothing for the rerun; the edited manifest, the edited blob
    assert [len(asked) for asked in fetch.asked] == [1, 2, 1, 1]
    assert fetch.asked[2] == {payload(root)["ship"]["digest"]}
    assert (Path(edited.workspace) / "test_a.py").read_text() == "VERSION = 2\n"
    assert (Path(first.workspace) / "test_a.py").read_text() == "VERSION = 1\n"
    assert edited.info["shadowed"] == []


def test_the_embedded_broker_allows_unsigned_runs_by_default(tmp_path: Path, state) -> None:
    root, empty = project(tmp_path / "ctl"), tmp_path / "empty"
    empty.mkdir()
    found = prepare(payload(root, "always"), str(empty), state, FakeFetcher(root), "w", "embedded")
    found.hold.close()
    assert found.info["state"] == "shipped"


def test_a_manifest_that_does_not_match_its_digest_or_the_cache_is_refused(tmp_path: Path) -> None:
    env = {"DISPATCH_CACHE_DIR": str(tmp_path / "c"), "DISPATCH_SHIP_UNSIGNED": "allow"}
    root, empty = project(tmp_path / "ctl"), tmp_path / "empty"
    empty.mkdir()
    real = build_manifest(str(root), walk_files(str(root))).canonical
    forged = FakeFetcher(root, real.replace(b'"exec":false', b'"exec":true', 1))
    found = prepare(payload(root), str(empty), ShipState(env), forged, "w", "amqp://x//")
    assert "refused the run's manifest: the manifest does not match its digest" in str(
        found.refused
    )
    assert not list((tmp_path / "c" / "manifests").iterdir()), "a forged manifest is not kept"
    small = ShipState({**env, "DISPATCH_CACHE_LIMIT": "5"})
    found = prepare(payload(root), str(empty), small, FakeFetcher(root), "w", "amqp://x//")
    assert "raise its DISPATCH_CACHE_LIMIT" in str(found.refused)


def test_the_manifest_is_fetched_once_by_its_digest_and_kept(tmp_path: Path) -> None:
    env = {"DISPATCH_CACHE_DIR": str(tmp_path / "c"), "DISPATCH_SHIP_UNSIGNED": "allow"}
    root = project(tmp_path / "ctl")
    digest = payload(root)["ship"]["digest"]
    fetch = FakeFetcher(root)
    state = ShipState(env)
    for _ in range(2):  # two slots of one pool process
        found = prepare(payload(root), str(root), state, fetch, "w", "amqp://x//")
        assert (found.info["state"], found.info["digest"]) == ("in place", digest)
    assert fetch.asked == [{digest}]
    found = prepare(payload(root), str(root), ShipState(env), fetch, "w", "amqp://x//")
    assert found.info["state"] == "in place"
    assert fetch.asked == [{digest}], "another pool process reads it from the cache"
    assert (tmp_path / "c" / "manifests" / f"{digest}.json").read_bytes() == build_manifest(
        str(root), walk_files(str(root))
    ).canonical


@pytest.mark.parametrize(
    ("ship", "why"),
    [
        ({"digest": "x"}, "the session names no manifest digest"),
        ({"manifest_size": 0}, "its size 0 is not between 1 byte"),
        ({"manifest_size": 10**12}, "is not between 1 byte and 256.0 MB"),
        ({"manifest_size": "5"}, "its size '5' is not"),
    ],
)
def test_a_bad_digest_or_size_is_refused_before_anything_is_fetched(
    tmp_path: Path, state, ship: dict, why: str
) -> None:
    root = project(tmp_path / "ctl")
    data = payload(root)
    data["ship"].update(ship)
    fetch = FakeFetcher(root)
    found = prepare(data, str(root), state, fetch, "w", "amqp://x//")
    assert why in str(found.refused)
    assert fetch.asked == []


def test_a_manifest_that_is_not_json_or_not_canonical_is_refused(tmp_path: Path, state) -> None:
    import hashlib
    import json

    root = project(tmp_path / "ctl")
    real = json.loads(build_manifest(str(root), walk_files(str(root))).canonical)
    for text, why in (
        (b"\x80 not json", "the manifest is not JSON"),
        (json.dumps(real, indent=1).encode(), "not in its canonical form"),
        (json.dumps([{"path": "../x", "sha256": "0" * 64, "size": 1}]).encode(), "outside"),
    ):
        data = payload(root)
        data["ship"].update(digest=hashlib.sha256(text).hexdigest(), manifest_size=len(text))
        found = prepare(data, str(root), state, FakeFetcher(root, text), "w", "amqp://x//")
        assert why in str(found.refused), text


def test_an_expired_signature_is_refused_before_anything_is_fetched(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from pytest_celery_dispatch.shipsign import DEFAULT_MAX_AGE, Signer

    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "trust.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    root, empty = project(tmp_path / "ctl"), tmp_path / "empty"
    empty.mkdir()
    data = payload(root, "always")
    data["ship"] = Signer(private.decode(), "test", lambda: 1000.0)(data)
    env = {
        "DISPATCH_CACHE_DIR": str(tmp_path / "c"),
        "DISPATCH_SHIP_TRUST": str(tmp_path / "trust.pem"),
    }
    fetch = FakeFetcher(root)
    fresh = prepare(data, str(empty), ShipState(env, lambda: 1000.0 + 60), fetch, "w", "amqp://x//")
    fresh.hold.close()
    assert (fresh.info["state"], fresh.refused) == ("shipped", None)
    late = ShipState(
        {**env, "DISPATCH_CACHE_DIR": str(tmp_path / "c2")}, lambda: 1000.0 + DEFAULT_MAX_AGE + 1
    )
    old = prepare(data, str(empty), late, fetch, "w", "amqp://x//")
    assert "w does not run this shipped tree" in str(old.refused)
    assert "(DISPATCH_SHIP_MAX_AGE, 1.0 d)" in str(old.refused)
    assert len(fetch.asked) == 2, "the expired run fetched nothing (the fresh one: manifest, blobs)"


def test_one_slot_of_a_worker_fetches_at_a_time_however_many_wait(tmp_path: Path) -> None:
    """A slot that waited for the fetch lock while another fetched must still keep the next
    slot out (the lock file once went away with each fetch: a newcomer locked a new one)."""
    import os
    import threading
    import time

    from pytest_celery_dispatch.manifest import build_manifest
    from pytest_celery_dispatch.shipworker import _fill

    cache = ShipCache(str(tmp_path / "cache"))
    root = project(tmp_path / "ctl")
    manifest = build_manifest(str(root), walk_files(str(root)))
    inside = {name: threading.Event() for name in "abc"}
    leave = {name: threading.Event() for name in "abc"}

    def fetcher_of(name: str):
        def fetch(missing, cache):  # fetches nothing: each slot after it still misses blobs
            inside[name].set()
            assert leave[name].wait(30)
            return {}

        return fetch

    def waiting_for_a_lock() -> bool:
        with open("/proc/locks") as fh:
            return any("->" in line and f" {os.getpid()} " in line for line in fh)

    def until(condition) -> None:  # a guard against a hang, each condition comes at once
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    slots = {}
    for name in "abc":
        slots[name] = threading.Thread(
            target=_fill, args=(cache, manifest, fetcher_of(name)), daemon=True
        )
    slots["a"].start()
    until(inside["a"].is_set)
    slots["b"].start()
    until(waiting_for_a_lock)  # b waits for a's fetch
    leave["a"].set()
    until(inside["b"].is_set)
    slots["c"].start()
    until(lambda: inside["c"].is_set() or waiting_for_a_lock())
    assert not inside["c"].is_set(), "a third slot fetched beside the second"
    leave["b"].set()
    until(inside["c"].is_set)
    leave["c"].set()
    for slot in slots.values():
        slot.join(30)
