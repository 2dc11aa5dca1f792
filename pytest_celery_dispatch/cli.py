"""The ``celery-dispatch`` console command: ``celery-dispatch status --broker URL``.

``status`` listens to the lab board (see :mod:`.lab`, :mod:`.labboard`) for a moment and shows
per queue its workers (name, host, slots, idle or busy), the run holding each busy slot
(identity, progress, elapsed), the runs waiting with their priority and place in line, and each
worker's last run. It reads what workers and controllers publish and changes nothing.
``--json`` prints the same as one JSON object (for scripts); ``--watch`` shows it again every
few seconds until Ctrl-C. Subcommands share one parser, so more (a ``release``) fit beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from .lab import BOARD_WAIT, ago, lab_view
from .names import mask_url

#: ``--watch``: seconds between two views.
WATCH_EVERY = 2.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celery-dispatch", description="pytest-celery-dispatch's lab tools"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser(
        "status", help="who uses the benches: workers, the runs holding them, the runs waiting"
    )
    status.add_argument(
        "--broker",
        metavar="URL",
        help="broker URL or 'embedded' (default: env CELERY_BROKER_URL, then BROKER_URL)",
    )
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    status.add_argument("--watch", action="store_true", help="show it again every 2 s")
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


def status(broker: str | None, as_json: bool, watch: bool) -> int:
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
            print(f"celery-dispatch status: {fix}", file=sys.stderr)
            return 1
    board = open_board(app, root)
    try:
        deadline = time.monotonic() + BOARD_WAIT
        while not board.ready:
            if time.monotonic() >= deadline:
                why = board.error or "no answer"
                print(
                    f"celery-dispatch status: the lab board is out of reach ({why})",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.02)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "status":
        return status(args.broker, args.json, args.watch)
    return 2  # pragma: no cover (argparse requires a command)


if __name__ == "__main__":
    sys.exit(main())
