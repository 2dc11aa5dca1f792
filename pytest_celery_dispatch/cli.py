"""The ``celery-dispatch`` console command: ``celery-dispatch status --broker URL``.

``status`` listens to the lab board (see :mod:`.lab`, :mod:`.labboard`) for a moment and shows
per queue its workers (name, host, slots, idle or busy), the run holding each busy slot
(identity, progress, elapsed), the runs waiting with their priority and place in line, and each
worker's last run. It reads what workers and controllers publish and changes nothing.
``--json`` prints the same as one JSON object (for scripts); ``--watch`` shows it again every
few seconds until Ctrl-C. ``release WORKER`` puts a quarantined worker back in service (a
release notice on the board: the worker takes it and says so in its notice; see :mod:`.health`).
Subcommands share one parser and one ``--broker`` handling.
"""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from .lab import BOARD_WAIT, LAB_INTERVAL, RELEASE, ago, lab_view, workers
from .labboard import Board
from .names import mask_url

#: ``--watch``: seconds between two views.
WATCH_EVERY = 2.0
#: ``release``: how long it waits for the worker to say it is back in service.
RELEASE_WAIT = 10.0
BROKER_HELP = "broker URL or 'embedded' (default: env CELERY_BROKER_URL, then BROKER_URL)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celery-dispatch", description="pytest-celery-dispatch's lab tools"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser(
        "status", help="who uses the benches: workers, the runs holding them, the runs waiting"
    )
    status.add_argument("--broker", metavar="URL", help=BROKER_HELP)
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    status.add_argument("--watch", action="store_true", help="show it again every 2 s")
    release = commands.add_parser(
        "release", help="put a quarantined worker back in service (its health tests run again)"
    )
    release.add_argument("worker", metavar="WORKER", help="the worker's name (WORKER_ID) or node")
    release.add_argument("--broker", metavar="URL", help=BROKER_HELP)
    return parser


def render(view: dict[str, Any]) -> str:
    """The readable table of :func:`.lab.lab_view`."""
    now = float(view.get("time") or time.time())
    out: list[str] = []
    queues = view.get("queues") or {}
    if not queues:
        return "no worker or run on the board (workers and controllers of 0.1+ publish there)"
    for queue, entry in queues.items():
        out.append(f"{queue}")
        out.append(f"  {'worker':<24} {'host':<16} {'slots':>5}  state  run")
        for worker in entry["workers"]:
            busy = worker["busy"] or [None]
            for n, slot in enumerate(busy):
                head = (
                    f"  {worker['name']:<24} {worker.get('host') or '':<16} "
                    f"{worker['slots']:>5}  {worker['state']:<5}  "
                    if n == 0
                    else " " * 57
                )
                out.append(head + (_slot_text(slot) if slot else "-"))
            quarantine = worker.get("quarantine")
            if quarantine:
                out.append(
                    f"  {'':<24} QUARANTINED {ago(now - float(quarantine.get('since') or now))}: "
                    f"{quarantine.get('reason')} (celery-dispatch release {worker['name']})"
                )
            last = worker.get("last_run")
            if last:
                counts = ", ".join(f"{v} {k}" for k, v in sorted(last.get("outcomes", {}).items()))
                out.append(
                    f"  {'':<24} last run {str(last.get('run_id'))[:4]} "
                    f"({last.get('identity') or '?'}): {counts or 'no tests'}, "
                    f"ended {ago(now - float(last.get('finished') or now))}"
                )
        if entry["waiting"]:
            out.append("  waiting:")
            for run in entry["waiting"]:
                out.append(
                    f"    {run['position']}. run {str(run['run_id'])[:4]} priority "
                    f"{run['priority']}: {run.get('label') or '?'} ({run.get('total') or '?'} "
                    "tests)"
                )
        else:
            out.append("  waiting: nobody")
    return "\n".join(out)


def _slot_text(slot: dict[str, Any]) -> str:
    text = f"run {str(slot.get('run_id'))[:4]} ({slot.get('label') or '?'}"
    if slot.get("total"):
        text += f", {slot.get('done') or 0}/{slot['total']} tests"
    if slot.get("elapsed") is not None:
        text += f", {slot['elapsed']:.0f} s"
    return text + ")"


def open_lab(broker: str | None, command: str) -> tuple[Board, str] | None:
    """The lab board of ``--broker`` (else the environment's) and its URL; None (said on
    stderr, with the fix) when the broker does not answer."""
    from .celeryconf import broker_from_env
    from .labboard import open_board
    from .transport import BrokerUnavailable, connect, embedded_root_of, make_app

    url = broker or broker_from_env()
    app = make_app(url, "disabled")
    root = embedded_root_of(app)
    if root is None:
        try:
            connect(app).release()  # fail fast, with the fix, rather than show an empty lab
        except BrokerUnavailable as exc:
            fix = str(exc).replace("--celery-broker", "--broker")  # this command's option
            print(f"celery-dispatch {command}: {fix}", file=sys.stderr)
            return None
    return open_board(app, root), url


def heard_everyone(board: Board, command: str) -> bool:
    """Wait (up to ``BOARD_WAIT``) until the board has heard every live sender; False (said on
    stderr) when it is out of reach."""
    deadline = time.monotonic() + BOARD_WAIT
    while not board.ready:
        if time.monotonic() >= deadline:
            why = board.error or "no answer"
            print(
                f"celery-dispatch {command}: the lab board is out of reach ({why})", file=sys.stderr
            )
            return False
        time.sleep(0.02)
    return True


def status(broker: str | None, as_json: bool, watch: bool) -> int:
    opened = open_lab(broker, "status")
    if opened is None:
        return 1
    board, url = opened
    try:
        if not heard_everyone(board, "status"):
            return 1
        while True:
            view = lab_view(board.notices())
            view["broker"] = mask_url(url)
            if as_json:
                print(json.dumps(view, indent=None if watch else 2), flush=True)
            else:
                if watch:
                    print("\033[H\033[J", end="")
                print(f"celery-dispatch status: {mask_url(url)}\n{render(view)}", flush=True)
            if not watch:
                return 0
            time.sleep(WATCH_EVERY)
    except (KeyboardInterrupt, BrokenPipeError):  # Ctrl-C under --watch; `| head`
        return 0
    finally:
        board.close()


def release(broker: str | None, name: str) -> int:
    """``celery-dispatch release WORKER``: 0 once the worker's notice shows it in service."""
    opened = open_lab(broker, "release")
    if opened is None:
        return 1
    board, url = opened
    notice_id = f"release-{uuid.uuid4().hex[:12]}"
    try:
        if not heard_everyone(board, "release"):
            return 1
        matches = find_workers(board.notices(), name)
        if not matches:
            known = sorted({str(w.get("worker") or w["id"]) for w in workers(board.notices())})
            print(
                f"celery-dispatch release: no worker {name!r} on the board of {mask_url(url)} "
                f"(workers there: {', '.join(known) or 'none'}); see celery-dispatch status",
                file=sys.stderr,
            )
            return 1
        quarantined = [w for w in matches if w.get("quarantine")]
        if not quarantined:
            print(f"{name} is not quarantined: nothing to release")
            return 0
        if len(quarantined) > 1:
            nodes = ", ".join(sorted(str(w["id"]) for w in quarantined))
            print(
                f"celery-dispatch release: {len(quarantined)} quarantined workers are named "
                f"{name!r} ({nodes}): name one by its node",
                file=sys.stderr,
            )
            return 1
        found = quarantined[0]
        quarantine = found["quarantine"]
        notice = {
            "kind": RELEASE,
            "id": notice_id,
            "worker": found["id"],  # its node: another worker may have the same name
            "since": quarantine.get("since"),
            "by": f"{getpass.getuser()}@{socket.gethostname()}",
        }
        deadline = time.monotonic() + RELEASE_WAIT
        while time.monotonic() < deadline:
            board.publish(notice)
            time.sleep(LAB_INTERVAL)
            now = find_worker(board.notices(), str(found["id"]))
            if now is not None and (now.get("quarantine") or {}).get("since") != quarantine.get(
                "since"
            ):
                print(f"{name} released (it was quarantined: {quarantine.get('reason')})")
                return 0
        print(
            f"celery-dispatch release: {name} did not take the release within {RELEASE_WAIT:g}s "
            "(is it running? see its log and celery-dispatch status)",
            file=sys.stderr,
        )
        return 1
    finally:
        board.publish({"kind": RELEASE, "id": notice_id, "gone": True})
        board.close()


def find_workers(notices: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The worker notices whose name (WORKER_ID) or node is ``name``: a node names one worker,
    a name may be shared (``worker-a`` on two hosts)."""
    found = [w for w in workers(notices) if name in (w.get("worker"), w.get("node"), w.get("id"))]
    by_node = [w for w in found if name in (w.get("node"), w.get("id"))]
    return by_node or found


def find_worker(notices: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The first worker notice whose name (WORKER_ID) or node is ``name``."""
    found = find_workers(notices, name)
    return found[0] if found else None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "status":
        return status(args.broker, args.json, args.watch)
    if args.command == "release":
        return release(args.broker, args.worker)
    return 2  # pragma: no cover (argparse requires a command)


if __name__ == "__main__":
    sys.exit(main())
