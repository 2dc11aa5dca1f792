"""The broker side started while pytest collects (startup.Prestart)."""

from __future__ import annotations

import pytest

from pytest_celery_dispatch import transport
from pytest_celery_dispatch.labboard import AmqpBoard, FileBoard
from pytest_celery_dispatch.names import EMBEDDED
from pytest_celery_dispatch.startup import Prestart


def test_what_the_start_made_is_handed_over_once_it_is_taken(tmp_path):
    prestart = Prestart(EMBEDDED, tmp_path).start()
    app, board = prestart.app_and_board()
    assert isinstance(board, FileBoard)
    started = prestart.take()
    assert started.app is app
    assert started.board is board
    assert started.error is None
    assert started.conn.connected
    prestart.close()  # taken: the caller's to close now
    assert started.conn.connected
    started.conn.release()


def test_a_start_never_taken_is_closed(tmp_path):
    prestart = Prestart(EMBEDDED, tmp_path).start()
    prestart._thread.join()
    conn = prestart._started.conn
    prestart.close()
    assert not conn.connected


def test_a_broker_out_of_reach_is_left_for_the_session_to_report_masked():
    prestart = Prestart("amqp://guest:secret@127.0.0.1:1//", None).start()
    started = prestart.take()
    try:
        assert isinstance(started.board, AmqpBoard)
        assert started.conn is None
        assert isinstance(started.error, transport.BrokerUnavailable)
        assert "127.0.0.1:1" in str(started.error)
        assert "secret" not in str(started.error)
    finally:
        started.board.close()


def test_a_failure_of_the_start_itself_is_raised_where_it_is_taken(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no app for you")

    monkeypatch.setattr(transport, "make_app", broken)
    prestart = Prestart("amqp://guest@127.0.0.1:1//", None).start()
    with pytest.raises(RuntimeError, match="no app for you"):
        prestart.app_and_board()
    with pytest.raises(RuntimeError, match="no app for you"):
        prestart.take()


def test_warming_the_send_path_is_best_effort():
    app = transport.make_app("amqp://guest@127.0.0.1:1//", "disabled")
    transport.warm_sending(app)  # no broker: nothing warmed, nothing raised
    assert app.backend is not None


def test_the_board_is_handed_to_on_board_in_the_thread_before_the_run_takes_it(tmp_path):
    seen = []
    prestart = Prestart(EMBEDDED, tmp_path, on_board=seen.append).start()
    _app, board = prestart.app_and_board()
    assert seen == [board]
    prestart.take().conn.release()
