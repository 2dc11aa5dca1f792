"""Spare runners: real interpreters started ahead of time, activated with one session's order."""

from __future__ import annotations

import os

from pytest_celery_dispatch import runner
from pytest_celery_dispatch.runner import RunnerSpec, _Spare


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
    spare = _Spare(str(tmp_path), env)
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


def test_a_spare_that_started_differently_is_not_used(tmp_path):
    spare = _Spare(str(tmp_path), dict(os.environ, PYTHONPATH="/somewhere"))
    try:
        assert not spare.fits(spec_for(tmp_path, dict(os.environ, PYTHONPATH="/elsewhere")))
        assert not spare.fits(
            spec_for(tmp_path / "other", dict(os.environ, PYTHONPATH="/somewhere"))
        )
        assert spare.fits(spec_for(tmp_path, dict(os.environ, PYTHONPATH="/somewhere")))
    finally:
        spare.discard()
    assert spare.proc.poll() is not None


def test_a_spare_exits_when_its_worker_process_goes_away(tmp_path):
    spare = _Spare(str(tmp_path), dict(os.environ))
    os.close(spare.boot_w)  # what the pool process's death does to the boot pipe
    assert spare.proc.wait(30) == 0


def test_prepare_spare_keeps_one_and_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_spare", None)
    runner.prepare_spare(str(tmp_path), {**os.environ, runner.ENV_SPARE: "0"})
    assert runner._spare is None
    runner.prepare_spare(str(tmp_path), dict(os.environ))
    first = runner._spare
    assert first is not None
    runner.prepare_spare(str(tmp_path), dict(os.environ))
    assert runner._spare is first  # a live spare is kept
    taken = runner._take_spare(spec_for(tmp_path, dict(os.environ)))
    assert taken is first
    assert runner._spare is None
    taken.discard()


def test_a_spare_imports_no_plugin_before_pytest_configures(tmp_path):
    # pytest cannot rewrite the asserts of a plugin imported before it configures and warns
    # ("Module already imported so cannot be rewritten"): made an error here, it must not come.
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert True\n")
    spare = _Spare(str(tmp_path), dict(os.environ))
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
