"""A zygote prewarmed for a run that is gone from the lab board is killed while it collects."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_celery_dispatch.prewarmwatch import PrewarmWatch, runs_seen
from pytest_celery_dispatch.zygote import PREWARMED, SERVING

NODE, WORKER = "celery@bench-a", 4242
ME = {"kind": "worker", "id": NODE}


def run(run_id: str, gone: bool = False) -> dict:
    return {"kind": "run", "id": run_id, **({"gone": True} if gone else {})}


def test_runs_seen_are_live_until_said_gone_or_no_longer_renewed():
    live, gone = runs_seen([ME, run("r1"), run("r2", gone=True)], {"r3", "r1"})
    assert live == {"r1"}
    assert gone == {"r2", "r3"}


class StandIns:
    """Stand-in zygotes (a sleeping process leading its own group), each in its folder."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.procs: dict[Path, subprocess.Popen[bytes]] = {}

    def add(self, run_id: str, worker: int = WORKER, serving: bool = False) -> Path:
        proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
        folder = self.top / f"z-{run_id}"
        folder.mkdir()
        self.procs[folder] = proc
        record = {"key": f"{run_id}/queue_a", "pid": proc.pid, "worker": worker}
        (folder / PREWARMED).write_text(json.dumps(record))
        if serving:
            (folder / SERVING).write_text("")
        return folder

    def running(self, folder: Path) -> bool:
        return self.procs[folder].poll() is None


@pytest.fixture
def zygotes(tmp_path: Path) -> Iterator[StandIns]:
    stand_ins = StandIns(tmp_path)
    yield stand_ins
    for proc in stand_ins.procs.values():
        proc.kill()
        proc.wait()


def test_a_run_seen_and_then_gone_loses_its_collecting_zygote(zygotes):
    folder = zygotes.add("r1")
    watch = PrewarmWatch(NODE, str(zygotes.top), WORKER)
    assert watch.check([ME, run("r1")]) == []
    assert zygotes.running(folder)
    assert watch.check([ME]) == ["r1/queue_a"]  # not renewed for LAB_STALE: gone
    assert not zygotes.running(folder)
    assert not folder.exists()


def test_a_run_said_gone_loses_its_zygote_even_if_never_seen_live(zygotes):
    folder = zygotes.add("r1")
    watch = PrewarmWatch(NODE, str(zygotes.top), WORKER)
    assert watch.check([ME, run("r1", gone=True)]) == ["r1/queue_a"]
    assert not zygotes.running(folder)


def test_what_is_kept(zygotes):
    """A live run's zygote; one whose run was never seen (a board it could not reach: the
    prewarm's own limit applies); one that serves forks; another worker's."""
    live, unseen = zygotes.add("live"), zygotes.add("unseen")
    serving = zygotes.add("served", serving=True)
    other = zygotes.add("r1", worker=WORKER + 1)
    watch = PrewarmWatch(NODE, str(zygotes.top), WORKER)
    watch.check([ME, run("live"), run("served"), run("r1")])
    assert watch.check([ME, run("live"), run("r1", gone=True)]) == []
    assert watch.check([ME, run("live")]) == []
    for folder in (live, unseen, serving, other):
        assert zygotes.running(folder), folder.name
    assert watch.seen == {"live", "served"}  # a served zygote's run is remembered while it is


def test_a_worker_that_does_not_hear_its_own_notice_decides_nothing(zygotes):
    """Its board lost the broker: every notice looks stale, the runs are not gone."""
    folder = zygotes.add("r1")
    watch = PrewarmWatch(NODE, str(zygotes.top), WORKER)
    watch.check([ME, run("r1")])
    assert watch.check([]) == []
    assert watch.check([run("r1", gone=True)]) == []
    assert zygotes.running(folder)
    assert watch.check([ME]) == ["r1/queue_a"]
