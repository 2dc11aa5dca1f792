"""Shipping a 5,000-file tree (issue #21): ``python -m bench.ship``.

A project of 50 test modules (10 trivial tests each) and 4,950 data files of 2 kB, outside git,
dispatched to one ``-c 1`` worker started in an empty folder with an empty cache: the first run
(every blob sent), a rerun with nothing changed, a rerun after one file changed, and, for
comparison, the same run in place (``--celery-ship off``, the worker started in the project).
Prints one Markdown row per run: the controller's wall time, what ``dispatch.ship`` says.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BROKER = os.environ.get("CELERY_DISPATCH_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672//")


def make_tree(root: Path) -> None:
    for module in range(50):
        tests = "".join(f"def test_{i}():\n    pass\n\n" for i in range(10))
        (root / f"test_m{module:02d}.py").write_text(tests)
    data = root / "data"
    for n in range(4950):
        folder = data / f"d{n // 100:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{n:04d}.txt").write_text((f"{n:08d} " * 228)[:2048])


def start_worker(cwd: Path, queue: str, cache: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, CELERY_BROKER_URL=BROKER, BROKER_URL=BROKER, WORKER_ID="bench-ship")
    env.update(DISPATCH_CACHE_DIR=str(cache), DISPATCH_SHIP_UNSIGNED="allow")
    env["DISPATCH_WORKSPACE"] = str(cwd)
    command = [sys.executable, "-m", "celery", "-A", "pytest_celery_dispatch.worker", "worker"]
    command += ["-Q", queue, "-n", f"bench-ship-{queue}@%h", "-c", "1", "--without-gossip"]
    command += ["--without-mingle", "-l", "WARNING"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    time.sleep(4)  # then the controller's --celery-wait-workers covers the rest
    return proc


def dispatch(root: Path, queue: str, report: Path, *args: str) -> tuple[float, dict]:
    command = [sys.executable, "-m", "pytest", "--celery-dispatch", f"--celery-broker={BROKER}"]
    command += [f"--celery-default-queue={queue}", f"--rootdir={root}", "-q", "-p", "no:randomly"]
    command += [f"--celery-json-report={report}", "-p", "no:cacheprovider", *args]
    began = time.monotonic()
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
    wall = time.monotonic() - began
    if done.returncode != 0:
        raise SystemExit(done.stdout[-3000:])
    return wall, json.loads(report.read_text())["dispatch"]["ship"]


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-ship-"))
    root, empty, cache, out = (work / n for n in ("tree", "empty", "cache", "out"))
    for folder in (root, empty, cache, out):
        folder.mkdir()
    make_tree(root)
    queue = f"bench-ship-{uuid.uuid4().hex[:6]}"
    rows = []
    worker = start_worker(empty, queue, cache, out / "worker.log")
    try:
        for name, change in (
            ("first run", False),
            ("no change", False),
            ("one file changed", True),
        ):
            if change:
                (root / "data" / "d00" / "f0000.txt").write_text("changed\n")
            wall, ship = dispatch(root, queue, out / f"{len(rows)}.json")
            rows.append((name, wall, ship))
    finally:
        worker.terminate()
        worker.wait(30)
    worker = start_worker(root, queue, cache, out / "worker-in-place.log")
    try:
        for name in ("in place (--celery-ship off)", "in place (auto, workspace matches)"):
            args = ("--celery-ship=off",) if "off" in name else ()
            wall, ship = dispatch(root, queue, out / f"{len(rows)}.json", *args)
            rows.append((name, wall, ship))
    finally:
        worker.terminate()
        worker.wait(30)
    print(
        "| run | controller wall | manifest | manifests sent | blobs sent | bytes sent "
        "| worker: state, seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, wall, ship in rows:
        w = next(iter(ship["workers"].values()), {})
        print(
            f"| {name} | {wall:.2f} s | {ship['manifest_seconds']:.2f} s "
            f"| {ship.get('manifests_sent', 0)} | {ship['blobs_sent']} "
            f"| {ship['bytes_sent']:,} | {w.get('state')}, {w.get('seconds')} |"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
