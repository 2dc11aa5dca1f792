"""Spare runners: real interpreters started ahead of time, activated with one session's order."""

from __future__ import annotations

import logging
import os

from pytest_celery_dispatch.names import ENV_PYCACHE, ENV_SPARE
from pytest_celery_dispatch.runnerspec import RunnerSpec, runner_env, runner_pycache
from pytest_celery_dispatch.spares import Spare, SparePool
from pytest_celery_dispatch.zygote import listen, sweep_zygotes


def spec_for(workspace, env) -> RunnerSpec:
    return RunnerSpec(workspace=str(workspace), nodeids=[], timeout=10, pytest_args=[], env=env)


def test_an_activated_spare_runs_pytest_in_the_order_s_directory_and_environment(tmp_path):
    (tmp_path / "test_here.py").write_text(
        "import os, sys\n"
        "def test_here():\n"
        "    assert os.environ['ORDER_VALUE'] == 'from-the-order'\n"
        "    assert 'SPARE_ONLY' not in os.environ\n"
        "    assert sys.path[0] == os.getcwd()\n"
        "    print('ran in', os.getcwd())\n"
    )
    env = dict(os.environ, SPARE_ONLY="1")
    spare = Spare(str(tmp_path), env)
    try:
        assert spare.fits(spec_for(tmp_path, dict(os.environ)))
        order_env = dict(os.environ, ORDER_VALUE="from-the-order")
        log = tmp_path / "runner.log"
        assert spare.activate(["-s", "-p", "no:cacheprovider", "test_here.py"], order_env, str(log))
        assert spare.proc.wait(60) == 0, log.read_text()
        out = log.read_text()
        assert f"ran in {tmp_path.resolve()}" in out
        assert "1 passed" in out
    finally:
        spare.discard()


def test_an_activated_spare_runs_pytest_as_python_m_pytest_would(tmp_path):
    # Its exit code is pytest's, and it adds nothing to the runner's log (a runner's crash
    # message quotes the log's tail): pytest 9.1 deprecated console_main(), which warned there.
    (tmp_path / "test_fails.py").write_text("def test_fails():\n    assert False\n")
    spare = Spare(str(tmp_path), dict(os.environ))
    log = tmp_path / "runner.log"
    try:
        args = ["-p", "no:cacheprovider", "test_fails.py"]
        assert spare.activate(args, dict(os.environ), str(log))
        assert spare.proc.wait(60) == 1, log.read_text()
        out = log.read_text()
        assert "1 failed" in out
        assert "Warning" not in out, out
    finally:
        spare.discard()


def test_a_spare_that_started_differently_is_not_used(tmp_path):
    spare = Spare(str(tmp_path), dict(os.environ, PYTHONPATH="/somewhere"))
    try:
        assert not spare.fits(spec_for(tmp_path, dict(os.environ, PYTHONPATH="/elsewhere")))
        reason = spare.unfit_reason(spec_for(tmp_path, dict(os.environ, PYTHONPATH="/elsewhere")))
        assert reason == "its start-up environment differs (PYTHONPATH)"
        assert not spare.fits(
            spec_for(tmp_path / "other", dict(os.environ, PYTHONPATH="/somewhere"))
        )
        assert spare.fits(spec_for(tmp_path, dict(os.environ, PYTHONPATH="/somewhere")))
    finally:
        spare.discard()
    assert spare.proc.poll() is not None


def ready_lines(caplog, spare) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "pytest_celery_dispatch.spares"
        and getattr(r, "spare_pid", 0) == spare.proc.pid
    ]


def test_a_spare_says_when_it_is_ready_for_an_order(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pytest_celery_dispatch.spares")
    spare = Spare(str(tmp_path), dict(os.environ))
    try:
        spare.watcher.join(60)  # it ends once the spare has said it (or has gone)
        assert spare.proc.poll() is None  # it waits for its order
        assert ready_lines(caplog, spare) == ["spare runner started", "spare runner ready"]
    finally:
        spare.discard()


def test_a_spare_given_its_order_before_it_is_ready_never_says_it_is(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pytest_celery_dispatch.spares")
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    spare = Spare(str(tmp_path), dict(os.environ), delay=60.0)
    try:
        log = tmp_path / "runner.log"
        assert spare.activate(["-p", "no:cacheprovider", "test_one.py"], dict(os.environ), str(log))
        assert spare.proc.wait(60) == 0, log.read_text()
        spare.watcher.join(60)
        assert not spare.watcher.is_alive()  # the runner it became did not keep the pipe
        assert ready_lines(caplog, spare) == ["spare runner started"]
    finally:
        spare.discard()


def test_a_spare_exits_when_its_worker_process_goes_away(tmp_path):
    spare = Spare(str(tmp_path), dict(os.environ))
    os.close(spare.boot_w)  # what the pool process's death does to the boot pipe
    assert spare.proc.wait(30) == 0


def test_prepare_spare_keeps_one_and_can_be_turned_off(tmp_path):
    pool = SparePool()
    pool.prepare(str(tmp_path), {**os.environ, ENV_SPARE: "0"})
    assert pool.waiting is None
    pool.prepare(str(tmp_path), dict(os.environ))
    first = pool.waiting
    assert first is not None
    pool.prepare(str(tmp_path), dict(os.environ))
    assert pool.waiting is first  # a live spare is kept
    taken = pool.take(spec_for(tmp_path, dict(os.environ)))
    assert taken is first
    assert pool.waiting is None
    taken.discard()


def test_what_a_spare_imports_before_pytest_configures_never_makes_pytest_warn(tmp_path):
    # pytest cannot rewrite the asserts of a plugin imported before it configures and warns
    # ("Module already imported so cannot be rewritten"): made an error here, it must not come.
    # The spare imports only pytest and this plugin's modules, which say PYTEST_DONT_REWRITE.
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert True\n")
    spare = Spare(str(tmp_path), dict(os.environ))
    log = tmp_path / "runner.log"
    try:
        args = [
            "-p", "pytest_celery_dispatch.runner", "-p", "no:cacheprovider",
            "-W", "error::pytest.PytestAssertRewriteWarning", "test_one.py",
        ]  # fmt: skip
        assert spare.activate(args, dict(os.environ), str(log))
        assert spare.proc.wait(60) == 0, log.read_text()
        assert "1 passed" in log.read_text()
    finally:
        spare.discard()


def test_runners_keep_bytecode_in_a_private_cache_outside_the_workspace(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, ENV_PYCACHE: str(cache), "PYTHONDONTWRITEBYTECODE": "1"}
    result = runner_env(env)
    assert result["PYTHONPYCACHEPREFIX"] == str(cache)
    assert "PYTHONDONTWRITEBYTECODE" not in result
    assert cache.stat().st_mode & 0o777 == 0o700
    # A folder others may write into is not trusted: Python's settings stay as they were.
    cache.chmod(0o777)
    assert runner_pycache(env) is None
    assert runner_env(env)["PYTHONDONTWRITEBYTECODE"] == "1"


def test_the_runner_bytecode_cache_can_be_turned_off_or_chosen_by_the_worker(tmp_path, monkeypatch):
    for off in ("off", "0"):
        env = {**os.environ, ENV_PYCACHE: off, "PYTHONDONTWRITEBYTECODE": "1"}
        assert runner_pycache(env) is None
        assert runner_env(env) == env
    own = {**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path / "mine")}
    own.pop(ENV_PYCACHE, None)
    assert runner_env(own)["PYTHONPYCACHEPREFIX"] == str(tmp_path / "mine")
    relative = {**os.environ, ENV_PYCACHE: "rel-cache"}
    relative.pop("PYTHONPYCACHEPREFIX", None)
    monkeypatch.chdir(tmp_path)
    assert runner_pycache(relative) == str(tmp_path / "rel-cache")
    default = {k: v for k, v in os.environ.items() if k not in ("PYTHONPYCACHEPREFIX",)}
    default.pop(ENV_PYCACHE, None)
    prefix = runner_pycache(default)
    assert prefix is not None
    assert prefix.endswith(os.path.join(f"-{os.getuid()}", "pycache"))


def test_a_read_only_workspace_s_test_modules_are_rewritten_once_then_read_from_the_cache(
    tmp_path,
):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "test_cached.py").write_text("def test_cached():\n    assert 1 + 1 == 2\n")
    workspace.chmod(0o555)
    cache = tmp_path / "cache"
    env = {**os.environ, ENV_PYCACHE: str(cache), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        for attempt in (1, 2):
            spare = Spare(str(workspace), env)
            log = tmp_path / f"runner-{attempt}.log"
            try:
                args = ["-p", "no:cacheprovider", "--debug=" + str(tmp_path / f"d{attempt}.log")]
                assert spare.activate([*args, "test_cached.py"], runner_env(env), str(log))
                assert spare.proc.wait(60) == 0, log.read_text()
            finally:
                spare.discard()
        first = (tmp_path / "d1.log").read_text()
        second = (tmp_path / "d2.log").read_text()
        assert "rewriting" in first
        assert "test_cached.py" in first
        assert "found cached rewritten pyc" in second
        cached = list(cache.rglob("test_cached.*pytest*.pyc"))
        assert cached, sorted(str(p) for p in cache.rglob("*"))
        assert not (workspace / "__pycache__").exists()
    finally:
        workspace.chmod(0o755)


def test_the_folders_of_killed_zygotes_are_swept_and_live_ones_kept(tmp_path):
    import socket

    dead = tmp_path / "z-dead"
    dead.mkdir()
    gone = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    gone.bind(str(dead / "sock"))
    gone.close()  # the socket file stays, nobody listens: a zygote killed with its worker
    (dead / "zygote.log").write_text("collected\n")
    live = tmp_path / "z-live"
    live.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(live / "sock"))
    listener.listen(1)
    other = tmp_path / "pycache"
    other.mkdir()
    try:
        sweep_zygotes(str(tmp_path))
        assert not dead.exists()
        assert (live / "sock").exists()
        assert other.exists()
    finally:
        listener.close()


def test_a_zygote_s_socket_appears_only_once_it_listens(tmp_path, monkeypatch):
    """A driver that starts a zygote connects as soon as its socket file exists: ``bind`` makes
    the file before ``listen``, and a connection in between is refused (the slot then started
    a cold runner of its own)."""
    import socket

    path = str(tmp_path / "sock")
    (tmp_path / "sock.new").write_text("")  # left by a zygote killed before it listened
    seen_before_listen: list[bool] = []
    real_listen = socket.socket.listen

    def observed_listen(self, *args):
        seen_before_listen.append(os.path.exists(path))
        return real_listen(self, *args)

    monkeypatch.setattr(socket.socket, "listen", observed_listen)
    listener = listen(path)
    try:
        assert seen_before_listen == [False]
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)  # ready as soon as it is there
        client.close()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["sock"]
    finally:
        listener.close()
