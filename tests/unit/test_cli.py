"""``celery-dispatch status`` on the embedded broker's board (a folder): --json, the table,
--watch until Ctrl-C; it writes nothing to the board."""

from __future__ import annotations

import json
import time

import pytest

from pytest_celery_dispatch import cli, lab
from pytest_celery_dispatch.labboard import LAB_FOLDER, FileBoard


@pytest.fixture
def board(tmp_path, monkeypatch):
    monkeypatch.setenv("DISPATCH_EMBEDDED_DIR", str(tmp_path))
    board = FileBoard(tmp_path)
    board.publish(
        {
            "kind": "worker",
            "id": "w@h",
            "worker": "worker-a",
            "host": "h",
            "queues": ["q"],
            "slots": 1,
            "busy": [{"run_id": "aaaa1111", "queue": "q", "identity": "job A"}],
            "last": None,
        }
    )
    board.publish(
        {
            "kind": "run",
            "id": "aaaa1111",
            "priority": 5,
            "arrived": 1.0,
            "identity": {"label": "job A"},
            "queues": {"q": {"state": lab.HOLDING, "slots": 1, "done": 3, "total": 9}},
        }
    )
    board.publish(
        {
            "kind": "run",
            "id": "cccc3333",
            "priority": 9,
            "arrived": 3.0,
            "identity": {"label": "job C"},
            "queues": {"q": {"state": lab.WAITING, "total": 2}},
        }
    )
    return tmp_path


def files(root):
    return sorted((p.name, p.stat().st_mtime) for p in (root / LAB_FOLDER).iterdir())


def test_status_json_lists_the_busy_worker_and_the_line(board, capsys):
    before = files(board)
    assert cli.main(["status", "--broker", "embedded", "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    entry = view["queues"]["q"]
    assert entry["workers"][0]["busy"][0]["run_id"] == "aaaa1111"
    assert entry["workers"][0]["busy"][0]["done"] == 3
    assert [(w["run_id"], w["priority"], w["position"]) for w in entry["waiting"]] == [
        ("cccc3333", 9, 1)
    ]
    assert files(board) == before  # it only reads


def test_status_table_and_watch_until_ctrl_c(board, capsys, monkeypatch):
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        if seconds == cli.WATCH_EVERY and len([s for s in sleeps if s == seconds]) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.time, "sleep", sleep)
    assert cli.main(["status", "--broker", "embedded", "--watch"]) == 0
    out = capsys.readouterr().out
    assert out.count("celery-dispatch status: embedded") == 2
    assert "worker-a" in out
    assert "1. run cccc priority 9: job C (2 tests)" in out


def test_status_needs_a_command(capsys):
    with pytest.raises(SystemExit):
        cli.main([])
    assert "status" in capsys.readouterr().err


def test_status_on_an_unreachable_broker_fails_fast_naming_it(capsys):
    assert cli.main(["status", "--broker", "amqp://guest:secret@127.0.0.1:1//"]) == 1
    err = capsys.readouterr().err
    assert "127.0.0.1:1" in err
    assert "secret" not in err


# ----------------------------------------------------------------------------- release


@pytest.fixture
def quarantined_worker(tmp_path, monkeypatch):
    """worker-a's notices on the embedded board, from its own thread, quarantined."""
    from pytest_celery_dispatch.benchnotice import BenchNotices
    from pytest_celery_dispatch.health import HealthBook, HealthConfig, SessionHealth

    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setenv("DISPATCH_EMBEDDED_DIR", str(tmp_path))
    monkeypatch.setenv("DISPATCH_SLOT_GATE", str(gate))
    book = HealthBook(str(gate))
    SessionHealth(book, HealthConfig(after=1), str(tmp_path), {}, 30).after_failure(
        "runner", "the test process crashed outside a test (exit code 3)"
    )
    notices = BenchNotices(FileBoard(tmp_path), "worker-a@h", "worker-a", ["q"], 1)
    notices.start()
    deadline = time.monotonic() + 5.0
    while not (tmp_path / LAB_FOLDER / "worker-a@h.json").exists():  # its first notice
        assert time.monotonic() < deadline, "the worker published no notice"
        time.sleep(0.01)
    yield book
    notices.stop()
    notices.join(5)


def test_status_shows_a_quarantined_worker_and_why(quarantined_worker, capsys):
    assert cli.main(["status", "--broker", "embedded", "--json"]) == 0
    (worker,) = json.loads(capsys.readouterr().out)["queues"]["q"]["workers"]
    reason = (
        "a session ended in an infrastructure failure (the last: the test process "
        "crashed outside a test (exit code 3))"
    )
    assert worker["quarantine"]["reason"] == reason
    assert cli.main(["status", "--broker", "embedded"]) == 0
    table = capsys.readouterr().out
    assert f"QUARANTINED 0 s ago: {reason} (celery-dispatch release worker-a)" in table


def test_release_puts_the_worker_back_and_waits_until_it_says_so(quarantined_worker, capsys):
    assert cli.main(["release", "worker-a", "--broker", "embedded"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("worker-a released (it was quarantined: a session ended in an")
    assert quarantined_worker.quarantine() is None
    assert cli.main(["release", "worker-a", "--broker", "embedded"]) == 0
    assert capsys.readouterr().out == "worker-a is not quarantined: nothing to release\n"


def test_release_of_a_worker_not_on_the_board_names_the_ones_there(quarantined_worker, capsys):
    assert cli.main(["release", "worker-z", "--broker", "embedded"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("celery-dispatch release: no worker 'worker-z' on the board of embedded")
    assert "(workers there: worker-a)" in err
    assert quarantined_worker.quarantine() is not None


def test_release_by_a_shared_name_releases_the_quarantined_worker_of_that_name(
    quarantined_worker, tmp_path, capsys
):
    # Another worker of the same name (WORKER_ID) on another host, in service: the name alone
    # must not pick it and answer "not quarantined".
    other = {"kind": "worker", "id": "worker-a@0ther", "node": "worker-a@0ther"}
    FileBoard(tmp_path).publish({**other, "worker": "worker-a", "queues": ["q"], "slots": 1})
    assert cli.main(["release", "worker-a", "--broker", "embedded"]) == 0
    assert capsys.readouterr().out.startswith("worker-a released (it was quarantined: ")
    assert quarantined_worker.quarantine() is None


def test_a_node_names_one_worker_and_a_name_may_name_several():
    notices = [
        {"kind": "worker", "id": "worker-a@h1", "node": "worker-a@h1", "worker": "worker-a"},
        {"kind": "worker", "id": "worker-a@h2", "node": "worker-a@h2", "worker": "worker-a"},
    ]
    assert [w["id"] for w in cli.find_workers(notices, "worker-a")] == [
        "worker-a@h1",
        "worker-a@h2",
    ]
    assert [w["id"] for w in cli.find_workers(notices, "worker-a@h2")] == ["worker-a@h2"]
    assert cli.find_workers(notices, "worker-b") == []
