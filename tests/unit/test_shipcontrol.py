"""The controller's side of shipping: the manifest travels by its digest and is served once
asked, like a blob, checked by the worker before it is parsed."""

from __future__ import annotations

import json
from pathlib import Path

from pytest_celery_dispatch.blobs import Assembler
from pytest_celery_dispatch.manifest import parse_manifest
from pytest_celery_dispatch.shipcontrol import Shipper, ShipSettings


def shipper(tmp_path: Path) -> Shipper:
    root = tmp_path / "ctl"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    for n in range(50):
        (root / f"test_{n}.py").write_text(f"def test(): assert {n}\n")
    found = Shipper(str(root), ShipSettings(mode="always"), [])
    found.prepare()
    return found


def test_the_slot_payload_names_the_manifest_by_digest_and_size(tmp_path: Path) -> None:
    ship = shipper(tmp_path)
    payload = ship.payload()
    assert ship.manifest is not None
    assert payload == {
        "mode": "always",
        "digest": ship.manifest.digest,
        "manifest_size": len(ship.manifest.canonical),
    }
    assert len(json.dumps(payload)) < 200  # whatever the tree's size


def test_the_manifest_is_served_when_asked_and_parses_as_the_controllers(tmp_path: Path) -> None:
    ship = shipper(tmp_path)
    manifest = ship.manifest
    assert manifest is not None
    sent: list[tuple[str, str]] = []
    event = {"worker": "w", "session_id": "s1", "blobs": [manifest.digest, "f" * 64]}
    ship.serve("run", event, lambda queue, body: sent.append((queue, body)))  # type: ignore[arg-type]
    assembler = Assembler({manifest.digest: len(manifest.canonical)}, str(tmp_path))
    done = [d for _, body in sent for item in json.loads(body) if (d := assembler.add(item))]
    ((_, path),) = done
    assert parse_manifest(Path(path).read_bytes(), manifest.digest) == manifest
    stats = ship.report()["workers"]["w"]
    assert (stats["manifests_sent"], stats["blobs_sent"]) == (1, 0)  # an unknown sha: nothing
    assert ship.report()["manifests_sent"] == 1
    assert stats["bytes_sent"] == sum(len(body) for _, body in sent)


def test_the_controllers_hash_cache_is_used_and_never_part_of_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "ctl"
    root.mkdir()
    (root / "test_a.py").write_text("def test(): pass\n")
    store = root / "cache" / "hashes.json"  # a cache_dir inside the rootdir, outside git
    store.parent.mkdir()
    store.write_text("{}")
    first = Shipper(str(root), ShipSettings(hash_file=str(store)), [])
    first.prepare()
    assert first.manifest is not None
    assert [e["path"] for e in first.manifest.entries] == ["test_a.py"]
    assert first.report()["files_hashed"] == 1
