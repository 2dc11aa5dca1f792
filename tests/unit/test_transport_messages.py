"""transport.py: what the user reads when the broker cannot be reached (pure)."""

from __future__ import annotations

from pytest_celery_dispatch.transport import unreachable_message

URL = "amqp://guest:**@127.0.0.1:5672//"


def test_no_broker_names_rabbitmq_the_option_and_the_one_machine_way() -> None:
    text = unreachable_message(URL, "[Errno 111] Connection refused")
    assert text == (
        f"cannot reach the broker {URL}: [Errno 111] Connection refused; start RabbitMQ "
        "(rabbitmq-server -detached), pass --celery-broker URL, or try it on this machine: "
        "--celery-broker embedded --celery-local-workers auto"
    )
    assert "))" not in text


def test_refused_credentials_point_at_the_url_only() -> None:
    text = unreachable_message(URL, "(0, 0): (403) ACCESS_REFUSED", refused=True)
    assert text.endswith("; check the user name and password in the broker URL")
    assert "embedded" not in text
