"""forwarding.py and replay.py pure helpers: options forwarded to workers, JSON tuples restored."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

from pytest_celery_dispatch.forwarding import forwarded_plugin_options, forwarded_pytest_args
from pytest_celery_dispatch.replay import restore_tuples
from pytest_celery_dispatch.runnerspec import RunnerSpec, runner_command, runner_options


def fake_config(**option: Any) -> Any:
    defaults: dict[str, Any] = {
        "tbstyle": "auto",
        "showlocals": False,
        "override_ini": None,
        "pythonwarnings": None,
        "importmode": "prepend",
        "verbose": 0,
        "timeout": None,
    }
    return SimpleNamespace(option=SimpleNamespace(**{**defaults, **option}))


def test_pytest_defaults_forward_nothing() -> None:
    assert forwarded_pytest_args(fake_config()) == []
    assert forwarded_pytest_args(fake_config(verbose=-1)) == []  # -q: a runner prints nothing
    assert forwarded_pytest_args(SimpleNamespace(option=SimpleNamespace())) == []  # type: ignore[arg-type]


def test_options_that_shape_a_run_are_forwarded_in_order() -> None:
    config = fake_config(
        tbstyle="short",
        showlocals=True,
        override_ini=["xfail_strict=true", "log_level=INFO"],
        pythonwarnings=["error::DeprecationWarning"],
        importmode="importlib",
        verbose=2,
        fulltrace=True,
        timeout=5.0,
    )
    assert forwarded_pytest_args(config) == [
        "--tb=short",
        "--showlocals",
        "-o",
        "xfail_strict=true",
        "-o",
        "log_level=INFO",
        "-W",
        "error::DeprecationWarning",
        "--import-mode=importlib",
        "--full-trace",
        "-vv",
    ]


def test_other_plugins_options_travel_as_values_not_arguments() -> None:
    # A worker without pytest-randomly must not refuse "--randomly-seed": these are applied
    # there only when the plugin exists.
    config = fake_config(timeout=5.0, randomly_seed=1234, reruns=2, reruns_delay=0.5, maxfail=0)
    assert forwarded_plugin_options(config) == {
        "timeout": 5.0,
        "randomly_seed": 1234,
        "reruns": 2,
        "reruns_delay": 0.5,
    }
    assert forwarded_plugin_options(fake_config()) == {}
    assert forwarded_pytest_args(fake_config(maxfail=3)) == ["--maxfail=3"]


def test_restore_tuples() -> None:
    report = SimpleNamespace(longrepr=["t.py", 3, "Skipped: no"], location=["t.py", 2, "test_x"])
    restore_tuples(report)
    assert report.longrepr == ("t.py", 3, "Skipped: no")
    assert report.location == ("t.py", 2, "test_x")

    untouched = SimpleNamespace(longrepr="E  assert 1 == 2", location=("t.py", 2, "test_x"))
    restore_tuples(untouched)
    assert untouched.longrepr == "E  assert 1 == 2"
    assert untouched.location == ("t.py", 2, "test_x")


def test_a_runner_takes_report_options_as_values_and_the_rest_on_its_command_line() -> None:
    # A runner has no terminal plugin, whose options these are: as arguments, its pytest would
    # refuse to start.
    forwarded = ["--tb=short", "-o", "-v", "--showlocals", "-W", "error", "-vv", "--full-trace"]
    spec = RunnerSpec(
        workspace="/bench",
        nodeids=["t.py::a"],
        timeout=1,
        pytest_args=[*forwarded, "--import-mode=importlib"],
        env={},
        plugin_options={"timeout": 5},
    )
    command = runner_command(spec, spec.nodeids, "/cache")
    assert command[command.index("no:terminal") - 1] == "-p"
    assert "-s" not in command
    assert command[command.index("--continue-on-collection-errors") + 3 :] == [
        "-o",
        "-v",  # the value of -o, not verbosity
        "-W",
        "error",
        "--import-mode=importlib",
        "-o",
        "cache_dir=/cache",
        "--",
        "t.py",
    ]
    assert runner_options(spec) == {
        "tbstyle": "short",
        "showlocals": True,
        "verbose": 2,
        "fulltrace": True,
        "timeout": 5,
    }
    assert "-s" in runner_command(dataclasses.replace(spec, stream=True), spec.nodeids, "/c")
