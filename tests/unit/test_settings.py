"""settings.py: precedence, validators, URL masking, default report name."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from pytest_celery_dispatch import settings as S

NOW = 1_700_000_000.0  # a fixed instant for the default report name


def getter(values: Mapping[str, Any]) -> Callable[[str], Any]:
    """A stand-in for ``config.getoption`` / ``config.getini``: None when unset."""
    return lambda name: values.get(name)


def resolve(
    option: Mapping[str, Any] | None = None,
    ini: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> S.Settings:
    return S.resolve(getter(option or {}), getter(ini or {}), environ or {}, NOW)


def test_defaults_when_nothing_is_set() -> None:
    settings = resolve()
    assert settings.dispatch is False
    assert settings.broker == S.DEFAULT_BROKER
    assert settings.backend == S.DEFAULT_BACKEND
    assert settings.default_queue is None
    assert settings.timeout == S.DEFAULT_TIMEOUT
    assert settings.wait_workers == S.DEFAULT_WAIT_WORKERS
    assert settings.retries == S.DEFAULT_RETRIES
    assert settings.allowed_queues is None
    assert settings.local_workers == ()


@pytest.mark.parametrize(
    ("option", "environ", "ini", "expected"),
    [
        pytest.param(
            "amqp://cli//",
            {"CELERY_BROKER_URL": "amqp://env1//", "BROKER_URL": "amqp://env2//"},
            "amqp://ini//",
            "amqp://cli//",
            id="command-line-first",
        ),
        pytest.param(
            None,
            {"CELERY_BROKER_URL": "amqp://env1//", "BROKER_URL": "amqp://env2//"},
            "amqp://ini//",
            "amqp://env1//",
            id="CELERY_BROKER_URL-before-BROKER_URL",
        ),
        pytest.param(
            None, {"BROKER_URL": "amqp://env2//"}, "amqp://ini//", "amqp://env2//", id="env-ini"
        ),
        pytest.param(None, {}, "amqp://ini//", "amqp://ini//", id="ini-before-default"),
    ],
)
def test_broker_precedence(
    option: str | None, environ: dict[str, str], ini: str, expected: str
) -> None:
    settings = resolve(
        option={"celery_broker": option},
        ini={"celery_dispatch_broker": ini},
        environ=environ,
    )
    assert settings.broker == expected


def test_blank_values_fall_through_to_the_next_source() -> None:
    settings = resolve(
        option={"celery_broker": ""},
        environ={"CELERY_BROKER_URL": "   ", "BROKER_URL": "redis://env:6379/0"},
    )
    assert settings.broker == "redis://env:6379/0"


def test_command_line_beats_ini_for_every_option() -> None:
    settings = resolve(
        option={
            "celery_timeout": "5",
            "celery_retries": "0",
            "celery_default_queue": "queue_cli",
            "celery_json_report": "cli.json",
        },
        ini={
            "celery_dispatch_timeout": "7",
            "celery_dispatch_retries": "4",
            "celery_dispatch_default_queue": "queue_ini",
            "celery_dispatch_json_report": "ini.json",
            "celery_dispatch_wait_workers": "0",
        },
    )
    assert settings.timeout == 5.0
    assert settings.retries == 0
    assert settings.default_queue == "queue_cli"
    assert settings.json_report == "cli.json"
    assert settings.wait_workers == 0.0  # only the ini gives it


def test_broker_timeout_command_line_beats_ini_beats_default() -> None:
    assert resolve().broker_timeout == S.DEFAULT_BROKER_TIMEOUT == 300.0
    assert resolve(ini={"celery_dispatch_broker_timeout": "45"}).broker_timeout == 45.0
    settings = resolve(
        option={"celery_broker_timeout": "20"}, ini={"celery_dispatch_broker_timeout": "45"}
    )
    assert settings.broker_timeout == 20.0
    with pytest.raises(pytest.UsageError) as excinfo:
        resolve(option={"celery_broker_timeout": "0"})
    assert "--celery-broker-timeout" in str(excinfo.value)
    with pytest.raises(pytest.UsageError) as excinfo:
        resolve(ini={"celery_dispatch_broker_timeout": "soon"})
    assert "ini celery_dispatch_broker_timeout" in str(excinfo.value)


def test_a_bad_ini_value_names_the_ini_key() -> None:
    with pytest.raises(pytest.UsageError) as excinfo:
        resolve(ini={"celery_dispatch_timeout": "abc"})
    assert "ini celery_dispatch_timeout" in str(excinfo.value)
    assert "'abc'" in str(excinfo.value)


def test_positive_float_accepts_numbers_of_seconds() -> None:
    assert S.parse_positive_float("0.5", "--celery-timeout") == 0.5
    assert S.parse_positive_float(" 300 ", "--celery-timeout") == 300.0


def test_positive_float_rejects_with_source_and_value() -> None:
    for raw in ("-1", "0", "abc", "nan", "inf", ""):
        with pytest.raises(pytest.UsageError) as excinfo:
            S.parse_positive_float(raw, "--celery-timeout")
        message = str(excinfo.value)
        assert "--celery-timeout" in message
        assert repr(raw) in message
        assert "greater than 0" in message


def test_non_negative_float_accepts_zero_and_rejects_junk() -> None:
    assert S.parse_non_negative_float("0", "--celery-wait-workers") == 0.0
    assert S.parse_non_negative_float("2.5", "--celery-wait-workers") == 2.5
    for raw in ("-1", "abc", "nan", "inf"):
        with pytest.raises(pytest.UsageError) as excinfo:
            S.parse_non_negative_float(raw, "--celery-wait-workers")
        assert "--celery-wait-workers" in str(excinfo.value)
        assert repr(raw) in str(excinfo.value)


def test_parse_retries() -> None:
    assert S.parse_retries("0", "--celery-retries") == 0
    assert S.parse_retries(" 3 ", "--celery-retries") == 3
    for raw in ("-1", "1.5", "abc", "nan"):
        with pytest.raises(pytest.UsageError) as excinfo:
            S.parse_retries(raw, "--celery-retries")
        assert "--celery-retries" in str(excinfo.value)
        assert repr(raw) in str(excinfo.value)


def test_parse_queue_name() -> None:
    assert S.parse_queue_name("queue_a", "--celery-default-queue") == "queue_a"
    assert S.parse_queue_name(" bench-1.x:y ", "--celery-default-queue") == "bench-1.x:y"
    for raw in ("", "two words", "a/b", "q" * 256, "é"):
        with pytest.raises(pytest.UsageError) as excinfo:
            S.parse_queue_name(raw, "--celery-default-queue")
        assert "--celery-default-queue" in str(excinfo.value)
        assert repr(raw) in str(excinfo.value)


def test_parse_queue_list_splits_strips_and_dedupes_in_order() -> None:
    source = "ini celery_dispatch_queues"
    assert S.parse_queue_list("queue_b, queue_a\nqueue_c,queue_b", source) == (
        "queue_b",
        "queue_a",
        "queue_c",
    )
    for raw in (" , ", "queue_a,bad/name"):
        with pytest.raises(pytest.UsageError, match=source):
            S.parse_queue_list(raw, source)


def test_parse_url_accepts_broker_urls() -> None:
    for url in (
        "amqp://guest@localhost//",
        "amqp:///",
        "pyamqp://u:p@h:5672/vh",
        "redis://h:6379/0",
    ):
        assert S.parse_url(url, "--celery-broker", S.BROKER_SCHEMES, "broker") == url


def test_embedded_is_a_broker_word_only() -> None:
    assert S.parse_url("embedded", "--celery-broker", S.BROKER_SCHEMES, "broker") == "embedded"
    assert S.parse_url("embedded://", "env BROKER_URL", S.BROKER_SCHEMES, "broker") == "embedded"
    with pytest.raises(pytest.UsageError, match="--celery-backend"):
        S.parse_url("embedded", "--celery-backend", S.BACKEND_SCHEMES, "backend")


def test_parse_url_rejects_malformed_broker_urls() -> None:
    for url in ("amqp//x", "http://x", "amqp://host:notaport//", "amqp://:5672"):
        with pytest.raises(pytest.UsageError) as excinfo:
            S.parse_url(url, "env BROKER_URL", S.BROKER_SCHEMES, "broker")
        message = str(excinfo.value)
        assert "env BROKER_URL" in message
        assert repr(url) in message
        assert "schemes: amqp" in message  # the accepted form is spelled out


def test_rejected_url_has_its_password_masked() -> None:
    with pytest.raises(pytest.UsageError) as excinfo:
        resolve(option={"celery_broker": "amqp://u:secret@host:notaport//"})
    message = str(excinfo.value)
    assert "secret" not in message
    assert "--celery-broker" in message
    assert "u:**@host:notaport" in message


def test_mask_url() -> None:
    assert "secret" not in S.mask_url("amqp://u:secret@h//")
    assert S.mask_url("amqp://u:secret@h//") == "amqp://u:**@h//"
    assert "secret" not in S.mask_url("redis://:secret@h:6379/0")
    for untouched in ("amqp://guest@localhost//", "amqp:///", "memory://", "embedded"):
        assert S.mask_url(untouched) == untouched


def test_settings_keep_the_password_but_display_it_masked() -> None:
    settings = resolve(environ={"CELERY_BROKER_URL": "amqp://u:secret@h//"})
    assert settings.broker == "amqp://u:secret@h//"
    assert "secret" not in settings.broker_masked


def test_default_json_report_name() -> None:
    name = resolve().json_report
    assert re.fullmatch(r"dispatch_results_\d{8}_\d{6}\.json", name)
    assert name == time.strftime("dispatch_results_%Y%m%d_%H%M%S.json", time.localtime(NOW))
    assert re.fullmatch(r"dispatch_results_\d{8}_\d{6}\.json", S.default_json_report_path())


def test_allowed_queues_from_ini_lines() -> None:
    settings = resolve(
        option={"celery_default_queue": "queue_b"},
        ini={"celery_dispatch_queues": ["queue_a", "queue_b,queue_c"]},
    )
    assert settings.allowed_queues == frozenset({"queue_a", "queue_b", "queue_c"})


def test_default_queue_missing_from_allowed_queues_is_a_usage_error() -> None:
    with pytest.raises(pytest.UsageError) as excinfo:
        resolve(
            option={"celery_default_queue": "queue_z"},
            ini={"celery_dispatch_queues": ["queue_a", "queue_b"]},
        )
    message = str(excinfo.value)
    assert "'queue_z'" in message
    assert "celery_dispatch_queues" in message
    assert "queue_a, queue_b" in message


@pytest.mark.parametrize(
    ("option", "ini", "expected"),
    [
        pytest.param(
            {},
            {"celery_dispatch_routes": ["tests/hw/* = queue_bb", "tests/sim/* = queue_a"]},
            "celery-dispatch: ini celery_dispatch_routes: route 'tests/hw/*': 'queue_bb' is an "
            "unknown queue (did you mean queue_b?); ini celery_dispatch_queues allows queue_a, "
            "queue_b. Fix the name or add the queue there.",
            id="ini-route",
        ),
        pytest.param(
            {},
            {"celery_dispatch_default_queue": "queue_c"},
            "celery-dispatch: ini celery_dispatch_default_queue: 'queue_c' is an unknown queue "
            "(did you mean queue_a or queue_b?); ini celery_dispatch_queues allows queue_a, "
            "queue_b. Fix the name or add the queue there.",
            id="ini-default-queue",
        ),
        pytest.param(
            {"celery_default_queue": "queue_zz"},
            {},
            "celery-dispatch: --celery-default-queue: 'queue_zz' is an unknown queue; "
            "ini celery_dispatch_queues allows queue_a, queue_b. Fix the name or add the queue "
            "there.",
            id="cli-default-queue-no-close-name",
        ),
    ],
)
def test_a_typo_in_an_ini_queue_names_the_setting_and_the_close_allowed_queue(
    option: dict[str, Any], ini: dict[str, Any], expected: str
) -> None:
    # The same words as for a marker (routing.check_queue_name), with where the name came from.
    with pytest.raises(pytest.UsageError) as excinfo:
        resolve(option=option, ini={"celery_dispatch_queues": "queue_a, queue_b", **ini})
    assert str(excinfo.value) == expected


def test_local_workers_auto_or_list() -> None:
    auto = resolve(option={"celery_local_workers": "auto"})
    assert auto.local_workers_auto is True
    assert auto.local_workers == ()
    listed = resolve(ini={"celery_dispatch_local_workers": "queue_a,queue_b"})
    assert listed.local_workers_auto is False
    assert listed.local_workers == ("queue_a", "queue_b")


def test_the_embedded_broker_keeps_results_beside_it_unless_told_otherwise() -> None:
    assert resolve(environ={"CELERY_BROKER_URL": "embedded"}).backend == "embedded"
    assert resolve(ini={"celery_dispatch_broker": "embedded"}).backend == "embedded"
    explicit = resolve(option={"celery_broker": "embedded", "celery_backend": "file:///tmp/r"})
    assert explicit.backend == "file:///tmp/r"
    assert resolve().backend == S.DEFAULT_BACKEND


def test_dist_defaults_to_load_and_the_command_line_beats_the_ini() -> None:
    assert resolve().dist == "load"
    assert resolve(ini={"celery_dispatch_dist": "loadfile"}).dist == "loadfile"
    both = resolve(option={"celery_dist": "loadgroup"}, ini={"celery_dispatch_dist": "loadfile"})
    assert both.dist == "loadgroup"


@pytest.mark.parametrize(
    ("option", "ini", "source"),
    [
        ({"celery_dist": "each"}, {}, "--celery-dist"),
        ({}, {"celery_dispatch_dist": "LoadFile"}, "ini celery_dispatch_dist"),
    ],
)
def test_a_bad_dist_names_its_source_and_the_accepted_modes(
    option: dict[str, str], ini: dict[str, str], source: str
) -> None:
    with pytest.raises(pytest.UsageError) as excinfo:
        resolve(option=option, ini=ini)
    bad = next(iter({**option, **ini}.values()))
    assert str(excinfo.value) == (
        f"celery-dispatch: invalid value {bad!r} for {source}: "
        "expected one of load, loadfile, loadscope, loadgroup"
    )


def test_health_tests_and_their_interval_from_the_ini() -> None:
    assert resolve().health == ()
    assert resolve().health_every is None
    settings = resolve(
        ini={
            "celery_dispatch_health": "tests/health/test_board.py::test_uart,\ntests/health/power",
            "celery_dispatch_health_every": "2.5",
        }
    )
    assert settings.health == ("tests/health/test_board.py::test_uart", "tests/health/power")
    assert settings.health_every == 2.5


def test_a_bad_health_interval_names_the_ini_key_and_the_form() -> None:
    with pytest.raises(pytest.UsageError) as info:
        resolve(ini={"celery_dispatch_health_every": "hourly"})
    assert str(info.value) == (
        "celery-dispatch: invalid value 'hourly' for ini celery_dispatch_health_every: give "
        "minutes (a number >= 0, e.g. 10)"
    )
