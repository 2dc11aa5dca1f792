"""transport.py: what the user reads when the broker cannot be reached (pure)."""

from __future__ import annotations

from pytest_celery_dispatch.transport import all_answered, unreachable_message

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


def test_the_workers_broadcast_ends_once_each_queue_has_its_consumers_answered():
    names, consumers = {"bench-a", "bench-b"}, {"bench-a": 2, "bench-b": 1}
    replies = {"other@lab": [{"name": "unrelated"}], "a1@lab": [{"name": "bench-a"}]}
    assert not all_answered(replies, names, consumers)  # the lab's other workers do not count
    replies["both@lab"] = [{"name": "bench-a"}, {"name": "bench-b"}, {"name": "x"}]
    assert all_answered(replies, names, consumers)  # one worker answers for two queues
    assert not all_answered({"a1@lab": None}, names, consumers)
