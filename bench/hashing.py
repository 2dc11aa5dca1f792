"""Hashing a big tree outside git (issue #21): ``python -m bench.hashing [FILES]``.

A tree of FILES files (default 10,000; every tenth is 550 kB, the others 4 kB: about 590 MB)
in a temporary folder, outside git. Times, best of ``--rounds`` (default 3), in this process:

* the controller's manifest (``list_files`` and ``build_manifest``) without a hash cache (every
  file hashed, as before the cache), with a cache that knows nothing yet, with a warm cache and
  nothing changed, and with one file changed;
* a worker's check of its workspace under ``--celery-ship auto`` (``ShipCache.matches``) in a
  new pool process: without its hash file (every file hashed) and with it.

The hash cache's clock is moved past the files' times (files written less than 2 s before their
hashing are hashed again: a freshly made tree would otherwise never be remembered). It asserts
nothing; it prints one Markdown row per measurement.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pytest_celery_dispatch.hashcache import HashCache
from pytest_celery_dispatch.manifest import build_manifest, list_files
from pytest_celery_dispatch.shipcache import ShipCache


def make_tree(root: Path, count: int) -> None:
    rnd = random.Random(1)
    for n in range(count):
        folder = root / f"d{n // 200:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{n:05d}.py").write_bytes(rnd.randbytes(550_000 if n % 10 == 0 else 4096))


def best(rounds: int, setup: Callable[[], object], step: Callable[[object], object]) -> float:
    times = []
    for _ in range(rounds):
        made = setup()
        began = time.perf_counter()
        step(made)
        times.append(time.perf_counter() - began)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", type=int, nargs="?", default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cdhash-"))
    try:
        root = work / "tree"
        make_tree(root, args.files)
        clock = lambda: time.time_ns() + 10**10  # noqa: E731 (past the racy window)
        top = str(root)
        store = str(work / "controller.json")

        def manifest(hashes: HashCache | None) -> object:
            return build_manifest(top, list_files(top), hashes=hashes)

        built = build_manifest(top, list_files(top))
        size = built.total_size / 1e6
        print(f"{len(built.entries):,} files, {size:.0f} MB, load {os.getloadavg()[0]:.1f}\n")
        print(f"| measurement | seconds (best of {args.rounds}) |\n|---|---|")
        fresh = work / "fresh.json"

        def empty() -> HashCache:
            fresh.unlink(missing_ok=True)
            return HashCache(str(fresh), clock)

        rows = {
            "controller, listing the files only (`list_files`)": best(
                args.rounds, lambda: None, lambda _: list_files(top)
            ),
            "controller, no hash cache": best(args.rounds, lambda: None, manifest),
            "controller, empty hash cache": best(args.rounds, empty, manifest),
        }
        manifest(HashCache(store, clock))
        rows["controller, warm, nothing changed"] = best(
            args.rounds, lambda: HashCache(store, clock), manifest
        )
        changed = root / "d000" / "f00001.py"

        def one_changed() -> HashCache:
            changed.write_bytes(os.urandom(4096))
            return HashCache(store, lambda: time.time_ns() + 10**10)

        rows["controller, warm, one file changed"] = best(args.rounds, one_changed, manifest)
        built = build_manifest(top, list_files(top))
        cache_dir = str(work / "cache")

        def fresh_worker() -> ShipCache:
            shutil.rmtree(os.path.join(cache_dir, "hashes"), ignore_errors=True)
            return ShipCache(cache_dir, clock=clock)

        def check(cache: object) -> object:
            assert isinstance(cache, ShipCache)
            return cache.matches(top, built, "bench-worker")

        rows["worker pool process, no hash file"] = best(args.rounds, fresh_worker, check)
        rows["worker pool process, with its hash file"] = best(
            args.rounds, lambda: ShipCache(cache_dir, clock=clock), check
        )
        for name, seconds in rows.items():
            print(f"| {name} | {seconds:.3f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
