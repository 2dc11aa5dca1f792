"""The lab board opened before pytest collects (startup.Prestart)."""

from __future__ import annotations

import sys

from pytest_celery_dispatch import transport
from pytest_celery_dispatch.labboard import AmqpBoard, FileBoard
from pytest_celery_dispatch.names import EMBEDDED
from pytest_celery_dispatch.startup import SWITCH_INTERVAL, Prestart


def test_the_app_and_board_are_handed_over_once_taken(tmp_path):
    seen = []
    prestart = Prestart(EMBEDDED, tmp_path, on_board=seen.append)
    app, board = prestart.take()
    assert isinstance(board, FileBoard)
    assert seen == [board]  # the run may join the line on it before collection
    assert transport.embedded_root_of(app) == tmp_path


def test_the_switch_interval_is_short_from_the_start_until_it_is_taken(tmp_path):
    """The board's thread takes its turns between collection's (traced on W1: with the
    default 5 ms its hello came after collection, and the line's wait after that)."""
    before = sys.getswitchinterval()
    prestart = Prestart(EMBEDDED, tmp_path)
    assert sys.getswitchinterval() == min(before, SWITCH_INTERVAL)
    prestart.take()
    assert sys.getswitchinterval() == before
    prestart.close()
    assert sys.getswitchinterval() == before


def test_a_board_never_taken_is_closed():
    prestart = Prestart("amqp://guest@127.0.0.1:1//", None)  # nobody there: it keeps trying
    assert isinstance(prestart.board, AmqpBoard)
    prestart.close()
    prestart.board._thread.join(5)
    assert not prestart.board._thread.is_alive()


def test_warming_the_send_path_is_best_effort():
    app = transport.make_app("amqp://guest@127.0.0.1:1//", "disabled")
    transport.warm_sending(app)  # no broker: nothing warmed, nothing raised
    assert app.backend is not None
