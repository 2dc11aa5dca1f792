"""A worker's pool keeps one process beside its slots for plain tasks."""

from __future__ import annotations

import types

from pytest_celery_dispatch.workerpool import reserve_plain_task_process, slots_of


def worker(concurrency, pool_cls="prefork", autoscale=None):
    return types.SimpleNamespace(concurrency=concurrency, pool_cls=pool_cls, autoscale=autoscale)


def test_prefork_pool_gets_one_more_process_and_the_slots_are_noted():
    env: dict[str, str] = {}
    w = worker(2)
    assert reserve_plain_task_process(w, env) == 2
    assert w.concurrency == 3
    assert env["DISPATCH_WORKER_CONCURRENCY"] == "2"
    assert slots_of(w, env) == 2


def test_the_pool_class_from_the_command_line_counts_as_prefork():
    from celery.concurrency.prefork import TaskPool

    w = worker(4, pool_cls=TaskPool)
    reserve_plain_task_process(w, {})
    assert w.concurrency == 5


def test_off_other_pools_autoscale_and_auto_keep_their_size():
    for w, env in (
        (worker(2), {"DISPATCH_PLAIN_TASK_PROCESS": "0"}),
        (worker(2, pool_cls="solo"), {}),
        (worker(2, pool_cls="threads"), {}),
        (worker(2, autoscale=(4, 2)), {}),
    ):
        assert reserve_plain_task_process(w, env) == 2
        assert w.concurrency == 2
    auto = worker("auto")
    assert reserve_plain_task_process(auto, {}) is None
    assert auto.concurrency == "auto"
